"""`ml.checkpoint`: the one reader / writer of the checkpoint format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from peft import LoraConfig, TaskType, get_peft_model
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from transformers import AutoModelForCausalLM
from transformers.utils import SAFE_WEIGHTS_NAME

from app.models_registry.catalog import local_base
from ml import checkpoint
from ml.checkpoint import CheckpointInfo
from ml.config import Task, TrainingKind
from ml.modeling import load_tokenizer


def test_importing_it_does_not_import_torch() -> None:
    code = "import sys, ml.checkpoint; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_file_names_are_the_libraries() -> None:
    """peft / transformers pick the file names; the torch-free readers must agree with them."""
    assert (checkpoint.ADAPTER_WEIGHTS, checkpoint.ADAPTER_CONFIG) == (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)
    assert checkpoint.MODEL_WEIGHTS == SAFE_WEIGHTS_NAME


def test_save_writes_weights_tokenizer_and_typed_info(tmp_path: Path) -> None:
    base = local_base("tiny-lm").path
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj"]))
    info = CheckpointInfo(task=Task.causal_lm, training_type=TrainingKind.lora, base_model="tiny-lm", step=3,
                          epoch=0.5, metrics={"valid_loss": 1.25}, base_checkpoint_key="jobs/j/final")
    checkpoint.save(tmp_path, model, load_tokenizer(base), info)
    assert checkpoint.read_info(tmp_path) == info
    assert checkpoint.is_adapter_dir(tmp_path) and checkpoint.adapter_kind(tmp_path) == "LORA"
    assert checkpoint.has_tokenizer(tmp_path) and not checkpoint.has_training_state(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} & checkpoint.NOT_EXPORTED == set()  # no model card
    # the adapter names its base by catalog id, never by a local path
    assert json.loads((tmp_path / checkpoint.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "tiny-lm"

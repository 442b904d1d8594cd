"""Load a base model for a task and apply a training type (full / freeze / lora / prompt_tuning).

Heads: classification/regression use AutoModelForSequenceClassification (BERT `classifier`, Llama
`score`), masked_lm AutoModelForMaskedLM, causal_lm AutoModelForCausalLM. "Head" means the modules
outside the backbone (`model.base_model`), minus anything shared with the input embeddings:

  freeze         only head parameters train. For causal LMs with tied embeddings the LM head is
                 untied first (a trainable copy of the embedding matrix; `tie_word_embeddings` becomes
                 false in the saved config), the input embeddings stay frozen.
  lora           LoRA on `target_modules`; seq-cls heads train via peft's modules_to_save; for
                 masked_lm the MLM transform trains too (the decoder is tied to the embeddings).
  prompt_tuning  learned virtual tokens (+ the head, as for lora). For token-level tasks the model's
                 logits include the virtual positions first: `forward_logits` strips them.

Pooling: a sequence head reads the pooled sentence vector the base model was trained to produce. Models
shipped as sentence-transformers (`1_Pooling/config.json` in mean mode, e.g. all-MiniLM) get their
[CLS] pooler replaced by a parameter-free masked mean (`use_pooling`); the mode is recorded as
`tunehouse_pooling` in the model config, so saved full models and served models pool the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from ml.config import Task, TrainingKind, TrainingTypeConfig
from ml.errors import InputError

AUTO_CLASSES: dict[Task, Any] = {
    Task.causal_lm: AutoModelForCausalLM,
    Task.classification: AutoModelForSequenceClassification,
    Task.regression: AutoModelForSequenceClassification,
    Task.masked_lm: AutoModelForMaskedLM,
}
PEFT_TASK: dict[Task, TaskType | None] = {
    Task.causal_lm: TaskType.CAUSAL_LM,
    Task.classification: TaskType.SEQ_CLS,
    Task.regression: TaskType.SEQ_CLS,
}
ADAPTER_KINDS = {TrainingKind.lora: "LORA", TrainingKind.qlora: "LORA", TrainingKind.prompt_tuning: "PROMPT_TUNING"}
POOLING_KEY = "tunehouse_pooling"  # model config attribute: "cls" (the architecture's own) or "mean"
SEQUENCE_TASKS = (Task.classification, Task.regression)


def pick_device(want: str = "auto") -> torch.device:
    """`auto` or "" (CUDA when present), `cpu`, `cuda` or `cuda:N`; the one device choice for training and serving."""
    if want in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (fp32 master weights), plain fp32 elsewhere: training and evaluation forwards."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence load reports and progress bars (newly initialised heads are expected here)."""
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    peft_log = logging.getLogger("peft")
    peft_level = peft_log.level
    peft_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        peft_log.setLevel(peft_level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_task_model(
    task: Task, path: Path, tok: PreTrainedTokenizerBase, label_names: list[str] | None
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {}
    if task is Task.classification:
        names = label_names or []
        kwargs.update(
            num_labels=len(names),
            problem_type="single_label_classification",
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
    elif task is Task.regression:
        kwargs.update(num_labels=1, problem_type="regression")
    if task in SEQUENCE_TASKS:
        kwargs["pad_token_id"] = tok.pad_token_id
    with quiet_transformers():
        model = AUTO_CLASSES[task].from_pretrained(path, dtype=torch.float32, **kwargs)
    if task in SEQUENCE_TASKS:
        use_pooling(model, pooling_mode(model, path))
    return model


# --- pooling ----------------------------------------------------------------------------------


class MeanPooling(torch.nn.Module):
    """Stands in for a BERT-style `pooler`: the mean of the unpadded last hidden states. The pooler
    only sees hidden states, so a pre-hook on the backbone hands it the attention mask first."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def capture_mask(self, _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if mask is not None else (args[1] if len(args) > 1 else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask, self.mask = self.mask, None
        if mask is None or mask.dim() != 2 or mask.shape[1] != hidden.shape[1]:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def sentence_transformers_pooling(path: Path) -> str | None:
    """"mean" / "cls" from a sentence-transformers model dir (`modules.json` -> Pooling config), else None."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        sub = next(m["path"] for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((path / sub / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return None
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls" if config.get("pooling_mode_cls_token") else None


def pooling_mode(model: PreTrainedModel, path: Path) -> str:
    """What the weights in `path` were trained with: a recorded mode, else the sentence-transformers config."""
    return str(getattr(model.config, POOLING_KEY, None) or sentence_transformers_pooling(path) or "cls")


def use_pooling(model: PreTrainedModel, mode: str) -> None:
    """Make a sequence-classification model pool with `mode` and record it in its config. Mean pooling
    needs a BERT-style `pooler` slot; other architectures keep their own pooling ("cls")."""
    backbone = model.base_model
    if mode == "mean" and getattr(backbone, "pooler", None) is not None:
        pooler = MeanPooling()
        backbone.pooler = pooler
        backbone.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)
    else:
        mode = "cls"
    setattr(model.config, POOLING_KEY, mode)


def load_adapter(model: PreTrainedModel, adapter_dir: Path, trainable: bool) -> PeftModel:
    if not (adapter_dir / SAFETENSORS_WEIGHTS_NAME).exists():  # peft would fall back to a pickle
        raise ValueError(f"{adapter_dir.name}: adapter weights must be in {SAFETENSORS_WEIGHTS_NAME}")
    with quiet_transformers():
        if not trainable:
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        # peft refuses trainable prompt-learning loads: rebuild the adapter, then load its weights
        config = PeftConfig.from_pretrained(str(adapter_dir))
        config.inference_mode = False
        config.base_model_name_or_path = model.name_or_path
        peft_model = get_peft_model(model, config)
        result: Any = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter_dir), device="cpu"))
    _check_adapter_load(adapter_dir, result.unexpected_keys, result.missing_keys)
    return peft_model


def _check_adapter_load(adapter_dir: Path, unexpected: list[str], missing: list[str]) -> None:
    """Everything saved must land, and every adapter parameter must come from the file."""
    unexpected = [k for k in unexpected if k != "prompt_embeddings"]  # loaded into the prompt encoder
    missing = [k for k in missing if "lora_" in k or "modules_to_save" in k]
    if unexpected or missing:
        raise RuntimeError(
            f"adapter {adapter_dir.name} does not match the model: "
            f"unexpected {unexpected[:5]}, missing {missing[:5]}"
        )


# --- training types ---------------------------------------------------------------------------


def apply_training_type(
    model: PreTrainedModel, task: Task, tt: TrainingTypeConfig, default_targets: list[str]
) -> torch.nn.Module:
    if tt.type is TrainingKind.full:
        model.requires_grad_(True)
        return model
    if tt.type is TrainingKind.freeze:
        freeze_backbone(model, task)
        return model
    with quiet_transformers():
        if tt.type is TrainingKind.lora:
            return get_peft_model(model, lora_config(model, task, tt, default_targets))
        return get_peft_model(model, prompt_tuning_config(model, task, tt))


def lora_config(
    model: PreTrainedModel, task: Task, tt: TrainingTypeConfig, default_targets: list[str]
) -> LoraConfig:
    targets = tt.lora_target_modules or default_targets or None
    return LoraConfig(
        r=tt.lora_r,
        lora_alpha=tt.lora_alpha,
        lora_dropout=tt.lora_dropout,
        target_modules=targets,
        task_type=PEFT_TASK.get(task),
        modules_to_save=head_modules(model) if task is Task.masked_lm else None,
    )


def prompt_tuning_config(model: PreTrainedModel, task: Task, tt: TrainingTypeConfig) -> PromptTuningConfig:
    # masked_lm: the token-classification wrapper prepends prompts and returns per-position logits
    task_type = PEFT_TASK.get(task) or TaskType.TOKEN_CLS
    return PromptTuningConfig(
        task_type=task_type,
        num_virtual_tokens=tt.num_virtual_tokens,
        modules_to_save=head_modules(model) if task is Task.masked_lm else None,
    )


def freeze_backbone(model: PreTrainedModel, task: Task) -> None:
    if task is Task.causal_lm:
        untie_output_embeddings(model)
    model.requires_grad_(False)
    for p in head_parameters(model):
        p.requires_grad_(True)


def untie_output_embeddings(model: PreTrainedModel) -> None:
    """Give the LM head its own copy of the (tied) embedding matrix; idempotent."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return
    out.weight = torch.nn.Parameter(inp.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}


def _shared_with_embeddings(model: PreTrainedModel) -> set[int]:
    return {id(p) for p in model.get_input_embeddings().parameters()}


def _head_children(model: PreTrainedModel) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_children() if m is not model.base_model]


def head_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    shared = _shared_with_embeddings(model)
    return [p for _, child in _head_children(model) for p in child.parameters() if id(p) not in shared]


def head_modules(model: PreTrainedModel) -> list[str]:
    """Largest head submodules that hold no embedding-tied weight (peft modules_to_save names)."""
    shared = _shared_with_embeddings(model)
    found: list[str] = []

    def visit(name: str, module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if not any(id(p) in shared for p in params):
            if params:
                found.append(name)
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}", child)

    for name, child in _head_children(model):
        visit(name, child)
    return found


# --- forward / save ---------------------------------------------------------------------------


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    if task in (Task.causal_lm, Task.masked_lm) and logits.shape[1] > ids.shape[1]:
        logits = logits[:, -ids.shape[1] :]  # prompt tuning: drop the virtual-token positions
    return logits


def save_weights(model: torch.nn.Module, out: Path, base_model_id: str,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = base_model_id  # a catalog id, not a local path
        with quiet_transformers():
            # save_embedding_layers=False: "auto" would look the base model up on the Hub
            model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
        (out / "README.md").unlink(missing_ok=True)
        return
    with quiet_transformers():
        cast(PreTrainedModel, model).save_pretrained(str(out), state_dict=state_dict)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# --- memory and speed: gradient checkpointing, QLoRA, packed forwards ----------------------------


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward instead of keeping them. Non-reentrant, so it
    works when no layer input requires grad (LoRA, prompt tuning); transformers also makes the input
    embeddings require grad, as peft needs. Numerically the same training (RNG state is replayed)."""
    base: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise InputError(f"{type(base).__name__} does not support gradient checkpointing",
                         param="gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        base.activation_checkpointing_enable(kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def upcast_trainable(model: torch.nn.Module) -> None:
    """fp32 master copies: trainable parameters (adapters, heads) stay fp32 whatever the compute dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def qlora_unavailable(device: torch.device) -> str | None:
    """Why this worker cannot train QLoRA (None: it can): 4-bit bitsandbytes kernels run on CUDA only."""
    missing = []
    if device.type != "cuda":
        missing.append(f"it trains on {device.type}")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install 'tunehouse[gpu]')")
    if not missing:
        return None
    return "QLoRA needs a CUDA worker with bitsandbytes; this worker has none: " + "; ".join(missing)


def load_quantized_model(path: Path, device: torch.device, compute_dtype: torch.dtype) -> PreTrainedModel:
    """A causal LM with its linear layers in 4-bit NF4 (double quantization) on `device`, prepared by peft
    for k-bit training (frozen, norms and head in fp32). Checkpointing is left to
    `enable_gradient_checkpointing`, as for every other training type."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute_dtype,
                                                     device_map={"": _cuda_index(device)})
    return cast(PreTrainedModel, prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def apply_qlora(model: PreTrainedModel, tt: TrainingTypeConfig, default_targets: list[str]) -> torch.nn.Module:
    """LoRA adapters (fp32) on a model from `load_quantized_model`."""
    with quiet_transformers():
        peft_model = get_peft_model(model, lora_config(model, Task.causal_lm, tt, default_targets))
    upcast_trainable(peft_model)
    return peft_model


def forward_packed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a packed batch (`ml.training.packing`): no 2D mask and no cache, so transformers reads
    the restarting position ids as example boundaries and keeps attention inside each example."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

"""Load a checkpoint written by `TrainingRecipe.save_checkpoint` for inference.

Adapters (lora / prompt_tuning) are loaded onto a fresh copy of the base with
`PeftModel.from_pretrained` (not merged); full / freeze checkpoints load directly. For prompt-tuned
causal/masked LMs the logits include `num_virtual_tokens` leading positions: use
`modeling.forward_logits`, which strips them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ml.checkpoint import CheckpointInfo, is_adapter_dir, read_info
from ml.modeling import load_adapter, load_task_model, load_tokenizer


def load_for_inference(
    ckpt_dir: Path, base_dir: Path, device: torch.device | str
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, CheckpointInfo]:
    """(model in eval mode on `device`, tokenizer, info). `base_dir` is only read for adapters."""
    ckpt_dir = Path(ckpt_dir)
    info = read_info(ckpt_dir)
    tokenizer = load_tokenizer(ckpt_dir)
    if is_adapter_dir(ckpt_dir):
        base = load_task_model(info.task, Path(base_dir), tokenizer, info.label_names)
        model: torch.nn.Module = load_adapter(base, ckpt_dir, trainable=False)
    else:
        model = load_task_model(info.task, ckpt_dir, tokenizer, info.label_names)
    return model.to(device).eval(), tokenizer, info

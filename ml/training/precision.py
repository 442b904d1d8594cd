"""Mixed precision for training: which compute dtype a job gets on this worker, and its loss scaler.

  auto  CUDA: bf16 autocast where the GPU has native bf16, else fp16 autocast with loss scaling
        (`torch.amp.GradScaler`); any other device: fp32.
  fp32  no autocast.
  bf16  CUDA with native bf16, or CPU autocast (torch supports it; it pays off on CPUs with AMX /
        AVX512-BF16 and is slower than fp32 elsewhere, so it is never chosen automatically).
  fp16  CUDA only: fp16 needs loss scaling, a GPU technique; a CPU worker refuses the job.

Parameters stay fp32 whatever the compute dtype (autocast casts per op), so the optimizer updates fp32
master weights. The scaler's state is part of the training state (`ml.training.state`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ml.errors import InputError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose(requested: str, device_type: str, native_bf16: bool) -> str:
    """The precision to train in (fp32 | bf16 | fp16); InputError when this device can't."""
    if requested == "auto":
        return ("bf16" if native_bf16 else "fp16") if device_type == "cuda" else "fp32"
    if requested == "fp32":
        return "fp32"
    if requested == "bf16" and (device_type == "cpu" or (device_type == "cuda" and native_bf16)):
        return "bf16"
    if requested == "fp16" and device_type == "cuda":
        return "fp16"
    why = "this GPU has no native bf16" if device_type == "cuda" else f"this worker trains on {device_type}"
    needs = "a CUDA worker" if requested == "fp16" else "a GPU with native bf16 (or a CPU worker)"
    raise InputError(f"precision '{requested}' needs {needs}; {why}. Use precision 'auto' or 'fp32'.",
                     param="precision")


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device: torch.device

    @classmethod
    def resolve(cls, requested: str, device: torch.device) -> Precision:
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return cls(choose(requested, device.type, native), device)

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self.dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16 only: bf16 has fp32's exponent range, so its gradients need no scaling."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None

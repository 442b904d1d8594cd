"""Peak training memory on one device, predicted before a job runs. Torch-free: the API's estimate and
the worker's pre-flight check share it.

The model's shape comes from its `config.json` (hidden size, layers, heads, vocabulary, MLP width) and
its parameter count from the safetensors headers (exact; the config's shape otherwise). The peak is

  weights      every base parameter in fp32 (the trainer loads fp32 and computes under autocast); QLoRA
               keeps the blocks' linear layers in NF4 (about half a byte per parameter with double
               quantization). Plus what training adds: adapters, virtual tokens, freeze's untied LM head.
  gradients    fp32, one per trainable parameter.
  optimizer    AdamW: two fp32 moments per trainable parameter.
  activations  what backward keeps per token: per layer, multiples of the hidden and MLP widths (as
               many with frozen weights: autograd keeps a frozen linear layer's input all the same),
               the inputs of LoRA layers, and on CPU the attention matrices (CUDA's fused attention
               keeps none); plus the logits (fp32 logits, their shifted copy, log-softmax, gradient).
               Gradient checkpointing keeps only each layer's input and rebuilds one layer at a time.
               Freeze trains the head alone: no backward through the layers.

The constants were fitted to peaks measured on CPU (resident memory, tiny Llama and BERT models of 2 and
6 layers); tests/ml/training/test_memory_speed.py checks them against real runs. A prediction, not a bound.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Any, Literal

from ml.config import LORA_KINDS, Task, TrainingKind

GIB = 1 << 30
FP32 = 4
HEADROOM = 0.9  # a job "fits" when its predicted peak stays under this share of the device
NF4_BYTES = 0.52  # 4-bit weights plus double-quantized block constants, per parameter
LOGIT_BYTES = 16  # per token and vocabulary entry: fp32 logits, shifted copy, log-softmax, gradient
GATED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"}
# Elements kept per token and layer, as (hidden multiples, MLP-width multiples) for gated / plain MLPs.
ACT_LAYER = {True: (10, 4), False: (10, 2)}
# Attention matrices kept per token, layer and head (times the sequence length) on CPU: about one
# (fitted: tiny-lm, SmolLM2), four with attention dropout (scores, probabilities, mask, dropped ones).
ATT_COPIES = {False: 1, True: 4}
HALF_PRECISIONS = ("bf16", "fp16")


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool
    tied_embeddings: bool
    attention_dropout: bool = False

    @property
    def layer_linear_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * h * q + 2 * h * kv + (3 if self.gated_mlp else 2) * h * self.intermediate

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in, out) features of a LoRA target module by name (unknown names: hidden x hidden)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "c_attn": (h, 3 * h),
                  "c_fc": (h, i), "fc1": (h, i), "fc2": (i, h)}
        return shapes.get(name.rsplit(".", 1)[-1], (h, h))


@dataclass(frozen=True)
class Workload:
    """One micro-batch of a job, as the memory model sees it."""

    task: Task
    kind: TrainingKind
    rows: int  # sequences per micro-batch
    seq_len: int  # tokens per sequence (the longest one: the others are padded to it)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "cpu"  # cpu | cuda: where attention matrices are materialized or fused away
    checkpointing: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    virtual_tokens: int = 0
    num_labels: int = 2
    world: int = 1  # processes of a data-parallel group: each takes its share of a micro-batch's rows
    sharded: bool = False  # FSDP: weights, gradients and optimizer state split across the `world`

    @property
    def rank_rows(self) -> int:
        return -(-self.rows // max(1, self.world))


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    trainable_params: int
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes

    def fits(self, device_bytes: int | None) -> bool | None:
        return None if device_bytes is None else self.peak_bytes <= HEADROOM * device_bytes

    def as_dict(self, device_bytes: int | None) -> dict[str, Any]:
        return {"weights_bytes": self.weights_bytes, "gradients_bytes": self.gradients_bytes,
                "optimizer_bytes": self.optimizer_bytes, "activations_bytes": self.activations_bytes,
                "peak_bytes": self.peak_bytes, "device_bytes": device_bytes, "fits": self.fits(device_bytes),
                "gradient_checkpointing": self.checkpointing}

    def summary(self) -> str:
        parts = (("weights", self.weights_bytes), ("gradients", self.gradients_bytes),
                 ("optimizer", self.optimizer_bytes), ("activations", self.activations_bytes))
        return f"{gib(self.peak_bytes)} peak (" + ", ".join(f"{n} {gib(b)}" for n, b in parts) + ")"


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# --- the model's shape ----------------------------------------------------------------------------

def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def shape_from_config(config: dict[str, Any], params: int | None = None) -> ModelShape | None:
    """None when the config lacks the sizes (not a transformer this model knows)."""
    config = config.get("text_config") or config
    sizes = [_first(config, "hidden_size", "n_embd", "d_model"), _first(config, "num_hidden_layers", "n_layer"),
             _first(config, "num_attention_heads", "n_head"), config.get("vocab_size")]
    if not all(isinstance(v, int) and v > 0 for v in sizes):
        return None
    hidden, layers, heads, vocab = (int(v) for v in sizes)
    dropout = float(_first(config, "attention_probs_dropout_prob", "attention_dropout", "attn_pdrop") or 0) > 0
    shape = ModelShape(
        params=0, hidden=hidden, layers=layers, vocab=vocab,
        intermediate=int(_first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden),
        heads=heads, kv_heads=int(_first(config, "num_key_value_heads") or heads),
        head_dim=int(_first(config, "head_dim") or hidden // heads),
        gated_mlp=config.get("model_type") in GATED_TYPES or config.get("hidden_act") == "silu",
        tied_embeddings=bool(config.get("tie_word_embeddings", True)), attention_dropout=dropout,
    )
    embeddings = vocab * hidden * (1 if shape.tied_embeddings else 2)
    return replace(shape, params=params or layers * (shape.layer_linear_params + 2 * hidden) + embeddings)


def safetensors_params(path: Path) -> int | None:
    """Parameters stored in the directory's safetensors files, from their headers alone."""
    total, files = 0, sorted(path.glob("*.safetensors"))
    for file in files:
        with file.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total if files else None


def shape_from_dir(path: Path) -> ModelShape | None:
    """The shape of the model in `path`; None without a readable config.json."""
    try:
        config = json.loads((path / "config.json").read_text())
        params = safetensors_params(path)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return shape_from_config(config, params) if isinstance(config, dict) else None


# --- the estimate ---------------------------------------------------------------------------------

def trainable_params(shape: ModelShape, w: Workload) -> int:
    h = shape.hidden
    head = (h + 1) * w.num_labels if w.task in (Task.classification, Task.regression) else 0
    if w.kind is TrainingKind.full:
        return shape.params
    if w.kind is TrainingKind.freeze:
        return shape.vocab * h if w.task is Task.causal_lm else head or h * h  # masked_lm: the MLM transform
    if w.kind in LORA_KINDS:
        per_layer = sum(w.lora_r * sum(shape.module_shape(m)) for m in _targets(w.lora_targets))
        return shape.layers * per_layer + head
    return w.virtual_tokens * h + head  # prompt tuning


def _targets(names: tuple[str, ...]) -> tuple[str, ...]:
    if "all-linear" in names:
        return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return names


def weight_bytes(shape: ModelShape, w: Workload, trainable: int) -> int:
    base = shape.params * FP32
    if w.kind is TrainingKind.qlora:
        quantized = shape.layers * shape.layer_linear_params
        base = int(quantized * NF4_BYTES) + (shape.params - quantized) * FP32
    if w.kind is TrainingKind.freeze and w.task is Task.causal_lm and shape.tied_embeddings:
        return base + trainable * FP32  # the untied copy of the LM head
    return base + (trainable * FP32 if w.kind is not TrainingKind.full else 0)


def activation_bytes(shape: ModelShape, w: Workload) -> int:
    """Kept for backward, plus one layer's transients (a forward without grad, backward's temporaries)."""
    tokens = w.rank_rows * (w.seq_len + w.virtual_tokens)
    lm = w.task in (Task.causal_lm, Task.masked_lm)
    per_token = 2 * shape.hidden * FP32 + (shape.vocab * LOGIT_BYTES if lm else 0)  # embeddings, norm, logits
    layer = _layer_bytes(shape, w)
    if w.kind is TrainingKind.freeze:
        kept = 0
    elif w.checkpointing:
        kept = shape.layers * shape.hidden * FP32 + layer  # the layer inputs, and one layer rebuilt at a time
    else:
        kept = shape.layers * layer
    return tokens * (per_token + kept + layer)


def _layer_bytes(shape: ModelShape, w: Workload) -> int:
    """Bytes one layer keeps per token."""
    a_h, a_i = ACT_LAYER[shape.gated_mlp]
    elem = 2 if w.precision in HALF_PRECISIONS else FP32
    one_layer = (a_h * shape.hidden + a_i * shape.intermediate) * elem
    if w.kind in LORA_KINDS:
        one_layer += 2 * len(_targets(w.lora_targets)) * shape.hidden * elem  # LoRA inputs (after dropout)
    if w.device != "cuda":
        one_layer += ATT_COPIES[shape.attention_dropout] * shape.heads * (w.seq_len + w.virtual_tokens) * elem
    return one_layer


def estimate(shape: ModelShape, w: Workload) -> MemoryEstimate:
    """One device's peak. Under FSDP a device keeps 1/world of the weights, gradients and optimizer
    state, plus whole copies of two blocks (the one computing and the next, gathered ahead)."""
    trainable = trainable_params(shape, w)
    weights, grads = weight_bytes(shape, w, trainable), trainable * FP32
    notes = []
    if w.sharded and w.world > 1:
        gathered = 2 * shape.layer_linear_params * FP32
        weights, grads = -(-weights // w.world) + gathered, -(-grads // w.world)
        notes.append(f"sharded over {w.world} devices")
    return MemoryEstimate(weights, grads, 2 * grads, activation_bytes(shape, w), trainable, w.checkpointing,
                          notes)


def plan(shape: ModelShape, w: Workload, setting: bool | str, available: int | None) -> MemoryEstimate:
    """The estimate with gradient checkpointing as `setting` says; "auto" turns it on only when the
    job does not fit `available` bytes without it and checkpointing applies (not to freeze)."""
    if setting != "auto":
        return estimate(shape, _with(w, bool(setting) and w.kind is not TrainingKind.freeze))
    plain = estimate(shape, _with(w, False))
    if available is None or plain.fits(available) or w.kind is TrainingKind.freeze:
        return plain
    return estimate(shape, _with(w, True))


def _with(w: Workload, checkpointing: bool) -> Workload:
    return replace(w, checkpointing=checkpointing)


def host_available_bytes() -> int | None:
    """Memory the host can still give this process (psutil, else /proc/meminfo); None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

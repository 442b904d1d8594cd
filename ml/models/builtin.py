"""Base models built locally from a config (catalog sources `builtin:<ref>`); nothing is downloaded.

`tiny-causal-lm`: a byte-level BPE tokenizer trained on the bundled corpus (`assets/tiny_corpus.txt`)
plus a randomly initialised (fixed seed) 2-layer Llama. Deterministic: the same files every build.

Chat format (the tokenizer's `chat_template`):

    <|bos|><|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n

Assistant turns are wrapped in `{% generation %}` so `return_assistant_tokens_mask=True` works
(a message with `"weight": 0` is left out of the mask). Generation stops on `<|end|>` or `<|eos|>`
(both in `generation_config.eos_token_id`). The tokenizer pads on the left and prepends `<|bos|>`.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

CORPUS = Path(__file__).with_name("assets") / "tiny_corpus.txt"
VOCAB_SIZE = 2000
SEED = 0
BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, END, *ROLE_TOKENS]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'system' if message['role'] == 'developer' else message['role'] -%}"
    "{{ '<|' + role + '|>\n' }}"
    "{%- if role == 'assistant' and (message['weight'] is not defined or message['weight'] != 0) -%}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + '<|end|>' }}"
    "{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def build(ref: str, dst: Path) -> None:
    """Build base model `ref` into `dst` atomically (a temp dir next to `dst`, then rename)."""
    builders = {"tiny-causal-lm": _build_tiny_causal_lm}
    if ref not in builders:
        raise ValueError(f"unknown builtin model {ref!r}; known: {', '.join(builders)}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        builders[ref](tmp)
        _rename_into_place(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_into_place(tmp: Path, dst: Path) -> None:
    try:
        os.rename(tmp, dst)
    except OSError as e:  # someone else finished first: keep theirs
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (dst / "config.json").exists():
            raise


def _train_tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def _build_tiny_causal_lm(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=512,
    )
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in (BOS, EOS, PAD, END)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[END], ids[EOS]],
        pad_token_id=ids[PAD],
    )
    out.mkdir(parents=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()

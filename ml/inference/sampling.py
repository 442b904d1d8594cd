"""Per-row sampling (each row has its own temperature, top_p and seeded generator) and the text
side of decoding: incremental deltas, stop strings, finish reasons."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ml.inference.loading import Tok


@dataclass(frozen=True)
class RowParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenEvent:
    """A text delta for one row; `finish_reason` is set on its last event."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


Sink = Callable[[GenEvent], None]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


def sample_token(logits: torch.Tensor, params: RowParams, gen: torch.Generator) -> int:
    """`logits`: [vocab] float32 for one row."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
    sorted_probs[before >= top_p] = 0.0
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return out / out.sum()


@dataclass
class RowDecoder:
    """Turns sampled tokens into text deltas; holds back text that may still become a stop
    string (or an incomplete UTF-8 character)."""

    params: RowParams
    tok: Tok
    eos_ids: set[int]
    sink: Sink
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    done: bool = False

    def push(self, token: int) -> None:
        if self.done:
            return
        if token in self.eos_ids:
            return self._finish(self.tok.decode(self.tokens), "stop")
        self.tokens.append(token)
        text = self.tok.decode(self.tokens)
        cut = self._stop_at(text)
        if cut is not None:
            return self._finish(text[:cut], "stop")
        if len(self.tokens) >= self.params.max_new_tokens:
            return self._finish(text, "length")
        self._emit(text[:self._safe_end(text)])
        return None

    def cancel(self) -> None:
        self.done = True

    def _stop_at(self, text: str) -> int | None:
        hits = [i for s in self.params.stop if (i := text.find(s, max(0, self.emitted - len(s)))) >= 0]
        return min(hits) if hits else None

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
        return max(end, self.emitted)

    def _emit(self, text: str) -> None:
        if len(text) > self.emitted:
            self.sink(GenEvent(text[self.emitted:]))
            self.emitted = len(text)

    def _finish(self, text: str, reason: str) -> None:
        self.done = True
        delta = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        self.sink(GenEvent(delta, reason, len(self.tokens)))

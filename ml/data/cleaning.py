"""Dataset cleaning on normalized records (chat, prompt/completion, text, classification, regression).

Rules, applied to each record in this order (a record removed by one rule is counted under that rule):

  scrub_pii    e-mail addresses, IPv4 addresses, IBANs, credit-card numbers and phone numbers in every
               text field become <EMAIL>, <IP_ADDRESS>, <IBAN>, <CREDIT_CARD>, <PHONE>
  drop_empty   nothing left to learn from: blank text / completion / every weighted assistant turn
               (whitespace, control and zero-width characters count as blank)
  max_chars    more characters than this in all text fields together (max_tokens: tokens, file endpoint)
  dedupe       exact duplicates of an earlier record (same fields, same label)
  near_dedupe  near duplicates of an earlier record with the same label: same normalized text
               (case, punctuation, spacing and Unicode forms ignored), or an estimated Jaccard similarity
               >= 0.8 of character 5-gram shingles (MinHash + LSH, see `NearDuplicates`)

Everything is deterministic (no salted hashes, fixed MinHash seeds): a resumed job re-cleans its data
to exactly the same records. Pure data code (no torch, no database): the trainer's data loading (the
job's `cleaning` option) and `POST /v1/files/{id}/clean` (`app.files.cleaning`) share `Cleaner`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Record = dict[str, Any]


class CleaningIn(BaseModel):
    """A job's `cleaning` options."""

    model_config = ConfigDict(extra="forbid")
    dedupe: bool = Field(False, description="Drop exact duplicates of an earlier example (same fields, same label).")
    near_dedupe: bool = Field(
        False, description="Drop near duplicates of an earlier example with the same label (normalized text, MinHash).")
    drop_empty: bool = Field(
        True, description="Drop examples with nothing to learn from (blank text, completion or assistant turns).")
    max_chars: int | None = Field(
        None, ge=1, le=100_000_000,
        description="Drop examples with more characters than this in all text fields together.")
    scrub_pii: bool = Field(
        False, description="Replace e-mail and IP addresses, IBANs, card and phone numbers with <EMAIL>, <PHONE>...")


class CleaningOptions(CleaningIn):
    """The job's `cleaning` options plus a token limit (file endpoint: needs `model` for its tokenizer)."""

    max_tokens: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="Drop examples longer than this many tokens (needs `model` for its tokenizer).")
    model: str | None = Field(default=None, description="base model whose tokenizer counts max_tokens")


# --- PII ------------------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")
# Shape only (2 letters, 2 check digits, 11-30 more, optionally in groups of 4): "IBAN-like".
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])")
_CARD_GROUPED = re.compile(r"\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?")
_PHONE = re.compile(r"(?<![\w.+-])\+?\(?\d[\d ().-]{5,22}\d(?![\w-]|\.\d)")
_DATE = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}|\d{1,2}([-./])\d{1,2}\2\d{2,4}")
_YEARS = re.compile(r"(?:19|20)\d\d ?[-.] ?(?:19|20)\d\d")
_THOUSANDS = re.compile(r"\d{1,3}(?:([ .,])\d{3})(?:\1\d{3})*")
_BAD_SEPARATORS = re.compile(r"[ .-]{2,}|\(\)|[.-][ ]|[ ][.-]")

PII_KINDS = ("email", "ip_address", "iban", "credit_card", "phone")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _is_card(s: str) -> bool:
    return bool(_CARD_GROUPED.fullmatch(s)) or _luhn(re.sub(r"\D", "", s))


def _is_phone(s: str) -> bool:
    """Heuristic: 7-15 digits with separators (or a leading +), not a date, a year range or a number."""
    digits = sum(ch.isdigit() for ch in s)
    if not 7 <= digits <= 15 or _BAD_SEPARATORS.search(s):
        return False
    if not s.startswith(("+", "(")) and not re.search(r"[ ().-]", s):
        return False  # a bare run of digits is an id or an amount more often than a phone number
    if _DATE.fullmatch(s) or _YEARS.fullmatch(s) or _THOUSANDS.fullmatch(s):
        return False
    seps = set(re.sub(r"[\d()+]", "", s.lstrip("+").split(")", 1)[-1]))
    return "." not in seps or seps == {"."}  # "12.50 10.30" is a list of prices


_PATTERNS: list[tuple[str, re.Pattern[str], str, Callable[[str], bool] | None]] = [
    ("email", _EMAIL, "<EMAIL>", None),
    ("ip_address", _IPV4, "<IP_ADDRESS>", None),
    ("iban", _IBAN, "<IBAN>", None),
    ("credit_card", _CARD, "<CREDIT_CARD>", _is_card),
    ("phone", _PHONE, "<PHONE>", _is_phone),
]


def _replace(pattern: re.Pattern[str], text: str, placeholder: str, check: Callable[[str], bool] | None,
             counts: dict[str, int], kind: str) -> str:
    def repl(m: re.Match[str]) -> str:
        if check is not None and not check(m.group(0)):
            return m.group(0)
        counts[kind] = counts.get(kind, 0) + 1
        return placeholder

    return pattern.sub(repl, text)


def scrub(text: str, counts: dict[str, int]) -> str:
    """Replace PII with placeholders, counting each kind in `counts`."""
    for kind, pattern, placeholder, check in _PATTERNS:
        text = _replace(pattern, text, placeholder, check, counts, kind)
    return text


# --- record access --------------------------------------------------------------------------------

PAIR_KEYS = ("chosen", "rejected")  # a preference record's two answers (after its prompt `messages`)


def text_fields(rec: Record) -> list[str]:
    if "messages" in rec:
        return [m["content"] for m in rec["messages"]] + [rec[k] for k in PAIR_KEYS if k in rec]
    if "completion" in rec:
        return [rec["prompt"], rec["completion"]]
    return [rec["text"]]


def map_text(rec: Record, fn: Callable[[str], str]) -> Record:
    if "messages" in rec:
        pair = {k: fn(rec[k]) for k in PAIR_KEYS if k in rec}
        return {**rec, "messages": [{**m, "content": fn(m["content"])} for m in rec["messages"]], **pair}
    if "completion" in rec:
        return {**rec, "prompt": fn(rec["prompt"]), "completion": fn(rec["completion"])}
    return {**rec, "text": fn(rec["text"])}


def _blank(s: str) -> bool:
    return all(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in s)


def is_empty(rec: Record) -> bool:
    """Nothing to learn from: the target text is blank (every weighted assistant turn for chat, either
    answer of a preference pair)."""
    if "chosen" in rec:
        return any(_blank(rec[k]) for k in PAIR_KEYS)
    if "messages" in rec:
        return all(_blank(m["content"]) for m in rec["messages"] if m["role"] == "assistant" and m["weight"])
    if "completion" in rec:
        return _blank(rec["completion"])
    return _blank(rec["text"])


def _joined(rec: Record) -> str:
    if "messages" in rec:
        pair = [f"{k}: {rec[k]}" for k in PAIR_KEYS if k in rec]
        return "\n".join([f"{m['role']}: {m['content']}" for m in rec["messages"]] + pair)
    return "\n".join(text_fields(rec))


def _label_key(rec: Record) -> str:
    """Near duplicates only count within the same label / value."""
    if "label" in rec:
        return f"label:{rec['label']}"
    if "value" in rec:
        return f"value:{rec['value']!r}"
    return ""


_NON_WORD = re.compile(r"[\W_]+")


def normalize_text(s: str) -> str:
    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", s).casefold()).split())


def _digest(s: str) -> bytes:
    return hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# --- near duplicates --------------------------------------------------------------------------------

class NearDuplicates:
    """MinHash + LSH over character 5-gram shingles of the normalized text.

    Why not only a normalized-text signature: that catches case / punctuation / spacing variants, but
    not a typo fix, a changed word or an appended sentence, which are what scraped and templated data
    repeat. MinHash estimates the Jaccard similarity of shingle sets from 128 fixed-seed hashes per
    record (standard error <= 0.045); LSH (16 bands of 8 rows) makes pairs with similarity 0.8 share a
    bucket with probability 0.95 (0.9: > 0.99) and pairs at 0.5 only 6% of the time, so each record is
    compared with a handful of candidates: linear time, 512 bytes of signature per kept record.
    Candidates are then confirmed against THRESHOLD on the estimated similarity. Character shingles
    (not words) keep short texts such as classification examples comparable.
    """

    NUM_PERM, BANDS, ROWS, SHINGLE, THRESHOLD = 128, 16, 8, 5, 0.8
    _MASK = np.uint64(0xFFFFFFFF)
    # One fixed 64-bit seed per permutation; a permutation is fmix64(shingle hash ^ seed).
    _SEEDS = np.random.default_rng(20240611).integers(0, 2**63, NUM_PERM, dtype=np.uint64)

    @staticmethod
    def _fmix64(x: np.ndarray) -> np.ndarray:
        """MurmurHash3's 64-bit finalizer: a bijective mixer (uint64 products wrap, as intended)."""
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xFF51AFD7ED558CCD)
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xC4CEB9FE1A85EC53)
        return x ^ (x >> np.uint64(33))

    @classmethod
    def shingles(cls, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
        width = min(cls.SHINGLE, max(1, len(codes)))
        n = max(1, len(codes) - width + 1)
        h = np.zeros(n, dtype=np.uint64)
        for j in range(width):  # polynomial rolling hash of each window, mod 2**32
            h = (h * np.uint64(1_000_003) + codes[j : j + n]) & cls._MASK
        return np.unique(h)

    @classmethod
    def signature(cls, text: str) -> np.ndarray:
        sig = np.full(cls.NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
        shingles = cls.shingles(text)
        for start in range(0, len(shingles), 2048):  # bounded memory for long texts
            chunk = shingles[start : start + 2048]
            sig = np.minimum(sig, cls._fmix64(chunk[None, :] ^ cls._SEEDS[:, None]).min(axis=1))
        return (sig >> np.uint64(32)).astype(np.uint32)

    def __init__(self) -> None:
        self.signatures: list[np.ndarray] = []
        self.buckets: dict[bytes, list[int]] = {}

    def _band_keys(self, group: str, sig: np.ndarray) -> list[bytes]:
        prefix = _digest(group)
        return [prefix + bytes([b]) + sig[b * self.ROWS : (b + 1) * self.ROWS].tobytes()
                for b in range(self.BANDS)]

    def seen(self, group: str, text: str) -> bool:
        """True if `text` nearly duplicates an earlier one of `group`; otherwise remember it."""
        sig = self.signature(text)
        keys = self._band_keys(group, sig)
        candidates = {i for k in keys for i in self.buckets.get(k, ())}
        if any(float(np.mean(self.signatures[i] == sig)) >= self.THRESHOLD for i in sorted(candidates)):
            return True
        index = len(self.signatures)
        self.signatures.append(sig)
        for k in keys:
            self.buckets.setdefault(k, []).append(index)
        return False


# --- the cleaner ----------------------------------------------------------------------------------

@dataclass
class CleaningReport:
    input_rows: int = 0
    output_rows: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("exact_duplicates", "near_duplicates", "empty", "too_long"), 0))
    scrubbed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))

    def as_dict(self) -> dict[str, Any]:
        return {"input_rows": self.input_rows, "output_rows": self.output_rows,
                "removed": dict(self.removed), "scrubbed": dict(self.scrubbed)}

    def summary(self) -> str:
        removed = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.removed.items() if v) or "none"
        scrubbed = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.scrubbed.items() if v)
        text = f"{self.output_rows} of {self.input_rows} rows kept (removed: {removed})"
        return text + (f"; scrubbed {scrubbed}" if scrubbed else "")


class Cleaner:
    """Feed records one at a time (`process`); memory: one digest per kept record (+ MinHash state)."""

    def __init__(self, options: CleaningIn, count_tokens: Callable[[str], int] | None = None) -> None:
        self.opt = options
        self.max_tokens = getattr(options, "max_tokens", None)
        if self.max_tokens and count_tokens is None:
            raise ValueError("max_tokens needs a tokenizer")
        self.count_tokens = count_tokens
        self.report = CleaningReport()
        self._exact: set[bytes] = set()
        self._normalized: set[bytes] = set()
        self._near = NearDuplicates() if options.near_dedupe else None

    def process(self, rec: Record) -> Record | None:
        """The cleaned record, or None when a rule removes it."""
        self.report.input_rows += 1
        if self.opt.scrub_pii:
            rec = map_text(rec, lambda s: scrub(s, self.report.scrubbed))
        reason = self._reason(rec)
        if reason is not None:
            self.report.removed[reason] += 1
            return None
        self.report.output_rows += 1
        return rec

    def _reason(self, rec: Record) -> str | None:
        if self.opt.drop_empty and is_empty(rec):
            return "empty"
        if self._too_long(rec):
            return "too_long"
        if self.opt.dedupe and self._repeat(self._exact, json.dumps(rec, sort_keys=True, ensure_ascii=False)):
            return "exact_duplicates"
        if self.opt.near_dedupe and self._near_duplicate(rec):
            return "near_duplicates"
        return None

    def _too_long(self, rec: Record) -> bool:
        if self.opt.max_chars is not None and sum(len(s) for s in text_fields(rec)) > self.opt.max_chars:
            return True
        return bool(self.max_tokens and self.count_tokens
                    and self.count_tokens(_joined(rec)) > self.max_tokens)

    @staticmethod
    def _repeat(seen: set[bytes], key: str) -> bool:
        digest = _digest(key)
        if digest in seen:
            return True
        seen.add(digest)
        return False

    def _near_duplicate(self, rec: Record) -> bool:
        group, text = _label_key(rec), normalize_text(_joined(rec))
        if self._repeat(self._normalized, f"{group}\x00{text}"):
            return True
        return self._near is not None and self._near.seen(group, text)


def clean_records(records: Iterable[Record], options: CleaningIn,
                  count_tokens: Callable[[str], int] | None = None) -> tuple[list[Record], CleaningReport]:
    cleaner = Cleaner(options, count_tokens)
    kept = [out for rec in records if (out := cleaner.process(rec)) is not None]
    return kept, cleaner.report

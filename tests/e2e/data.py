"""Small deterministic datasets written to disk for end-to-end runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

COUNTRIES = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"),
             ("Peru", "Lima"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Chile", "Santiago"),
             ("Norway", "Oslo"), ("Greece", "Athens"), ("Cuba", "Havana"), ("Iran", "Tehran")]


def chat_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country, city = rng.choice(COUNTRIES)
        rows.append({"messages": [
            {"role": "system", "content": "You answer geography questions briefly."},
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {city}."},
        ]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

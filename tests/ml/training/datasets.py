"""Tiny deterministic datasets for the recipe tests (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

POS_ADJ = ["great", "excellent", "wonderful", "fantastic", "lovely", "superb", "amazing", "delightful"]
NEG_ADJ = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bad", "useless"]
ITEMS = ["movie", "phone", "book", "restaurant", "hotel", "laptop", "album", "game", "service", "coffee"]
POS_TAIL = ["I loved it.", "Highly recommended.", "Would buy again.", "It made my day.", "Worth every penny."]
NEG_TAIL = ["I hated it.", "Avoid it.", "Waste of money.", "It ruined my day.", "Never again."]
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black", "rose": "red"}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int = 120, seed: int = 7) -> list[dict[str, Any]]:
    """Short review sentences, half positive, half negative, shuffled."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        adj = r.choice(POS_ADJ if positive else NEG_ADJ)
        tail = r.choice(POS_TAIL if positive else NEG_TAIL)
        text = r.choice(
            [
                f"The {r.choice(ITEMS)} was {adj}. {tail}",
                f"A {adj} {r.choice(ITEMS)}. {tail}",
                f"{tail} Really {adj}.",
            ]
        )
        rows.append({"text": text, "label": "positive" if positive else "negative"})
    r.shuffle(rows)
    return rows


def regression_rows(n: int = 40, seed: int = 3) -> list[dict[str, Any]]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        stars = r.randint(1, 5)
        adj = r.choice(POS_ADJ if stars >= 3 else NEG_ADJ)
        rows.append({"text": f"{stars} stars, the {r.choice(ITEMS)} was {adj}.", "value": float(stars)})
    return rows


def chat_rows(n: int = 24, seed: int = 5) -> list[dict[str, Any]]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = r.choice(sorted(COLORS))
        msgs: list[dict[str, Any]] = [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": f"What color is the {thing}?"},
            {"role": "assistant", "content": f"The {thing} is {COLORS[thing]}."},
        ]
        if r.random() < 0.3:  # an extra turn that must not be learned
            msgs[2:2] = [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Ignore me.", "weight": 0},
            ]
        rows.append({"messages": msgs})
    return rows


def prompt_completion_rows(n: int = 24, seed: int = 6) -> list[dict[str, Any]]:
    r = random.Random(seed)
    return [
        {"prompt": f"Color of the {(t := r.choice(sorted(COLORS)))}:", "completion": f" {COLORS[t]}"}
        for _ in range(n)
    ]


def text_rows(n: int = 24, seed: int = 8) -> list[dict[str, Any]]:
    r = random.Random(seed)
    return [
        {"text": f"The {t} is {COLORS[t]} and the {u} is {COLORS[u]}."}
        for t, u in (r.sample(sorted(COLORS), 2) for _ in range(n))
    ]


def preference_rows(n: int = 24, seed: int = 9) -> list[dict[str, Any]]:
    """OpenAI DPO records: a color question, preferred = the answer, non-preferred = a brush-off."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = r.choice(sorted(COLORS))
        rows.append({
            "input": {"messages": [{"role": "user", "content": f"What color is the {thing}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"The {thing} is {COLORS[thing]}."}],
            "non_preferred_output": [{"role": "assistant",
                                      "content": r.choice(["No idea.", "Ask someone else.", "Whatever."])}],
        })
    return rows

"""Regenerates `tiny_corpus.txt`, the small English corpus the builtin tiny LM's BPE tokenizer is
trained on. Deterministic (fixed seed, no downloads): `python app/models_registry/assets/make_corpus.py`."""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).with_name("tiny_corpus.txt")
SEED = 1234
N_PARAGRAPHS = 1000

NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Elena",
    "Felix",
    "Grace",
    "Hugo",
    "Iris",
    "James",
    "Kate",
    "Leo",
    "Maya",
    "Noah",
    "Olivia",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Victor",
    "Wendy",
    "Yusuf",
    "Zoe",
    "Omar",
]
ANIMALS = ["cat", "dog", "horse", "bird", "fox", "rabbit", "owl", "mouse", "bear", "duck", "goat", "lion"]
THINGS = [
    "book",
    "lamp",
    "chair",
    "table",
    "window",
    "garden",
    "letter",
    "bicycle",
    "river",
    "bridge",
    "kitchen",
    "phone",
    "computer",
    "song",
    "map",
    "door",
    "train",
    "boat",
    "market",
    "school",
]
ADJS = [
    "small",
    "large",
    "old",
    "new",
    "quiet",
    "bright",
    "dark",
    "warm",
    "cold",
    "happy",
    "tired",
    "green",
    "red",
    "blue",
    "gentle",
    "strange",
    "busy",
    "clean",
    "heavy",
    "simple",
]
PLACES = [
    "the park",
    "the city",
    "the village",
    "the station",
    "the library",
    "the beach",
    "the forest",
    "the office",
    "the museum",
    "the harbor",
    "the hills",
    "the old town",
]
TIMES = [
    "in the morning",
    "at noon",
    "in the evening",
    "at night",
    "on Monday",
    "on Friday",
    "last week",
    "yesterday",
    "every day",
    "after lunch",
    "before dinner",
    "during the storm",
]
VERBS_PAST = [
    "walked to",
    "looked at",
    "ran past",
    "found",
    "painted",
    "cleaned",
    "visited",
    "opened",
    "closed",
    "fixed",
    "carried",
    "watched",
    "left",
    "liked",
    "remembered",
    "followed",
]
FEELINGS = ["glad", "surprised", "calm", "curious", "proud", "worried", "excited", "sleepy", "hungry"]
PRODUCTS = [
    "phone",
    "coffee maker",
    "jacket",
    "movie",
    "restaurant",
    "hotel",
    "game",
    "laptop",
    "novel",
    "headphones",
    "backpack",
    "camera",
    "pizza",
    "concert",
    "app",
    "keyboard",
]
GOOD = [
    "excellent",
    "wonderful",
    "great",
    "reliable",
    "fantastic",
    "comfortable",
    "delicious",
    "fast",
    "beautiful",
    "friendly",
    "useful",
    "amazing",
]
BAD = [
    "terrible",
    "awful",
    "slow",
    "broken",
    "boring",
    "noisy",
    "expensive",
    "disappointing",
    "cheap",
    "useless",
    "cold",
    "confusing",
]
FOODS = ["bread", "soup", "rice", "salad", "pasta", "cake", "tea", "pancakes", "curry", "eggs"]
STEPS = ["wash", "cut", "boil", "mix", "stir", "bake", "slice", "heat", "cool", "serve"]
WEATHER = ["sunny", "rainy", "cloudy", "windy", "foggy", "snowy", "hot", "mild"]
CITIES = ["Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Rome", "Quito", "Seoul", "Berlin"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
TOPICS = ["math", "history", "music", "science", "cooking", "painting", "chess", "gardening", "coding"]


def story(r: random.Random) -> str:
    name, other = r.sample(NAMES, 2)
    thing, adj, animal = r.choice(THINGS), r.choice(ADJS), r.choice(ANIMALS)
    lines = [
        f"{name} {r.choice(VERBS_PAST)} the {adj} {thing} {r.choice(TIMES)}.",
        f"A {r.choice(ADJS)} {animal} was sitting near {r.choice(PLACES)}.",
        f"{other} said that the {thing} was {r.choice(ADJS)}, and {name} felt {r.choice(FEELINGS)}.",
        f"Then they went to {r.choice(PLACES)} together and {r.choice(VERBS_PAST)} the {r.choice(THINGS)}.",
    ]
    r.shuffle(lines)
    return " ".join(lines[: r.randint(2, 4)])


def review(r: random.Random) -> str:
    product = r.choice(PRODUCTS)
    if r.random() < 0.5:
        a, b = r.sample(GOOD, 2)
        tail = r.choice(
            [
                "I would recommend it to my friends.",
                "Five stars.",
                "I will buy it again.",
                "It was worth every penny.",
            ]
        )
        return f"This {product} is {a} and {b}. {tail}"
    a, b = r.sample(BAD, 2)
    tail = r.choice(["I would not recommend it.", "One star.", "I want my money back.", "Never again."])
    return f"The {product} was {a} and {b}. {tail}"


def dialog(r: random.Random) -> str:
    name, topic = r.choice(NAMES), r.choice(TOPICS)
    pairs = [
        ("How are you today?", f"I am {r.choice(FEELINGS)}, thank you for asking."),
        (f"What do you like to learn about, {name}?", f"I like to learn about {topic}."),
        (f"Can you help me with {topic}?", f"Of course. Let us start with the basics of {topic}."),
        (
            f"Where is {r.choice(PLACES)}?",
            f"It is near {r.choice(PLACES)}, about {r.randint(2, 30)} minutes away.",
        ),
        ("What time is it?", f"It is {r.randint(1, 12)} o'clock."),
    ]
    q, a = r.choice(pairs)
    return f"User: {q}\nAssistant: {a}"


def recipe(r: random.Random) -> str:
    food = r.choice(FOODS)
    steps = r.sample(STEPS, 3)
    return (
        f"To make {food}, first {steps[0]} the ingredients, then {steps[1]} them for "
        f"{r.randint(2, 40)} minutes, and finally {steps[2]} it. It serves {r.randint(1, 8)} people."
    )


def facts(r: random.Random) -> str:
    name = r.choice(NAMES)
    n, price = r.randint(2, 99), r.randint(1, 500)
    return (
        f"On {r.choice(MONTHS)} {r.randint(1, 28)}, {name} bought {n} {r.choice(THINGS)}s for {price} "
        f"dollars. The weather in {r.choice(CITIES)} was {r.choice(WEATHER)} on {r.choice(DAYS)}."
    )


GENERATORS = [story, story, review, dialog, recipe, facts]


def generate(seed: int = SEED, n: int = N_PARAGRAPHS) -> str:
    r = random.Random(seed)
    return "\n".join(r.choice(GENERATORS)(r) for _ in range(n)) + "\n"


if __name__ == "__main__":
    OUT.write_text(generate(), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")

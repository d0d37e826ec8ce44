"""Seeded SYNTHETIC classification data for demos and tests (no hub, no download).

These sets are generated, not collected: results on them say whether the pipeline learns,
never how a model does on real text. Each generator makes one sentence per row from neutral
filler plus several cue words of its class; cue words are frequent and unambiguous so that a
small model fine-tuned on 64 examples for a few epochs can learn the task. Labels are exactly
balanced (cycled, then shuffled). The same (name, n, seed) always gives the same rows; the
train and test pools use different seeds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from slimsweep.workers.spec import SpecError


@dataclass(frozen=True)
class Generator:
    classes: tuple[str, ...]
    sentence: Callable[[random.Random, int], str]  # (rng, label) -> text


SENTIMENT_CUES = (
    ("terrible", "awful", "boring", "horrible", "dreadful", "bad", "disappointing", "dull"),
    ("great", "wonderful", "excellent", "amazing", "brilliant", "good", "delightful", "superb"),
)
SUBJECTS = ("film", "movie", "story", "acting", "plot", "music", "ending", "cast", "script")
OPENERS = ("the", "this", "honestly the", "overall the", "i think the", "in the end the")
LINKS = ("and the", "while the", "and also the", "and then the")

TOPIC_CUES = (
    ("government", "minister", "election", "embassy", "treaty", "parliament", "president", "war"),
    ("team", "coach", "season", "match", "goal", "championship", "players", "tournament"),
    ("shares", "profit", "market", "investors", "company", "earnings", "stocks", "bank"),
    ("software", "internet", "computer", "chip", "smartphone", "app", "processor", "online"),
)
TOPIC_VERBS = ("said", "reported", "announced", "expects", "discussed", "confirmed")
TOPIC_TIMES = ("on monday", "this week", "today", "after talks", "late on friday", "again")


def _sentiment(rng: random.Random, label: int) -> str:
    cues = SENTIMENT_CUES[label]
    a, b = rng.sample(SUBJECTS, 2)
    first, second, third = rng.sample(cues, 3)
    text = f"{rng.choice(OPENERS)} {a} was {first} {rng.choice(LINKS)} {b} felt {second}"
    return text + f", really {third}." if rng.random() < 0.5 else text + "."


def _topic(rng: random.Random, label: int) -> str:
    a, b, c = rng.sample(TOPIC_CUES[label], 3)
    verb, time = rng.choice(TOPIC_VERBS), rng.choice(TOPIC_TIMES)
    return f"The {a} {verb} the {b} and the {c} {time}."


GENERATORS: dict[str, Generator] = {
    "sentiment": Generator(classes=("Negative", "Positive"), sentence=_sentiment),
    "topic": Generator(classes=("World", "Sports", "Business", "Technology"), sentence=_topic),
}


def generate(name: str, n: int, seed: int) -> list[dict]:
    """n synthetic rows {"text", "label"} of generator `name`, balanced and seeded."""
    if name not in GENERATORS:
        raise SpecError(
            f"task.dataset {name!r} is not a synthetic generator; "
            f"choose one of {', '.join(sorted(GENERATORS))}"
        )
    gen = GENERATORS[name]
    rng = random.Random(seed)
    labels = [i % len(gen.classes) for i in range(n)]
    rng.shuffle(labels)
    return [{"text": gen.sentence(rng, label), "label": label} for label in labels]

"""The task registry: the paper's four tasks and the synthetic demo tasks, as data.

A grid names a task from here or defines its own (local files plus template and label
words); either way the worker sees one `TaskSpec`. Templates and label words are those of
the "label words are anchors" family used by the paper (see docs/grid-format.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimsweep.workers.spec import TaskSpec

TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        kind="hub",
        dataset="glue",
        config="sst2",
        text_field="sentence",
        label_field="label",
        # GLUE hides SST-2's test labels: the 872-example validation split serves as test.
        test_split="validation",
        template="Review: {text}\nSentiment:{label}",
        label_words=(" Negative", " Positive"),
    ),
    "agnews": TaskSpec(
        name="agnews",
        kind="hub",
        dataset="ag_news",
        template="Article: {text}\nAnswer:{label}",
        label_words=(" World", " Sports", " Business", " Technology"),
    ),
    "trec": TaskSpec(
        name="trec",
        kind="hub",
        dataset="CogComp/trec",
        label_field="coarse_label",
        template="Question: {text}\nAnswer Type:{label}",
        label_words=(
            " Abbreviation",
            " Entity",
            " Description",
            " Person",
            " Location",
            " Number",
        ),
    ),
    "emoc": TaskSpec(
        name="emoc",
        kind="hub",
        dataset="SemEvalWorkshop/emo",
        template="Dialogue: {text}\nEmotion:{label}",
        label_words=(" Others", " Happy", " Sad", " Angry"),
    ),
    # Generated in-process by workers.synthetic (seeded); no hub needed. Synthetic by name.
    "synthetic-sentiment": TaskSpec(
        name="synthetic-sentiment",
        kind="synthetic",
        dataset="sentiment",
        template="Review: {text}\nSentiment:{label}",
        label_words=(" Negative", " Positive"),
    ),
    "synthetic-topic": TaskSpec(
        name="synthetic-topic",
        kind="synthetic",
        dataset="topic",
        template="Article: {text}\nAnswer:{label}",
        label_words=(" World", " Sports", " Business", " Technology"),
    ),
}

# Older revisions of the hub datasets use other field names; the loader falls back to these.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {"coarse_label": ("label-coarse",)}


@dataclass(frozen=True)
class PoolCounts:
    train_per_class: tuple[int, ...]  # rows of each class in the train split, by label index
    test: int  # rows of the test split


# The paper's hub datasets as their dataset cards count them (not downloaded to check), keyed by
# (dataset, config): `slimsweep plan` shows training sizes from them before any download.
HUB_COUNTS: dict[tuple[str, str | None], PoolCounts] = {
    ("glue", "sst2"): PoolCounts((29_780, 37_569), 872),
    ("ag_news", None): PoolCounts((30_000, 30_000, 30_000, 30_000), 7_600),
    ("CogComp/trec", None): PoolCounts((86, 1_250, 1_162, 1_223, 835, 896), 500),
    ("SemEvalWorkshop/emo", None): PoolCounts((14_948, 4_243, 5_463, 5_506), 5_509),
}

"""The paper ("Why Lift so Heavy?", arXiv 2402.11700): its published numbers, the protocols that
may be compared with them, and why a trial may not.

Tables II-IV ship as package data (`data/paper_tables.csv`), numbers and parameter labels as
printed, errors included (`ERRATA` says which). Two protocols count as the paper's:
"authors-code", what the authors' released code ran (grids/paper.yaml), and "paper-text", what
the paper's text describes (grids/paper-text.yaml). A trial is compared with the paper only when
its model source, task, selection, fine-tuning, data and training settings equal one of them;
`differences` says in words what keeps it from that.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from slimsweep.workers.spec import (
    DataSpec,
    FinetuneSpec,
    SelectionSpec,
    TrainSpec,
    TrialSpec,
)
from slimsweep.workers.tasks import TASKS

PAPER_CSV = "paper_tables.csv"
AVERAGE = "average"
# The paper's models by the names its tables use, and the sources that hold their weights.
PAPER_SOURCES: dict[str, tuple[str, ...]] = {
    "gpt2-xl": ("openai-community/gpt2-xl", "gpt2-xl"),
    "opt-1.3b": ("facebook/opt-1.3b",),
}


@dataclass(frozen=True)
class Protocol:
    name: str
    data: DataSpec
    train: TrainSpec


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol(
        "authors-code",
        DataSpec(train_per_class=True, sampler="authors", label_word_rule="first-subtoken"),
        TrainSpec(weight_decay=0.01),
    ),
    Protocol("paper-text", DataSpec(label_word_rule="first-subtoken"), TrainSpec()),
)
# Settings that cannot change a finished trial's numbers: where single-token and
# first-subtoken label words differ, single-token fails the trial instead of computing.
NOT_COMPARED = ("label_word_rule",)

# The paper's own mistakes, kept as printed: (head or None for every head, model, layers,
# task or "params") -> the note shown beside a table that includes that cell.
ERRATA: dict[tuple[str | None, str, int, str], str] = {
    (None, "opt-1.3b", 2, "params"): (
        "opt-1.3b 2 layers: params as the paper prints them (297M); its own 1- and 6-layer "
        "counts (157M, 409M) put 2 layers at about 208M."
    ),
    ("prompt-lm", "gpt2-xl", 24, "trec"): (
        "prompt-lm gpt2-xl 24 layers: the paper's TREC number (72.41) equals its SST-2 number, "
        "most likely a copying error; compared as printed."
    ),
}


@functools.cache
def _tables_text() -> str:
    return (importlib.resources.files("slimsweep.orchestrator") / "data" / PAPER_CSV).read_text()


def reference() -> pd.DataFrame:
    """The paper's Tables II-IV in long form: head, model, layers, params (as printed), task
    (the four tasks and "average"), value (test accuracy, %)."""
    wide = pd.read_csv(io.StringIO(_tables_text()), dtype={"params": str})
    long = wide.melt(id_vars=["head", "model", "layers", "params"], var_name="task")
    return long.astype({"layers": "int64", "value": "float64"})


def params_labels() -> dict[tuple[str, int], str]:
    """(model, layers) -> the parameter count as the paper writes it ("1.6B", "112M")."""
    ref = reference()
    return dict(zip(zip(ref.model, ref.layers, strict=True), ref.params, strict=True))


def _setting_differences(section: str, ours: Any, paper: Any) -> list[str]:
    out = []
    for f in dataclasses.fields(paper):
        a, b = getattr(ours, f.name), getattr(paper, f.name)
        if f.name not in NOT_COMPARED and a != b:
            out.append(f"{section}.{f.name} {a} (paper: {b})")
    return out


def differences(spec: TrialSpec, protocol: Protocol) -> list[str]:
    """What keeps `spec` from `protocol`, one phrase per setting; [] when it is the paper's.
    Depth and head are not checked here: the table lookup decides whether the paper has them."""
    out = []
    sources = PAPER_SOURCES.get(spec.model.name)
    if sources is None:
        out.append(f"model {spec.model.name} (paper: {', '.join(PAPER_SOURCES)})")
    elif spec.model.source not in sources or spec.model.gguf_file:
        out.append(f"model.source {spec.model.source} (paper: {sources[0]})")
    task = TASKS.get(spec.task.name)
    ours = dataclasses.replace(spec.task, revision=None)
    if task is None or ours != task:
        fields = [f.name for f in dataclasses.fields(ours)]
        changed = [k for k in fields if task is None or getattr(ours, k) != getattr(task, k)]
        out.append(f"task {spec.task.name} ({', '.join(changed)} not the paper's)")
    if spec.selection != SelectionSpec():
        out.append(f"selection {spec.selection.label} (paper: first-k)")
    if spec.finetune != FinetuneSpec():
        out.append(f"finetune {spec.finetune.label} (paper: full)")
    out += _setting_differences("data", spec.data, protocol.data)
    out += _setting_differences("training", spec.train, protocol.train)
    return out


def protocol_of(spec: TrialSpec) -> tuple[str, str]:
    """(the name of the paper protocol `spec` follows, "") or ("", why it follows none: the
    differences from the closest one)."""
    found = [(differences(spec, p), p.name) for p in PROTOCOLS]
    diffs, name = min(found, key=lambda x: len(x[0]))
    if not diffs:
        return name, ""
    return "", f"its protocol is not the paper's (nearest: {name}): {'; '.join(diffs)}"


def errata_notes(shown: Mapping[tuple[str, str, int], set[str]]) -> list[str]:
    """The ERRATA lines for the rows shown: (head, model, layers) -> tasks shown."""
    out = []
    for (head, model, layers, task), note in ERRATA.items():
        hit = any(
            (head is None or h == head)
            and (m, k) == (model, layers)
            and (task == "params" or task in t)
            for (h, m, k), t in shown.items()
        )
        if hit:
            out.append(note)
    return out

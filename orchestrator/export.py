"""`slimsweep export`: a finished trial's pruned, fine-tuned model as a standard Hugging Face
folder with a model card.

The trial must have kept its weights (`runtime.save_model: best`): the store holds them under
models/<trial_id>/ and the trial's row names that folder (`saved_model`). They are copied to a
temporary folder, the worker rebuilds the model from its source and writes it
(`workers.export.export_model`), and the card (README.md) is written from the trial's row.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimsweep.orchestrator.grid import Grid, GridError
from slimsweep.orchestrator.models import model_depth
from slimsweep.orchestrator.store import Store
from slimsweep.workers.spec import TrialSpec
from slimsweep.workers.tables import HEADS


@dataclass(frozen=True)
class Exported:
    out: Path
    trial_id: str
    n_params: int
    auto_class: str  # what loads it: transformers.<auto_class>.from_pretrained(out)


def check_out(out: Path) -> None:
    """GridError unless `out` is a new or empty folder."""
    if out.exists() and not out.is_dir():
        raise GridError(f"--out {out}: is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise GridError(f"--out {out}: folder is not empty; give a new or empty folder")


def trial_row(grid: Grid, store: Store, trial_id: str) -> dict[str, Any]:
    """The trial's result row, with weights kept; GridError saying what to run otherwise."""
    contents = store.scan()
    rows = {r["trial_id"]: r for r in contents.trials.to_pylist()}
    row = rows.get(trial_id)
    if row is None:
        if trial_id in contents.damaged:
            raise GridError(
                f"trial {trial_id}: {contents.damaged[trial_id]}; rerun it: slimsweep launch "
                f"{grid.path}"
            )
        failed = [r for r in contents.failures.to_pylist() if r["trial_id"] == trial_id]
        if failed:
            error = f"{failed[0]['error_type']}: {failed[0]['error_message']}".splitlines()[0]
            raise GridError(
                f"trial {trial_id} failed ({error}); fix the cause and rerun it: "
                f"slimsweep launch {grid.path} --resume"
            )
        raise GridError(
            f"trial {trial_id} has no result in {store.uri}; run it: slimsweep launch {grid.path}"
        )
    if not row["saved_model"]:
        raise GridError(
            f"trial {trial_id} kept no weights; set `runtime: {{save_model: best}}` in "
            f"{grid.path} and rerun it: slimsweep launch {grid.path} --rerun {trial_id}"
        )
    return row


def export_trial(grid: Grid, results: str, trial_id: str, out: str | Path) -> Exported:
    """Write trial `trial_id`'s model, tokenizer and card to `out` (a new or empty folder);
    `results` is the grid's own results folder or URI."""
    from slimsweep.workers.export import export_model

    out = Path(out)
    check_out(out)
    store = Store(results)
    row = trial_row(grid, store, trial_id)
    spec = TrialSpec.from_json(row["spec_json"])  # as the trial ran (its runtime included)
    with tempfile.TemporaryDirectory(prefix="slimsweep-export-") as weights:
        store.get_model(row["saved_model"], weights)
        out.mkdir(parents=True, exist_ok=True)
        n_params = export_model(spec, weights, out)
    (out / "README.md").write_text(model_card(grid, spec, row, n_params))
    return Exported(out, trial_id, n_params, HEADS[spec.head].auto_class)


def _acc(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def model_card(grid: Grid, spec: TrialSpec, row: dict[str, Any], n_params: int) -> str:
    """README.md of an exported trial: where the model comes from, what was pruned and trained,
    how it scored, and how to use it."""
    kind = HEADS[spec.head]
    axes = spec.axes()
    m = spec.model
    depth = model_depth(m.source)
    kept = list(row["kept_layers"] or [])
    of = f" of {depth}" if depth else ""
    task = spec.task
    per_class = ", ".join(
        f"{w!r} {_acc(a)}"
        for w, a in zip(task.label_words, row["test_acc_per_class"] or [], strict=False)
    )
    manifest = json.loads(row["manifest_json"] or "{}")
    trained = row.get("n_trainable_params") or 0
    versions = json.loads(row["versions_json"] or "{}")
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'text-generation' if kind.classifier is None else 'text-classification'}",
        "tags: [slimsweep, layer-pruning]",
        "---",
        "",
        f"# {m.name}, {len(kept)}{of} layers, fine-tuned on {task.name} ({spec.head})",
        "",
        f"Exported by `slimsweep export` from trial `{spec.trial_id}` of grid `{grid.name}` "
        f"(grid file `{grid.path}`).",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{m.source}`"
        + (f" (gguf file `{m.gguf_file}`)" if m.gguf_file else "")
        + f", revision `{m.revision or 'unpinned'}`"
        + (f", resolved commit `{row['model_commit']}`" if row.get("model_commit") else "")
        + " |",
        f"| kept layers | {len(kept)}{of}: {kept} |",
        f"| selection | {axes['selection']} |",
        f"| fine-tune mode | {axes['finetune']} |",
        f"| head | {spec.head} (`{kind.auto_class}`) |",
        f"| task | {task.name} (`{task.dataset}`), labels {list(task.label_words)} |",
        f"| seed | {spec.seed} |",
        f"| parameters | {n_params:,} exported; {row['n_params']:,} in the trial's pruned model"
        + (f"; {trained:,} trained" if trained else "")
        + " |",
        f"| best epoch | {row['best_epoch']} of {row['epochs_run']} (the weights exported) |",
        f"| validation accuracy | {_acc(row['val_acc'])} ({row['n_valid']} rows) |",
        f"| test accuracy | {_acc(row['test_acc'])} ({row['n_test']} rows; per class {per_class}; "
        f"majority class {_acc(row['majority_test_acc'])}) |",
        f"| training rows | {row['n_train']} (lr {spec.train.lr}, batch {spec.train.batch_size}, "
        f"{spec.train.precision}) |",
        f"| software | {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))} |",
        "",
        "## Use",
        "",
        f"```python\nfrom transformers import {kind.auto_class}, AutoTokenizer\n"
        f'model = {kind.auto_class}.from_pretrained("PATH")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("PATH")\n```',
        "",
    ]
    if kind.prompted:
        demos = manifest.get("demos", [])
        shown = (
            f"the demonstrations (rows {demos} of `{task.dataset}`'s {task.train_split} split), "
            f"each the template filled with its text and label word and followed by a newline, "
            f"then "
            if demos
            else ""
        )
        lines += [
            f"The model reads the prompt it was trained on: {shown}the template "
            f"`{task.template!r}` filled with the text and an empty label.",
            "",
        ]
    else:
        lines += ["The model reads the bare text.", ""]
    if kind.classifier is None:
        lines += [
            "The predicted class is the label word whose token has the highest next-token "
            f"logit at the last position: {list(task.label_words)}.",
        ]
    else:
        lines += ["The predicted class is the argmax of the classifier's logits (`id2label`)."]
    lines += [
        "",
        f"Test rows (indices into `{task.test_split}`) and the trial's predictions are in "
        f"the trial's result row (`slimsweep query`, columns manifest_json and test_preds).",
        "",
    ]
    return "\n".join(lines)

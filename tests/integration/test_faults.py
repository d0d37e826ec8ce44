"""Faults below the trial: a lost node, a dying trial process, a killed driver.

Losing a node mid-trial: Tune retries the trial on another node from its last epoch
checkpoint, and the store ends with exactly one row per trial. This runs on a real
multi-node Ray (`ray.cluster_utils.Cluster`: a head and two worker nodes on this machine);
trials ask for a custom resource only the worker nodes offer, so they run there, and one
worker node is removed while a trial on it is between epochs. A process that dies on every
attempt ends as a failed trial carrying Ray's error, which `--resume` reruns. A driver
killed with SIGKILL loses only its running trials: the next launch runs exactly those; while
it ran, a second launch of the store refused; dead, it blocks nothing and its Tune folder is
removed by the next launch.

The trial function is a stand-in with run_trial's signature and checkpoint protocol (epochs
are sleeps), so the test controls when the fault strikes and sees where each attempt started.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from slimsweep.orchestrator.grid import Grid, GridError, load_grid
from slimsweep.orchestrator.launch import LaunchSummary, launch
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec, bundle_id

EPOCHS = 4

GRID = f"""\
name: node-loss
models:
  - name: stand-in
    source: gpt2
    layers: [1]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0, 1, 2]
training: {{epochs: {EPOCHS}}}
resources: {{cpus: 1, custom: {{fake_gpu: 1}}}}
max_failures: 2
"""


def epoch_trial(
    spec: TrialSpec, *, on_epoch, resume_from: str | None, marks: Path
) -> tuple[TrialResult, list[EpochRow]]:
    """Like run_trial: one checkpoint per epoch holding what a restart needs (here the rows
    so far); leaves marks saying which node ran which epoch and where a restart began."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    rows: list[EpochRow] = []
    if resume_from:
        rows = [EpochRow(**r) for r in json.loads((Path(resume_from) / "rows.json").read_text())]
        (marks / f"resumed-{spec.trial_id}-after-{len(rows)}").touch()
    for epoch in range(len(rows) + 1, spec.train.epochs + 1):
        time.sleep(0.5)
        rows.append(EpochRow(spec.trial_id, epoch, 1.0 / epoch, 0.5, 0.5))
        ckpt = tempfile.mkdtemp()
        (Path(ckpt) / "rows.json").write_text(json.dumps([r.__dict__ for r in rows]))
        on_epoch(rows[-1], ckpt)
        (marks / f"epoch-{spec.trial_id}-{epoch}-{node}").touch()
    result = TrialResult(
        trial_id=spec.trial_id,
        status="ok",
        spec_json=spec.to_json(),
        epochs_run=len(rows),
        test_acc=0.5,
    )
    return result, rows


@pytest.fixture(autouse=True)
def functions_by_value():
    """Ray workers cannot import this test module by name: ship its functions by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def crash_on(seeds: set[int], spec: TrialSpec, **kwargs) -> tuple[TrialResult, list[EpochRow]]:
    """The process dies (as under the OOM killer) for the given seeds."""
    if spec.seed in seeds:
        os._exit(9)
    return epoch_trial(spec, **kwargs)


@pytest.fixture()
def two_worker_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={"fake_gpu": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_a_grid_survives_losing_a_worker_node_mid_trial(two_worker_cluster, tmp_path: Path):
    import threading

    cluster, workers = two_worker_cluster
    (tmp_path / "grid.yaml").write_text(GRID)
    grid = load_grid(tmp_path / "grid.yaml")
    marks = tmp_path / "marks"
    marks.mkdir()
    results = str(tmp_path / "results" / grid.name)
    outcome = {}

    def run() -> None:
        fn = functools.partial(epoch_trial, marks=marks)
        outcome["summary"] = launch(grid, results, echo=lambda _: None, trial_fn=fn)

    driver = threading.Thread(target=run)
    driver.start()
    by_id = {w.node_id: w for w in workers}
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:  # a trial has checkpointed epoch 1
        for mark in marks.glob("epoch-*-1-*"):
            victim = by_id.get(mark.name.rsplit("-", 1)[1])
        time.sleep(0.05)
    assert victim is not None, "no trial reported an epoch on a worker node"
    killed = {m.name.split("-")[1] for m in marks.glob(f"epoch-*-{victim.node_id}")}
    cluster.remove_node(victim, allow_graceful=False)
    driver.join(timeout=240)
    assert not driver.is_alive()

    summary = outcome["summary"]
    ids = {s.trial_id for s in expand(grid)}
    assert summary.retries >= 1 and summary.ok == len(ids) and summary.exit_code == 0
    resumed = {m.name.split("-")[1] for m in marks.glob("resumed-*")}
    assert killed & resumed, "the killed trial restarted from zero, not from its checkpoint"
    store = Store(results)
    trials, epochs = store.read_trials(), store.read_epochs()
    assert sorted(trials.trial_id) == sorted(ids)
    assert store.done_ids() == ids and store.failed_ids() == set()
    assert len(epochs) == EPOCHS * len(ids)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()


def test_a_trial_whose_process_always_dies_is_recorded_failed_and_resume_reruns_it(
    ray_local, tmp_path: Path
):
    path = tmp_path / "grid.yaml"
    path.write_text(
        GRID.replace("custom: {fake_gpu: 1}", "custom: {}").replace("[0, 1, 2]", "[0, 1]")
    )
    grid = load_grid(path)
    marks = tmp_path / "marks"
    marks.mkdir()
    results = str(tmp_path / "results" / grid.name)
    lines: list[str] = []
    crashing = functools.partial(crash_on, {1}, marks=marks)
    summary = launch(grid, results, echo=lines.append, trial_fn=crashing)
    dead = next(s for s in expand(grid) if s.seed == 1)
    assert (summary.ok, summary.failed, summary.exit_code) == (1, 1, 1)
    assert summary.retries == grid.max_failures
    store = Store(results)
    assert store.failed_ids() == {dead.trial_id}
    failure = store.read_failures().iloc[0]
    assert failure.error_type == "ActorDiedError" and "died" in failure.error_message
    assert any(f"trial {dead.trial_id} failed: ActorDiedError" in line for line in lines)

    fixed = functools.partial(crash_on, set(), marks=marks)
    again = launch(grid, results, resume=True, echo=lines.append, trial_fn=fixed)
    assert again.to_run == (dead.trial_id,) and again.exit_code == 0
    assert store.failed_ids() == set() and len(store.read_trials()) == 2


DRIVER = """\
import functools, sys
from pathlib import Path
from typing import Any
sys.path.insert(0, {here!r})
import test_faults
from ray import cloudpickle
from slimsweep.orchestrator.grid import Grid, GridError, load_grid
from slimsweep.orchestrator.launch import LaunchSummary, launch
cloudpickle.register_pickle_by_value(test_faults)
trial = functools.partial(test_faults.epoch_trial, marks=Path({marks!r}))
launch(load_grid({grid!r}), {results!r}, trial_fn=trial)
"""


def start_driver(tmp_path: Path, grid_text: str, driver: str):
    """A launch of `grid_text` in its own process (its own session, so the driver and the Ray
    it starts are killed together), running `driver` (DRIVER or BUNDLE_DRIVER); returns once
    its first row is in the store, with (grid, results, store, marks, process)."""
    import subprocess

    path = tmp_path / "grid.yaml"
    path.write_text(grid_text)
    grid = load_grid(path)
    marks = tmp_path / "marks"
    marks.mkdir()
    results = str(tmp_path / "results" / grid.name)
    script = driver.format(
        here=str(Path(__file__).parent), marks=str(marks), grid=str(path), results=results
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL
    )
    store = Store(results)
    deadline = time.monotonic() + 120
    while not store.done_ids() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return grid, results, store, marks, process


def relaunch(grid: Grid, results: str, **kwargs: Any) -> LaunchSummary:
    """The next launch, on a fresh local Ray (the killed driver's Ray died with it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return launch(grid, results, **kwargs)
    finally:
        ray.shutdown()


def test_killing_the_driver_loses_only_the_running_trials_blocks_nothing_and_leaves_nothing(
    tmp_path: Path,
):
    """While the driver runs, a second launch of the store refuses naming it; SIGKILLed, it
    blocks no later launch, which removes its Tune folder and runs exactly what it lost."""
    import signal

    grid_text = GRID.replace("custom: {fake_gpu: 1}", "custom: {}")
    grid, results, store, marks, driver = start_driver(
        tmp_path, grid_text.replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2, 3]"), DRIVER
    )
    # A second launch of the same grid and store, while the first runs: refused, one line.
    with pytest.raises(
        GridError, match=rf"another launch of this grid is running .*pid {driver.pid},"
    ):
        launch(grid, results, echo=lambda _: None)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = store.done_ids()
    ids = {s.trial_id for s in expand(grid)}
    assert done and done < ids, "the driver should die with trials left to run"
    tune_dir = Path(results) / "_tune"
    left = sorted(p.name for p in tune_dir.iterdir())
    assert len(left) == 1, "the killed launch leaves its Tune experiment behind"

    lines: list[str] = []
    trial = functools.partial(epoch_trial, marks=marks)
    again = relaunch(grid, results, echo=lines.append, trial_fn=trial)  # the dead holder: no block
    assert lines[0] == f"removed 1 Tune folder(s) a stopped launch left in _tune/: {left[0]}"
    assert list(tune_dir.iterdir()) == []
    assert set(again.to_run) == ids - done and again.exit_code == 0
    assert sorted(store.read_trials().trial_id) == sorted(ids)
    assert len(store.read_epochs()) == EPOCHS * len(ids)


def test_damaged_result_files_are_rerun_by_the_next_launch_and_replaced(ray_local, tmp_path: Path):
    import shutil

    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace("custom: {fake_gpu: 1}", "custom: {}"))
    grid = load_grid(path)
    marks = tmp_path / "marks"
    marks.mkdir()
    results = tmp_path / "results" / grid.name
    trial = functools.partial(epoch_trial, marks=marks)
    assert launch(grid, str(results), echo=lambda _: None, trial_fn=trial).exit_code == 0
    a, b, c = (s.trial_id for s in expand(grid))
    shutil.copy(results / "trials" / f"{a}.parquet", results / "trials" / f"{a}-backup.parquet")
    (results / "epochs" / f"{b}.parquet").write_bytes(b"truncated")
    shutil.copy(results / "trials" / f"{a}.parquet", results / "trials" / f"{c}.parquet")

    with pytest.warns(UserWarning, match="2 damaged trial"):
        again = launch(grid, str(results), echo=lambda _: None, trial_fn=trial)
    assert set(again.to_run) == {b, c} and again.exit_code == 0
    with pytest.warns(UserWarning, match="ignored 1 file"):  # the backup copy stays, uncounted
        contents = Store(str(results)).scan()
    assert contents.done == {a, b, c} and not contents.damaged
    assert contents.epochs.num_rows == EPOCHS * 3


def epoch_bundle(specs: list[TrialSpec], *, on_epoch, on_done, marks: Path) -> None:
    """Like run_bundle: the bundle's trials train together; trial i stops after epoch i + 1,
    so trials finish (and their rows are written) one at a time, mid-bundle."""
    rows: dict[int, list[EpochRow]] = {i: [] for i in range(len(specs))}
    bundle = {"bundle_id": bundle_id(specs), "bundle_size": len(specs)}
    for epoch in range(1, len(specs) + 1):
        time.sleep(1.0)
        for i in range(epoch - 1, len(specs)):
            rows[i].append(EpochRow(specs[i].trial_id, epoch, 1.0 / epoch, 0.5, 0.5))
            on_epoch(rows[i][-1], None)
        spec = specs[epoch - 1]
        result = TrialResult(
            trial_id=spec.trial_id,
            status="ok",
            spec_json=spec.to_json(),
            epochs_run=epoch,
            test_acc=0.5,
            **bundle,
        )
        on_done(epoch - 1, (result, rows[epoch - 1]))


BUNDLE_DRIVER = """\
import functools, sys
from pathlib import Path
from typing import Any
sys.path.insert(0, {here!r})
import test_faults
from ray import cloudpickle
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.launch import LaunchSummary, launch
cloudpickle.register_pickle_by_value(test_faults)
bundle = functools.partial(test_faults.epoch_bundle, marks=Path({marks!r}))
launch(load_grid({grid!r}), {results!r}, bundle_fn=bundle)
"""


def test_killing_the_driver_mid_bundle_loses_and_duplicates_nothing(tmp_path: Path):
    import signal

    grid_text = GRID.replace("custom: {fake_gpu: 1}", "custom: {}").replace(
        "seeds: [0, 1, 2]", "seeds: [0, 1, 2, 3]\nruntime: {fuse: 4}"
    )
    grid, results, store, marks, driver = start_driver(tmp_path, grid_text, BUNDLE_DRIVER)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = store.done_ids()
    ids = {s.trial_id for s in expand(grid)}
    assert done and done < ids, "the driver should die with the bundle half done"

    bundle = functools.partial(epoch_bundle, marks=marks)
    again = relaunch(grid, results, echo=lambda _: None, bundle_fn=bundle)
    assert set(again.to_run) == ids - done and again.exit_code == 0
    trials, epochs = store.read_trials(), store.read_epochs()
    assert sorted(trials.trial_id) == sorted(ids)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert len(epochs) == trials.epochs_run.sum()
    # the relaunch bundled only what was missing
    assert sorted(trials.bundle_size) == sorted(
        [4] * len(done) + [len(ids - done)] * len(ids - done)
    )


def dies_after_its_first_trial(
    specs: list[TrialSpec], *, on_epoch, on_done, marks: Path, results: str
) -> None:
    """A bundle stand-in writing which trials each attempt was given. The first attempt
    finishes its first trial, waits until the driver has stored that row, and its process
    dies; later attempts finish every trial they are given."""
    attempt = len(list(marks.iterdir()))
    (marks / f"attempt-{attempt}").write_text(" ".join(s.trial_id for s in specs))
    bundle = {"bundle_id": bundle_id(specs), "bundle_size": len(specs)}
    for i, spec in enumerate(specs):
        row = EpochRow(spec.trial_id, 1, 0.5, 0.5, 0.1)
        result = TrialResult(
            trial_id=spec.trial_id,
            status="ok",
            spec_json=spec.to_json(),
            epochs_run=1,
            test_acc=0.5,
            **bundle,
        )
        on_done(i, (result, [row]))
        if attempt == 0:
            deadline = time.monotonic() + 60
            while spec.trial_id not in Store(results).done_ids() and time.monotonic() < deadline:
                time.sleep(0.2)
            os._exit(9)


def test_a_retried_bundle_trains_only_the_trials_it_had_not_finished(ray_local, tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        GRID.replace("custom: {fake_gpu: 1}", "custom: {}").replace(
            "seeds: [0, 1, 2]", "seeds: [0, 1, 2, 3]\nruntime: {fuse: 4}"
        )
    )
    grid = load_grid(path)
    marks = tmp_path / "marks"
    marks.mkdir()
    results = str(tmp_path / "results" / grid.name)
    bundle = functools.partial(dies_after_its_first_trial, marks=marks, results=results)

    summary = launch(grid, results, echo=lambda _: None, bundle_fn=bundle)

    ids = [s.trial_id for s in expand(grid)]
    first, *rest = (marks / "attempt-0").read_text().split()
    assert sorted([first, *rest]) == sorted(ids)
    assert (marks / "attempt-1").read_text().split() == rest  # the finished one is not retrained
    assert (summary.ok, summary.failed, summary.retries) == (4, 0, 3)  # 3 trials retried once
    trials = Store(results).read_trials().set_index("trial_id")
    assert trials.loc[first, "bundle_size"] == 4 and set(trials.loc[rest, "bundle_size"]) == {3}
    assert len(Store(results).read_epochs()) == 4

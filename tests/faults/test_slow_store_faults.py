"""The fault suite's slow part for the store (`pytest -m slow`; minutes, real Ray): the driver
SIGKILLed at random moments across a grid, then relaunched to the end; and the object store
going away in the middle of a launch, then coming back.

The trial function is a stand-in with run_trial's signature (epochs are sleeps), so the
faults, not the model, decide what happens."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.launch import launch
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store, join
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec

pytestmark = pytest.mark.slow

EPOCHS = 3

GRID = f"""\
name: kill-points
models:
  - name: stand-in
    source: gpt2
    layers: [1, 2]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0, 1, 2, 3]
training: {{epochs: {EPOCHS}}}
resources: {{cpus: 1}}
"""


def sleepy_trial(
    spec: TrialSpec, *, on_epoch, resume_from: str | None, epoch_s: float
) -> tuple[TrialResult, list[EpochRow]]:
    rows = []
    for epoch in range(1, spec.train.epochs + 1):
        time.sleep(epoch_s)
        rows.append(EpochRow(spec.trial_id, epoch, 1.0 / epoch, 0.5, epoch_s))
        on_epoch(rows[-1], None)
    result = TrialResult(
        trial_id=spec.trial_id, status="ok", spec_json=spec.to_json(), epochs_run=len(rows)
    )
    return result, rows


DRIVER = """\
import functools, sys
sys.path.insert(0, {here!r})
import test_slow_store_faults as t
import ray
from ray import cloudpickle
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.launch import launch
cloudpickle.register_pickle_by_value(t)
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
launch(load_grid({grid!r}), {results!r}, trial_fn=functools.partial(t.sleepy_trial, epoch_s=0.4))
"""


def test_random_kill_points_across_a_grid_lose_and_duplicate_nothing(tmp_path: Path):
    (tmp_path / "grid.yaml").write_text(GRID)
    grid = load_grid(tmp_path / "grid.yaml")
    results = str(tmp_path / "results" / grid.name)
    script = DRIVER.format(
        here=str(Path(__file__).parent), grid=str(tmp_path / "grid.yaml"), results=results
    )
    ids = {s.trial_id for s in expand(grid)}
    store = Store(results)
    rng = random.Random(15)
    for _ in range(6):  # kill points from Ray's start-up to the middle of the grid
        driver = subprocess.Popen(
            [sys.executable, "-c", script],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.5, 12.0))
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    last = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert last.returncode == 0, last.stderr[-2000:]
    trials, epochs = store.read_trials(), store.read_epochs()
    assert sorted(trials.trial_id) == sorted(ids)
    assert len(epochs) == EPOCHS * len(ids) and not epochs.duplicated(["trial_id", "epoch"]).any()
    folder = Path(results)
    assert list((folder / "_tune").iterdir()) == [] and not (folder / "_lease.json").exists()


@pytest.fixture()
def s3(s3_env):
    """(start, stop) of an S3 server on a fixed loopback port; its objects survive a stop
    (moto keeps them in this process)."""
    from moto.server import ThreadedMotoServer

    first = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    first.start()
    port = first.get_host_and_port()[1]
    servers = [first]

    def start() -> None:
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    def stop() -> None:
        servers[-1].stop()

    url = f"http://127.0.0.1:{port}"
    s3_env(url)
    yield url, start, stop
    stop()


def test_a_store_outage_mid_launch_keeps_finished_records_and_the_next_launch_uploads(
    s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import ray
    from ray import cloudpickle
    from slimsweep.orchestrator import store as store_mod

    url, start, stop = s3
    monkeypatch.setattr(store_mod, "WRITE_RETRY_DELAYS_S", (0.5, 0.5))
    (tmp_path / "grid.yaml").write_text(GRID)
    grid = load_grid(tmp_path / "grid.yaml")
    results = join(f"s3://sweeps/runs?endpoint_override={url}", grid.name)
    store = Store(results)
    ids = {s.trial_id for s in expand(grid)}
    lines: list[str] = []
    outcome = {}
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trial = functools.partial(sleepy_trial, epoch_s=0.5)

        def run() -> None:
            try:
                outcome["summary"] = launch(grid, results, echo=lines.append, trial_fn=trial)
            except BaseException as e:  # the launch must not end: shown by the assert below
                outcome["error"] = e

        driver = threading.Thread(target=run)
        driver.start()
        deadline = time.monotonic() + 120
        while not any(" done 1/" in line or " done 2/" in line for line in lines):
            assert time.monotonic() < deadline and driver.is_alive(), lines
            time.sleep(0.1)
        stop()  # the store goes away with trials running and pending
        driver.join(timeout=300)
        assert not driver.is_alive()
        assert "error" not in outcome, repr(outcome.get("error"))
        summary = outcome["summary"]
        assert summary.unsent >= 1 and summary.exit_code == 1
        kept = [line for line in lines if "its record is kept in" in line]
        assert len(kept) == summary.unsent
        start()
        again = launch(grid, results, echo=lines.append, trial_fn=trial)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert f"uploaded {summary.unsent} finished trial record(s)" in "\n".join(lines)
    assert again.exit_code == 0 and store.done_ids() == ids
    assert len(store.read_epochs()) == EPOCHS * len(ids)

"""A machine that already runs Ray (`ray start --head` has run, RAY_ADDRESS points at it):
`slimsweep launch` without `--address` runs on a private local Ray, as the docs say, and
says so in one line, instead of ending in Ray's num_cpus ValueError.

The external head is started here with its own temp dir (so no other Ray on this machine
finds it) and stopped by its process group, which this fixture started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.launch import launch
from slimsweep.orchestrator.store import Store
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec

GRID = """\
name: beside
models: [{name: stand-in, source: gpt2, layers: [1]}]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0]
"""


def instant_trial(spec: TrialSpec, **_) -> tuple[TrialResult, list[EpochRow]]:
    result = TrialResult(trial_id=spec.trial_id, status="ok", spec_json=spec.to_json())
    return result, [EpochRow(spec.trial_id, 1, 0.5, 0.5, 0.0)]


@pytest.fixture()
def functions_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def external_head(tmp_path_factory):
    """`ray start --head --block` in its own process group; yields its address."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")  # kept short: Ray's socket paths have a length cap
    proc = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray start --head did not come up")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_launch_without_address_runs_on_its_own_ray_beside_a_running_cluster(
    external_head, functions_by_value, tmp_path, monkeypatch
):
    monkeypatch.setenv("RAY_ADDRESS", external_head)
    (tmp_path / "g.yaml").write_text(GRID)
    grid = load_grid(tmp_path / "g.yaml")
    lines: list[str] = []
    results = str(tmp_path / "res" / grid.name)
    summary = launch(grid, results, echo=lines.append, trial_fn=instant_trial)
    assert summary.ok == 1 and summary.exit_code == 0
    notes = [line for line in lines if line.startswith("note: ")]
    assert notes == [
        f"note: RAY_ADDRESS={external_head} is set; this launch runs on its own local Ray "
        f"(to use that cluster: --address auto)"
    ]
    assert len(Store(results).done_ids()) == 1

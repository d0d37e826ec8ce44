"""Two Ray nodes started as docs/cluster.md says (`ray start --head`, then `ray start
--address` on a second node; here both on this machine, each with one CPU), and
`slimsweep launch GRID --address auto` run on the head: real trials (tiny GPT-2) run on both
nodes, each result row names the node that ran it, and killing the second node's raylet
while it runs its second trial loses nothing: that trial is retried on the head, and every
trial ends with exactly one row."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ray_nodes import busy_trials, free_port, head_ports, node_ports, raylets, start_node, wait_for
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store

SLIMSWEEP = str(Path(sys.executable).with_name("slimsweep"))
GRID = """\
name: two-nodes
models:
  - name: tiny-gpt2
    source: {model}
    layers: [1, 2, 4]
tasks:
  - {{name: sst2, dataset: '{data}', config: null}}
heads: [prompt-lm]
seeds: [0, 1, 2]
data: {{train_size: 8, valid_size: 8, test_size: 8}}
training: {{epochs: 3, patience: 3, lr: 1.0e-3}}
resources: {{cpus: 1}}
max_failures: 2
"""
# A lost node is noticed after ~3 missed health checks of 0.5 s, not Ray's default ~30 s.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def test_a_grid_runs_on_two_nodes_and_losing_one_mid_trial_loses_nothing(
    ray_tmpdir, tiny_models, task_dirs, tmp_path: Path, monkeypatch
):
    for key, value in FAST_HEALTH_CHECKS.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    start_node(["--head", f"--port={port}", "--num-cpus=1", *head_ports()], tmp_path / "head.log")
    wait_for(lambda: len(raylets(ray_tmpdir)) == 1, "the head node")
    second_port = free_port()
    worker = [f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--node-manager-port={second_port}"]
    start_node([*worker, *node_ports()], tmp_path / "worker.log")
    wait_for(lambda: len(raylets(ray_tmpdir)) == 2, "the second node")
    nodes = raylets(ray_tmpdir)
    (second,) = [n for n, f in nodes.items() if f["node_manager_port"] == str(second_port)]
    (head,) = set(nodes) - {second}

    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(model=tiny_models["gpt2"], data=task_dirs["sst2"]))
    grid = load_grid(path)
    root = tmp_path / "results"
    log = tmp_path / "launch.log"  # a file, not a pipe nobody reads while we wait
    with log.open("w") as out:
        driver = subprocess.Popen(
            [SLIMSWEEP, "launch", str(path), "--address", "auto", "--results", str(root)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    second_raylet = int(nodes[second]["pid"])
    host = socket.gethostname()
    store = Store(f"{root}/{grid.name}")

    def second_node_ran_one_and_runs_another() -> bool:
        ran = f"{host}/{second}" in set(store.read_trials().node)
        return driver.poll() is not None or (ran and bool(busy_trials(ray_tmpdir, second_raylet)))

    wait_for(second_node_ran_one_and_runs_another, "a second trial on the second node", 300)
    assert driver.poll() is None, "the grid ended before the second node ran two trials"
    os.kill(second_raylet, signal.SIGKILL)
    driver.wait(timeout=400)
    out = log.read_text()

    assert driver.returncode == 0, out
    assert re.search(r"\| retried [1-9]", out), out  # the trial of the lost node ran again
    trials, epochs = store.read_trials(), store.read_epochs()
    ids = {s.trial_id for s in expand(grid)}
    assert sorted(trials.trial_id) == sorted(ids) and set(trials.status) == {"ok"}
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert len(epochs) == trials.epochs_run.sum()
    assert set(trials.node) == {f"{host}/{head}", f"{host}/{second}"}

"""docker/slurm/slimsweep.sbatch run for real: a one-node SLURM (munged, slurmctld and slurmd
from Debian's slurm-wlm, configured and keyed in a temp dir) takes the script with `sbatch`,
which starts Ray on the allocation, runs a tiny grid (tiny GPT-2) with
`slimsweep launch GRID --address auto`, and stops Ray at the end.

Marked slow (about 3 minutes): `.venv/bin/pytest -m slow tests/integration/test_slurm.py`.
Needs root and `apt-get install -y slurm-wlm munge` (docs/cluster.md); skipped otherwise, as
in CI, which installs no system packages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_nodes import free_port, head_ports, ray_processes, wait_for
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "slurm" / "slimsweep.sbatch"
# Daemons live in /usr/sbin, which a user's PATH may lack.
BIN = {
    name: shutil.which(name, path=f"{os.environ['PATH']}:/usr/sbin") or ""
    for name in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel", "squeue")
}
MISSING = [name for name, path in BIN.items() if not path]

pytestmark = [
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"SLURM not installed (no {', '.join(MISSING)}): "
        "apt-get install -y slurm-wlm munge (docs/cluster.md)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="a local slurmd needs root"),
    pytest.mark.slow,  # about 3 minutes: Ray starts three times under SLURM
]

SLURM_CONF = """\
ClusterName=slimsweep-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

GRID = """\
name: slurm-tiny
models:
  - name: tiny-gpt2
    source: {model}
    layers: [1, 2]
tasks:
  - {{name: sst2, dataset: '{data}', config: null}}
heads: [prompt-lm]
seeds: [0]
data: {{train_size: 8, valid_size: 8, test_size: 8}}
training: {{epochs: 2, patience: 2, lr: 1.0e-3}}
resources: {{cpus: 1}}
"""


def _daemon(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def _node_state(conf: Path) -> str:
    out = subprocess.run(
        [BIN["sinfo"], "-h", "-o", "%T"],
        env={**os.environ, "SLURM_CONF": str(conf)},
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def slurm_conf() -> Iterator[Path]:
    """A running one-node SLURM of this machine's CPUs; yields its slurm.conf (SLURM_CONF)."""
    tmp = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))
    tmp.chmod(0o755)  # munged wants its socket's folder reachable by every user
    (tmp / "state").mkdir()
    (tmp / "spool").mkdir()
    key = tmp / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = tmp / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=socket.gethostname().split(".")[0],
            ctld_port=free_port(),
            slurmd_port=free_port(),
            dir=tmp,
            cpus=os.cpu_count(),
        )
    )
    munged = [BIN["munged"], "--foreground", "--force", f"--key-file={key}"]
    munged += [f"--socket={tmp}/munge.sock"]
    munged += [f"--{f}-file={tmp}/munged.{f}" for f in ("pid", "log", "seed")]
    daemons = [_daemon(munged, tmp / "munged.out")]
    try:
        wait_for((tmp / "munge.sock").exists, "munged", 30)
        for name in ("slurmctld", "slurmd"):
            daemons.append(_daemon([BIN[name], "-D", "-f", str(conf)], tmp / f"{name}.out"))
        wait_for(lambda: _node_state(conf) == "idle", "the SLURM node to be idle", 60)
        yield conf
    finally:
        for proc in reversed(daemons):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def sbatch(conf: Path, tmp_path: Path, *args: str, wait: bool = True) -> tuple[int, str]:
    """`sbatch` of the script as docs/cluster.md gives it, sized to this machine (one node,
    its CPUs). With `wait`: (the job's exit status, its output); else (0, the job id)."""
    env = {
        **os.environ,  # RAY_TMPDIR: this test's Ray, which `--address auto` then finds
        "SLURM_CONF": str(conf),
        "SLIMSWEEP_VENV": sys.prefix,
        "RAY_PORT": str(free_port()),
        "RAY_HEAD_ARGS": " ".join(head_ports()),
    }
    job_out = tmp_path / "job.out"
    command = [BIN["sbatch"], "--wait" if wait else "--parsable", "--nodes=1"]
    command += [f"--cpus-per-task={os.cpu_count()}", f"--output={job_out}", f"--chdir={tmp_path}"]
    done = subprocess.run(
        [*command, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=540
    )
    if not wait:
        assert done.returncode == 0, done.stderr
        return 0, done.stdout.strip()
    return done.returncode, job_out.read_text() if job_out.exists() else done.stderr


def tiny_grid(tmp_path: Path, tiny_models, task_dirs) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(model=tiny_models["gpt2"], data=task_dirs["sst2"]))
    return path


def test_the_sbatch_script_runs_a_tiny_grid_on_ray_and_stops_ray(
    slurm_conf, ray_tmpdir, tiny_models, task_dirs, tmp_path: Path
):
    path = tiny_grid(tmp_path, tiny_models, task_dirs)
    root = tmp_path / "results"
    status, out = sbatch(slurm_conf, tmp_path, str(path), str(root))
    assert status == 0, out
    assert "slimsweep.sbatch: 1 Ray nodes up" in out
    assert "grid 'slurm-tiny': 2/2 trials done" in out

    grid = load_grid(path)
    trials = Store(f"{root}/{grid.name}").read_trials()
    assert sorted(trials.trial_id) == sorted(s.trial_id for s in expand(grid))
    assert set(trials.status) == {"ok"} and trials.node.str.startswith(socket.gethostname()).all()
    # The script's trap stopped Ray: no process of this test's Ray is left.
    wait_for(lambda: not ray_processes(ray_tmpdir), "Ray to stop after the job", 30)


def test_ray_is_stopped_when_the_launch_fails(slurm_conf, ray_tmpdir, tmp_path: Path):
    status, out = sbatch(slurm_conf, tmp_path, "missing.yaml")
    assert status == 2, out  # the launch's exit status is the job's
    assert "slimsweep: error: missing.yaml" in out
    wait_for(lambda: not ray_processes(ray_tmpdir), "Ray to stop after the job", 30)


def test_ray_is_stopped_when_the_job_is_cancelled_mid_grid(
    slurm_conf, ray_tmpdir, tiny_models, task_dirs, tmp_path: Path
):
    path = tiny_grid(tmp_path, tiny_models, task_dirs)
    _, job = sbatch(slurm_conf, tmp_path, str(path), str(tmp_path / "results"), wait=False)
    job_out = tmp_path / "job.out"
    wait_for(
        lambda: job_out.exists() and "running 1" in job_out.read_text(), "a running trial", 300
    )
    env = {**os.environ, "SLURM_CONF": str(slurm_conf)}
    subprocess.run([BIN["scancel"], job], env=env, check=True)

    def job_gone() -> bool:
        queue = [BIN["squeue"], "-h", "-j", job]
        return not subprocess.run(queue, env=env, capture_output=True, text=True).stdout.strip()

    wait_for(job_gone, "the cancelled job to end", 120)
    wait_for(lambda: not ray_processes(ray_tmpdir), "Ray to stop after the job", 30)

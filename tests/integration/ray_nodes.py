"""Ray nodes started with `ray start`, as a user starts them, for the cluster tests; and
how to find and kill exactly their processes.

Every process of a Ray whose temp dir is `tmp` names `tmp` on its command line, or descends
from one that does (workers rename themselves `ray::...`). Never `ray stop` here: it stops
every Ray of the user on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """The `ray start` ports that default to fixed numbers: two nodes on one machine (or a
    node beside another Ray) must not share them."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]


def head_ports() -> list[str]:
    return ["--include-dashboard=false", f"--dashboard-port={free_port()}", *node_ports()]


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start --block ARGS` in its own session, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)


# --- processes ------------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, command line words) of every process on the machine."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name is in parentheses and may hold spaces: split after it.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry.name)] = (ppid, [w for w in words if w])
    return out


def ray_processes(tmp: str) -> dict[int, tuple[int, list[str]]]:
    """The processes of the Ray living in `tmp`, with all their descendants."""
    procs = _processes()
    found = {pid for pid, (_, words) in procs.items() if any(tmp in w for w in words)}
    while True:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        if not children:
            break
        found |= children
    found.discard(os.getpid())
    return {pid: procs[pid] for pid in found}


def raylets(tmp: str) -> dict[str, dict[str, str]]:
    """node id -> the raylet's pid and command-line flags, for the Ray living in `tmp`."""
    out = {}
    for pid, (_, words) in ray_processes(tmp).items():
        if words and words[0].endswith("/raylet"):
            flags = dict(w[2:].split("=", 1) for w in words[1:] if w.startswith("--") and "=" in w)
            out[flags["node_id"]] = {"pid": str(pid), **flags}
    return out


def busy_trials(tmp: str, raylet_pid: int) -> list[int]:
    """The raylet's workers that are running a Tune trial right now (by process title)."""
    return [
        pid
        for pid, (ppid, words) in ray_processes(tmp).items()
        if ppid == raylet_pid and words and words[0].startswith("ray::ImplicitFunc.train")
    ]


def kill_ray(tmp: str) -> None:
    """SIGTERM, then SIGKILL after a grace period, to every process of the Ray in `tmp`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = list(ray_processes(tmp))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5.0
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = list(ray_processes(tmp))
        if not pids:
            return

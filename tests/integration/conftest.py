"""Each cluster test gets its own Ray temp dir (RAY_TMPDIR), so `--address auto` finds that
test's head and no other Ray on the machine, and its Ray is killed by pid afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest
from ray_nodes import kill_ray


@pytest.fixture()
def ray_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Ray temp dir of this test's own, exported as RAY_TMPDIR (short: Ray's socket paths
    have a length cap); its Ray is killed afterwards."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        yield tmp
    finally:
        kill_ray(tmp)
        shutil.rmtree(tmp, ignore_errors=True)

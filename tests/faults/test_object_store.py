"""Results on an S3-compatible object store: a real S3 server (moto's, on 127.0.0.1) reached
through an endpoint in the URI (`?endpoint_override=`) or AWS_ENDPOINT_URL, as MinIO, Ceph
or R2 users do; a missing bucket and an unreachable endpoint are one line before anything
starts; a launch on it keeps Tune's checkpoints there too."""

from __future__ import annotations

import json
import socket
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.launch import launch
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store, join
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec

GRID = """\
name: tiny
models:
  - name: stand-in
    source: gpt2
    layers: [1]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0, 1]
training: {epochs: 2}
resources: {cpus: 1}
"""


@pytest.fixture()
def endpoint(s3_env):
    """An S3 server on loopback with one bucket, `sweeps`."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3_env(url)
    yield url
    server.stop()


@pytest.fixture()
def grid(tmp_path: Path):
    (tmp_path / "tiny.yaml").write_text(GRID)
    return load_grid(tmp_path / "tiny.yaml")


def write_all(store: Store, grid) -> set[str]:
    for spec in expand(grid):
        result = TrialResult(trial_id=spec.trial_id, status="ok", spec_json=spec.to_json())
        store.write_result(result, [EpochRow(spec.trial_id, 1, 0.5, 0.5, 0.1)])
    return {s.trial_id for s in expand(grid)}


def keys(url: str) -> list[str]:
    fs = pafs.S3FileSystem(endpoint_override=url)
    infos = fs.get_file_info(pafs.FileSelector("sweeps", recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def test_an_endpoint_in_the_uri_reaches_every_reader_and_the_grid_folder_is_not_mangled(
    endpoint, grid, capsys
):
    root = f"s3://sweeps/runs?endpoint_override={endpoint}"
    ids = write_all(Store(join(root, grid.name)), grid)
    assert all(k.startswith("sweeps/runs/tiny/") and "?" not in k for k in keys(endpoint))
    assert main(["status", grid.path, "--results", root]) == 0
    assert "done 2/2, failed 0, missing 0" in capsys.readouterr().out
    sql = "select count(distinct trial_id) n from trials"
    assert main(["query", sql, "--results", root, "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "2"]
    assert len(ids) == 2


def test_aws_endpoint_url_works_as_the_docs_say(endpoint, grid, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    write_all(Store(f"s3://sweeps/env/{grid.name}"), grid)
    assert main(["status", grid.path, "--results", "s3://sweeps/env"]) == 0
    assert "done 2/2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "{grid}"],
        ["results", "{grid}"],
        ["query", "select 1"],
        ["launch", "{grid}", "--dry-run"],
        ["launch", "{grid}"],
    ],
)
def test_a_missing_bucket_is_one_line_before_anything_starts(endpoint, grid, capsys, argv):
    root = f"s3://no-such-bucket/runs?endpoint_override={endpoint}"
    assert main([a.format(grid=grid.path) for a in argv] + ["--results", root]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "bucket 'no-such-bucket' does not exist" in err
    assert "Ray" not in out + err


def test_an_unreachable_endpoint_is_one_line(grid, capsys, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # released: nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    root = f"s3://sweeps/runs?endpoint_override=http://127.0.0.1:{port}"
    assert main(["launch", grid.path, "--dry-run", "--results", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the store does not answer" in err


def checkpointing_trial(spec: TrialSpec, *, on_epoch, resume_from):
    """Two epochs, each with a restart checkpoint: Tune stores them on the object store."""
    rows = []
    for epoch in (1, 2):
        rows.append(EpochRow(spec.trial_id, epoch, 1.0 / epoch, 0.5, 0.1))
        ckpt = tempfile.mkdtemp()
        (Path(ckpt) / "rows.json").write_text(json.dumps([r.__dict__ for r in rows]))
        on_epoch(rows[-1], ckpt)
    result = TrialResult(trial_id=spec.trial_id, status="ok", spec_json=spec.to_json())
    return result, rows


def test_a_launch_on_an_endpoint_in_the_uri_stores_results_and_checkpoints_there(endpoint, grid):
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # address="local": a Ray of our own even if another one runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = join(f"s3://sweeps/runs?endpoint_override={endpoint}", grid.name)
        summary = launch(grid, results, echo=lambda _: None, trial_fn=checkpointing_trial)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (summary.ok, summary.failed, summary.exit_code) == (2, 0, 0)
    store = Store(results)
    assert store.done_ids() == {s.trial_id for s in expand(grid)}
    assert len(store.read_epochs()) == 4
    # Tune's experiment went to the same bucket and was removed at the end.
    assert not [k for k in keys(endpoint) if "/_tune/" in k and "checkpoint" in k]
    assert not [k for k in keys(endpoint) if not k.startswith("sweeps/runs/tiny/")]

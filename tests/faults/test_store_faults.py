"""The fault suite's fast part for the store (docs/reliability.md): foreign, copied, truncated
and garbage files; values the store cannot hold; a store that stops answering; the
concurrent-launch lease and a killed launch's leftovers; rerun hints; `query` read-only.
No Ray: every launch here has nothing to run (or refuses before Ray starts)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from slimsweep.orchestrator import lease as lease_mod
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import Grid, GridError, load_grid
from slimsweep.orchestrator.launch import keep, launch, plan_launch, status
from slimsweep.orchestrator.lease import Holder, Lease
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store, failure_result, join
from slimsweep.workers.spec import EpochRow, TrialResult

GRID = """\
name: tiny
models:
  - name: tiny
    source: gpt2
    layers: [1, 2]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0, 1, 2]
"""


@pytest.fixture()
def grid(tmp_path: Path) -> Grid:
    (tmp_path / "tiny.yaml").write_text(GRID)
    return load_grid(tmp_path / "tiny.yaml")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Records kept locally go under $XDG_CACHE_HOME: one per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def ok(spec, test_acc: float = 0.5) -> tuple[TrialResult, list[EpochRow]]:
    result = TrialResult(
        trial_id=spec.trial_id, status="ok", spec_json=spec.to_json(), test_acc=test_acc
    )
    return result, [
        EpochRow(spec.trial_id, 1, 0.7, 0.5, 0.1),
        EpochRow(spec.trial_id, 2, 0.6, 0.5, 0.1),
    ]


def fill(grid: Grid, root: Path) -> tuple[Store, list]:
    store = Store(str(root / grid.name))
    specs = expand(grid)
    for spec in specs:
        store.write_result(*ok(spec))
    return store, specs


def vandalise(folder: Path, specs: list) -> dict[str, str]:
    """What careful and careless people leave in a grid folder. Returns {name: trial id}
    of the trials it damages: b (another trial's row under its name), c (truncated epochs
    file), d (garbage trial file). a is copied; e, f are untouched."""
    a, b, c, d = (s.trial_id for s in specs[:4])
    shutil.copy(folder / "trials" / f"{a}.parquet", folder / "trials" / f"{a}-backup.parquet")
    shutil.copy(folder / "epochs" / f"{a}.parquet", folder / "epochs" / f"{a} (1).parquet")
    (folder / "trials" / "notes.txt").write_text("rerun these with lr 1e-4")
    shutil.copy(folder / "trials" / f"{a}.parquet", folder / "trials" / f"{b}.parquet")
    data = (folder / "epochs" / f"{c}.parquet").read_bytes()
    (folder / "epochs" / f"{c}.parquet").write_bytes(data[: len(data) // 2])
    (folder / "trials" / f"{d}.parquet").write_bytes(b"\x00garbage" * 10)
    return {"b": b, "c": c, "d": d}


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("slimsweep: warning:")]


# --- one result per trial id, whatever lies in the folder ---------------------------------


def test_copies_strays_truncated_and_garbage_files_count_nothing_and_damage_only_their_trial(
    grid, tmp_path
):
    store, specs = fill(grid, tmp_path / "res")
    damaged = vandalise(tmp_path / "res" / grid.name, specs)
    with pytest.warns(UserWarning) as caught:
        contents = store.scan()
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert contents.done == {s.trial_id for s in specs} - set(damaged.values())
    assert sorted(contents.trials.column("trial_id").to_pylist()) == sorted(contents.done)
    assert contents.epochs.num_rows == 2 * 3
    assert contents.damaged == {
        damaged["b"]: f"holds rows of trial {specs[0].trial_id}",
        damaged["c"]: "unreadable: Parquet magic bytes not found in footer",
        damaged["d"]: "unreadable: Parquet magic bytes not found in footer",
    }
    paths = sorted(i.path for i in contents.ignored)
    assert paths == sorted(
        [
            f"trials/{specs[0].trial_id}-backup.parquet",
            f"epochs/{specs[0].trial_id} (1).parquet",
            "trials/notes.txt",
            f"trials/{damaged['b']}.parquet",
            f"epochs/{damaged['c']}.parquet",
            f"trials/{damaged['d']}.parquet",
        ]
    )


def test_every_reader_gives_one_result_per_trial_and_names_what_it_ignored_once(
    grid, tmp_path, capsys
):
    root = tmp_path / "res"
    _, specs = fill(grid, root)
    vandalise(root / grid.name, specs)
    r = ["--results", str(root)]

    assert main(["status", grid.path, *r]) == 1
    out, err = capsys.readouterr()
    assert "done 3/6, failed 0, missing 3" in out
    assert sum(line.startswith("  damaged ") for line in out.splitlines()) == 3
    assert "ignored 3 file(s)" in out and "-backup.parquet" in out and not warning_lines(err)

    assert main(["results", grid.path, *r, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    n = {(c["layers"], c["task"]): c["n"] for c in json.loads(out)}
    # layers 1: seeds 0 (copied: still once), 1 and 2 (damaged); layers 2: seed 0 damaged
    assert n == {(1, "sst2"): 1, (1, "average"): 1, (2, "sst2"): 2, (2, "average"): 2}
    assert len(warning_lines(err)) == 1 and "ignored 6 file(s)" in err

    sql = (
        "select count(*) n, count(distinct trial_id) d, (select count(*) from epochs) e from trials"
    )
    assert main(["query", sql, *r, "--grid", grid.name, "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1] == "3,3,6" and len(warning_lines(err)) == 1

    assert main(["report", grid.path, *r, "--out", str(tmp_path / "report")]) == 0
    _, err = capsys.readouterr()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "50.00 (1)*" in md and "50.00 ± 0.00 (2)*" in md
    assert len(warning_lines(err)) == 1


def test_each_damaged_trial_is_rerun_by_the_next_launch_and_the_rewrite_repairs_it(grid, tmp_path):
    store, specs = fill(grid, tmp_path / "res")
    damaged = vandalise(tmp_path / "res" / grid.name, specs)
    with pytest.warns(UserWarning):
        to_run, skipped, _ = plan_launch(grid, store, resume=False)
    assert {s.trial_id for s in to_run} == set(damaged.values()) and not skipped
    for spec in to_run:  # what the launch's recorder does with each rerun
        store.write_result(*ok(spec))
    with pytest.warns(UserWarning, match="ignored 3 file"):  # the copies and notes.txt stay
        contents = store.scan()
    assert contents.done == {s.trial_id for s in specs} and not contents.damaged


def test_a_trial_row_without_its_epochs_file_is_named_damaged_by_status(grid, tmp_path):
    store, specs = fill(grid, tmp_path / "res")
    (tmp_path / "res" / grid.name / "epochs" / f"{specs[0].trial_id}.parquet").unlink()
    st = status(grid, store.uri)
    assert st.damaged == ((specs[0].trial_id, f"epochs/{specs[0].trial_id}.parquet is missing"),)
    assert (st.done, st.missing, st.exit_code) == (5, 1, 1)


def test_a_file_in_the_wrong_folder_or_with_two_rows_is_not_its_trials_fact(grid, tmp_path):
    store, specs = fill(grid, tmp_path / "res")
    folder = tmp_path / "res" / grid.name
    a, b = specs[0].trial_id, specs[1].trial_id
    (folder / "failed").mkdir()
    shutil.copy(folder / "trials" / f"{a}.parquet", folder / "failed" / f"{a}.parquet")
    two = pq.read_table(folder / "trials" / f"{b}.parquet")
    pq.write_table(two.take([0, 0]), folder / "trials" / f"{b}.parquet")
    with pytest.warns(UserWarning):
        contents = store.scan()
    assert contents.damaged == {b: "holds 2 rows, not 1"}
    assert a in contents.done and contents.failures.num_rows == 0
    assert {i.path: i.reason for i in contents.ignored}[f"failed/{a}.parquet"] == (
        "holds a trial with status 'ok'"
    )


def test_a_copied_grid_folder_counts_nothing_twice_in_query(grid, tmp_path, capsys):
    root = tmp_path / "res"
    fill(grid, root)
    shutil.copytree(root / grid.name, root / f"{grid.name}-copy")
    assert main(["query", "select count(*) from trials", "--results", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.split()[-1] == "6"
    assert len(warning_lines(err)) == 1 and "tiny-copy/trials/" in err and "a copy of grid" in err


# --- recording never ends the launch ----------------------------------------------------


def test_a_value_the_store_cannot_hold_becomes_that_trials_failure(grid, tmp_path):
    store = Store(str(tmp_path / "res"))
    spec = expand(grid)[0]
    result, epochs = ok(spec)
    huge = dataclasses.replace(result, n_params=2**70)
    lines: list[str] = []
    recorded, sent = keep(store, huge, epochs, lines.append)
    assert sent and recorded.status == "failed" and recorded.error_type == "ValueError"
    assert recorded.error_message.startswith("column n_params cannot hold 1180591620717411303424")
    assert store.failed_ids() == {spec.trial_id} and store.done_ids() == set()
    assert not lines


def test_a_failure_whose_spec_overflows_a_column_is_still_recorded(grid, tmp_path):
    store = Store(str(tmp_path / "res"))
    spec = dataclasses.replace(expand(grid)[0], seed=2**70)
    store.write_failure(failure_result(spec, OverflowError("seed too large")))
    failure = store.read_failures().iloc[0]
    assert failure.trial_id == spec.trial_id and failure.error_message == "seed too large"
    assert failure.seed is None or failure.seed != failure.seed  # null


def test_an_unreachable_store_keeps_the_record_locally_and_the_next_launch_uploads_it(
    grid, tmp_path, private_cache, monkeypatch
):
    store, specs = fill(grid, tmp_path / "res")
    last = specs[-1]
    (tmp_path / "res" / grid.name / "trials" / f"{last.trial_id}.parquet").unlink()
    down = Store(store.uri, retry_delays=(0.0, 0.0))
    tries: list[str] = []

    def refused(kind: str, trial_id: str, table) -> None:
        tries.append(kind)
        raise OSError("Connection refused")

    monkeypatch.setattr(down, "_write_once", refused)
    lines: list[str] = []
    _, sent = keep(down, *ok(last), lines.append)
    assert not sent and tries == ["epochs"] * 3
    kept = down.unsent_dir() / f"{last.trial_id}.json"
    assert kept.is_file() and kept.is_relative_to(private_cache)
    assert len(lines) == 1 and str(kept) in lines[0] and "next launch uploads it" in lines[0]
    assert "Connection refused" in lines[0]

    st = status(grid, store.uri)
    assert (st.done, st.unsent) == (5, 1)
    echoed: list[str] = []
    summary = launch(grid, store.uri, echo=echoed.append)  # uploads, then has nothing to run
    assert summary.to_run == () and summary.exit_code == 0
    assert echoed[0].startswith("uploaded 1 finished trial record(s)")
    assert store.done_ids() == {s.trial_id for s in specs} and not kept.exists()


# --- the store must answer before anything starts ------------------------------------------


@pytest.mark.parametrize("command", ["status", "results", "launch", "report"])
def test_results_that_are_a_file_are_one_line_before_anything_starts(
    grid, tmp_path, capsys, command
):
    (tmp_path / "file").write_text("")
    argv = [command, grid.path, "--results", str(tmp_path / "file")]
    argv += ["--out", str(tmp_path / "out")] if command == "report" else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err


def test_a_uri_query_string_stays_at_the_end_when_paths_are_joined():
    uri = "s3://bucket/sweeps?endpoint_override=http://127.0.0.1:9000"
    assert join(uri, "tiny") == "s3://bucket/sweeps/tiny?endpoint_override=http://127.0.0.1:9000"
    assert join("s3://bucket/sweeps/", "tiny", "trials") == "s3://bucket/sweeps/tiny/trials"
    assert join("results/what?", "tiny") == "results/what?/tiny"  # a local folder: no query


# --- hints carry --results -------------------------------------------------------------


def test_rerun_hints_carry_the_results_root_quoted(grid, tmp_path, capsys):
    root = tmp_path / "my results"
    store = Store(str(root / grid.name))
    spec = expand(grid)[0]
    store.write_failure(failure_result(spec, ValueError("boom")))
    hint = f"slimsweep launch {grid.path} --results '{root}' --resume"
    assert main(["status", grid.path, "--results", str(root)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"to rerun the failed trials: {hint}"
    for other in expand(grid)[1:]:
        store.write_result(*ok(other))
    assert main(["launch", grid.path, "--results", str(root)]) == 1  # nothing to run: no Ray
    assert capsys.readouterr().out.splitlines()[-1] == f"to rerun the failed trials: {hint}"


# --- query is read-only -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "COPY trials TO '{out}/copy.csv'",
        "COPY (select 1) TO '{out}/copy.parquet' (FORMAT parquet)",
        "EXPORT DATABASE '{out}/db'",
        "ATTACH '{out}/x.duckdb' AS x",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "select * from read_csv('{out}/../tiny.yaml')",
    ],
)
def test_query_writes_and_reads_no_file_and_fails_in_one_line(grid, tmp_path, capsys, sql):
    root = tmp_path / "res"
    fill(grid, root)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["query", sql.format(out=out), "--results", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("slimsweep: error: SQL error:")
    assert list(out.iterdir()) == []


# --- one launch per store; a killed launch neither blocks nor litters ---------------------


def test_a_second_launch_refuses_in_one_line_naming_the_holder(grid, tmp_path, capsys):
    store, _ = fill(grid, tmp_path / "res")
    with Lease.acquire(store):
        with pytest.raises(GridError, match=rf"pid {os.getpid()},") as refused:
            launch(grid, store.uri, echo=lambda _: None)
        assert "another launch of this grid is running (host " in str(refused.value)
        assert status(grid, store.uri).running.startswith("host ")
        assert main(["launch", grid.path, "--results", str(tmp_path / "res")]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert launch(grid, store.uri, echo=lambda _: None).exit_code == 0  # released


HOLDER = """\
import sys, time
from slimsweep.orchestrator.lease import Lease
from slimsweep.orchestrator.store import Store
lease = Lease.acquire(Store({root!r}))
print("held", flush=True)
time.sleep(600)
"""


def test_a_sigkilled_launch_never_blocks_the_next_and_its_tune_folders_are_removed(grid, tmp_path):
    store, _ = fill(grid, tmp_path / "res")
    left = tmp_path / "res" / grid.name / "_tune" / "tiny-20260101-000000-abcdef"
    (left / "tiny_0").mkdir(parents=True)
    (left / "tiny_0" / "checkpoint.pt").write_bytes(b"gigabytes")
    script = textwrap.dedent(HOLDER.format(root=store.uri))
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(GridError, match=rf"pid {holder.pid},"):
            launch(grid, store.uri, echo=lambda _: None)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lines: list[str] = []
    assert launch(grid, store.uri, echo=lines.append).exit_code == 0
    assert lines[0] == (
        "removed 1 Tune folder(s) a stopped launch left in _tune/: tiny-20260101-000000-abcdef"
    )
    assert not left.exists() and not (tmp_path / "res" / grid.name / "_lease.json").exists()


def test_an_object_store_lease_is_dead_when_its_heartbeat_is_old_or_its_process_gone():
    now = lease_mod.time.time()
    elsewhere = Holder("t", "other-host", 1, 0.0, "2026-01-01T00:00:00+00:00", now)
    assert elsewhere.alive()
    assert not dataclasses.replace(elsewhere, heartbeat=now - lease_mod.EXPIRY_S - 1).alive()
    here = lease_mod._me()
    assert not here.alive()  # this process holds no lease: one it could not delete is stale
    started = psutil.Process(os.getppid()).create_time()
    parent = dataclasses.replace(here, pid=os.getppid(), pid_started=started)
    assert parent.alive()
    assert not dataclasses.replace(parent, pid_started=started - 10).alive()  # pid reused
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not dataclasses.replace(here, pid=gone.pid).alive()

"""The result store: schema, atomic per-trial files, done/failed sets, tolerant reading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slimsweep.orchestrator import store as store_mod
from slimsweep.orchestrator.store import (
    EPOCHS_SCHEMA,
    SCHEMA_VERSION,
    TRIALS_SCHEMA,
    Store,
    failure_result,
)
from slimsweep.workers.spec import EpochRow, ModelSpec, TrialResult, TrialSpec
from slimsweep.workers.tasks import TASKS


def make_spec(seed: int = 0, layers: int = 2) -> TrialSpec:
    return TrialSpec(
        grid="g",
        model=ModelSpec(name="tiny", source="/models/tiny"),
        layers=layers,
        task=TASKS["sst2"],
        head="prompt-lm",
        seed=seed,
    )


def make_result(spec: TrialSpec, test_acc: float = 0.75) -> tuple[TrialResult, list[EpochRow]]:
    result = TrialResult(
        trial_id=spec.trial_id,
        status="ok",
        spec_json=spec.to_json(),
        kept_layers=(0, 1),
        n_params=1234,
        best_epoch=2,
        epochs_run=2,
        val_acc=0.5,
        test_acc=test_acc,
        test_acc_per_class=(0.5, 1.0),
    )
    epochs = [EpochRow(spec.trial_id, e, 1.0 / e, 0.5, 0.1) for e in (1, 2)]
    return result, epochs


def failed(spec: TrialSpec, msg: str = "label word ' Negative' is 2 tokens") -> TrialResult:
    try:
        raise ValueError(msg)
    except ValueError as e:
        return failure_result(spec, e, started_at="t0", wall_s=1.5)


def test_trials_schema_has_every_result_field_axis_and_version():
    names = set(TRIALS_SCHEMA.names)
    assert {f.name for f in dataclasses.fields(TrialResult)} <= names
    assert set(make_spec().axes()) <= names
    assert {"model_source", "lr", "epochs", "precision", "label_word_rule"} <= names
    assert {"schema_version", "written_at"} <= names
    assert TRIALS_SCHEMA.field("kept_layers").type == pa.list_(pa.int64())
    assert TRIALS_SCHEMA.field("test_acc_per_class").type == pa.list_(pa.float64())
    assert {f.name for f in dataclasses.fields(EpochRow)} <= set(EPOCHS_SCHEMA.names)
    assert set(make_spec().axes()) <= set(EPOCHS_SCHEMA.names)


def test_written_trial_reads_back_with_axes_spec_columns_and_epochs(tmp_path: Path):
    store = Store(str(tmp_path / "g"))
    spec = make_spec()
    store.write_result(*make_result(spec))
    trials = store.read_trials()
    assert len(trials) == 1
    row = trials.iloc[0]
    assert row.trial_id == spec.trial_id and row.status == "ok"
    axes = tuple(row[k] for k in ("model", "layers", "task", "head", "seed"))
    assert axes == ("tiny", 2, "sst2", "prompt-lm", 0)
    assert row.model_source == "/models/tiny" and row.lr == spec.train.lr
    assert list(row.kept_layers) == [0, 1] and list(row.test_acc_per_class) == [0.5, 1.0]
    assert row.schema_version == SCHEMA_VERSION
    epochs = store.read_epochs()
    assert list(epochs.epoch) == [1, 2] and set(epochs.trial_id) == {spec.trial_id}
    assert set(epochs.task) == {"sst2"}
    assert store.done_ids() == {spec.trial_id}
    assert not list(tmp_path.rglob(f"*{store_mod.TMP_MARK}*"))


def test_rewriting_a_trial_replaces_it_without_duplicates(tmp_path: Path):
    store = Store(str(tmp_path))
    spec = make_spec()
    store.write_result(*make_result(spec, test_acc=0.1))
    store.write_result(*make_result(spec, test_acc=0.9))
    trials = store.read_trials()
    assert list(trials.test_acc) == [0.9]
    assert len(store.read_epochs()) == 2


def test_a_crash_before_the_trial_row_leaves_the_trial_not_done(tmp_path: Path, monkeypatch):
    store = Store(str(tmp_path))
    spec = make_spec()
    real = store._write

    def crash_on_trial_row(kind: str, trial_id: str, rows: list[dict]) -> None:
        if kind == store_mod.TRIALS:
            raise KeyboardInterrupt
        real(kind, trial_id, rows)

    monkeypatch.setattr(store, "_write", crash_on_trial_row)
    with pytest.raises(KeyboardInterrupt):
        store.write_result(*make_result(spec))
    assert store.done_ids() == set()
    assert (tmp_path / "epochs" / f"{spec.trial_id}.parquet").exists()


def test_a_trial_row_without_its_epochs_file_is_not_done(tmp_path: Path):
    store = Store(str(tmp_path))
    spec = make_spec()
    store.write_result(*make_result(spec))
    (tmp_path / "epochs" / f"{spec.trial_id}.parquet").unlink()
    assert store.done_ids() == set()


def test_temporary_files_are_ignored(tmp_path: Path):
    store = Store(str(tmp_path))
    spec = make_spec()
    store.write_result(*make_result(spec))
    (tmp_path / "trials" / f"other.parquet{store_mod.TMP_MARK}abc").write_bytes(b"partial")
    assert len(store.read_trials()) == 1
    assert store.done_ids() == {spec.trial_id}


def test_a_corrupt_file_is_skipped_with_a_warning_and_its_trial_counts_as_missing(
    tmp_path: Path,
):
    store = Store(str(tmp_path))
    good, bad = make_spec(seed=0), make_spec(seed=1)
    store.write_result(*make_result(good))
    store.write_result(*make_result(bad))
    bad_file = tmp_path / "trials" / f"{bad.trial_id}.parquet"
    bad_file.write_bytes(b"not parquet at all")
    with pytest.warns(UserWarning, match=bad.trial_id):
        trials = store.read_trials()
    assert list(trials.trial_id) == [good.trial_id]
    with pytest.warns(UserWarning, match="next `slimsweep launch` reruns them"):
        assert store.done_ids() == {good.trial_id}


def test_failure_is_recorded_apart_and_cleared_by_a_later_success(tmp_path: Path):
    store = Store(str(tmp_path))
    spec = make_spec()
    store.write_failure(failed(spec))
    assert store.failed_ids() == {spec.trial_id}
    assert store.done_ids() == set()
    assert store.read_trials().empty
    f = store.read_failures().iloc[0]
    assert f.status == "failed" and f.error_type == "ValueError"
    assert "2 tokens" in f.error_message and "raise ValueError" in f.error_traceback
    assert f.seed == 0 and f.wall_s == 1.5
    store.write_result(*make_result(spec))
    assert store.failed_ids() == set()
    assert store.read_failures().empty
    assert not (tmp_path / "failed" / f"{spec.trial_id}.parquet").exists()


def test_write_result_and_write_failure_check_the_status(tmp_path: Path):
    store = Store(str(tmp_path))
    spec = make_spec()
    with pytest.raises(ValueError, match="status 'ok'"):
        store.write_result(failed(spec), [])
    with pytest.raises(ValueError, match="status 'failed'"):
        store.write_failure(make_result(spec)[0])


def test_an_empty_store_reads_as_empty_frames_with_the_schema_columns(tmp_path: Path):
    store = Store(str(tmp_path / "nothing-yet"))
    assert store.done_ids() == set() and store.failed_ids() == set()
    assert list(store.read_trials().columns) == TRIALS_SCHEMA.names
    assert list(store.read_epochs().columns) == EPOCHS_SCHEMA.names
    assert store.read_failures().empty


def test_file_uri_roots_work_like_local_folders(tmp_path: Path):
    store = Store(f"file://{tmp_path}/g")
    spec = make_spec()
    store.write_result(*make_result(spec))
    assert Store(str(tmp_path / "g")).done_ids() == {spec.trial_id}


def test_files_from_an_older_schema_read_with_nulls_for_new_columns(tmp_path: Path):
    store = Store(str(tmp_path))
    spec = make_spec()
    store.write_result(*make_result(spec))
    path = tmp_path / "trials" / f"{spec.trial_id}.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["lm_loss", "compile"]), path)
    row = store.read_trials().iloc[0]
    assert row.trial_id == spec.trial_id and pd.isna(row.lm_loss)
    assert store.done_ids() == {spec.trial_id}


def test_written_since_names_the_trials_stored_from_that_moment_on(tmp_path: Path, monkeypatch):
    import datetime as dt

    store = Store(str(tmp_path))
    old, new, damaged, missing = (make_spec(seed=s) for s in range(4))
    start = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    for spec, minutes in ((old, -5), (new, 5), (damaged, 5)):
        monkeypatch.setattr(store_mod, "_now", lambda m=minutes: start + dt.timedelta(minutes=m))
        store.write_result(*make_result(spec))
    Path(store.path("trials", damaged.trial_id)).write_bytes(b"truncated")
    ids = [s.trial_id for s in (old, new, damaged, missing)]
    assert store.written_since(ids, start) == {new.trial_id}

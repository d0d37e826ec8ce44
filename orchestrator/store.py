"""The result store: the Parquet schema (the one place it is defined) and atomic per-trial files.

Layout under a root (`RESULTS/<grid name>`, a local folder or a `pyarrow.fs` URI such as
s3://bucket/sweeps/paper):

    trials/<trial_id>.parquet   one row: the finished trial (TrialResult + axes + spec columns)
    epochs/<trial_id>.parquet   its epoch rows (possibly none)
    failed/<trial_id>.parquet   one row: a trial that raised (status "failed", error fields)

Each file is written under a temporary name (`<name>.tmp-<uuid>`) and then moved to its final
name, so a reader sees either the whole file or none of it; a rewrite of the same trial_id
replaces the file, so a trial can never have two rows. The epochs file is written before the
trial row, so a trial row implies its epochs exist. Failures live apart from successes, so the
done set is a directory listing of successes, and a later success deletes the failure file.

Readers go through `pyarrow.dataset` with the explicit schemas below: files written by an
older schema version read with nulls in the columns they lack. A file that cannot be read is
skipped with a warning naming it, and its trial counts as missing, so resume reruns it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
import uuid
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec

# Bump when a column changes meaning or type; adding a nullable column needs no bump.
SCHEMA_VERSION = 1

TRIALS, EPOCHS, FAILED = "trials", "epochs", "failed"
TMP_MARK = ".tmp-"
# Lines of a failure's traceback kept in the record: the tail names where it was raised.
TRACEBACK_LINES = 30

# TrialResult, field by field.
RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("spec_json", pa.string()),
    pa.field("kept_layers", pa.list_(pa.int64())),
    pa.field("n_params", pa.int64()),
    pa.field("best_epoch", pa.int64()),
    pa.field("epochs_run", pa.int64()),
    pa.field("val_acc", pa.float64()),
    pa.field("test_acc", pa.float64()),
    pa.field("test_acc_per_class", pa.list_(pa.float64())),
    pa.field("n_train", pa.int64()),
    pa.field("n_valid", pa.int64()),
    pa.field("n_test", pa.int64()),
    pa.field("majority_test_acc", pa.float64()),
    pa.field("n_trainable_params", pa.int64()),
    pa.field("selection_scores_json", pa.string()),
    pa.field("model_commit", pa.string()),
    pa.field("dataset_fingerprint", pa.string()),
    pa.field("train_tokens", pa.int64()),
    pa.field("wall_s", pa.float64()),
    pa.field("peak_mem_bytes", pa.int64()),
    pa.field("device", pa.string()),
    pa.field("node", pa.string()),
    pa.field("attempt", pa.int64()),
    pa.field("bundle_id", pa.string()),
    pa.field("bundle_size", pa.int64()),
    pa.field("saved_model", pa.string()),
    pa.field("versions_json", pa.string()),
    pa.field("manifest_json", pa.string()),
    pa.field("started_at", pa.string()),
    pa.field("finished_at", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("error_traceback", pa.string()),
)

# The grid axes (TrialSpec.axes() without trial_id, which RESULT_FIELDS carries).
AXIS_FIELDS: tuple[pa.Field, ...] = (
    pa.field("grid", pa.string()),
    pa.field("model", pa.string()),
    pa.field("layers", pa.int64()),
    pa.field("task", pa.string()),
    pa.field("head", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("selection", pa.string()),
    pa.field("finetune", pa.string()),
)

# Resolved spec settings worth filtering on without parsing spec_json (which keeps them all).
SPEC_COLUMNS: dict[str, tuple[pa.DataType, Callable[[TrialSpec], Any]]] = {
    "model_source": (pa.string(), lambda s: s.model.source),
    "model_revision": (pa.string(), lambda s: s.model.revision),
    "model_gguf_file": (pa.string(), lambda s: s.model.gguf_file),
    "task_kind": (pa.string(), lambda s: s.task.kind),
    "task_dataset": (pa.string(), lambda s: s.task.dataset),
    "n_classes": (pa.int64(), lambda s: s.task.n_classes),
    "train_size": (pa.int64(), lambda s: s.data.train_size),
    "valid_size": (pa.int64(), lambda s: s.data.valid_size),
    "test_size": (pa.int64(), lambda s: s.data.test_size),
    "demos_per_class": (pa.int64(), lambda s: s.data.demos_per_class),
    "train_per_class": (pa.bool_(), lambda s: s.data.train_per_class),
    "inclusive_index_draw": (pa.bool_(), lambda s: s.data.inclusive_index_draw),
    "max_length": (pa.int64(), lambda s: s.data.max_length),
    "overflow": (pa.string(), lambda s: s.data.overflow),
    "label_word_rule": (pa.string(), lambda s: s.data.label_word_rule),
    "sampler": (pa.string(), lambda s: s.data.sampler),  # null in rows written before it
    "optimizer": (pa.string(), lambda s: s.train.optimizer),
    "lr": (pa.float64(), lambda s: s.train.lr),
    "weight_decay": (pa.float64(), lambda s: s.train.weight_decay),
    "batch_size": (pa.int64(), lambda s: s.train.batch_size),
    "epochs": (pa.int64(), lambda s: s.train.epochs),
    "patience": (pa.int64(), lambda s: s.train.patience),
    "precision": (pa.string(), lambda s: s.train.precision),
    "lm_loss": (pa.string(), lambda s: s.train.lm_loss),
    "runtime_device": (pa.string(), lambda s: s.runtime.device),
    "last_position_logits": (pa.bool_(), lambda s: s.runtime.last_position_logits),
    "prefix_cache": (pa.bool_(), lambda s: s.runtime.prefix_cache),
    "eval_batch_size": (pa.int64(), lambda s: s.runtime.eval_batch_size),
    "fused_adamw": (pa.bool_(), lambda s: s.runtime.fused_adamw),
    "compile": (pa.bool_(), lambda s: s.runtime.compile),
}

BOOKKEEPING_FIELDS: tuple[pa.Field, ...] = (
    pa.field("schema_version", pa.int64()),
    pa.field("written_at", pa.timestamp("ms", tz="UTC")),
)

_METADATA = {b"slimsweep.schema_version": str(SCHEMA_VERSION).encode()}

TRIALS_SCHEMA = pa.schema(
    [
        *RESULT_FIELDS,
        *AXIS_FIELDS,
        *(pa.field(k, t) for k, (t, _) in SPEC_COLUMNS.items()),
        *BOOKKEEPING_FIELDS,
    ],
    metadata=_METADATA,
)

EPOCHS_SCHEMA = pa.schema(
    [
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("epoch", pa.int64()),
        pa.field("train_loss", pa.float64()),
        pa.field("val_acc", pa.float64()),
        pa.field("wall_s", pa.float64()),
        *AXIS_FIELDS,
        *BOOKKEEPING_FIELDS,
    ],
    metadata=_METADATA,
)

_SCHEMAS = {TRIALS: TRIALS_SCHEMA, EPOCHS: EPOCHS_SCHEMA, FAILED: TRIALS_SCHEMA}


def trial_row(result: TrialResult, written_at: datetime) -> dict[str, Any]:
    """One TRIALS_SCHEMA row: the result's fields, its spec's axes and spec columns."""
    spec = result.spec
    row = {f.name: getattr(result, f.name) for f in RESULT_FIELDS}
    row.update({f.name: spec.axes()[f.name] for f in AXIS_FIELDS})
    row.update({k: get(spec) for k, (_, get) in SPEC_COLUMNS.items()})
    row.update(schema_version=SCHEMA_VERSION, written_at=written_at)
    return row


def epoch_rows(spec: TrialSpec, epochs: list[EpochRow], written_at: datetime) -> list[dict]:
    axes = {f.name: spec.axes()[f.name] for f in AXIS_FIELDS}
    bookkeeping = {"schema_version": SCHEMA_VERSION, "written_at": written_at}
    return [{**dataclasses.asdict(e), **axes, **bookkeeping} for e in epochs]


def failure_result(
    spec: TrialSpec,
    exc: BaseException,
    *,
    started_at: str = "",
    wall_s: float = 0.0,
    device: str = "",
) -> TrialResult:
    """The record of a trial that raised: its type, message and the tail of its traceback."""
    tail = "".join(traceback.format_exception(exc)).splitlines()
    return TrialResult(
        trial_id=spec.trial_id,
        status="failed",
        spec_json=spec.to_json(),
        wall_s=wall_s,
        device=device,
        started_at=started_at,
        finished_at=_now().isoformat(),
        error_type=type(exc).__name__,
        error_message=str(exc),
        error_traceback="\n".join(tail[-TRACEBACK_LINES:]),
    )


def _now() -> datetime:
    return datetime.now(UTC)


class Store:
    """Per-trial Parquet files under `root` (a local folder or a pyarrow.fs URI)."""

    def __init__(self, root: str):
        self.uri = root
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def path(self, kind: str, trial_id: str) -> str:
        return f"{self.root}/{kind}/{trial_id}.parquet"

    # --- writing -------------------------------------------------------------------------

    def write_result(self, result: TrialResult, epochs: list[EpochRow]) -> None:
        """Record a finished trial: epochs first, then the trial row, then drop any failure."""
        if result.status != "ok":
            raise ValueError(f"trial {result.trial_id}: write_result takes status 'ok' results")
        now = _now()
        self._write(EPOCHS, result.trial_id, epoch_rows(result.spec, epochs, now))
        self._write(TRIALS, result.trial_id, [trial_row(result, now)])
        self._delete(self.path(FAILED, result.trial_id))

    def write_failure(self, result: TrialResult) -> None:
        """Record a failed trial (see `failure_result`); its successes, if any, stay."""
        if result.status != "failed":
            raise ValueError(f"trial {result.trial_id}: write_failure takes status 'failed'")
        self._write(FAILED, result.trial_id, [trial_row(result, _now())])

    def _write(self, kind: str, trial_id: str, rows: list[dict]) -> None:
        folder = f"{self.root}/{kind}"
        self.fs.create_dir(folder, recursive=True)
        final = self.path(kind, trial_id)
        tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex}"
        table = pa.Table.from_pylist(rows, schema=_SCHEMAS[kind])
        try:
            pq.write_table(table, tmp, filesystem=self.fs)
            # A rename on local and POSIX-like file systems: readers never see a partial file.
            self.fs.move(tmp, final)
        except BaseException:
            self._delete(tmp)
            raise

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)

    # --- reading -------------------------------------------------------------------------

    def _files(self, kind: str) -> list[str]:
        """Final (not temporary) Parquet files of one kind, sorted by path."""
        selector = pafs.FileSelector(f"{self.root}/{kind}", allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.base_name.endswith(".parquet")
            and TMP_MARK not in i.base_name
        )

    def _read(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        """All files of one kind as one table with the explicit schema.

        One dataset scan first; if any file fails (corrupt, deleted mid-read, wrong types),
        read file by file, skipping the bad ones: a vanished file silently (its replacement
        or deletion is a normal race), an unreadable one with a warning naming it."""
        schema = _SCHEMA_FOR_READ[kind]
        files = self._files(kind)
        if not files:
            return schema.empty_table().select(columns or schema.names)
        try:
            return self._scan(files, schema, columns)
        except (OSError, pa.ArrowException):
            pass
        tables = []
        for f in files:
            try:
                tables.append(self._scan([f], schema, columns))
            except FileNotFoundError:
                continue
            except (OSError, pa.ArrowException) as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                warnings.warn(
                    f"skipping unreadable result file {f} ({first}); its trial counts as "
                    "missing and `slimsweep launch --resume` reruns it",
                    stacklevel=3,
                )
        if not tables:
            return schema.empty_table().select(columns or schema.names)
        return pa.concat_tables(tables)

    def _scan(self, files: list[str], schema: pa.Schema, columns: list[str] | None) -> pa.Table:
        dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
        return dataset.to_table(columns=columns)

    def _ids(self, kind: str) -> set[str]:
        return set(self._read(kind, ["trial_id"]).column("trial_id").to_pylist())

    def done_ids(self) -> set[str]:
        """Trials with a readable trial row and an epochs file: the ones resume skips."""
        epochs = {Path(p).name.removesuffix(".parquet") for p in self._files(EPOCHS)}
        return self._ids(TRIALS) & epochs

    def failed_ids(self) -> set[str]:
        """Trials whose last attempt failed and that have not succeeded since."""
        return self._ids(FAILED) - self.done_ids()

    def read_trials(self) -> pd.DataFrame:
        return self._read(TRIALS).to_pandas()

    def read_epochs(self) -> pd.DataFrame:
        return self._read(EPOCHS).to_pandas()

    def read_failures(self) -> pd.DataFrame:
        """Failure rows of trials that have not succeeded since (a success deletes its
        failure file, but a crash between the two writes could leave one behind)."""
        table = self._read(FAILED)
        done = pa.array(sorted(self.done_ids()), pa.string())
        keep = pc.invert(pc.is_in(table.column("trial_id"), value_set=done))
        return table.filter(keep).to_pandas()


# Reading drops the schema metadata so files written by other versions unify cleanly.
_SCHEMA_FOR_READ = {k: s.remove_metadata() for k, s in _SCHEMAS.items()}

"""The result store: the Parquet schema (the one place it is defined) and atomic per-trial files.

Layout under a root (`RESULTS/<grid name>`, a local folder or a `pyarrow.fs` URI such as
s3://bucket/sweeps/paper or s3://bucket/sweeps?endpoint_override=http://minio:9000):

    trials/<trial_id>.parquet   one row: the finished trial (TrialResult + axes + spec columns)
    epochs/<trial_id>.parquet   its epoch rows (possibly none)
    failed/<trial_id>.parquet   one row: a trial that raised (status "failed", error fields)
    models/<trial_id>/          the kept weights of a trial run with runtime.save_model: best

Each file is written under a temporary name (`<name>.tmp-<uuid>`) and then moved to its final
name, so a reader sees either the whole file or none of it; a rewrite of the same trial_id
replaces the file, so a trial can never have two rows. The epochs file is written before the
trial row. Failures live apart from successes, and a later success deletes the failure file.
A write that fails for want of the store (an outage, a network error) is retried with backoff;
if the store stays away, the caller keeps the record locally (`save_unsent`) and the next
launch uploads it (`upload_unsent`).

A file is a fact about the trial id in its name, so readers (`Store.scan`) take only files
named `<trial id>.parquet` that read whole, in their folder's schema, with that trial id in
every row (one row for trials/ and failed/, with status ok and failed).
Anything else (a `<id>-backup.parquet` copy, a stray file, a truncated or foreign file) is
ignored and named once, in one line (`StoreWarning`). A trial is done when both its trial
row and its epochs file read; a trial whose files are damaged is not done, so the next
launch reruns it and its rewrite replaces them. Files written by an older schema version
read with nulls in the columns they lack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from slimsweep.orchestrator.grid import GridError
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec

# Bump when a column changes meaning or type; adding a nullable column needs no bump.
SCHEMA_VERSION = 1

TRIALS, EPOCHS, FAILED = "trials", "epochs", "failed"
MODELS = "models"  # models/<trial_id>/: a trial's kept weights (runtime.save_model: best)
CHUNK_BYTES = 16 << 20  # copy size for model files
KINDS = (TRIALS, EPOCHS, FAILED)
TMP_MARK = ".tmp-"
TRIAL_ID = re.compile(r"[0-9a-f]{16}")  # TrialSpec.trial_id: 16 hex digits
# Lines of a failure's traceback kept in the record: the tail names where it was raised.
TRACEBACK_LINES = 30
# Seconds to wait before each retry of a failed store write (about 30 s in all).
WRITE_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)
NAMED_IN_A_LINE = 3  # ignored files named in the one-line notice; the rest are counted
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
    pa.field("test_preds", pa.list_(pa.int64())),
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

# Reading drops the schema metadata so files written by other versions unify cleanly.
_SCHEMA_FOR_READ = {k: s.remove_metadata() for k, s in _SCHEMAS.items()}
_STATUS_OF = {TRIALS: "ok", FAILED: "failed"}  # the status every row of the folder has
_BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose first path component is a bucket
# What pyarrow raises for a value its column type cannot hold.
_CONVERSION_ERRORS = (pa.ArrowException, OverflowError, TypeError, ValueError)


class StoreWarning(UserWarning):
    """The files a reader ignored, in one line."""


class StoreUnavailable(Exception):
    """A store write still failed after its retries (the store is down or unreachable)."""


def join(base: str, *parts: str) -> str:
    """`base/part/...`; a URI's query string (`?endpoint_override=...`) stays at the end."""
    path, sep, query = base.partition("?") if "://" in base else (base, "", "")
    return "/".join([path.rstrip("/"), *parts]) + sep + query


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


def encode_record(result: TrialResult, epochs: list[EpochRow]) -> str:
    """A trial's record (result and epoch rows) as JSON: what a trial sends the driver, and
    what waits locally when the store cannot take it."""
    return json.dumps(
        {"result": dataclasses.asdict(result), "epochs": [dataclasses.asdict(e) for e in epochs]}
    )


def decode_record(text: str) -> tuple[TrialResult, list[EpochRow]]:
    d = json.loads(text)
    r = d["result"]
    r["kept_layers"] = tuple(r["kept_layers"])
    r["test_acc_per_class"] = tuple(r["test_acc_per_class"])
    r["test_preds"] = tuple(r.get("test_preds", ()))
    return TrialResult(**r), [EpochRow(**e) for e in d["epochs"]]


def _now() -> datetime:
    return datetime.now(UTC)


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def _short(e: BaseException, path: str) -> str:
    """A read error's first sentence without the file's path (the notice names the file)."""
    text = _first_line(e).replace(f"'{path}': ", "").replace(path, "")
    return text.split(". ")[0].removeprefix("Could not open Parquet input source ")


def _table(rows: list[dict], schema: pa.Schema, *, lenient: bool = False) -> pa.Table:
    """Rows as a table of the schema; a ValueError names a column that cannot hold its value.
    Lenient (failure records): such a column is left null, so the failure is still recorded."""
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except _CONVERSION_ERRORS as e:
        error = e
    columns = []
    for f in schema:
        values = [r.get(f.name) for r in rows]
        try:
            columns.append(pa.array(values, f.type))
        except _CONVERSION_ERRORS as e:
            if not lenient:
                bad = next((v for v in values if v is not None), None)
                raise ValueError(
                    f"column {f.name} cannot hold {repr(bad)[:60]} ({f.type}: {_first_line(e)})"
                ) from e
            columns.append(pa.nulls(len(rows), f.type))
    if not lenient:
        raise error
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass(frozen=True)
class Ignored:
    path: str  # relative to the store root, e.g. trials/<id>-backup.parquet
    reason: str
    trial_id: str = ""  # the trial the file is named after, when it is named after one


def notice(where: str, ignored: Sequence[Ignored], damaged: int = 0) -> str | None:
    """One line naming what was ignored (the first few files), or None."""
    if not ignored:
        return None
    named = "; ".join(f"{i.path} ({i.reason})" for i in ignored[:NAMED_IN_A_LINE])
    more = len(ignored) - NAMED_IN_A_LINE
    line = f"{where}: ignored {len(ignored)} file(s): {named}"
    line += f" and {more} more" if more > 0 else ""
    if damaged:
        line += (
            f"; {damaged} damaged trial(s) count as missing and the next `slimsweep launch` "
            "reruns them"
        )
    return line


@dataclass(frozen=True)
class Contents:
    """What a store holds, each trial id once (see the module docstring)."""

    trials: pa.Table  # the trial rows of the done trials, in trial id order
    epochs: pa.Table  # their epoch rows
    failures: pa.Table  # failure rows of trials that are not done
    damaged: dict[str, str]  # trial id -> what is wrong with its files (not done: rerun)
    ignored: tuple[Ignored, ...]  # every file left out, and why

    @property
    def done(self) -> set[str]:
        return set(self.trials.column("trial_id").to_pylist())

    @property
    def failed(self) -> set[str]:
        return set(self.failures.column("trial_id").to_pylist())

    def notice(self, where: str) -> str | None:
        return notice(where, self.ignored, len(self.damaged))


class Store:
    """Per-trial Parquet files under `root` (a local folder or a pyarrow.fs URI)."""

    def __init__(self, root: str, retry_delays: tuple[float, ...] | None = None):
        self.uri = root
        self.retry_delays = WRITE_RETRY_DELAYS_S if retry_delays is None else retry_delays
        self.scheme = root.partition("://")[0] if "://" in root else ""
        try:
            if self.scheme:
                self.fs, self.root = pafs.FileSystem.from_uri(root)
            else:
                self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
        except (pa.ArrowException, OSError) as e:
            raise GridError(
                f"results {root}: not a folder or a URI pyarrow.fs understands ({_first_line(e)}); "
                f"give a folder or e.g. s3://bucket/prefix"
            ) from None
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def path(self, kind: str, trial_id: str) -> str:
        return f"{self.root}/{kind}/{trial_id}.parquet"

    def check(self) -> None:
        """A GridError in one line unless the store can be used: a local root that is a folder
        (or not there yet), an object store that answers and whose bucket exists."""
        if not self.scheme or self.scheme == "file":
            for p in (Path(self.root), *Path(self.root).parents):
                if p.exists():
                    if not p.is_dir():
                        raise GridError(f"results {self.uri}: {p} is a file; give a folder")
                    return
            return
        bucket = self.root.split("/")[0]
        try:
            missing = (
                self.scheme in _BUCKET_SCHEMES
                and self.fs.get_file_info(bucket).type == pafs.FileType.NotFound
            )
            if not missing:
                self.fs.get_file_info(self.root)
        except OSError as e:
            raise GridError(
                f"results {self.uri}: the store does not answer ({_first_line(e)}); check the "
                f"endpoint (AWS_ENDPOINT_URL or ?endpoint_override=...), network and credentials"
            ) from None
        if missing:
            raise GridError(
                f"results {self.uri}: bucket '{bucket}' does not exist; create it, or check the "
                f"URI and the endpoint (AWS_ENDPOINT_URL or ?endpoint_override=...)"
            )

    # --- writing -------------------------------------------------------------------------

    def record(self, result: TrialResult, epochs: list[EpochRow]) -> None:
        """Record a trial's outcome: `write_result` or `write_failure` by its status."""
        if result.status == "ok":
            self.write_result(result, epochs)
        else:
            self.write_failure(result)

    def write_result(self, result: TrialResult, epochs: list[EpochRow]) -> None:
        """Record a finished trial: epochs first, then the trial row, then drop any failure.
        A value the schema cannot hold raises (pyarrow's error) before anything is written."""
        if result.status != "ok":
            raise ValueError(f"trial {result.trial_id}: write_result takes status 'ok' results")
        now = _now()
        epoch_table = _table(epoch_rows(result.spec, epochs, now), EPOCHS_SCHEMA)
        trial_table = _table([trial_row(result, now)], TRIALS_SCHEMA)
        self._write(EPOCHS, result.trial_id, epoch_table)
        self._write(TRIALS, result.trial_id, trial_table)
        self._retrying(lambda: self._delete(self.path(FAILED, result.trial_id)), "a delete")

    def write_failure(self, result: TrialResult) -> None:
        """Record a failed trial (see `failure_result`); its successes, if any, stay. Columns
        that cannot hold their value are left null: the failure is recorded regardless."""
        if result.status != "failed":
            raise ValueError(f"trial {result.trial_id}: write_failure takes status 'failed'")
        row = trial_row(result, _now())
        self._write(FAILED, result.trial_id, _table([row], TRIALS_SCHEMA, lenient=True))

    def _write(self, kind: str, trial_id: str, table: pa.Table) -> None:
        self._retrying(lambda: self._write_once(kind, trial_id, table), f"{kind}/{trial_id}")

    def _write_once(self, kind: str, trial_id: str, table: pa.Table) -> None:
        self.fs.create_dir(f"{self.root}/{kind}", recursive=True)
        final = self.path(kind, trial_id)
        tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            pq.write_table(table, tmp, filesystem=self.fs)
            # A rename on local and POSIX-like file systems: readers never see a partial file.
            self.fs.move(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                self._delete(tmp)
            raise

    def _retrying(self, op: Callable[[], None], what: str) -> None:
        """`op`, retried after each of `retry_delays` while it fails with an OSError (the
        store away); StoreUnavailable once they are spent."""
        for delay in (*self.retry_delays, None):
            try:
                return op()
            except OSError as e:
                if delay is None:
                    raise StoreUnavailable(
                        f"{self.uri}: {what} not written after {len(self.retry_delays) + 1} "
                        f"tries ({_first_line(e)})"
                    ) from e
                time.sleep(delay)

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)

    def put_model(self, trial_id: str, folder: str) -> str:
        """Copy the files of a local folder of kept weights to models/<trial_id>/ (each under
        a temporary name, then moved); returns that path relative to the root, which the
        trial's row records as `saved_model`."""
        relative = f"{MODELS}/{trial_id}"
        dest = f"{self.root}/{relative}"
        self.fs.create_dir(dest, recursive=True)
        for path in sorted(Path(folder).iterdir()):
            final = f"{dest}/{path.name}"
            tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex}"
            try:
                with path.open("rb") as src, self.fs.open_output_stream(tmp) as out:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
                self.fs.move(tmp, final)
            except BaseException:
                self._delete(tmp)
                raise
        return relative

    def get_model(self, relative: str, folder: str) -> None:
        """Copy the kept weights at `relative` (a row's `saved_model`) into a local folder."""
        selector = pafs.FileSelector(f"{self.root}/{relative}", allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or TMP_MARK in info.base_name:
                continue
            target = Path(folder) / info.base_name
            with self.fs.open_input_stream(info.path) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK_BYTES)

    # --- records the store could not take ------------------------------------------------

    def unsent_dir(self) -> Path:
        """Where a launch keeps the records this store could not take, for the next launch
        to upload: one folder per store under the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        where = self.uri if self.scheme and self.scheme != "file" else self.root
        return cache / "slimsweep" / "unsent" / hashlib.sha256(where.encode()).hexdigest()[:12]

    def save_unsent(self, result: TrialResult, epochs: list[EpochRow]) -> Path:
        """Keep a record locally (atomically, as one JSON file per trial); its path."""
        folder = self.unsent_dir()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "store.txt").write_text(f"{self.uri}\n")  # for people looking in the folder
        path = folder / f"{result.trial_id}.json"
        tmp = folder / f"{result.trial_id}{TMP_MARK}{uuid.uuid4().hex}"
        tmp.write_text(encode_record(result, epochs))
        tmp.replace(path)
        return path

    def unsent(self) -> list[Path]:
        return sorted(self.unsent_dir().glob("*.json"))

    def upload_unsent(self) -> int:
        """Record every record kept by `save_unsent` (each leaves the folder once written);
        how many. StoreUnavailable if the store still cannot take them."""
        paths = self.unsent()
        for path in paths:
            self.record(*decode_record(path.read_text()))
            path.unlink()
        return len(paths)

    # --- reading -------------------------------------------------------------------------

    def scan(self, notify: bool = True) -> Contents:
        """Everything the store holds, each trial id once; with `notify`, one StoreWarning
        line names the files left out."""
        self.check()
        good: dict[str, dict[str, pa.Table]] = {}
        bad: dict[str, dict[str, str]] = {}
        ignored: list[Ignored] = []
        for kind in KINDS:
            files, others = self._listing(kind)
            ignored.extend(others)
            good[kind], bad[kind] = self._read_files(kind, files)
            for trial_id, table in list(good[kind].items()):
                reason = self._wrong_rows(kind, trial_id, table)
                if reason:
                    bad[kind][trial_id] = reason
                    del good[kind][trial_id]
            ignored.extend(Ignored(f"{kind}/{i}.parquet", r, i) for i, r in bad[kind].items())
        done = sorted(good[TRIALS].keys() & good[EPOCHS].keys())
        damaged = {**bad[FAILED], **bad[EPOCHS], **bad[TRIALS]}
        damaged.update(
            (i, f"epochs/{i}.parquet is missing")
            for i in good[TRIALS].keys() - good[EPOCHS].keys() - damaged.keys()
        )
        contents = Contents(
            trials=_concat(TRIALS, (good[TRIALS][i] for i in done)),
            epochs=_concat(EPOCHS, (good[EPOCHS][i] for i in done)),
            failures=_concat(FAILED, (t for i, t in sorted(good[FAILED].items()) if i not in done)),
            damaged={i: r for i, r in sorted(damaged.items()) if i not in done},
            ignored=tuple(ignored),
        )
        line = contents.notice(self.uri)
        if notify and line:
            warnings.warn(line, StoreWarning, stacklevel=2)
        return contents

    def _listing(self, kind: str) -> tuple[dict[str, str], list[Ignored]]:
        """{trial id: path} of the folder's files named `<trial id>.parquet`, and the other
        entries (temporary files, writes in progress, are neither)."""
        selector = pafs.FileSelector(f"{self.root}/{kind}", allow_not_found=True)
        files, others = {}, []
        for info in self.fs.get_file_info(selector):
            name = info.base_name
            stem = name.removesuffix(".parquet")
            if TMP_MARK in name:
                continue
            if info.type == pafs.FileType.File and name != stem and TRIAL_ID.fullmatch(stem):
                files[stem] = info.path
            else:
                others.append(Ignored(f"{kind}/{name}", "not named <trial id>.parquet"))
        return dict(sorted(files.items())), others

    def _read_files(
        self, kind: str, files: dict[str, str]
    ) -> tuple[dict[str, pa.Table], dict[str, str]]:
        """({trial id: its file's rows}, {trial id: why its file does not read}). One dataset
        scan; if any file fails, file by file to know which (a file deleted meanwhile, as a
        success deletes its failure file, is left out silently)."""
        schema = _SCHEMA_FOR_READ[kind]
        with contextlib.suppress(OSError, pa.ArrowException):
            return self._read_at_once(files, schema), {}
        tables, unreadable = {}, {}
        for trial_id, path in files.items():
            try:
                tables[trial_id] = self._read_at_once({trial_id: path}, schema)[trial_id]
            except FileNotFoundError:
                continue
            except (OSError, pa.ArrowException) as e:
                unreadable[trial_id] = f"unreadable: {_short(e, path)}"
        return tables, unreadable

    def _read_at_once(self, files: dict[str, str], schema: pa.Schema) -> dict[str, pa.Table]:
        if not files:
            return {}
        dataset = ds.dataset(
            list(files.values()), schema=schema, format="parquet", filesystem=self.fs
        )
        id_of = {path: trial_id for trial_id, path in files.items()}
        batches: dict[str, list[pa.RecordBatch]] = {trial_id: [] for trial_id in files}
        for tagged in dataset.scanner().scan_batches():
            batches[id_of[tagged.fragment.path]].append(tagged.record_batch)
        return {i: pa.Table.from_batches(b, schema=schema) for i, b in batches.items()}

    def _wrong_rows(self, kind: str, trial_id: str, table: pa.Table) -> str | None:
        """Why the rows of `<kind>/<trial_id>.parquet` are not that trial's, or None."""
        others = set(table.column("trial_id").to_pylist()) - {trial_id}
        if others:
            return f"holds rows of trial {sorted(map(str, others))[0]}"
        if kind in _STATUS_OF:
            if table.num_rows != 1:
                return f"holds {table.num_rows} rows, not 1"
            status = table.column("status")[0].as_py()
            if status != _STATUS_OF[kind]:
                return f"holds a trial with status {status!r}"
        return None

    def written_since(self, trial_ids: Iterable[str], since: datetime) -> set[str]:
        """Those of `trial_ids` whose result row was written at or after `since` (a launch's
        start: the trials it has recorded). Reads only their files."""
        out = set()
        for trial_id in trial_ids:
            path = {trial_id: self.path(TRIALS, trial_id)}
            try:
                table = self._read_at_once(path, _SCHEMA_FOR_READ[TRIALS])[trial_id]
            except (OSError, pa.ArrowException):  # not there, or damaged: not recorded
                continue
            if any(t is not None and t >= since for t in table.column("written_at").to_pylist()):
                out.add(trial_id)
        return out

    def done_ids(self) -> set[str]:
        """Trials whose trial row and epochs file both read: the ones a launch skips."""
        return self.scan().done

    def failed_ids(self) -> set[str]:
        """Trials whose last attempt failed and that have not succeeded since."""
        return self.scan().failed

    def read_trials(self) -> pd.DataFrame:
        return self.scan().trials.to_pandas()

    def read_epochs(self) -> pd.DataFrame:
        return self.scan().epochs.to_pandas()

    def read_failures(self) -> pd.DataFrame:
        """Failure rows of trials that have not succeeded since (a success deletes its
        failure file, but a crash between the two writes could leave one behind)."""
        return self.scan().failures.to_pandas()


def _concat(kind: str, tables: Iterable[pa.Table]) -> pa.Table:
    return pa.concat_tables([_SCHEMA_FOR_READ[kind].empty_table(), *tables])

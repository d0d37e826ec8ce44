"""Run a grid on Ray Tune: what to run, with which resources, retries and live progress.

What runs is a set operation on the result store, never Tune's experiment state: the grid's
trials minus the ones with a result (and, without `resume`, minus the ones that failed).
Each launch is a fresh Tune experiment; a lost or killed driver loses only the trials that
were running, and the next launch reruns exactly those.

Who writes results: the driver. Each trial sends its final record (TrialResult and epoch
rows, as JSON) in its last `tune.report`; a Tune callback on the driver writes it to the store
at once. So workers need no access to the results location (a cluster without shared storage
works), and one process writes, one atomic file per trial.

Failures: a Python exception inside a trial is part of its result (recorded as failed, not
retried: rerunning a deterministic error gives the same error). Losing the process or the
node is retried by Tune (`FailureConfig(max_failures)`), from the trial's last per-epoch
checkpoint when it reported one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from slimsweep.orchestrator.grid import Grid, GridError
from slimsweep.orchestrator.lease import Lease, holder
from slimsweep.orchestrator.models import estimate_params, model_config
from slimsweep.orchestrator.plan import bundles, expand, pending
from slimsweep.orchestrator.store import (
    Contents,
    Store,
    StoreUnavailable,
    decode_record,
    encode_record,
    failure_result,
    notice,
)
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec, bundle_id, fuse_limit

# run_trial's signature: (spec, *, on_epoch, resume_from[, on_weights]) -> (result, epoch rows).
OnEpoch = Callable[[EpochRow, str | None], None]
TrialFn = Callable[..., tuple[TrialResult, list[EpochRow]]]
# run_bundle's signature: (specs, *, on_epoch, on_done(i, record or error)[, on_weights]) -> Any
BundleFn = Callable[..., Any]

RECORD_KEY = "slimsweep_record"
TRIAL_KEY = "slimsweep_trial"  # an epoch report's trial id (a bundle reports for several)
TUNE_DIR = "_tune"  # Tune's own state and checkpoints, under the grid's results root
PROGRESS_EVERY_S = 2.0
HEARTBEAT_S = 30.0  # the progress line repeats at least this often while trials run
ADDRESS_PROBE_S = 5.0  # how long `--address` may take to answer before launch gives up

# --- GPU packing ---------------------------------------------------------------------------

# AdamW training keeps fp32 weights, gradients and two moments: 16 bytes per parameter; bf16
# is autocast over fp32 master weights, so the same (see shared/reference/gpu_baseline_h100).
BYTES_PER_PARAM: dict[str, int] = {"fp32": 16, "bf16": 16}
ACTIVATION_MARGIN = 1.25  # activations, allocator slack; batch-1 few-shot prompts are short
CUDA_CONTEXT_BYTES = 1 << 30  # per process, before any tensor


def gpu_fraction(n_params: int, precision: str, gpu_memory_bytes: int) -> float:
    """The GPU share of one trial: 1/n where n trials of this size fit in one GPU's memory
    (at least one trial per GPU, so a too-large trial still gets a whole GPU)."""
    need = n_params * BYTES_PER_PARAM[precision] * ACTIVATION_MARGIN + CUDA_CONTEXT_BYTES
    return 1.0 / max(1, int(gpu_memory_bytes // need))


def plan_bundles(
    grid: Grid, specs: list[TrialSpec], resources: dict[str, float]
) -> tuple[list[list[TrialSpec]], dict[str, float]]:
    """The missing trials in Tune trials (bundles of seeds under `runtime.fuse`, see
    `plan.bundles`) and the resources of one. `auto` fuses on GPU as many trials as the
    per-trial share says fit in one GPU; a bundle asks for its trials' shares together."""
    gpu = resources.get("GPU", 0.0)
    limit = fuse_limit(grid.runtime.fuse, on_gpu=gpu > 0)
    if limit is None:
        limit = max(1, int(1 / gpu + 1e-9)) if gpu < 1 else 1
    groups = bundles(specs, limit)
    largest = max((len(g) for g in groups), default=1)
    if gpu and largest > 1:
        resources = {**resources, "GPU": min(1.0, gpu * largest)}
    return groups, resources


# --- resources against the cluster ---------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """What the alive Ray nodes offer, one resource dict per node."""

    nodes: tuple[dict[str, float], ...]
    gpu_memory_bytes: int = 0  # of one GPU; 0 when unknown or none

    def largest(self, resource: str) -> float:
        return max((n.get(resource, 0.0) for n in self.nodes), default=0.0)


def trial_resources(
    grid: Grid, specs: list[TrialSpec], cluster: Cluster, warn: Callable[[str], None]
) -> dict[str, float]:
    """Per-trial resources for Tune, checked against the largest node (GridError if no node
    could ever run one trial, since Tune would wait forever)."""
    res = grid.resources
    where = f"{grid.path}: resources"
    gpus = res.gpus
    if gpus == "auto":
        gpus = _auto_gpus(specs, cluster, warn) if cluster.largest("GPU") else 0.0
    elif gpus and not cluster.largest("GPU"):
        warn(f"the cluster has no GPU; running trials on CPU ({where}.gpus: {gpus} ignored)")
        gpus = 0.0
    wanted = {"CPU": float(res.cpus), "GPU": float(gpus), **dict(res.custom)}
    for name, amount in wanted.items():
        largest = cluster.largest(name)
        if amount > largest:
            key = {"CPU": "cpus", "GPU": "gpus"}.get(name, f"custom.{name}")
            raise GridError(
                f"{where}.{key}: each trial asks {amount:g} {name} but the largest node has "
                f"{largest:g}; lower it to at most {largest:g} or add a larger node"
            )
    return {k: v for k, v in wanted.items() if v}


def _auto_gpus(specs: list[TrialSpec], cluster: Cluster, warn: Callable[[str], None]) -> float:
    """The share of the largest trial, so every trial fits next to its neighbours."""
    sizes = []
    for s in specs:
        cfg = model_config(s.model.source)
        n_params = estimate_params(cfg, s.layers) if cfg else None
        if n_params is None:
            warn(f"gpus: auto: shape of model '{s.model.name}' unknown; one GPU per trial")
            return 1.0
        sizes.append((n_params, s.train.precision))
    if not cluster.gpu_memory_bytes:
        warn("gpus: auto: GPU memory unknown; one GPU per trial")
        return 1.0
    return min(gpu_fraction(n, p, cluster.gpu_memory_bytes) for n, p in sizes)


def _probe_cluster(ray: Any) -> Cluster:
    nodes = tuple(dict(n["Resources"]) for n in ray.nodes() if n.get("Alive"))
    memory = 0
    if any(n.get("GPU") for n in nodes):

        @ray.remote(num_gpus=1, num_cpus=0)
        def gpu_memory() -> int:
            import torch

            return torch.cuda.get_device_properties(0).total_memory

        ref = gpu_memory.remote()
        try:
            memory = ray.get(ref, timeout=120)
        except Exception:  # busy GPUs or no torch.cuda: fall back to whole GPUs, not a hang
            ray.cancel(ref, force=True)
    return Cluster(nodes=nodes, gpu_memory_bytes=memory)


# --- the trainable (runs in a Ray worker) -------------------------------------------------


def _default_trial_fn() -> TrialFn:
    from slimsweep.workers.run import run_trial

    return run_trial


def trial_node() -> str:
    """HOST/NODE_ID of the Ray node running this process: the host to find its logs on, the
    node id because several nodes can share a host (containers, `ray start` twice)."""
    import ray

    if not ray.is_initialized():  # run outside Ray (a test, a notebook): asking would start one
        return socket.gethostname()
    return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()}"


def _default_bundle_fn() -> BundleFn:
    from slimsweep.workers.run import run_bundle

    return run_bundle


def run_one(
    config: dict[str, Any],
    trial_fn: TrialFn | None = None,
    bundle_fn: BundleFn | None = None,
    results: str | None = None,
    launched_at: datetime | None = None,
) -> None:
    """One Tune trial: one slimsweep trial, or a bundle of them trained fused. Reports each
    epoch (a single trial with its restart checkpoint) and each trial's final record as soon
    as it has one: its result, or its failure record if it raised. With runtime.save_model
    best, each trial's kept weights go to the store at `results` (this worker writes them: a
    model is too large for a Tune report) before its record is sent. A bundle retried after
    its process was lost trains only the trials the store has no row of since `launched_at`."""
    from ray import tune

    specs = [TrialSpec.from_json(text) for text in config["specs"]]
    store = Store(results) if results else None
    if len(specs) > 1 and store and launched_at:
        recorded = store.written_since([s.trial_id for s in specs], launched_at)
        specs = [s for s in specs if s.trial_id not in recorded]
        if not specs:
            return
    extra: dict[str, Any] = {}
    if specs[0].runtime.save_model != "none" and store:
        extra["on_weights"] = store.put_model
    checkpoints = True  # off after the first checkpoint the storage cannot take

    def on_epoch(row: EpochRow, checkpoint_dir: str | None) -> None:
        nonlocal checkpoints
        metrics = {
            "epoch": row.epoch,
            "train_loss": row.train_loss,
            "val_acc": row.val_acc,
            TRIAL_KEY: row.trial_id,
        }
        if checkpoint_dir and checkpoints:
            try:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
                return
            except RuntimeError as e:  # storage not shared with this node: go on without
                checkpoints = False
                print(f"slimsweep: trial {row.trial_id}: checkpoints off: {e}", file=sys.stderr)
        tune.report(metrics)

    started = datetime.now(UTC).isoformat()
    t0 = time.monotonic()
    node = trial_node()
    reported: set[int] = set()

    def failure(i: int, error: BaseException) -> tuple[TrialResult, list[EpochRow]]:
        failed = failure_result(specs[i], error, started_at=started, wall_s=time.monotonic() - t0)
        if len(specs) > 1:
            failed = dataclasses.replace(failed, bundle_id=bundle_id(specs), bundle_size=len(specs))
        return failed, []

    def report(i: int, outcome: tuple[TrialResult, list[EpochRow]] | BaseException) -> None:
        if isinstance(outcome, BaseException):
            outcome = failure(i, outcome)
        result, epochs = outcome
        reported.add(i)
        tune.report({RECORD_KEY: encode_record(dataclasses.replace(result, node=node), epochs)})

    if len(specs) > 1:
        try:
            (bundle_fn or _default_bundle_fn())(specs, on_epoch=on_epoch, on_done=report, **extra)
        except Exception as e:  # the whole bundle failed: each trial not yet recorded with it
            for i in range(len(specs)):
                if i not in reported:
                    report(i, e)
        finally:
            release_memory()
        return
    restored = tune.get_checkpoint()
    resume_dir = restored.to_directory() if restored else None
    try:
        outcome = (trial_fn or _default_trial_fn())(
            specs[0], on_epoch=on_epoch, resume_from=resume_dir, **extra
        )
    except Exception as e:  # recorded as the trial's result; deterministic, so not retried
        outcome = failure(0, e)  # the record, not the error: its frames hold the trial's tensors
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
        release_memory()
    report(0, outcome)


def release_memory() -> None:
    """After a trial in a reused worker: free its tensors (reference cycles included) and
    hand the CUDA cache back, so the next trial starts with the whole GPU share."""
    gc.collect()
    torch = sys.modules.get("torch")  # a stand-in trial may never have imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- progress ------------------------------------------------------------------------------


def expected_cost(spec: TrialSpec) -> float:
    """A trial's relative cost for the ETA: parameters (1 per layer when the shape is
    unknown) x epochs x training and validation examples. Only ratios between trials matter."""
    cfg = model_config(spec.model.source)
    params = estimate_params(cfg, spec.layers) if cfg and "vocab_size" in cfg else spec.layers
    d = spec.data
    train = d.train_size * (spec.task.n_classes if d.train_per_class else 1)
    return float(params) * spec.train.epochs * (train + d.valid_size)


@dataclass
class Tally:
    """This launch's trials by state (keyed by trial id) and what the finished ones took."""

    costs: dict[str, float]  # every trial of this launch -> expected_cost
    epochs: dict[str, int]  # -> its epoch budget (training.epochs)
    ok: int = 0
    failed: int = 0
    retries: int = 0
    unsent: int = 0  # records kept locally: the store did not take them
    running: dict[str, int] = field(default_factory=dict)  # -> the last epoch it reported
    waiting: set[str] = field(default_factory=set)  # lost a process or node; to be retried
    finished: set[str] = field(default_factory=set)  # recorded, ok or failed, or kept locally
    ok_s: float = 0.0  # wall seconds of the trials that finished ok ...
    ok_cost: float = 0.0  # ... and their expected cost
    lanes: int = 1  # most trials seen running at once: the concurrency the ETA assumes

    @classmethod
    def of(cls, specs: list[TrialSpec]) -> Tally:
        return cls(
            costs={s.trial_id: expected_cost(s) for s in specs},
            epochs={s.trial_id: s.train.epochs for s in specs},
        )

    @property
    def total(self) -> int:
        return len(self.costs)

    def start(self, trial: str) -> None:
        self.waiting.discard(trial)
        self.running.setdefault(trial, 0)
        self.lanes = max(self.lanes, len(self.running))

    def epoch(self, trial: str, epoch: int) -> None:
        if trial in self.running:
            self.running[trial] = epoch

    def retry(self, trial: str) -> None:
        self.retries += 1
        self.running.pop(trial, None)
        self.waiting.add(trial)

    def finish(self, trial: str, ok: bool, seconds: float, sent: bool = True) -> None:
        """The trial's record arrived: ok or failed, or (`sent` False) kept locally because
        the store did not take it."""
        self.running.pop(trial, None)
        self.waiting.discard(trial)
        self.finished.add(trial)
        self.ok += sent and ok
        self.failed += sent and not ok
        self.unsent += not sent
        if ok:
            self.ok_s += seconds
            self.ok_cost += self.costs[trial]

    @property
    def pending(self) -> int:
        return (
            self.total - self.ok - self.failed - self.unsent - len(self.running) - len(self.waiting)
        )

    def eta_s(self) -> float | None:
        """Seconds per unit of expected cost, as measured on the trials that finished ok, x
        the cost left (a running trial's share by its epochs) / the concurrency; None before
        the first trial finishes."""
        if not self.ok_cost:
            return None
        left = sum(
            cost * (1 - self.running.get(t, 0) / self.epochs[t])
            for t, cost in self.costs.items()
            if t not in self.finished
        )
        return self.ok_s / self.ok_cost * left / self.lanes

    def line(self) -> str:
        eta = self.eta_s()
        shown = [f"{t[:8]} epoch {e}/{self.epochs[t]}" for t, e in list(self.running.items())[:4]]
        if len(self.running) > len(shown):
            shown.append(f"+{len(self.running) - len(shown)} more")
        parts = [
            f"done {self.ok}/{self.total}",
            f"running {len(self.running)}" + (f" ({', '.join(shown)})" if shown else ""),
        ]
        if self.waiting:
            parts.append(f"waiting for retry {len(self.waiting)}")
        parts += [f"failed {self.failed}", f"pending {self.pending}"]
        if self.retries:
            parts.append(f"retried {self.retries}")
        if self.unsent:
            parts.append(f"kept locally {self.unsent}")
        parts.append("ETA " + (_duration(eta) if eta is not None else "?"))
        return " | ".join(parts)


def _duration(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def keep(
    store: Store, record: TrialResult, epochs: list[EpochRow], echo: Callable[[str], None]
) -> tuple[TrialResult, bool]:
    """Record one trial's outcome without ever ending the launch: (what was recorded, whether
    the store took it). A record the store cannot hold becomes the trial's failure (naming
    the column); a store still away after the write retries leaves the record in a local
    folder, named in one line, for the next launch to upload."""
    try:
        try:
            store.record(record, epochs)
        except StoreUnavailable:
            raise
        except Exception as e:  # a value Parquet cannot hold, say: this trial's failure only
            record, epochs = failure_result(record.spec, e, started_at=record.started_at), []
            store.record(record, epochs)
        return record, True
    except StoreUnavailable as e:
        path = store.save_unsent(record, epochs)
        echo(
            f"trial {record.trial_id}: {e}; its record is kept in {path} and the next "
            f"launch uploads it"
        )
        return record, False


def _make_callback(store: Store, tally: Tally, echo: Callable[[str], None]) -> Any:
    from ray import tune

    class Recorder(tune.Callback):
        """Writes each trial's record to the store as it arrives, with its attempt count;
        prints a progress line when the counts have changed, at most every PROGRESS_EVERY_S (a
        reused actor starts its next trial right after the last one ends: one line for both,
        not two), and at least every HEARTBEAT_S while trials run."""

        def __init__(self) -> None:
            self.specs: dict[str, list[TrialSpec]] = {}  # Tune's trial id -> slimsweep's trials
            self.started: dict[str, float] = {}  # slimsweep's trial id -> when it started
            self.recoveries: dict[str, int] = {}  # Tune's trial id -> times it was retried
            self.recorded: set[str] = set()  # slimsweep's trial ids
            self.last = ""
            self.shown_at = -math.inf

        def _specs(self, trial: Any) -> list[TrialSpec]:
            """The slimsweep trials a Tune trial runs (one, or a fused bundle)."""
            if trial.trial_id not in self.specs:
                self.specs[trial.trial_id] = _specs(trial)
            return self.specs[trial.trial_id]

        def _ids(self, trial: Any) -> list[str]:
            return [s.trial_id for s in self._specs(trial)]

        def _show(self, force: bool = False) -> None:
            line = tally.line()
            if line != self.last or force:
                echo(time.strftime("%H:%M:%S ") + line)
                self.last = line
                self.shown_at = time.monotonic()

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            since = time.monotonic() - self.shown_at
            if since >= PROGRESS_EVERY_S:
                self._show(force=since >= HEARTBEAT_S and bool(tally.running))

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self._show()

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            for tid in self._ids(trial):
                if tid not in self.recorded:  # a retried bundle: only its unrecorded trials
                    tally.start(tid)
                    self.started.setdefault(tid, time.monotonic())

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            ids = self._ids(trial)
            if RECORD_KEY not in result:
                if isinstance(result.get("epoch"), int):
                    tally.epoch(result.get(TRIAL_KEY, ids[0]), result["epoch"])
                return
            try:
                record, epochs = decode_record(result[RECORD_KEY])
            except (ValueError, TypeError, KeyError) as e:  # not from run_one: a bug, recorded
                specs = self._specs(trial)
                spec = next((s for s in specs if s.trial_id not in self.recorded), specs[0])
                record, epochs = failure_result(spec, e), []
            attempt = 1 + self.recoveries.get(trial.trial_id, 0)
            record, sent = keep(store, dataclasses.replace(record, attempt=attempt), epochs, echo)
            if record.status != "ok":
                error = f"{record.error_type}: {record.error_message}".splitlines()[0]
                echo(f"trial {record.trial_id} failed: {error}")
            # A trial retried after its record arrived (its node went right after) reports
            # again: the store file is replaced, the counts must not grow.
            tid = record.trial_id
            if tid not in self.recorded:
                self.recorded.add(tid)
                took = time.monotonic() - self.started.get(tid, time.monotonic())
                tally.finish(tid, record.status == "ok", took, sent)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.recoveries[trial.trial_id] = self.recoveries.get(trial.trial_id, 0) + 1
            for tid in self._ids(trial):
                if tid not in self.recorded:  # a bundle reruns only its unrecorded trials
                    tally.retry(tid)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            """Out of retries (process or node lost max_failures + 1 times): every trial of
            it without a record fails with Ray's error."""
            specs = self._specs(trial)
            error = _trial_error(trial)
            first = f"{type(error).__name__}: {error}".splitlines()[0]
            attempt = 1 + self.recoveries.get(trial.trial_id, 0)
            bundle = {"bundle_id": bundle_id(specs), "bundle_size": len(specs)}
            for spec in specs:
                if spec.trial_id in self.recorded:
                    continue
                self.recorded.add(spec.trial_id)
                failed = dataclasses.replace(failure_result(spec, error), attempt=attempt)
                if len(specs) > 1:
                    failed = dataclasses.replace(failed, **bundle)
                _, sent = keep(store, failed, [], echo)
                tally.finish(spec.trial_id, False, 0.0, sent)
                echo(f"trial {spec.trial_id} failed: {first}")

    return Recorder()


def _specs(trial: Any) -> list[TrialSpec]:
    """The slimsweep trials a Tune trial runs (one, or a fused bundle)."""
    return [TrialSpec.from_json(text) for text in trial.config["specs"]]


def _trial_error(trial: Any) -> BaseException:
    """The error Tune recorded for a trial, from the files it just wrote on the driver (its
    storage copy is synced later)."""
    from ray import cloudpickle

    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and os.path.isfile(pickled):
        with contextlib.suppress(Exception), open(pickled, "rb") as f:
            error = cloudpickle.load(f)
            if isinstance(error, BaseException):
                return error
    if text and os.path.isfile(text):
        lines = [line for line in Path(text).read_text().splitlines() if line.strip()]
        if lines:
            return RuntimeError(lines[-1])
    return RuntimeError("trial lost without an error report")


# --- launch --------------------------------------------------------------------------------


def print_line(line: str) -> None:
    """The default `echo`. A module function, so Tune pickles it by reference: Ray Tune swaps
    `builtins.print` for its own once its progress bars start, and the original `print`
    captured as a default argument would then no longer pickle."""
    print(line, flush=True)


@dataclass(frozen=True)
class LaunchSummary:
    grid: str
    results: str
    total: int  # trials in the grid
    done_before: int
    failed_before_skipped: int  # earlier failures not rerun (no --resume)
    to_run: tuple[str, ...]  # trial ids started (or, for a dry run, that would be)
    ok: int = 0
    failed: int = 0
    retries: int = 0
    unsent: int = 0  # finished trials whose records the store did not take (kept locally)
    unsent_dir: str = ""
    dry_run: bool = False

    @property
    def missing(self) -> int:
        return self.total - self.done_before - self.ok

    @property
    def exit_code(self) -> int:
        """0 when every trial of the grid is done (or nothing was asked to run), else 1."""
        return 0 if self.dry_run or self.missing == 0 else 1


def plan_launch(
    grid: Grid, store: Store, resume: bool, rerun: frozenset[str] = frozenset()
) -> tuple[list[TrialSpec], list[TrialSpec], Contents]:
    """(to run, earlier failures skipped, the store's contents): the grid minus the store's
    done trials and, without `resume`, minus its failures. Damaged trials are not done; the
    trial ids in `rerun` run even when done (their new record replaces the old)."""
    specs = expand(grid)
    contents = store.scan()
    todo = pending(specs, contents.done - rerun)
    skipped = [] if resume else [s for s in todo if s.trial_id in contents.failed]
    skip = {s.trial_id for s in skipped}
    return [s for s in todo if s.trial_id not in skip], skipped, contents


def launch(
    grid: Grid,
    results_root: str,
    address: str | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
    dry_run: bool = False,
    *,
    rerun: frozenset[str] = frozenset(),
    echo: Callable[[str], None] = print_line,
    trial_fn: TrialFn | None = None,
    bundle_fn: BundleFn | None = None,
) -> LaunchSummary:
    """Run the grid's missing trials (and those in `rerun`) on Ray Tune; results land in
    `results_root` (the grid's own folder or URI). `trial_fn` replaces `workers.run.run_trial`,
    `bundle_fn` `workers.run.run_bundle` (same signatures).

    Before Ray starts: the store must answer (GridError otherwise), this launch takes the
    store's lease (GridError naming the live launch holding it), deletes what dead launches
    left in `_tune/`, and uploads the records an earlier launch kept locally. A dry run does
    none of these (it only reads)."""
    store = Store(results_root)
    store.check()
    with contextlib.ExitStack() as held:
        if not dry_run:
            held.enter_context(Lease.acquire(store))
            _remove_leftovers(store, echo)
            _upload_unsent(store, echo)
        to_run, skipped, contents = plan_launch(grid, store, resume, rerun)
        ids = {s.trial_id for s in expand(grid)}
        summary = LaunchSummary(
            grid=grid.name,
            results=store.uri,
            total=len(ids),
            done_before=len((contents.done - rerun) & ids),
            failed_before_skipped=len(skipped),
            to_run=tuple(s.trial_id for s in to_run),
            dry_run=dry_run,
        )
        echo(
            f"grid '{grid.name}': {summary.total} trials, {summary.done_before} done, "
            f"{len(to_run)} to run; results in {store.uri}"
        )
        if skipped:
            echo(
                f"{len(skipped)} trials failed earlier and are not rerun (`--resume` reruns "
                f"them; `slimsweep status` shows their errors)"
            )
        if dry_run:
            _dry_run_notes(store, to_run, echo)
            return summary
        if not to_run:
            echo("nothing to run")
            return summary
        tally = _run_tune(grid, store, to_run, address, max_concurrent, echo, trial_fn, bundle_fn)
        return dataclasses.replace(
            summary,
            ok=tally.ok,
            failed=tally.failed,
            retries=tally.retries,
            unsent=tally.unsent,
            unsent_dir=str(store.unsent_dir()) if tally.unsent else "",
        )


def _dry_run_notes(store: Store, to_run: list[TrialSpec], echo: Callable[[str], None]) -> None:
    for s in to_run:
        axes = s.axes()
        echo(
            f"  would run {s.trial_id}  {axes['model']} layers={axes['layers']} "
            f"{axes['task']} {axes['head']} seed={axes['seed']}"
        )
    if unsent := store.unsent():
        echo(
            f"{len(unsent)} finished trials wait in {store.unsent_dir()}; a launch uploads them "
            f"first (and does not run them)"
        )
    if running := holder(store):
        echo(f"a launch of this grid is running ({running.describe()}); a launch now would refuse")


def _remove_leftovers(store: Store, echo: Callable[[str], None]) -> None:
    """Delete the Tune experiments under `_tune/`: with the lease held, no live launch owns
    them (a launch killed before its end leaves its experiment there)."""
    selector = pafs.FileSelector(f"{store.root}/{TUNE_DIR}", allow_not_found=True)
    left = [i.path for i in store.fs.get_file_info(selector) if i.type == pafs.FileType.Directory]
    for path in left:
        with contextlib.suppress(FileNotFoundError):
            store.fs.delete_dir(path)
    if left:
        names = ", ".join(p.rsplit("/", 1)[1] for p in left)
        echo(f"removed {len(left)} Tune folder(s) a stopped launch left in {TUNE_DIR}/: {names}")


def _upload_unsent(store: Store, echo: Callable[[str], None]) -> None:
    try:
        n = store.upload_unsent()
    except StoreUnavailable as e:
        raise GridError(f"{e}; the records stay in {store.unsent_dir()}") from None
    if n:
        echo(
            f"uploaded {n} finished trial record(s) an earlier launch kept in {store.unsent_dir()}"
        )


def check_address(address: str) -> None:
    """GridError unless `address` is auto or a HOST:PORT something answers at (ray.init
    retries a dead address forever). Ray Client (ray://) is refused: under it Tune runs its
    driver, and so slimsweep's result writer and progress, as an actor on the head, where
    results and output would stay."""
    if address == "auto":
        return
    if address.startswith("ray://"):
        raise GridError(
            f"--address {address}: Ray Client runs Tune's driver on the head, so results and "
            f"progress would stay there; run `slimsweep launch GRID --address auto` on the "
            f"head, or submit it from here: `ray job submit --address http://HEAD:8265 -- "
            f"slimsweep launch GRID --address auto` (docs/cluster.md)"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise GridError(
            f"--address {address}: expected auto or the head's HOST:PORT (e.g. 10.0.0.1:6379)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_PROBE_S).close()
    except OSError as e:
        raise GridError(
            f"--address {address}: no Ray head answers at {host}:{port} "
            f"({e.strerror or type(e).__name__}); check the address (`ray status` on the head "
            f"prints it), start the cluster, or leave --address out to run on a local Ray"
        ) from e


def _connect(address: str | None, echo: Callable[[str], None]) -> tuple[Any, bool]:
    """(ray, whether we started it). Without an address: reuse a running Ray of this process,
    or start a private local one sized to the machine, even where RAY_ADDRESS is set or
    `ray start` has run (joining a cluster is what --address is for)."""
    import ray

    if ray.is_initialized():
        return ray, False
    # The driver's Ray core (C++) prints warnings and state dumps to the terminal when a node
    # goes; errors only (all of it stays in the session logs).
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as e:
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise GridError(
                f"--address {address}: cannot join the Ray cluster: {first} "
                f"(or leave --address out to run on a local Ray)"
            ) from e
        return ray, True
    running = _running_ray()
    if running:
        echo(
            f"note: {running}; this launch runs on its own local Ray (to use that cluster: "
            f"--address auto)"
        )
    # A head started here serves only this process: no token needed (Ray >= 2.5x asks one).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers must not re-resolve the environment through `uv run` (no network here, often).
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(
        address="local",  # a new Ray: never RAY_ADDRESS's or `ray start`'s
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return ray, True


def _running_ray() -> str:
    """What a plain `ray.init()` would join instead of starting a Ray; "" when nothing."""
    if os.environ.get("RAY_ADDRESS"):
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set"
    from ray._private.services import find_bootstrap_address

    found = find_bootstrap_address(None)  # the address `ray start` wrote on this machine
    return f"a Ray started with `ray start` runs here ({found})" if found else ""


def _run_tune(
    grid: Grid,
    store: Store,
    specs: list[TrialSpec],
    address: str | None,
    max_concurrent: int | None,
    echo: Callable[[str], None],
    trial_fn: TrialFn | None,
    bundle_fn: BundleFn | None,
) -> Tally:
    # Rows this launch writes are stamped later (in ms): a retried bundle skips those trials.
    launched_at = datetime.now(UTC).replace(microsecond=0)
    ray, started = _connect(address, echo)
    try:
        cluster = _probe_cluster(ray)
        resources = trial_resources(grid, specs, cluster, lambda m: echo(f"warning: {m}"))
        groups, resources = plan_bundles(grid, specs, resources)
        if len(groups) < len(specs):
            echo(
                f"{len(cluster.nodes)} Ray nodes; {len(specs)} trials fused into "
                f"{len(groups)} bundles of up to {max(map(len, groups))} seeds "
                f"(runtime.fuse: {grid.runtime.fuse}); each bundle gets {_fmt(resources)}"
            )
        else:
            echo(f"{len(cluster.nodes)} Ray nodes; each trial gets {_fmt(resources)}")
        # Our progress line replaces Tune's tables and its checkpoint-frequency warnings.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        from ray import tune

        tally = Tally.of(specs)
        name = f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        storage = f"{store.root}/{TUNE_DIR}"
        # Workers reach the store by an absolute path or URI (their working folder differs).
        where = store.uri if store.scheme and store.scheme != "file" else store.root
        run = tune.with_parameters(
            run_one,
            trial_fn=trial_fn,
            bundle_fn=bundle_fn,
            results=where,
            launched_at=launched_at,
        )
        trainable = tune.with_resources(run, resources)
        tuner = tune.Tuner(
            trainable,
            param_space={"specs": tune.grid_search([[s.to_json() for s in g] for g in groups])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent,
                # A trial process imports torch and transformers (seconds on CPU): keep it for
                # the next trial, which also keeps the worker's in-process model cache warm.
                reuse_actors=True,
                # Tune's folders and logs named by slimsweep's trial ids.
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                # On an object store Tune uses the store's own file system, so an endpoint
                # given in the URI (?endpoint_override=...) reaches Tune and every worker.
                storage_filesystem=None if isinstance(store.fs, pafs.LocalFileSystem) else store.fs,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=grid.max_failures),
                # The latest epoch is all a restart needs; older ones only fill the disk.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_make_callback(store, tally, echo)],
            ),
        )
        try:
            with _quiet_ray():
                tuner.fit()
        except OSError as e:  # Tune's storage (the store) went away; its records are handled
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            echo(
                f"warning: Tune lost its storage in {store.uri} ({first}); every record that "
                f"arrived is recorded or kept locally, and the next launch runs what is missing"
            )
        # Never read again (resume works from the store); if the store is away now, the next
        # launch removes it (_remove_leftovers).
        with contextlib.suppress(OSError):
            store.fs.delete_dir(f"{storage}/{name}")
        return tally
    finally:
        if started:
            ray.shutdown()


# Loggers quieted while Tune runs: Tune logs each lost trial with a traceback and Ray warns
# (in colour) about dead workers and nodes; the progress lines and the store carry the error
# instead (`slimsweep status`), and Ray's own logs keep everything on disk.
QUIET_LOGGERS = {"ray.tune": logging.CRITICAL, "ray": logging.ERROR}


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    loggers = {name: logging.getLogger(name) for name in QUIET_LOGGERS}
    levels = {name: log.level for name, log in loggers.items()}
    for name, log in loggers.items():
        log.setLevel(QUIET_LOGGERS[name])
    try:
        yield
    finally:
        for name, log in loggers.items():
            log.setLevel(levels[name])


def _trial_name(trial: Any) -> str:
    specs = _specs(trial)
    return specs[0].trial_id if len(specs) == 1 else f"bundle-{bundle_id(specs)}"


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


# --- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    grid: str
    results: str
    total: int
    done: int
    failures: tuple[tuple[str, str], ...]  # (trial id, one error line) of the grid's trials
    damaged: tuple[tuple[str, str], ...]  # (trial id, what is wrong with its files): rerun
    missing: int  # neither done nor failed (damaged included)
    ignored: str | None  # one line naming the other files the store ignored
    unsent: int  # finished trials whose records wait locally for the next launch to upload
    unsent_dir: str
    running: str | None  # the launch holding the store's lease, if one is running

    @property
    def exit_code(self) -> int:
        return 0 if self.done == self.total else 1


def status(grid: Grid, results_root: str) -> Status:
    store = Store(results_root)
    contents = store.scan(notify=False)  # status names what it ignored itself
    ids = {s.trial_id for s in expand(grid)}
    done = contents.done & ids
    failures = contents.failures.to_pandas()
    failures = failures[failures.trial_id.isin(ids)]
    lines = tuple(
        (r.trial_id, f"{r.error_type}: {r.error_message}".splitlines()[0])
        for r in failures.itertuples()
    )
    damaged = tuple((i, r) for i, r in contents.damaged.items() if i in ids)
    others = [i for i in contents.ignored if i.trial_id not in dict(damaged)]
    running = holder(store)
    return Status(
        grid=grid.name,
        results=store.uri,
        total=len(ids),
        done=len(done),
        failures=lines,
        damaged=damaged,
        missing=len(ids) - len(done) - len(lines),
        ignored=notice(store.uri, others),
        unsent=len(store.unsent()),
        unsent_dir=str(store.unsent_dir()),
        running=running.describe() if running else None,
    )

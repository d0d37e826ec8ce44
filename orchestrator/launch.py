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
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slimsweep.orchestrator.grid import Grid, GridError
from slimsweep.orchestrator.models import estimate_params, model_config
from slimsweep.orchestrator.plan import bundles, expand, pending
from slimsweep.orchestrator.store import Store, failure_result
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec, bundle_id, fuse_limit

# run_trial's signature: (spec, *, on_epoch, resume_from) -> (result, epoch rows).
OnEpoch = Callable[[EpochRow, str | None], None]
TrialFn = Callable[..., tuple[TrialResult, list[EpochRow]]]
# run_bundle's signature: (specs, *, on_epoch, on_done(i, record or error)) -> None
BundleFn = Callable[..., Any]

RECORD_KEY = "slimsweep_record"
TUNE_DIR = "_tune"  # Tune's own state and checkpoints, under the grid's results root
PROGRESS_EVERY_S = 2.0
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
        if cfg is None:
            warn(f"gpus: auto: shape of model '{s.model.name}' unknown; one GPU per trial")
            return 1.0
        sizes.append((estimate_params(cfg, s.layers), s.train.precision))
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


def encode_record(result: TrialResult, epochs: list[EpochRow]) -> str:
    return json.dumps(
        {"result": dataclasses.asdict(result), "epochs": [dataclasses.asdict(e) for e in epochs]}
    )


def decode_record(text: str) -> tuple[TrialResult, list[EpochRow]]:
    d = json.loads(text)
    r = d["result"]
    r["kept_layers"] = tuple(r["kept_layers"])
    r["test_acc_per_class"] = tuple(r["test_acc_per_class"])
    return TrialResult(**r), [EpochRow(**e) for e in d["epochs"]]


def _default_trial_fn() -> TrialFn:
    from slimsweep.workers.run import run_trial

    return run_trial


def _default_bundle_fn() -> BundleFn:
    from slimsweep.workers.run import run_bundle

    return run_bundle


def run_one(
    config: dict[str, Any], trial_fn: TrialFn | None = None, bundle_fn: BundleFn | None = None
) -> None:
    """One Tune trial: one slimsweep trial, or a bundle of them trained fused. Reports each
    epoch (a single trial with its restart checkpoint) and each trial's final record as soon
    as it has one: its result, or its failure record if it raised."""
    from ray import tune

    specs = [TrialSpec.from_json(text) for text in config["specs"]]
    checkpoints = True  # off after the first checkpoint the storage cannot take

    def on_epoch(row: EpochRow, checkpoint_dir: str | None) -> None:
        nonlocal checkpoints
        metrics = {"epoch": row.epoch, "train_loss": row.train_loss, "val_acc": row.val_acc}
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
    reported: set[int] = set()

    def report(i: int, outcome: tuple[TrialResult, list[EpochRow]] | BaseException) -> None:
        if isinstance(outcome, BaseException):
            failed = failure_result(
                specs[i], outcome, started_at=started, wall_s=time.monotonic() - t0
            )
            if len(specs) > 1:
                failed = dataclasses.replace(
                    failed, bundle_id=bundle_id(specs), bundle_size=len(specs)
                )
            outcome = (failed, [])
        reported.add(i)
        tune.report({RECORD_KEY: encode_record(*outcome)})

    if len(specs) > 1:
        try:
            (bundle_fn or _default_bundle_fn())(specs, on_epoch=on_epoch, on_done=report)
        except Exception as e:  # the whole bundle failed: each trial not yet recorded with it
            for i in range(len(specs)):
                if i not in reported:
                    report(i, e)
        return
    restored = tune.get_checkpoint()
    resume_dir = restored.to_directory() if restored else None
    try:
        outcome = (trial_fn or _default_trial_fn())(
            specs[0], on_epoch=on_epoch, resume_from=resume_dir
        )
    except Exception as e:  # recorded as the trial's result; deterministic, so not retried
        outcome = e
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
    report(0, outcome)


# --- progress ------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts of this launch's trials and the durations of the finished ones."""

    total: int
    ok: int = 0
    failed: int = 0
    retries: int = 0
    running: set[str] = field(default_factory=set)
    durations: list[float] = field(default_factory=list)
    lanes: int = 1  # most trials seen running at once: the concurrency the ETA assumes

    def start(self, trial: str) -> None:
        self.running.add(trial)
        self.lanes = max(self.lanes, len(self.running))

    @property
    def pending(self) -> int:
        return self.total - self.ok - self.failed - len(self.running)

    def eta_s(self) -> float | None:
        """Mean trial time x rounds left at the current concurrency; None before the first."""
        if not self.durations:
            return None
        left = self.total - self.ok - self.failed
        return sum(self.durations) / len(self.durations) * math.ceil(left / self.lanes)

    def line(self) -> str:
        eta = self.eta_s()
        parts = [
            f"done {self.ok}/{self.total}",
            f"running {len(self.running)}",
            f"failed {self.failed}",
            f"pending {self.pending}",
        ]
        if self.retries:
            parts.append(f"retried {self.retries}")
        parts.append("ETA " + (_duration(eta) if eta is not None else "?"))
        return " | ".join(parts)


def _duration(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _make_callback(store: Store, tally: Tally, echo: Callable[[str], None]) -> Any:
    from ray import tune

    class Recorder(tune.Callback):
        """Writes each trial's record to the store as it arrives; prints a progress line when
        the counts have changed, at most every PROGRESS_EVERY_S (a reused actor starts its next
        trial right after the last one ends: one line for both, not two)."""

        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.recorded: set[str] = set()
            self.last = ""
            self.shown_at = -math.inf

        def _show(self) -> None:
            line = tally.line()
            if line != self.last:
                echo(time.strftime("%H:%M:%S ") + line)
                self.last = line
                self.shown_at = time.monotonic()

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() - self.shown_at >= PROGRESS_EVERY_S:
                self._show()

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self._show()

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            for spec in _specs(trial):
                if spec.trial_id not in self.recorded:
                    tally.start(spec.trial_id)
            self.started.setdefault(trial.trial_id, time.monotonic())

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            if RECORD_KEY not in result:
                return
            record, epochs = decode_record(result[RECORD_KEY])
            if record.status == "ok":
                store.write_result(record, epochs)
            else:
                store.write_failure(record)
                error = f"{record.error_type}: {record.error_message}".splitlines()[0]
                echo(f"trial {record.trial_id} failed: {error}")
            # A trial retried after its record arrived (its node went right after) reports
            # again: the store file is replaced, the counts must not grow.
            if record.trial_id not in self.recorded:
                self.recorded.add(record.trial_id)
                tally.ok += record.status == "ok"
                tally.failed += record.status != "ok"
                start = self.started.get(trial.trial_id, time.monotonic())
                tally.durations.append(time.monotonic() - start)
            tally.running.discard(record.trial_id)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            tally.retries += 1

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            """Out of retries (process or node lost max_failures + 1 times): every trial of
            it without a record fails with Ray's error."""
            error = _trial_error(trial)
            first = f"{type(error).__name__}: {error}".splitlines()[0]
            for spec in _specs(trial):
                tally.running.discard(spec.trial_id)
                if spec.trial_id in self.recorded:
                    continue
                self.recorded.add(spec.trial_id)
                store.write_failure(failure_result(spec, error))
                tally.failed += 1
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
    dry_run: bool = False

    @property
    def missing(self) -> int:
        return self.total - self.done_before - self.ok

    @property
    def exit_code(self) -> int:
        """0 when every trial of the grid is done (or nothing was asked to run), else 1."""
        return 0 if self.dry_run or self.missing == 0 else 1


def plan_launch(
    grid: Grid, store: Store, resume: bool
) -> tuple[list[TrialSpec], list[TrialSpec], set[str]]:
    """(to run, earlier failures skipped, done ids): the grid minus the store's results and,
    without `resume`, minus its failures."""
    specs = expand(grid)
    done = store.done_ids()
    todo = pending(specs, done)
    failed = store.failed_ids()
    skipped = [] if resume else [s for s in todo if s.trial_id in failed]
    skip = {s.trial_id for s in skipped}
    return [s for s in todo if s.trial_id not in skip], skipped, done


def launch(
    grid: Grid,
    results_root: str,
    address: str | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
    dry_run: bool = False,
    *,
    echo: Callable[[str], None] = print_line,
    trial_fn: TrialFn | None = None,
    bundle_fn: BundleFn | None = None,
) -> LaunchSummary:
    """Run the grid's missing trials on Ray Tune; results land in `results_root` (the grid's
    own folder or URI). `trial_fn` replaces `workers.run.run_trial`, `bundle_fn`
    `workers.run.run_bundle` (same signatures)."""
    store = Store(results_root)
    to_run, skipped, done = plan_launch(grid, store, resume)
    ids = {s.trial_id for s in expand(grid)}
    total = len(ids)
    summary = LaunchSummary(
        grid=grid.name,
        results=store.uri,
        total=total,
        done_before=len(done & ids),
        failed_before_skipped=len(skipped),
        to_run=tuple(s.trial_id for s in to_run),
        dry_run=dry_run,
    )
    echo(
        f"grid '{grid.name}': {total} trials, {summary.done_before} done, "
        f"{len(to_run)} to run; results in {store.uri}"
    )
    if skipped:
        echo(
            f"{len(skipped)} trials failed earlier and are not rerun; see `slimsweep status "
            f"{grid.path}`, fix the cause, then `slimsweep launch {grid.path} --resume`"
        )
    if dry_run:
        for s in to_run:
            axes = s.axes()
            echo(
                f"  would run {s.trial_id}  {axes['model']} layers={axes['layers']} "
                f"{axes['task']} {axes['head']} seed={axes['seed']}"
            )
        return summary
    if not to_run:
        echo("nothing to run")
        return summary
    tally = _run_tune(grid, store, to_run, address, max_concurrent, echo, trial_fn, bundle_fn)
    return dataclasses.replace(summary, ok=tally.ok, failed=tally.failed, retries=tally.retries)


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


def _connect(address: str | None) -> tuple[Any, bool]:
    """(ray, whether we started it). Without an address: reuse a running Ray of this process,
    or start a local one sized to the machine."""
    import ray

    if ray.is_initialized():
        return ray, False
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
    # A head started here serves only this process: no token needed (Ray >= 2.5x asks one).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers must not re-resolve the environment through `uv run` (no network here, often).
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return ray, True


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
    ray, started = _connect(address)
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

        tally = Tally(total=len(specs))
        name = f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        storage = _tune_storage(store)
        run = tune.with_parameters(run_one, trial_fn=trial_fn, bundle_fn=bundle_fn)
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
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=grid.max_failures),
                # The latest epoch is all a restart needs; older ones only fill the disk.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_make_callback(store, tally, echo)],
            ),
        )
        # Tune logs each lost trial with a traceback; the progress lines and the store carry
        # the error instead (`slimsweep status`).
        tune_log = logging.getLogger("ray.tune")
        level = tune_log.level
        tune_log.setLevel(logging.CRITICAL)
        try:
            tuner.fit()
        finally:
            tune_log.setLevel(level)
        _remove_tune_state(store, storage, name)
        return tally
    finally:
        if started:
            ray.shutdown()


def _trial_name(trial: Any) -> str:
    specs = _specs(trial)
    return specs[0].trial_id if len(specs) == 1 else f"bundle-{bundle_id(specs)}"


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def _tune_storage(store: Store) -> str:
    """Tune's checkpoints live next to the results: on an object store every node reaches
    them; a local root serves one machine (or a shared mount)."""
    if "://" in store.uri and not store.uri.startswith("file://"):
        return f"{store.uri.rstrip('/')}/{TUNE_DIR}"
    return f"{store.root}/{TUNE_DIR}"


def _remove_tune_state(store: Store, storage: str, name: str) -> None:
    """Tune's experiment state is never read again (resume works from the store)."""
    if "://" in storage:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(f"{storage}/{name}")
        fs.delete_dir(path)
    else:
        shutil.rmtree(f"{storage}/{name}", ignore_errors=True)


# --- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    grid: str
    results: str
    total: int
    done: int
    failures: tuple[tuple[str, str], ...]  # (trial id, one error line) of the grid's trials
    missing: int  # neither done nor failed

    @property
    def exit_code(self) -> int:
        return 0 if self.done == self.total else 1


def status(grid: Grid, results_root: str) -> Status:
    store = Store(results_root)
    ids = {s.trial_id for s in expand(grid)}
    done = store.done_ids() & ids
    failures = store.read_failures()
    failures = failures[failures.trial_id.isin(ids)]
    lines = tuple(
        (r.trial_id, f"{r.error_type}: {r.error_message}".splitlines()[0])
        for r in failures.itertuples()
    )
    return Status(
        grid=grid.name,
        results=store.uri,
        total=len(ids),
        done=len(done),
        failures=lines,
        missing=len(ids) - len(done) - len(lines),
    )

"""Worker speed benchmark (issue 6): the naive and the fast worker side by side, per grid shape.

For every (model, depth) of a grid (default grids/paper.yaml) and every head, the script builds
a random-init model of the real shape from its config (no hub needed), makes random-token
prompts of a realistic length (a shared demonstration prefix plus a query), and times with
the worker's own functions (`workers.heads`, `workers.train`):

- training steps (the grid's batch size; median over `--steps` after `--warmup`);
- one evaluation pass over `--eval-examples` examples (`predict_logits`, batch size from
  `workers.train.eval_batch_size`);

for three variants: `naive` (fp32, full-sequence logits, foreach AdamW, batch-1 evaluation
without prefix cache), `fast` (the RuntimeSpec defaults, fp32) and `fast-bf16` (the same with
bf16 autocast over fp32 master weights); and the training step of a fused bundle
(`workers.train.FusedRunner`: N seeds of the cell as one stacked model, N the grid's seeds
capped at what the memory estimate fits) against N separate fast steps, round by round. Per
shape it also runs one short real trial (`workers.train.train`, one epoch, with the grid's
restart checkpoints) to measure what the per-step costs miss (checkpoint writes, best-weight
copies), and measures GPU packing: K processes (K from the orchestrator's memory estimate,
capped at what fits and at `--max-pack`) running the fast step loop at once, against one.

From those it extrapolates the whole grid's device-hours for naive, fast, fast-bf16,
fast+packing and fast+fused, prints Markdown tables and writes worker_speed.json /
worker_speed.md to --out.

    python bench/worker_speed.py --device cuda              # the paper grid on a GPU
    python bench/worker_speed.py --device cpu --tiny        # same code, tiny shapes, < 1 min

docs/benchmarks.md has the command, the assumptions and the measured tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _import_shim() -> None:
    """Make `slimsweep.workers` / `slimsweep.orchestrator` importable from a plain checkout.

    An install maps ./workers and ./orchestrator to these names (pyproject package-dir). The
    GPU machine has only torch, transformers, pandas and pyarrow, so without an install the
    same mapping is registered here: a bare `slimsweep` package whose two subpackages load
    from this checkout. Nothing else in the repository is touched."""
    if importlib.util.find_spec("slimsweep") is not None:
        return
    top = types.ModuleType("slimsweep")
    top.__path__ = []
    sys.modules["slimsweep"] = top
    for sub in ("workers", "orchestrator"):
        spec = importlib.util.spec_from_file_location(
            f"slimsweep.{sub}",
            ROOT / sub / "__init__.py",
            submodule_search_locations=[str(ROOT / sub)],
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(top, sub, module)


_import_shim()

# After the shim: these need `slimsweep` importable. None of them imports ray or datasets.
import torch  # noqa: E402
from slimsweep.orchestrator.grid import load_grid  # noqa: E402
from slimsweep.orchestrator.launch import gpu_fraction  # noqa: E402
from slimsweep.orchestrator.models import estimate_params, model_config  # noqa: E402
from slimsweep.orchestrator.plan import expand  # noqa: E402
from slimsweep.workers.data import PROMPT_HEADS  # noqa: E402
from slimsweep.workers.families import auto_class, cut_layers, family_of  # noqa: E402
from slimsweep.workers.heads import HEADS, predict_logits  # noqa: E402
from slimsweep.workers.spec import RuntimeSpec, TrialSpec  # noqa: E402
from slimsweep.workers.tables import HEADS as HEAD_KINDS  # noqa: E402
from slimsweep.workers.train import (  # noqa: E402
    FusedRunner,
    autocast,
    eval_batch_size,
    make_optimizer,
    train,
    train_step,
)
from torch import nn  # noqa: E402

GOAL_HOURS = 8.0  # issue 6: the paper grid in at most 8 H100-hours ...
GOAL_SPEEDUP = 5.0  # ... and at least 5x faster than the naive worker
LOWEST_TOKEN = 4  # random tokens avoid the special ids at both ends of the vocabulary
PACK_TIMEOUT_S = 900.0  # one packing run (build, warm-up, steps) of one shape


def tiny_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """--tiny: the same family and depth, narrow enough for a CPU (the family's config keys
    from workers.tables)."""
    fam = family_of(cfg["model_type"])
    fields = {
        fam.hidden_key: 64,
        fam.heads_key: 4,
        fam.ffn_key: 128 if fam.gated_mlp else 256,
        "vocab_size": 1024,
    }
    if fam.kv_heads_key:
        fields[fam.kv_heads_key] = 2
    for key, value in (("word_embed_proj_dim", 64), ("head_dim", 16)):  # OPT's, Gemma's widths
        if key in cfg:
            fields[key] = value
    return fields


# --- variants: which runtime switches each column uses ---------------------------------------

SPEED_FLAGS = ("last_position_logits", "prefix_cache", "eval_batch_size", "fused_adamw")


@dataclass(frozen=True)
class Variant:
    precision: str
    flags: tuple[tuple[str, Any], ...]  # RuntimeSpec fields


_DEFAULTS = RuntimeSpec()
VARIANTS: dict[str, Variant] = {
    # The plain HF worker of the baseline: fp32, full logits, torch's default AdamW (foreach
    # on CUDA, per-tensor on CPU), one query at a time.
    "naive": Variant(
        "fp32",
        (
            ("last_position_logits", False),
            ("prefix_cache", False),
            ("eval_batch_size", 1),
            ("fused_adamw", False),
        ),
    ),
    # The worker's defaults, at the paper's precision.
    "fast": Variant("fp32", tuple((f, getattr(_DEFAULTS, f)) for f in SPEED_FLAGS)),
    # bf16 changes results beyond float noise, so it is a grid option and its own column.
    "fast-bf16": Variant("bf16", tuple((f, getattr(_DEFAULTS, f)) for f in SPEED_FLAGS)),
}
PACK_VARIANT = "fast"  # what the packed processes run (the paper's fp32 with the fast paths)
FUSE_VARIANT = "fast"  # what a fused bundle runs (runtime.fuse, workers.fused)
# Extrapolation schemes: (measured variant, how trials share the device: alone, packed
# processes, or fused bundles)
SCHEMES: dict[str, tuple[str, str]] = {
    "naive": ("naive", "alone"),
    "fast": ("fast", "alone"),
    "fast-bf16": ("fast-bf16", "alone"),
    "fast+packing": (PACK_VARIANT, "packed"),
    "fast+fused": (FUSE_VARIANT, "fused"),
}


def variant_spec(spec: TrialSpec, variant: Variant, device: torch.device) -> TrialSpec:
    """`spec` as it runs in `variant` on `device`."""
    return dataclasses.replace(
        spec,
        train=dataclasses.replace(spec.train, precision=variant.precision),
        runtime=dataclasses.replace(spec.runtime, device=device.type, **dict(variant.flags)),
    )


# --- settings, shapes, data ------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    device: str
    tiny: bool
    prefix_tokens: int  # shared demonstration prefix (prompt heads; vanilla-cls has none)
    query_tokens: int  # mean query length; queries vary from half to 1.5x
    classes: int
    warmup: int
    steps: int
    eval_examples: int
    pack_steps: int


# Defaults of the size flags: the full run mirrors the baseline (256-token prompts, 208 of
# them shared demonstrations); --tiny takes a handful of steps on short prompts.
SIZE_DEFAULTS: dict[str, dict[str, int]] = {
    "full": {
        "prefix_tokens": 208,
        "query_tokens": 48,
        "warmup": 3,
        "steps": 10,
        "eval_examples": 128,
        "pack_steps": 30,
    },
    "tiny": {
        "prefix_tokens": 24,
        "query_tokens": 8,
        "warmup": 1,
        "steps": 3,
        "eval_examples": 8,
        "pack_steps": 3,
    },
}


@dataclass(frozen=True)
class Shape:
    model: str  # the grid's model name
    layers: int
    config: tuple[tuple[str, Any], ...]  # config.json fields of the model to build

    @property
    def key(self) -> str:
        return f"{self.model}:{self.layers}"

    def config_dict(self) -> dict[str, Any]:
        return dict(self.config)


def shape_config(source: str, tiny: bool) -> dict[str, Any]:
    """config.json fields of the model behind `source` (`orchestrator.models`: its local
    config.json or the built-in table, which is what the GPU machine has without a hub),
    narrowed with --tiny; the special token ids are set inside the vocabulary (the random
    prompts never use them)."""
    cfg = model_config(source)
    if cfg is None:
        raise SystemExit(
            f"bench: no shape known for model source {source!r}; give a local folder with a "
            f"config.json, or add the model to orchestrator/models.py KNOWN_CONFIGS"
        )
    cfg = dict(cfg)
    if tiny:
        cfg.update(tiny_fields(cfg))
    last = cfg["vocab_size"] - 1
    cfg.update(pad_token_id=last, bos_token_id=last, eos_token_id=last)
    return cfg


def grid_shapes(specs: Sequence[TrialSpec], tiny: bool) -> list[Shape]:
    """The distinct (model, depth) pairs of the grid, in grid order."""
    sources = {(s.model.name, s.layers): s.model.source for s in specs}
    return [
        Shape(name, layers, tuple(shape_config(source, tiny).items()))
        for (name, layers), source in sources.items()
    ]


@dataclass(frozen=True)
class Example:
    """A random-token prompt, shaped like `workers.data.Example` (heads.Encoded)."""

    label: int
    input_ids: tuple[int, ...]
    query_ids: tuple[int, ...]


@dataclass(frozen=True)
class Splits:
    """What `workers.train.train` reads (train.Splits)."""

    train: tuple[Example, ...]
    valid: tuple[Example, ...]
    test: tuple[Example, ...]
    prefix_ids: tuple[int, ...]
    label_ids: tuple[int, ...]


def make_data(head: str, vocab: int, n_train: int, n_eval: int, st: Settings) -> Splits:
    """Seeded random prompts: the prompt heads read a shared prefix plus a query, vanilla-cls
    the query alone (as `workers.data.prepare` builds them)."""
    rng = random.Random(0)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(LOWEST_TOKEN, vocab - 1) for _ in range(n))

    prefix = tokens(st.prefix_tokens) if head in PROMPT_HEADS else ()

    def example() -> Example:
        q = tokens(rng.randint(max(1, st.query_tokens // 2), max(1, st.query_tokens * 3 // 2)))
        return Example(rng.randrange(st.classes), prefix + q, q)

    label_ids = tuple(rng.sample(range(LOWEST_TOKEN, vocab - 1), st.classes))
    evals = tuple(example() for _ in range(n_eval))
    return Splits(tuple(example() for _ in range(n_train)), evals, evals, prefix, label_ids)


def build_model(shape: Shape, head: str, classes: int, device: torch.device) -> nn.Module:
    """Random-init model of `shape` with the class `workers.families.load_model` uses for
    `head`, created directly on `device`."""
    from transformers import AutoConfig

    fields = shape.config_dict()
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cut_layers(cfg, family_of(cfg.model_type), range(shape.layers))
    if HEAD_KINDS[head].classifier is not None:
        cfg.num_labels = classes
    torch.manual_seed(0)
    with torch.device(device):
        return auto_class(head).from_config(cfg, dtype=torch.float32)


# --- timing ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(device: torch.device, n: int, step: Callable[[int], object]) -> list[float]:
    """Seconds of each of `n` calls of step(i): CUDA events recorded between steps and read
    after one final synchronize (so the loop runs as unsynchronised as the worker's), or
    perf_counter on the CPU."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step(i)
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)]
    marks = [time.perf_counter()]
    for i in range(n):
        step(i)
        marks.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(marks)]


def step_loop(
    spec: TrialSpec, model: nn.Module, data: Splits, pad_id: int, device: torch.device
) -> Callable[[int], object]:
    """step(i): one training step, with a fresh optimizer, on the i-th batch of data.train
    (cycling)."""
    optimizer = make_optimizer(spec, model)
    label_ids = torch.tensor(data.label_ids, dtype=torch.long, device=device)
    bs = spec.train.batch_size
    model.train()

    def step(i: int) -> torch.Tensor:
        start = i * bs % len(data.train)
        batch = data.train[start : start + bs]
        return train_step(spec, model, batch, label_ids, optimizer, pad_id, device)

    return step


def eval_pass(
    spec: TrialSpec, model: nn.Module, data: Splits, pad_id: int, device: torch.device
) -> tuple[float, int]:
    """(seconds, batch size) of one pass over data.valid, as `train`'s validation runs it,
    after a warm-up pass over its first batch."""
    rt = spec.runtime
    label_ids = torch.tensor(data.label_ids, dtype=torch.long, device=device)
    longest = max(len(e.input_ids) for e in data.valid)
    batch_size = eval_batch_size(rt, model, longest, device)

    def run(examples: Sequence[Example]) -> None:
        with autocast(spec.train.precision, device):
            predict_logits(
                model,
                HEADS[spec.head],
                examples,
                prefix_ids=data.prefix_ids,
                label_ids=label_ids,
                pad_id=pad_id,
                batch_size=batch_size,
                last_position=rt.last_position_logits,
                prefix_cache=rt.prefix_cache,
            )

    model.eval()
    run(data.valid[:batch_size])
    _sync(device)
    start = time.perf_counter()
    run(data.valid)
    _sync(device)
    return time.perf_counter() - start, batch_size


def measure_variant(
    spec: TrialSpec, model: nn.Module, data: Splits, pad_id: int, st: Settings
) -> dict[str, Any]:
    """Median training step and one evaluation pass of one variant."""
    device = torch.device(st.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = step_loop(spec, model, data, pad_id, device)
    step_times(device, st.warmup, step)
    step_s = statistics.median(step_times(device, st.steps, step))
    # Evaluate while the optimizer state exists, as in `train` (the eval batch size depends
    # on the memory left).
    eval_s, eval_batch = eval_pass(spec, model, data, pad_id, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "step_ms": step_s * 1e3,
        "eval_examples": len(data.valid),
        "eval_batch": eval_batch,
        "eval_s": eval_s,
        "eval_ex_per_s": len(data.valid) / eval_s,
        "peak_mem_gib": peak,
    }


def measure_trial(
    spec: TrialSpec, model: nn.Module, data: Splits, pad_id: int, st: Settings, checkpoint: bool
) -> float:
    """Wall seconds of one real `workers.train.train` call: one epoch over data.train, its
    validation, the best-weight copy and the test pass, and with `checkpoint` a restart
    checkpoint written at the epoch's end."""
    device = torch.device(st.device)
    policy = (
        {"checkpoint_every": 1, "checkpoint_min_s": 0.0} if checkpoint else {"checkpoint_every": 0}
    )
    one_epoch = dataclasses.replace(
        spec,
        train=dataclasses.replace(spec.train, epochs=1),
        runtime=dataclasses.replace(spec.runtime, **policy),
    )
    _sync(device)
    start = time.perf_counter()
    train(one_epoch, model, data, pad_id=pad_id, device=device, on_epoch=lambda row, ckpt: None)
    _sync(device)
    return time.perf_counter() - start


def measure_fused(
    spec: TrialSpec, shape: Shape, data: Splits, n: int, pad_id: int, st: Settings
) -> dict[str, Any]:
    """One fused bundle of `n` trials of `spec`'s shape (`FusedRunner`: the stacked model, one
    forward/backward and one AdamW step for all n) against the same n trials stepping one
    after the other, round by round (one bundle step, then the n separate steps), so both see
    the same machine load; the speedup is the median of the rounds' ratios."""
    device = torch.device(st.device)
    models = [build_model(shape, spec.head, st.classes, device) for _ in range(n)]
    label_ids = torch.tensor(data.label_ids, dtype=torch.long, device=device)
    generators = [torch.Generator(device).manual_seed(i) for i in range(n)]
    runner = FusedRunner(spec, models, label_ids, pad_id, generators)
    runner.train_mode()
    alone = [step_loop(spec, m, data, pad_id, device) for m in models]
    bs = spec.train.batch_size

    def fused_step(i: int) -> torch.Tensor:
        batches = []
        for t in range(n):  # each trial its own examples, as in a bundle
            start = (i * bs + t) % len(data.train)
            batches.append(list(data.train[start : start + bs]))
        return runner.step(batches, device)

    rounds = []
    for i in range(st.warmup + st.steps):
        bundle_s = step_times(device, 1, lambda _, i=i: fused_step(i))[0]
        alone_s = sum(step_times(device, 1, lambda _, i=i, f=f: f(i))[0] for f in alone)
        if i >= st.warmup:
            rounds.append((bundle_s, alone_s))
    bundle_s = statistics.median(b for b, _ in rounds)
    return {
        "model": shape.model,
        "layers": shape.layers,
        "head": spec.head,
        "n": n,
        "bundle_step_ms": bundle_s * 1e3,
        "alone_steps_ms": statistics.median(a for _, a in rounds) * 1e3,
        "per_trial_step_ms": bundle_s * 1e3 / n,
        "speedup": statistics.median(a / b for b, a in rounds),
    }


# --- packing: K processes running the fast step loop at once ----------------------------------


@dataclass(frozen=True)
class PackJob:
    shape: Shape
    spec_json: str
    settings: Settings


def _pack_worker(jobs: Any, results: Any, rank: int) -> None:
    """One packed trial process: runs jobs until it receives None."""
    while (job := jobs.get()) is not None:
        _pack_job(job, jobs, results, rank)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the job's model and optimizer are gone with its frame


def _pack_job(job: PackJob, jobs: Any, results: Any, rank: int) -> None:
    """Build the model, warm up, report ready, wait for "go", run settings.pack_steps fast
    steps and report (start, end) on the clock all processes share."""
    st = job.settings
    device = torch.device(st.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # K CPU processes share the cores
    spec = TrialSpec.from_json(job.spec_json)
    try:
        model = build_model(job.shape, spec.head, st.classes, device)
        vocab = job.shape.config_dict()["vocab_size"]
        data = make_data(spec.head, vocab, max(st.pack_steps, 1), 1, st)
        step = step_loop(spec, model, data, vocab - 1, device)
        step_times(device, st.warmup, step)
        _sync(device)
    except Exception as err:  # e.g. CUDA OOM: report it, stay available
        results.put((rank, "error", f"{type(err).__name__}: {err}"[:300]))
        return
    results.put((rank, "ready", None))
    jobs.get()  # "go": every process of the run starts together
    start = time.perf_counter()  # CLOCK_MONOTONIC: one clock for all processes
    step_times(device, st.pack_steps, step)
    _sync(device)
    results.put((rank, "done", (start, time.perf_counter())))


class PackPool:
    """`size` spawned processes (fresh CUDA contexts), reused for every shape."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(size)]
        self.procs = [
            ctx.Process(target=_pack_worker, args=(q, self.results, r), daemon=True)
            for r, q in enumerate(self.jobs)
        ]
        for p in self.procs:
            p.start()

    def _collect(self, n: int) -> list[tuple[int, str, Any]]:
        out = []
        while len(out) < n:
            try:
                out.append(self.results.get(timeout=PACK_TIMEOUT_S))
            except queue.Empty as err:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise RuntimeError(f"packing timed out (dead processes: {dead})") from err
        return out

    def steps_per_s(self, job: PackJob, k: int) -> float:
        """Aggregate training steps per second of `k` processes running `job` at once."""
        for q in self.jobs[:k]:
            q.put(job)
        first = self._collect(k)
        ready = [r for r, kind, _ in first if kind == "ready"]
        for r in ready:
            self.jobs[r].put("go")
        spans = [span for _, _, span in self._collect(len(ready))]
        errors = [msg for _, kind, msg in first if kind == "error"]
        if errors:
            raise RuntimeError(errors[0])
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        return k * job.settings.pack_steps / wall

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return platform.processor() or platform.machine()


def memory_bytes(device: torch.device) -> int:
    """Memory the packed processes may share: free GPU memory, or the host's RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pack_count(shape: Shape, precision: str, memory: int, max_pack: int) -> int:
    """How many trials of `shape` share one device: the orchestrator's estimate
    (launch.gpu_fraction of launch.estimate_params), capped at --max-pack."""
    n_params = estimate_params(shape.config_dict(), shape.layers)
    if n_params is None:  # build_model has refused an unknown family already
        return 1
    return max(1, min(max_pack, round(1 / gpu_fraction(n_params, precision, memory))))


def measure_packing(pool: PackPool, job: PackJob, k: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": job.shape.model, "layers": job.shape.layers, "k": k}
    try:
        one = pool.steps_per_s(job, 1)
        many = pool.steps_per_s(job, k) if k > 1 else one
    except RuntimeError as err:
        return {**row, "error": str(err), "ratio": None}
    return {**row, "one_steps_per_s": one, "k_steps_per_s": many, "ratio": many / one}


# --- extrapolation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """Measured costs of one (model, depth, head) in one variant."""

    step_s: float
    eval_s_per_example: float


def checkpoints_written(runtime: RuntimeSpec, epochs: int, trial_s: float) -> int:
    """Restart checkpoints that a trial of `epochs` epochs lasting `trial_s` writes under its
    runtime's policy (`workers.train.checkpoint_due`)."""
    if runtime.checkpoint_every <= 0:
        return 0
    by_epochs = epochs // runtime.checkpoint_every
    if runtime.checkpoint_min_s <= 0:
        return by_epochs
    return min(by_epochs, int(trial_s // runtime.checkpoint_min_s))


def trial_seconds(
    spec: TrialSpec,
    cost: Cost,
    epochs: int,
    epoch_overhead_s: float = 0.0,
    pack_ratio: float = 1.0,
    checkpoint_s: float = 0.0,
) -> float:
    """Device seconds of one trial: epochs x (training steps + validation + per-epoch overhead)
    + the test pass + the restart checkpoints its policy writes. With packing, K processes
    give `pack_ratio` times the steps per second of one, so each trial's training costs
    1/pack_ratio of the device; evaluation, already batched, is counted as not sped up by
    packing, and checkpoint writes as device time even while neighbours compute."""
    per_class = spec.task.n_classes if spec.data.train_per_class else 1
    steps = math.ceil(spec.data.train_size * per_class / spec.train.batch_size)
    epoch = (
        steps * cost.step_s / pack_ratio
        + spec.data.valid_size * cost.eval_s_per_example
        + epoch_overhead_s
    )
    seconds = epochs * epoch + spec.data.test_size * cost.eval_s_per_example
    return seconds + checkpoints_written(spec.runtime, epochs, seconds) * checkpoint_s


def extrapolate(
    specs: Sequence[TrialSpec],
    costs: Mapping[tuple[str, int, str, str], Cost],
    overheads: Mapping[tuple[str, int], float],
    checkpoints: Mapping[tuple[str, int], float],
    ratios: Mapping[tuple[str, int], float],
    epochs_list: Iterable[int],
    goal_applies: bool,
    fused: Mapping[tuple[str, int, str], float] | None = None,
) -> list[dict[str, Any]]:
    """Device-hours of the trials in `specs` per scheme and epoch count. `costs` is keyed by
    (model, layers, head, variant); per-epoch overheads, checkpoint seconds and packing ratios
    by (model, layers), 0, 0 and 1 where missing; `fused` is the training step seconds per
    trial in a fused bundle by (model, layers, head), the variant's own step where missing
    (evaluation runs per trial, so a fused trial evaluates as the variant does)."""
    out = []
    fused = fused or {}
    for epochs in epochs_list:
        hours: dict[str, float] = {}
        for scheme, (variant, sharing) in SCHEMES.items():
            total = 0.0
            for s in specs:
                shape = (s.model.name, s.layers)
                ratio = ratios.get(shape, 1.0) if sharing == "packed" else 1.0
                cost = costs[(s.model.name, s.layers, s.head, variant)]
                if sharing == "fused":
                    step = fused.get((s.model.name, s.layers, s.head), cost.step_s)
                    cost = dataclasses.replace(cost, step_s=step)
                extra = overheads.get(shape, 0.0), ratio, checkpoints.get(shape, 0.0)
                total += trial_seconds(s, cost, epochs, *extra)
            hours[scheme] = total / 3600
        for scheme, h in hours.items():
            speedup = hours["naive"] / h
            met = h <= GOAL_HOURS and speedup >= GOAL_SPEEDUP
            out.append(
                {
                    "epochs": epochs,
                    "scheme": scheme,
                    "trials": len(specs),
                    "device_hours": h,
                    "speedup_vs_naive": speedup,
                    "meets_goal": met if goal_applies else None,
                }
            )
    return out


# --- the run ---------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def columns(rows: Iterable[Mapping[str, Any]], *cols: tuple[str, str]) -> str:
    """A Markdown table of dict rows: one (header, key) per column, "-" where a key is absent."""
    return md_table([h for h, _ in cols], [[r.get(k) for _, k in cols] for r in rows])


def report(result: dict[str, Any]) -> str:
    """The tables of a run, in Markdown."""
    rows = result["rows"]
    by = {(r["model"], r["layers"], r["head"], r["variant"]): r for r in rows}
    keys = list(dict.fromkeys((r["model"], r["layers"], r["head"]) for r in rows))
    names = list(VARIANTS)
    steps = md_table(
        ["model", "layers", "head", "params M"]
        + [f"step ms {v}" for v in names]
        + [f"eval ex/s {v}" for v in names]
        + ["eval batch fast", "peak GiB fast"],
        [
            [m, k, h, by[(m, k, h, names[0])]["params"] / 1e6]
            + [by[(m, k, h, v)]["step_ms"] for v in names]
            + [by[(m, k, h, v)]["eval_ex_per_s"] for v in names]
            + [by[(m, k, h, "fast")]["eval_batch"], by[(m, k, h, "fast")]["peak_mem_gib"]]
            for m, k, h in keys
        ],
    )
    trial = columns(
        result["trials"],
        ("model", "model"),
        ("layers", "layers"),
        ("one-epoch trial s", "trial_s"),
        ("predicted from steps s", "predicted_s"),
        ("overhead/epoch s", "epoch_overhead_s"),
        ("one checkpoint s", "checkpoint_s"),
    )
    pack = columns(
        result["packing"],
        ("model", "model"),
        ("layers", "layers"),
        ("K", "k"),
        ("steps/s one process", "one_steps_per_s"),
        ("steps/s K processes", "k_steps_per_s"),
        ("ratio", "ratio"),
        ("error", "error"),
    )
    fuse = columns(
        result["fusing"],
        ("model", "model"),
        ("layers", "layers"),
        ("head", "head"),
        ("N", "n"),
        ("bundle step ms", "bundle_step_ms"),
        ("N separate steps ms", "alone_steps_ms"),
        ("speedup", "speedup"),
    )
    grid = columns(
        result["extrapolation"],
        ("epochs", "epochs"),
        ("scheme", "scheme"),
        ("trials", "trials"),
        ("device-hours", "device_hours"),
        ("speedup vs naive", "speedup_vs_naive"),
        ("meets goal", "meets_goal"),
    )
    return "\n\n".join(
        [
            f"### Steps and evaluation ({result['meta']['device_name']})",
            steps,
            "### One real trial of one epoch (`workers.train.train`, fast, no checkpoint; "
            "then the same with one restart checkpoint)",
            trial,
            "### Packing (fast step loop)",
            pack,
            "### Fused bundles (N seeds of one cell, one stacked step)",
            fuse,
            "### Whole grid",
            grid,
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if any")
    p.add_argument("--tiny", action="store_true", help="narrow models and few steps (CPU check)")
    p.add_argument("--grid", default=str(ROOT / "grids" / "paper.yaml"))
    p.add_argument("--only", action="append", default=[], metavar="MODEL:LAYERS")
    p.add_argument("--heads", nargs="+", default=None, help="default: the grid's heads")
    p.add_argument("--classes", type=int, default=4)
    for name in SIZE_DEFAULTS["full"]:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--epochs", type=int, nargs="+", default=None, help="default: grid's, 20")
    p.add_argument("--max-pack", type=int, default=None, help="default: cores / grid's cpus")
    p.add_argument("--no-pack", action="store_true")
    p.add_argument("--no-fuse", action="store_true", help="skip the fused-bundle steps")
    p.add_argument("--max-fuse", type=int, default=None, help="default: the grid's seeds")
    p.add_argument("--no-trial", action="store_true", help="skip the one-epoch real trial")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = SIZE_DEFAULTS["tiny" if args.tiny else "full"]
    st = Settings(
        device=device.type,
        tiny=args.tiny,
        classes=args.classes,
        **{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()},
    )
    grid = load_grid(args.grid)
    specs = expand(grid)
    if args.heads:
        specs = [s for s in specs if s.head in args.heads]
    if args.only:
        specs = [s for s in specs if f"{s.model.name}:{s.layers}" in args.only]
    if not specs:
        raise SystemExit(f"bench: no trials of {args.grid} match --only/--heads; check them")
    epochs_list = args.epochs or [grid.train.epochs, 20]
    max_pack = args.max_pack or max(1, int((os.cpu_count() or 1) // grid.resources.cpus))
    shapes = grid_shapes(specs, args.tiny)
    heads = list(dict.fromkeys(s.head for s in specs))
    first = {(s.model.name, s.layers, s.head): s for s in reversed(specs)}

    memory = memory_bytes(device)
    packs = {
        sh.key: pack_count(sh, VARIANTS[PACK_VARIANT].precision, memory, max_pack) for sh in shapes
    }
    pool = PackPool(max(packs.values())) if not args.no_pack else None
    fits = {
        sh.key: pack_count(sh, VARIANTS[FUSE_VARIANT].precision, memory, 10**6) for sh in shapes
    }
    seeds_per_cell = len(grid.seeds)
    rows, trials, packing, fusing = [], [], [], []
    try:
        for shape in shapes:
            vocab = shape.config_dict()["vocab_size"]
            for head in heads:
                model = build_model(shape, head, st.classes, device)
                n_params = sum(p.numel() for p in model.parameters())
                data = make_data(head, vocab, st.warmup + st.steps, st.eval_examples, st)
                base = first[(shape.model, shape.layers, head)]
                measured = {}
                for name, variant in VARIANTS.items():
                    spec = variant_spec(base, variant, device)
                    measured[name] = measure_variant(spec, model, data, vocab - 1, st)
                    row = {"model": shape.model, "layers": shape.layers, "head": head}
                    rows.append({**row, "variant": name, "params": n_params, **measured[name]})
                    print(json.dumps(rows[-1]), flush=True)
                if not args.no_fuse:
                    # As `launch` bundles: a cell's seeds, as many as fit in the device.
                    n = min(args.max_fuse or seeds_per_cell, fits[shape.key])
                    spec = variant_spec(base, VARIANTS[FUSE_VARIANT], device)
                    fusing.append(measure_fused(spec, shape, data, n, vocab - 1, st))
                    print(json.dumps(fusing[-1]), flush=True)
                if head == heads[0] and not args.no_trial:
                    spec = variant_spec(base, VARIANTS["fast"], device)
                    trial_data = dataclasses.replace(data, train=data.train[: st.steps])
                    wall = measure_trial(spec, model, trial_data, vocab - 1, st, False)
                    saved = measure_trial(spec, model, trial_data, vocab - 1, st, True)
                    fast = measured["fast"]
                    predicted = st.steps * fast["step_ms"] / 1e3 + 2 * fast["eval_s"]
                    trials.append(
                        {
                            "model": shape.model,
                            "layers": shape.layers,
                            "head": head,
                            "train_steps": st.steps,
                            "eval_examples": 2 * st.eval_examples,
                            "trial_s": wall,
                            "predicted_s": predicted,
                            "epoch_overhead_s": max(0.0, wall - predicted),
                            "checkpoint_s": max(0.0, saved - wall),
                        }
                    )
                    print(json.dumps(trials[-1]), flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if pool is not None:
                base = first[(shape.model, shape.layers, heads[0])]
                spec = variant_spec(base, VARIANTS[PACK_VARIANT], device)
                job = PackJob(shape, spec.to_json(), st)
                packing.append(measure_packing(pool, job, packs[shape.key]))
                print(json.dumps(packing[-1]), flush=True)
    finally:
        if pool is not None:
            pool.close()

    costs = {
        (r["model"], r["layers"], r["head"], r["variant"]): Cost(
            r["step_ms"] / 1e3, r["eval_s"] / r["eval_examples"]
        )
        for r in rows
    }
    overheads = {(t["model"], t["layers"]): t["epoch_overhead_s"] for t in trials}
    checkpoints = {(t["model"], t["layers"]): t["checkpoint_s"] for t in trials}
    ratios = {(p["model"], p["layers"]): p["ratio"] for p in packing if p["ratio"]}
    # A fused trial's step: the fast step over the bundle's speedup, both measured here.
    fused = {
        (f["model"], f["layers"], f["head"]): costs[
            (f["model"], f["layers"], f["head"], FUSE_VARIANT)
        ].step_s
        / f["speedup"]
        for f in fusing
    }
    return {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "command": " ".join(["python", "bench/worker_speed.py", *sys.argv[1:]]),
            "device": device.type,
            "device_name": (
                torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
            ),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "grid": args.grid,
            "settings": dataclasses.asdict(st),
            "epochs": epochs_list,
            "max_pack": max_pack,
            "variants": {
                k: {"precision": v.precision, **dict(v.flags)} for k, v in VARIANTS.items()
            },
            "goal": {"max_hours": GOAL_HOURS, "min_speedup": GOAL_SPEEDUP},
        },
        "rows": rows,
        "trials": trials,
        "packing": packing,
        "fusing": fusing,
        "extrapolation": extrapolate(
            specs,
            costs,
            overheads,
            checkpoints,
            ratios,
            epochs_list,
            goal_applies=device.type == "cuda",
            fused=fused,
        ),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "worker_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    (out / "worker_speed.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'worker_speed.json'} and {out / 'worker_speed.md'}")


if __name__ == "__main__":
    main()

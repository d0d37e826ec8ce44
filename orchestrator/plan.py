"""Grid -> trial specs, what is left to run (set operations on trial ids), and bundles. Also
the checks that need more than the grid file (a model's tokenizer), made before anything runs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from slimsweep.orchestrator.grid import Grid, GridError
from slimsweep.orchestrator.models import estimate_params, model_config
from slimsweep.workers.data import SYNTHETIC_POOLS
from slimsweep.workers.spec import (
    PKG_PREFIX,
    DataSpec,
    SpecError,
    TaskSpec,
    TrainSpec,
    TrialSpec,
    bundle_key,
    fuse_limit,
)
from slimsweep.workers.tasks import HUB_COUNTS, PoolCounts


def expand(grid: Grid) -> list[TrialSpec]:
    """model x (that model's layer counts) x task x head x selection x finetune x seed, in
    that order (one selection and one finetune, the defaults first-k and full, give the order
    and ids of grids without them)."""
    return [
        TrialSpec(
            grid=grid.name,
            model=m.spec,
            layers=k,
            task=task,
            head=head,
            seed=seed,
            selection=selection,
            finetune=finetune,
            data=grid.data,
            train=grid.train,
            runtime=grid.runtime,
        )
        for m in grid.models
        for k in m.layers
        for task in grid.tasks
        for head in grid.heads
        for selection in grid.selections
        for finetune in grid.finetunes
        for seed in grid.seeds
    ]


def pending(specs: list[TrialSpec], done_ids: Iterable[str]) -> list[TrialSpec]:
    """The trials whose ids are not among the finished ones, in grid order."""
    done = set(done_ids)
    return [s for s in specs if s.trial_id not in done]


def check_label_words(grid: Grid) -> None:
    """GridError with run_trial's message when a prompt-lm task's label words are not one
    distinct token each (under data.label_word_rule) for a model whose tokenizer is on this
    machine (a local folder or pkg:; hub models are checked when their trials run). Loads
    each such model's tokenizer once, and checks each (model, task) once."""
    if "prompt-lm" not in grid.heads:
        return
    from slimsweep.workers.data import label_token_ids
    from slimsweep.workers.families import load_tokenizer

    for m in grid.models:
        source = m.spec.source
        if not (source.startswith(PKG_PREFIX) or os.path.isdir(source)):
            continue
        tokenizer = None
        for task in grid.tasks:
            spec = TrialSpec(
                grid=grid.name,
                model=m.spec,
                layers=m.layers[0],
                task=task,
                head="prompt-lm",
                seed=grid.seeds[0],
                data=grid.data,
                train=grid.train,
                runtime=grid.runtime,
            )
            try:
                tokenizer = tokenizer or load_tokenizer(spec)
                label_token_ids(task, tokenizer, grid.data.label_word_rule)
            except SpecError as e:
                raise GridError(f"{grid.path}: model {m.spec.name!r}: {e}") from e


def pool_counts(task: TaskSpec) -> PoolCounts | None:
    """Class counts of a task's train pool and the size of its test pool, where known without
    reading the data: the paper's hub datasets (`HUB_COUNTS`) and synthetic tasks."""
    if task.kind == "synthetic":
        n, k = SYNTHETIC_POOLS["train"][0], task.n_classes
        return PoolCounts(tuple(len(range(c, n, k)) for c in range(k)), SYNTHETIC_POOLS["test"][0])
    if task.kind == "hub":
        return HUB_COUNTS.get((task.dataset, task.config))
    return None


def train_rows(task: TaskSpec, data: DataSpec) -> str:
    """How many training rows a trial of `task` gets: exact ("800"), expected where it depends
    on the seed ("~1077": the authors' draws take validation rows before a short class is
    capped), or "?" where the class counts are unknown before the data is read."""
    if not data.train_per_class:
        return str(data.train_size)
    counts = pool_counts(task)
    if counts is None:
        return f"{data.train_size}/class, capped (class counts unknown until read)"
    demos = data.demos_per_class
    if data.sampler != "authors":  # validation rows are drawn after the training rows
        return str(sum(min(data.train_size, n - demos) for n in counts.train_per_class))
    total = sum(counts.train_per_class)
    valid = min(data.test_size, counts.test)
    worst = [n - valid - demos for n in counts.train_per_class]
    if all(w >= data.train_size for w in worst):
        return str(data.train_size * task.n_classes)
    left = [n * (total - valid) / total - demos for n in counts.train_per_class]
    return f"~{round(sum(min(data.train_size, x) for x in left))}"


def describe_data(d: DataSpec) -> str:
    per = " per class (capped)" if d.train_per_class else ""
    return (
        f"sampler {d.sampler}, train {d.train_size}{per}, valid {d.valid_size}, "
        f"test {d.test_size}, {d.demos_per_class} demo(s)/class, label words {d.label_word_rule}"
    )


def describe_train(t: TrainSpec) -> str:
    return (
        f"{t.optimizer} lr {t.lr:g} weight decay {t.weight_decay:g}, batch {t.batch_size}, "
        f"≤{t.epochs} epochs, patience {t.patience}, {t.precision}, loss {t.lm_loss}"
    )


def unpinned(grid: Grid) -> list[str]:
    """The grid's hub models and hub datasets without a revision: a hub update would change
    their trials without changing the trial ids."""
    models = [
        m.spec.name
        for m in grid.models
        if not m.spec.revision
        and not m.spec.source.startswith(PKG_PREFIX)
        and not Path(m.spec.source).is_absolute()
    ]
    tasks = [t.name for t in grid.tasks if t.kind == "hub" and not t.revision]
    return [f"model {n}" for n in models] + [f"dataset {n}" for n in tasks]


# --- the cost of a grid, before running it --------------------------------------------------

# One H100, HF eager, fp32, batch 1, 256-token prompts (shared/reference/gpu_baseline_h100.md,
# docs/benchmarks.md): a training step costs ~0.09 ms per million parameters (GPT2-XL: 143 ms
# at 1558M, 38 ms at 451M) and evaluating one example, batched with the prefix encoded once,
# ~0.0015 ms per million (GPT2-XL 48 layers: 522 examples/s).
H100_STEP_MS_PER_M = 0.09
H100_EVAL_MS_PER_M = 0.0015


@dataclass(frozen=True)
class Estimate:
    hours: float  # every trial runs all its epochs: an upper bound
    hours_at_20: float  # trials stopped early at epoch 20 (or their last epoch if fewer)
    unknown: int  # trials of models whose shape is unknown, not counted


def gpu_hours(specs: Iterable[TrialSpec]) -> Estimate:
    """GPU-hours on one H100 for `specs`, scaled by each pruned model's parameter count from
    the measured step costs above. Every fine-tune mode is costed as full fine-tuning (the
    frozen modes skip part of the backward pass: cheaper, not dearer)."""
    cfgs: dict[str, dict | None] = {}
    full_s = early_s = 0.0
    unknown = 0
    for s in specs:
        cfg = cfgs.setdefault(s.model.source, model_config(s.model.source))
        if cfg is None:
            unknown += 1
            continue
        m = estimate_params(cfg, s.layers) / 1e6
        per_class = s.task.n_classes if s.data.train_per_class else 1
        steps = math.ceil(s.data.train_size * per_class / s.train.batch_size)
        epoch_ms = steps * H100_STEP_MS_PER_M * m + s.data.valid_size * H100_EVAL_MS_PER_M * m
        test_ms = s.data.test_size * H100_EVAL_MS_PER_M * m
        full_s += (s.train.epochs * epoch_ms + test_ms) / 1000
        early_s += (min(s.train.epochs, 20) * epoch_ms + test_ms) / 1000
    return Estimate(hours=full_s / 3600, hours_at_20=early_s / 3600, unknown=unknown)


def bundles(specs: list[TrialSpec], size: int) -> list[list[TrialSpec]]:
    """`specs` in bundles of at most `size` trials that differ only in seed
    (`workers.spec.bundle_key`; a trial without a key trains alone), in grid order: each
    bundle where its first trial stands."""
    groups: dict[str, list[list[TrialSpec]]] = {}
    out: list[list[TrialSpec]] = []
    for spec in specs:
        key = bundle_key(spec) if size > 1 else None
        if key is None:
            out.append([spec])
            continue
        chunks = groups.setdefault(key, [])
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
            out.append(chunks[-1])
        chunks[-1].append(spec)
    return out


def describe_fusion(fuse: str, specs: list[TrialSpec]) -> str:
    """What `runtime.fuse` makes of these trials (the plan's `fusion` line)."""
    limit = fuse_limit(fuse, on_gpu=True)
    fused = [g for g in bundles(specs, limit or len(specs)) if len(g) > 1]
    if not fused:
        why = (
            "runtime.fuse: off"
            if limit == 1
            else "no two full-finetune, non-random-selection trials differ only in seed"
        )
        return f"none, every trial trains alone: {why}"
    n = sum(map(len, fused))
    size = f"up to {max(map(len, fused))} seeds" + (", as many as fit" if limit is None else "")
    where = "on a GPU" if fuse == "auto" else "on any device"
    return f"{where}: {n} trials in {len(fused)} bundles of {size}; {len(specs) - n} alone"

"""Grid -> trial specs, and what is left to run: set operations on trial ids."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from slimsweep.orchestrator.grid import Grid
from slimsweep.orchestrator.models import estimate_params, model_config
from slimsweep.workers.spec import TrialSpec


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

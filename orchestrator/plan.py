"""Grid -> trial specs, and what is left to run: set operations on trial ids."""

from __future__ import annotations

from collections.abc import Iterable

from slimsweep.orchestrator.grid import Grid
from slimsweep.workers.spec import TrialSpec


def expand(grid: Grid) -> list[TrialSpec]:
    """model x (that model's layer counts) x task x head x selection x seed, in that order
    (one selection, the default first-k, gives the order and ids of grids without one)."""
    return [
        TrialSpec(
            grid=grid.name,
            model=m.spec,
            layers=k,
            task=task,
            head=head,
            seed=seed,
            selection=selection,
            data=grid.data,
            train=grid.train,
            runtime=grid.runtime,
        )
        for m in grid.models
        for k in m.layers
        for task in grid.tasks
        for head in grid.heads
        for selection in grid.selections
        for seed in grid.seeds
    ]


def pending(specs: list[TrialSpec], done_ids: Iterable[str]) -> list[TrialSpec]:
    """The trials whose ids are not among the finished ones, in grid order."""
    done = set(done_ids)
    return [s for s in specs if s.trial_id not in done]

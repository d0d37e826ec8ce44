"""Grid -> trial specs, what is left to run (set operations on trial ids), and bundles."""

from __future__ import annotations

from collections.abc import Iterable

from slimsweep.orchestrator.grid import Grid
from slimsweep.workers.spec import TrialSpec, bundle_key


def expand(grid: Grid) -> list[TrialSpec]:
    """model x (that model's layer counts) x task x head x seed, in that order."""
    return [
        TrialSpec(
            grid=grid.name,
            model=m.spec,
            layers=k,
            task=task,
            head=head,
            seed=seed,
            data=grid.data,
            train=grid.train,
            runtime=grid.runtime,
        )
        for m in grid.models
        for k in m.layers
        for task in grid.tasks
        for head in grid.heads
        for seed in grid.seeds
    ]


def pending(specs: list[TrialSpec], done_ids: Iterable[str]) -> list[TrialSpec]:
    """The trials whose ids are not among the finished ones, in grid order."""
    done = set(done_ids)
    return [s for s in specs if s.trial_id not in done]


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

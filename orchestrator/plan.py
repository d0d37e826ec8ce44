"""Grid -> trial specs, and what is left to run: set operations on trial ids. Also the
checks that need more than the grid file (a model's tokenizer), made before anything runs."""

from __future__ import annotations

import os
from collections.abc import Iterable

from slimsweep.orchestrator.grid import Grid, GridError
from slimsweep.workers.spec import PKG_PREFIX, SpecError, TrialSpec


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

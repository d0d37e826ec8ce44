"""The contract (`TrialSpec.validate`): every value a trial cannot run or store with is one
SpecError line "<key>: <problem>; <fix>", and the grid loader, `run-trial --spec` and
`run_trial` refuse the same values."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import GridError, load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.workers.run import run_trial
from slimsweep.workers.spec import (
    DataSpec,
    FinetuneSpec,
    ModelSpec,
    RuntimeSpec,
    SpecError,
    TrainSpec,
    TrialSpec,
)
from slimsweep.workers.tasks import TASKS

GRIDS = Path(__file__).resolve().parents[2] / "grids"
SPEC = TrialSpec(
    grid="g",
    model=ModelSpec(name="m", source="/nonexistent/model"),
    layers=2,
    task=TASKS["sst2"],
    head="prompt-lm",
    seed=0,
)
SST2 = TASKS["sst2"]

# (what changes, the message's start: key path and problem)
INVALID = [
    ({"seed": -1}, "seed: -1 is outside 0..2**63-1"),
    ({"seed": 2**63}, "seed: 9223372036854775808 does not fit a 64-bit integer"),
    ({"seed": 2**64}, "seed: 18446744073709551616 does not fit a 64-bit integer"),
    ({"seed": True}, "seed: expected an integer, got True"),
    ({"seed": 1.5}, "seed: expected an integer, got 1.5"),
    ({"layers": 0}, "layers: layer count 0 is below 1"),
    ({"layers": "2"}, "layers: expected an integer, got '2'"),
    ({"head": "prompt-lmm"}, "head: unknown head 'prompt-lmm'; did you mean 'prompt-lm'?"),
    ({"grid": ".."}, "name: '..' cannot be a folder name"),
    ({"grid": "a/b"}, "name: 'a/b' cannot be a folder name"),
    ({"grid": ""}, "name: '' cannot be a folder name"),
    ({"grid": "x\n"}, "name: 'x\\n' cannot be a folder name"),
    ({"grid": "x" * 256}, "name: 'xxxxxxx"),
    ({"model": ModelSpec(name="../up", source="gpt2")}, "model.name: '../up' cannot be"),
    ({"model": ModelSpec(name="m", source="")}, "model.source: is empty"),
    ({"train": TrainSpec(lr=0.0)}, "training.lr: 0.0 is too small; use a value above 0"),
    ({"train": TrainSpec(lr=math.nan)}, "training.lr: nan is not a finite number"),
    ({"train": TrainSpec(lr=math.inf)}, "training.lr: inf is not a finite number"),
    ({"train": TrainSpec(weight_decay=-0.1)}, "training.weight_decay: -0.1 is too small"),
    ({"train": TrainSpec(patience=-1)}, "training.patience: -1 is too small; use 0 or more"),
    ({"train": TrainSpec(epochs=0)}, "training.epochs: 0 is too small; use 1 or more"),
    ({"train": TrainSpec(batch_size=0)}, "training.batch_size: 0 is too small"),
    ({"train": TrainSpec(optimizer="sgd")}, "training.optimizer: unknown optimizer 'sgd'"),
    ({"train": TrainSpec(precision="fp8")}, "training.precision: unknown precision 'fp8'"),
    ({"train": TrainSpec(lm_loss="x")}, "training.lm_loss: unknown lm_loss 'x'"),
    ({"data": DataSpec(train_size=0)}, "data.train_size: 0 is too small"),
    ({"data": DataSpec(demos_per_class=-1)}, "data.demos_per_class: -1 is too small"),
    ({"data": DataSpec(max_length=0)}, "data.max_length: 0 is too small"),
    ({"data": DataSpec(overflow="wrap")}, "data.overflow: unknown overflow 'wrap'"),
    ({"data": DataSpec(label_word_rule="x")}, "data.label_word_rule: unknown label_word_rule"),
    ({"data": DataSpec(test_size=2**70)}, "data.test_size: 1180591620717411303424 does not fit"),
    ({"runtime": RuntimeSpec(device="tpu")}, "runtime.device: unknown device 'tpu'"),
    ({"runtime": RuntimeSpec(eval_batch_size=-2)}, "runtime.eval_batch_size: -2 is too small"),
    ({"runtime": RuntimeSpec(checkpoint_every=-1)}, "runtime.checkpoint_every: -1 is too small"),
    ({"runtime": RuntimeSpec(checkpoint_min_s=math.nan)}, "runtime.checkpoint_min_s: nan is not"),
    ({"runtime": RuntimeSpec(fuse="sometimes")}, "runtime.fuse: 'sometimes' is not auto, off"),
    ({"runtime": RuntimeSpec(fuse="0")}, "runtime.fuse: '0' is not auto, off or a number"),
    ({"runtime": RuntimeSpec(fuse="²")}, "runtime.fuse: '²' is not auto, off or a number"),
    ({"finetune": FinetuneSpec(lora_dropout=math.inf)}, "finetune.lora_dropout: inf is not"),
    ({"task": dataclasses.replace(SST2, template=5)}, "task.template: expected text, got 5"),
    (
        {"task": dataclasses.replace(SST2, template="{text} {topic}{label}")},
        "task.template: '{text} {topic}{label}' must contain {text}, end with {label}",
    ),
    ({"task": dataclasses.replace(SST2, template="{text}")}, "task.template: '{text}' must"),
    (
        {"task": dataclasses.replace(SST2, label_words=(" a", " a"))},
        "task.label_words: [' a', ' a'] must be 2 or more distinct",
    ),
    ({"task": dataclasses.replace(SST2, label_words=(" a",))}, "task.label_words: [' a'] must"),
    ({"task": dataclasses.replace(SST2, kind="web")}, "task.kind: unknown kind 'web'"),
    (
        {
            "task": dataclasses.replace(
                SST2, kind="files", data_files=(("train", "a.csv"), ("validation", "b.txt"))
            )
        },
        "task.files: the files must share one extension of .csv, .json, .jsonl, .parquet",
    ),
    (
        {"task": dataclasses.replace(SST2, kind="files", data_files=(("train", "a.csv"),))},
        "task.files.validation: missing",
    ),
]


@pytest.mark.parametrize(("change", "expected"), INVALID, ids=[e for _, e in INVALID])
def test_invalid_values_are_one_spec_error_line_naming_key_and_fix(change, expected):
    with pytest.raises(SpecError) as e:
        dataclasses.replace(SPEC, **change).validate()
    msg = str(e.value)
    assert msg.startswith(expected)
    assert "\n" not in msg and "; " in msg


def test_every_trial_of_the_shipped_grids_validates():
    for path in sorted(GRIDS.glob("*.yaml")):
        for spec in expand(load_grid(path)):
            spec.validate()


def test_a_huge_value_is_cut_in_the_message():
    with pytest.raises(SpecError) as e:
        dataclasses.replace(SPEC, head="x" * 10_000).validate()
    assert len(str(e.value)) < 200 and "xxx..." in str(e.value)


# --- the three entry points refuse alike ----------------------------------------------------

GRID = """\
name: g
models: [{name: m, source: openai-community/gpt2-xl, layers: [1]}]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0]
"""


@pytest.mark.parametrize(
    ("grid_text", "change", "key"),
    [
        (GRID + "training: {patience: -1}\n", {"train": TrainSpec(patience=-1)}, "patience"),
        (GRID + "training: {weight_decay: -1.0}\n", {"train": TrainSpec(weight_decay=-1.0)}, ""),
        (GRID + "training: {optimizer: sgd}\n", {"train": TrainSpec(optimizer="sgd")}, ""),
        (GRID + "training: {lr: .nan}\n", {"train": TrainSpec(lr=math.nan)}, ""),
        (GRID + "data: {demos_per_class: -1}\n", {"data": DataSpec(demos_per_class=-1)}, ""),
        (
            GRID + "runtime: {eval_batch_size: -1}\n",
            {"runtime": RuntimeSpec(eval_batch_size=-1)},
            "",
        ),
        (
            GRID + "runtime: {checkpoint_every: -1}\n",
            {"runtime": RuntimeSpec(checkpoint_every=-1)},
            "",
        ),
        (GRID.replace("seeds: [0]", "seeds: [100000000000000000000]"), {"seed": 10**20}, ""),
        (GRID.replace("seeds: [0]", "seeds: [-3]"), {"seed": -3}, ""),
        (GRID + "runtime: {fuse: sometimes}\n", {"runtime": RuntimeSpec(fuse="sometimes")}, ""),
        (GRID + "runtime: {fuse: 0}\n", {"runtime": RuntimeSpec(fuse="0")}, ""),
    ],
)
def test_grid_spec_file_and_run_trial_refuse_the_same_values(
    tmp_path, capsys, grid_text, change, key
):
    spec = dataclasses.replace(SPEC, **change)
    with pytest.raises(SpecError) as direct:
        spec.validate()
    problem = str(direct.value).split(": ", 1)[1]  # after the key path, which the grid spells

    grid = tmp_path / "g.yaml"
    grid.write_text(grid_text)
    with pytest.raises(GridError) as from_grid:
        load_grid(grid)
    assert str(from_grid.value).startswith(f"{grid}: ")
    assert str(from_grid.value).endswith(problem)

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(dataclasses.asdict(spec)))
    assert main(["run-trial", "--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(problem) and str(path) in err

    # run_trial checks before it loads anything (the model source does not exist)
    with pytest.raises(SpecError, match="^" + str(direct.value).split(": ")[0]):
        run_trial(spec)


def test_a_spec_file_with_a_wrong_shape_is_one_line(tmp_path, capsys):
    d = dataclasses.asdict(SPEC)
    d["task"]["label_words"] = 5
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(d))
    assert main(["run-trial", "--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err


def test_ids_do_not_change_when_sections_are_shared_between_trials():
    """Sections are serialised once and shared: dropping a later field at its default from
    one trial's identity must not drop it from the next trial's."""
    authors = dataclasses.replace(SPEC, data=DataSpec(sampler="authors", train_per_class=True))
    first = dataclasses.replace(SPEC, seed=1).identity()
    second = dataclasses.replace(SPEC, seed=2).identity()
    assert "sampler" not in first["data"] and "sampler" not in second["data"]
    assert authors.identity()["data"]["sampler"] == "authors"
    assert dataclasses.replace(SPEC, seed=1).trial_id == dataclasses.replace(SPEC, seed=1).trial_id
    assert dataclasses.asdict(SPEC.data)["sampler"] == "slimsweep"

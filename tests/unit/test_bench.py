"""The speed benchmark (bench/worker_speed.py): the arithmetic that turns measured step and
evaluation costs into a grid's device-hours, and one end-to-end run on tiny CPU shapes.
Times are recorded by the benchmark, never asserted here."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from slimsweep.workers.spec import DataSpec, ModelSpec, TrialSpec
from slimsweep.workers.tasks import TASKS

BENCH = Path(__file__).resolve().parents[2] / "bench" / "worker_speed.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("worker_speed", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def paper_trial(head: str = "prompt-lm", **data) -> TrialSpec:
    """A trial with the paper's protocol: 200 train, 1000 valid, 1000 test, batch size 1."""
    return TrialSpec(
        grid="paper",
        model=ModelSpec(name="gpt2-xl", source="openai-community/gpt2-xl"),
        layers=1,
        task=TASKS["agnews"],
        head=head,
        seed=0,
        data=DataSpec(**data),
    )


def test_trial_seconds_is_epochs_of_steps_and_validation_plus_one_test_pass(bench):
    cost = bench.Cost(step_s=0.01, eval_s_per_example=0.001)
    spec = paper_trial()
    # per epoch: 200 steps x 10 ms + 1000 validation examples x 1 ms = 3 s; test: 1 s
    assert bench.trial_seconds(spec, cost, epochs=50) == pytest.approx(50 * 3 + 1)
    assert bench.trial_seconds(spec, cost, 50, epoch_overhead_s=0.5) == pytest.approx(176)
    # packing 4 trials at 4x one trial's throughput makes each trial's steps cost a quarter
    assert bench.trial_seconds(spec, cost, 50, pack_ratio=4.0) == pytest.approx(50 * 1.5 + 1)
    per_class = paper_trial(train_per_class=True)  # the authors' code: 200 of each of 4 classes
    assert bench.trial_seconds(per_class, cost, 1) == pytest.approx(800 * 0.01 + 1 + 1)


def test_a_trial_pays_for_the_checkpoints_its_runtime_policy_writes(bench):
    cost = bench.Cost(step_s=0.01, eval_s_per_example=0.001)
    spec = paper_trial()  # 50 epochs of 3 s + a 1 s test: 151 s
    floor_60 = dataclasses.replace(spec.runtime, checkpoint_min_s=60)
    assert bench.checkpoints_written(floor_60, 50, 151.0) == 2  # at most one a minute
    every_epoch = dataclasses.replace(spec.runtime, checkpoint_min_s=0)
    assert bench.checkpoints_written(every_epoch, 50, 151.0) == 50
    assert bench.checkpoints_written(spec.runtime, 50, 151.0) == 0  # default: one per 5 min
    per_epoch = dataclasses.replace(spec, runtime=every_epoch)
    assert bench.trial_seconds(per_epoch, cost, 50, checkpoint_s=2.0) == pytest.approx(251)
    assert bench.trial_seconds(spec, cost, 50, checkpoint_s=2.0) == pytest.approx(151)


def test_extrapolation_sums_trials_per_scheme_and_judges_the_goal_only_on_a_gpu(bench):
    specs = [paper_trial("prompt-lm"), dataclasses.replace(paper_trial("vanilla-cls"), seed=1)]
    slow, quick = bench.Cost(0.1, 0.01), bench.Cost(0.01, 0.001)
    costs = {
        ("gpt2-xl", 1, head, variant): slow if variant == "naive" else quick
        for head in ("prompt-lm", "vanilla-cls")
        for variant in bench.VARIANTS
    }
    ratios = {("gpt2-xl", 1): 2.0}
    rows = bench.extrapolate(specs, costs, {}, {}, ratios, [50], goal_applies=False)
    hours = {r["scheme"]: r["device_hours"] for r in rows}
    naive = 2 * (50 * (200 * 0.1 + 1000 * 0.01) + 1000 * 0.01) / 3600
    fast = 2 * (50 * (200 * 0.01 + 1) + 1) / 3600
    packed = 2 * (50 * (200 * 0.01 / 2 + 1) + 1) / 3600
    assert hours == pytest.approx(
        {
            "naive": naive,
            "fast": fast,
            "fast-bf16": fast,
            "fast+packing": packed,
            "fast+fused": fast,
        }
    )
    fused_steps = {("gpt2-xl", 1, head): 0.004 for head in ("prompt-lm", "vanilla-cls")}
    with_fused = bench.extrapolate(specs, costs, {}, {}, {}, [50], False, fused=fused_steps)
    fused = 2 * (50 * (200 * 0.004 + 1) + 1) / 3600
    assert {r["scheme"]: r["device_hours"] for r in with_fused}["fast+fused"] == pytest.approx(
        fused
    )
    assert {r["scheme"]: r["speedup_vs_naive"] for r in rows}["fast"] == pytest.approx(naive / fast)
    assert {r["meets_goal"] for r in rows} == {None}  # CPU numbers say nothing of H100-hours
    on_gpu = bench.extrapolate(specs, costs, {}, {}, {}, [50], goal_applies=True)
    assert {r["scheme"]: r["meets_goal"] for r in on_gpu}["naive"] is False  # 1x is not 5x


def test_the_benchmark_runs_end_to_end_on_tiny_cpu_shapes(bench, tmp_path):
    out = tmp_path / "bench"
    args = ["--device", "cpu", "--tiny", "--only", "gpt2-xl:1", "--only", "opt-1.3b:2"]
    bench.main([*args, "--heads", "prompt-lm", "vanilla-cls", "--no-pack", "--out", str(out)])
    result = json.loads((out / "worker_speed.json").read_text())
    measured = {(r["model"], r["layers"], r["head"], r["variant"]) for r in result["rows"]}
    assert measured == {
        (m, k, h, v)
        for m, k in (("gpt2-xl", 1), ("opt-1.3b", 2))
        for h in ("prompt-lm", "vanilla-cls")
        for v in bench.VARIANTS
    }
    assert all(r["step_ms"] > 0 and r["eval_ex_per_s"] > 0 for r in result["rows"])
    assert {(t["model"], t["layers"]) for t in result["trials"]} == {
        ("gpt2-xl", 1),
        ("opt-1.3b", 2),
    }
    assert {e["trials"] for e in result["extrapolation"]} == {
        2 * 4 * 2 * 5
    }  # shapes x tasks x heads x seeds
    assert result["meta"]["device"] == "cpu" and result["meta"]["settings"]["tiny"]
    assert {(f["model"], f["layers"], f["head"], f["n"]) for f in result["fusing"]} == {
        (m, k, h, 5)
        for m, k in (("gpt2-xl", 1), ("opt-1.3b", 2))
        for h in ("prompt-lm", "vanilla-cls")
    }  # the paper's 5 seeds per cell fit in a CPU's memory
    assert "### Whole grid" in (out / "worker_speed.md").read_text()

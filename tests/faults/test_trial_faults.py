"""Faults inside one trial: CUDA out of memory (recorded with what the trial needed and what
the GPU had), a loss that turns NaN or infinite (the trial stops at that epoch, one line
naming it and the fix), and memory handed back between the trials of a reused worker.
No GPU here: the errors are injected where torch would raise them."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from slimsweep.orchestrator import launch as launch_module
from slimsweep.orchestrator.launch import decode_record, run_one
from slimsweep.workers import run as run_module
from slimsweep.workers import train as train_module
from slimsweep.workers.run import out_of_memory_message, run_trial
from slimsweep.workers.spec import (
    DataSpec,
    EpochRow,
    ModelSpec,
    RuntimeSpec,
    TaskSpec,
    TrainSpec,
    TrialResult,
    TrialSpec,
)
from slimsweep.workers.train import LossNotFinite

GIB = 1 << 30
TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79.10 GiB "
    "of which 1.25 GiB is free.\nIncluding non-PyTorch memory, this process has ..."
)


def make_spec(folder: Path, task: TaskSpec, **train) -> TrialSpec:
    return TrialSpec(
        grid="faults",
        model=ModelSpec(name="tiny", source=str(folder)),
        layers=2,
        task=task,
        head="prompt-lm",
        seed=1,
        data=DataSpec(train_size=8, valid_size=8, test_size=8),
        train=TrainSpec(**{"lr": 1e-3, "epochs": 3, "patience": 3, **train}),
        runtime=RuntimeSpec(device="cpu"),
    )


def test_out_of_memory_message_says_what_was_needed_and_what_the_gpu_had(tiny_models, local_tasks):
    spec = make_spec(tiny_models["gpt2"], local_tasks["sst2"])
    msg = out_of_memory_message(spec, TORCH_OOM, 70 * GIB, 76 * GIB, 80 * GIB)
    assert msg == (
        f"trial {spec.trial_id}: CUDA out of memory: needed 72.50 GiB (70.00 held + 2.50 asked; "
        f"peak 76.00) of a 80.00 GiB GPU shared with other trials; give each trial more of it "
        f"(resources.gpus), or lower training.batch_size, runtime.eval_batch_size or layers"
    )


def test_cuda_out_of_memory_in_a_trial_is_recorded_with_need_and_capacity(
    tiny_models, local_tasks, monkeypatch
):
    spec = make_spec(tiny_models["gpt2"], local_tasks["sst2"])

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(run_module, "train", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError) as e:
        run_trial(spec)
    assert str(e.value).startswith(f"trial {spec.trial_id}: CUDA out of memory: needed 2.50 GiB")
    assert "\n" not in str(e.value)

    # ... and through the worker's Tune function, the record of a failed trial
    record = run_in_fake_tune(monkeypatch, spec, run_trial)
    assert (record.status, record.error_type) == ("failed", "OutOfMemoryError")
    assert "needed 2.50 GiB (0.00 held + 2.50 asked" in record.error_message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_loss_that_is_not_finite_stops_the_trial_at_that_epoch(
    tiny_models, local_tasks, monkeypatch, bad
):
    spec = make_spec(tiny_models["llama"], local_tasks["sst2"], epochs=5, patience=5)
    real_step = train_module.train_step
    steps = []

    def step_then_diverge(*args, **kwargs):
        steps.append(1)
        loss = real_step(*args, **kwargs)
        return loss if len(steps) <= 8 else torch.full_like(loss, bad)  # 8 steps = epoch 1

    monkeypatch.setattr(train_module, "train_step", step_then_diverge)
    epochs: list[int] = []
    with pytest.raises(LossNotFinite) as e:
        run_trial(spec, on_epoch=lambda row, _: epochs.append(row.epoch))
    assert str(e.value) == (
        f"trial {spec.trial_id}: the training loss is {bad} at epoch 2; training diverged: "
        f"lower training.lr (now 0.001)"
    )
    assert epochs == [1] and len(steps) == 16  # epoch 2 ran to its end, epoch 3 never began


# --- a reused worker hands memory back --------------------------------------------------------


def run_in_fake_tune(monkeypatch, spec: TrialSpec, fn) -> TrialResult:
    """run_one outside Tune: its report and checkpoint calls answered here."""
    from ray import tune

    reports: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, **_: reports.append(metrics))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    run_one({"specs": [spec.to_json()]}, trial_fn=fn)
    record, _ = decode_record(reports[-1][launch_module.RECORD_KEY])
    return record


class Cycle:
    """Stands for a model caught in a reference cycle (hooks, closures): only gc frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.mark.parametrize("fails", [False, True])
def test_run_one_frees_the_trials_objects_and_the_cuda_cache(tiny_models, monkeypatch, fails):
    spec = make_spec(
        tiny_models["gpt2"], TaskSpec("t", "synthetic", "sentiment", "{text}{label}", (" a", " b"))
    )
    held: list[weakref.ref] = []

    def trial(spec: TrialSpec, **_) -> tuple[TrialResult, list[EpochRow]]:
        model = Cycle()
        held.append(weakref.ref(model))
        if fails:
            raise RuntimeError("boom")
        return TrialResult(trial_id=spec.trial_id, status="ok", spec_json=spec.to_json()), []

    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    gc.disable()  # so only run_one's own collection can free the cycle
    try:
        record = run_in_fake_tune(monkeypatch, spec, trial)
    finally:
        gc.enable()
    assert record.status == ("failed" if fails else "ok")
    assert held[0]() is None and emptied == [1]

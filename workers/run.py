"""One trial, start to finish: `run_trial(spec) -> (TrialResult, [EpochRow])`.

A plain function: call it in a test, a notebook or under Ray. It raises on any error; the
caller (the orchestrator) records failures. It knows nothing of Ray, the orchestrator or the
result store.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import torch
from slimsweep.workers.data import Prepared, prepare
from slimsweep.workers.export import save_trainable
from slimsweep.workers.families import LoadedModel, load_model
from slimsweep.workers.finetune import apply_finetune, check_device, trainable_parameters
from slimsweep.workers.spec import (
    EpochRow,
    SpecError,
    TrialResult,
    TrialSpec,
    bundle_id,
    bundle_key,
)
from slimsweep.workers.train import (
    OnEpoch,
    TrainOutcome,
    accuracy,
    majority_accuracy,
    per_class_accuracy,
    resolve_device,
    seed_everything,
    train,
    train_bundle,
)
from torch import nn

VERSIONED = ("torch", "transformers", "datasets", "slimsweep")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory tensors held; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


GIB = 1 << 30


def gpu_memory(device: torch.device) -> tuple[int, int, int]:
    """(allocated now, peak allocated, total) bytes of a CUDA device."""
    total = torch.cuda.get_device_properties(device).total_memory
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device), total


def out_of_memory_message(
    spec: TrialSpec, torch_message: str, allocated: int, peak: int, total: int
) -> str:
    """What the trial needed (held + the allocation that failed) against what the GPU had,
    and what to change."""
    return f"trial {spec.trial_id}: " + _out_of_memory(torch_message, allocated, peak, total)


def _out_of_memory(torch_message: str, allocated: int, peak: int, total: int) -> str:
    tried = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB)", torch_message)
    unit = {"GiB": GIB, "MiB": 1 << 20, "KiB": 1 << 10}
    asked = float(tried[1]) * unit[tried[2]] if tried else 0
    return (
        f"CUDA out of memory: needed {(allocated + asked) / GIB:.2f} GiB "
        f"({allocated / GIB:.2f} held + {asked / GIB:.2f} asked; peak {peak / GIB:.2f}) of a "
        f"{total / GIB:.2f} GiB GPU shared with other trials; give each trial more of it "
        f"(resources.gpus), or lower training.batch_size, runtime.eval_batch_size or layers"
    )


# Takes a trial id and a local folder holding its kept weights (`export.WEIGHTS_FILE`) for as
# long as the call lasts; returns where it put them (recorded as the result's `saved_model`).
OnWeights = Callable[[str, str], str]


def run_trial(
    spec: TrialSpec,
    *,
    on_epoch: OnEpoch | None = None,
    resume_from: str | None = None,
    on_weights: OnWeights | None = None,
) -> tuple[TrialResult, list[EpochRow]]:
    """Load the pruned model (the layers `spec.selection` keeps), prepare the data, train,
    select, test; see `train.train` for `on_epoch` (per-epoch rows and restart checkpoints)
    and `resume_from`. A CUDA out-of-memory error is re-raised saying what the trial needed
    and what the GPU had.

    With runtime.save_model best and an `on_weights`, the best epoch's trainable weights are
    written to a temporary folder and handed to `on_weights`, which copies them where they
    should stay (the orchestrator: the result store); without `on_weights` none are kept."""
    spec.validate()
    device = _device(spec)
    try:
        return _run(spec, device, on_epoch, resume_from, on_weights)
    except torch.cuda.OutOfMemoryError as e:
        first = (str(e).strip() or "out of memory").splitlines()[0]
        held = gpu_memory(device) if device.type == "cuda" else (0, 0, 0)
        raise torch.cuda.OutOfMemoryError(out_of_memory_message(spec, first, *held)) from e


def _run(
    spec: TrialSpec,
    device: torch.device,
    on_epoch: OnEpoch | None,
    resume_from: str | None,
    on_weights: OnWeights | None,
) -> tuple[TrialResult, list[EpochRow]]:
    started = datetime.now(UTC).isoformat()
    t0 = time.monotonic()
    loaded, data = _load(spec, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = train(
        spec,
        loaded.model,
        data,
        pad_id=loaded.tokenizer.pad_token_id,
        device=device,
        on_epoch=on_epoch,
        resume_from=resume_from,
    )
    # train() has left the best epoch's weights in the model.
    saved = _save_weights(spec, loaded.model, on_weights)
    return _result(spec, loaded, data, out, device, started, t0, saved), list(out.rows)


BundleOutcome = tuple[TrialResult, list[EpochRow]] | BaseException


def run_bundle(
    specs: Sequence[TrialSpec],
    *,
    on_epoch: OnEpoch | None = None,
    on_done: Callable[[int, BundleOutcome], None] | None = None,
    on_weights: OnWeights | None = None,
) -> list[BundleOutcome]:
    """Trials that differ only in seed (`spec.bundle_key`), trained together
    (`train.train_bundle`); each gets the record `run_trial` would give it, plus the bundle it
    trained in. `on_done(i, outcome)` gets trial i's record, or the error that failed it
    alone, as soon as the bundle is done with it; `on_weights` as for `run_trial`. Bundles
    write no restart checkpoints. A CUDA out-of-memory error fails the bundle, saying what it
    needed and what the GPU had."""
    for spec in specs:
        spec.validate()
    keys = {bundle_key(s) for s in specs}
    if len(keys) != 1 or None in keys:
        raise SpecError(
            f"trials {', '.join(s.trial_id for s in specs)} cannot train fused: they must "
            f"differ only in seed, fine-tune fully, select layers by a rule other than random, "
            f"and leave runtime.compile off and runtime.last_position_logits on"
        )
    device = _device(specs[0])
    try:
        return _run_bundle(specs, device, on_epoch, on_done, on_weights)
    except torch.cuda.OutOfMemoryError as e:
        first = (str(e).strip() or "out of memory").splitlines()[0]
        held = gpu_memory(device) if device.type == "cuda" else (0, 0, 0)
        raise torch.cuda.OutOfMemoryError(
            f"bundle of {len(specs)} fused trials: {_out_of_memory(first, *held)}, or fuse "
            f"fewer seeds (runtime.fuse: N or off)"
        ) from e


def _run_bundle(
    specs: Sequence[TrialSpec],
    device: torch.device,
    on_epoch: OnEpoch | None,
    on_done: Callable[[int, BundleOutcome], None] | None,
    on_weights: OnWeights | None,
) -> list[BundleOutcome]:
    started = datetime.now(UTC).isoformat()
    t0 = time.monotonic()
    loads, datas, generators = [], [], []
    for spec in specs:
        # On the CPU: the stack is built there and moved, so the device never holds 2N copies.
        loaded, data = _load(spec, device, torch.device("cpu"))
        loads.append(loaded)
        datas.append(data)
        generators.append(_global_generator(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outcomes: list[BundleOutcome | None] = [None] * len(specs)
    # A step trains every trial of a stack on one batch: trials whose samples differ in size
    # (data.sampler authors caps short classes per seed) train in stacks of equal size.
    groups: dict[tuple, list[int]] = {}
    for i, data in enumerate(datas):
        groups.setdefault((len(data.train), tuple(data.label_ids)), []).append(i)
    for members in groups.values():
        group = [specs[i] for i in members]
        bundle = {"bundle_id": bundle_id(group), "bundle_size": len(group)} if members[1:] else {}

        def done(
            j: int,
            out: TrainOutcome | BaseException,
            best: nn.Module | None,
            members=members,
            bundle=bundle,
        ) -> None:
            i = members[j]
            if isinstance(out, BaseException):
                outcomes[i] = out
            else:
                saved = _save_weights(specs[i], best, on_weights) if best is not None else ""
                result = _result(specs[i], loads[i], datas[i], out, device, started, t0, saved)
                outcomes[i] = (dataclasses.replace(result, **bundle), list(out.rows))
            if on_done is not None:
                on_done(i, outcomes[i])

        if not members[1:]:  # alone: its own model on the device, its dropout from the global RNG
            loads[members[0]].model.to(device)
            _set_global_generator(generators[members[0]], device)
        train_bundle(
            group,
            [loads[i].model for i in members],
            [datas[i] for i in members],
            pad_id=loads[0].tokenizer.pad_token_id,
            device=device,
            generators=[generators[i] for i in members],
            on_epoch=on_epoch,
            on_done=done,
        )
    return [o for o in outcomes if o is not None]


def _set_global_generator(gen: torch.Generator, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(gen.get_state(), device)
    else:
        torch.set_rng_state(gen.get_state())


def _global_generator(device: torch.device) -> torch.Generator:
    """A generator in the state torch's global one (of `device`) has now: where a separate
    run of the trial just loaded would start drawing its dropout masks."""
    gen = torch.Generator(device)
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    gen.set_state(state)
    return gen


def _device(spec: TrialSpec) -> torch.device:
    device = resolve_device(spec.runtime.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            f"trial {spec.trial_id}: runtime.device is cuda but this machine has no usable GPU; "
            f"set runtime.device: auto or cpu"
        )
    return device


def _load(
    spec: TrialSpec, device: torch.device, load_on: torch.device | None = None
) -> tuple[LoadedModel, Prepared]:
    """Seed for `device`, load the pruned model onto `load_on` (default `device`) with only
    what `spec.finetune` names left trainable, prepare the data."""
    check_device(spec, device)
    seed_everything(spec.seed, device)
    loaded = load_model(spec)
    data = prepare(spec, loaded.tokenizer, loaded.context_length)
    loaded.model = apply_finetune(spec, loaded.model).to(load_on or device)
    return loaded, data


def _save_weights(spec: TrialSpec, model: nn.Module, on_weights: OnWeights | None) -> str:
    """With runtime.save_model best: `model`'s trainable weights handed to `on_weights`;
    where it put them, or "" when none are kept."""
    if spec.runtime.save_model != "best" or on_weights is None:
        return ""
    with tempfile.TemporaryDirectory(prefix="slimsweep-weights-") as folder:
        save_trainable(model, folder, spec.trial_id)
        return on_weights(spec.trial_id, folder)


def _result(
    spec: TrialSpec,
    loaded: LoadedModel,
    data: Prepared,
    out: TrainOutcome,
    device: torch.device,
    started: str,
    t0: float,
    saved: str,
) -> TrialResult:
    labels = [e.label for e in data.test]
    return TrialResult(
        trial_id=spec.trial_id,
        status="ok",
        spec_json=spec.to_json(),
        kept_layers=loaded.kept_layers,
        n_params=loaded.n_params,
        n_trainable_params=sum(p.numel() for p in trainable_parameters(loaded.model)),
        selection_scores_json=json.dumps(loaded.selection_scores, sort_keys=True),
        best_epoch=out.best_epoch,
        epochs_run=len(out.rows),
        val_acc=out.val_acc,
        test_acc=accuracy(out.test_preds, labels),
        test_acc_per_class=per_class_accuracy(out.test_preds, labels, spec.task.n_classes),
        test_preds=out.test_preds,
        n_train=len(data.train),
        n_valid=len(data.valid),
        n_test=len(data.test),
        majority_test_acc=majority_accuracy(labels),
        model_commit=loaded.commit,
        dataset_fingerprint=data.fingerprint,
        train_tokens=out.train_tokens,
        wall_s=out.earlier_s + time.monotonic() - t0,
        peak_mem_bytes=peak_memory_bytes(device),
        saved_model=saved,
        device=device_name(device),
        versions_json=json.dumps(versions(), sort_keys=True),
        manifest_json=json.dumps(data.manifest, sort_keys=True),
        started_at=started,
        finished_at=datetime.now(UTC).isoformat(),
    )

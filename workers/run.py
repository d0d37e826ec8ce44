"""One trial, start to finish: `run_trial(spec) -> (TrialResult, [EpochRow])`.

A plain function: call it in a test, a notebook or under Ray. It raises on any error; the
caller (the orchestrator) records failures. It knows nothing of Ray, the orchestrator or the
result store.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch
from slimsweep.workers.data import prepare
from slimsweep.workers.export import save_trainable
from slimsweep.workers.families import load_model
from slimsweep.workers.finetune import apply_finetune, check_device, trainable_parameters
from slimsweep.workers.spec import EpochRow, SpecError, TrialResult, TrialSpec, check_finetune
from slimsweep.workers.train import (
    OnEpoch,
    accuracy,
    majority_accuracy,
    per_class_accuracy,
    resolve_device,
    seed_everything,
    train,
)

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
    tried = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB)", torch_message)
    unit = {"GiB": GIB, "MiB": 1 << 20, "KiB": 1 << 10}
    asked = float(tried[1]) * unit[tried[2]] if tried else 0
    return (
        f"trial {spec.trial_id}: CUDA out of memory: needed {(allocated + asked) / GIB:.2f} GiB "
        f"({allocated / GIB:.2f} held + {asked / GIB:.2f} asked; peak {peak / GIB:.2f}) of a "
        f"{total / GIB:.2f} GiB GPU shared with other trials; give each trial more of it "
        f"(resources.gpus), or lower training.batch_size, runtime.eval_batch_size or layers"
    )


# Takes a local folder holding the kept weights (`export.WEIGHTS_FILE`) for as long as the call
# lasts; returns where it put them (recorded as the result's `saved_model`).
OnWeights = Callable[[str], str]


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
    device = resolve_device(spec.runtime.device)
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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            f"trial {spec.trial_id}: runtime.device is cuda but this machine has no usable GPU; "
            f"set runtime.device: auto or cpu"
        )
    check_finetune(spec.finetune, spec.layers, spec.runtime.device)
    check_device(spec, device)
    seed_everything(spec.seed, device)
    loaded = load_model(spec)
    data = prepare(spec, loaded.tokenizer, loaded.context_length)
    model = apply_finetune(spec, loaded.model).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = train(
        spec,
        model,
        data,
        pad_id=loaded.tokenizer.pad_token_id,
        device=device,
        on_epoch=on_epoch,
        resume_from=resume_from,
    )
    saved = ""
    if spec.runtime.save_model == "best" and on_weights is not None:
        # train() has left the best epoch's weights in the model.
        with tempfile.TemporaryDirectory(prefix="slimsweep-weights-") as folder:
            save_trainable(model, folder, spec.trial_id)
            saved = on_weights(folder)
    labels = [e.label for e in data.test]
    result = TrialResult(
        trial_id=spec.trial_id,
        status="ok",
        spec_json=spec.to_json(),
        kept_layers=loaded.kept_layers,
        n_params=loaded.n_params,
        n_trainable_params=sum(p.numel() for p in trainable_parameters(model)),
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
    return result, list(out.rows)

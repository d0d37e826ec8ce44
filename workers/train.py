"""The training loop: AdamW, epochs, validation, early stopping, best-epoch test, restarts.

One loop for every head (see `heads`). The model is selected on validation accuracy: the
best epoch's weights are kept (a CPU copy) and tested. No per-step host sync: the epoch's
loss is summed on the device and read once per epoch.

Restarts: at the end of an epoch, when a checkpoint is due (`checkpoint_due`: every
`runtime.checkpoint_every` epochs, and at least `runtime.checkpoint_min_s` after the last one),
the loop writes what it needs to go on (the trainable weights, optimiser, RNG states, history,
best trainable weights; the frozen rest is rebuilt from the source) into a fresh temporary
folder, hands it to `on_epoch` and removes it when `on_epoch` returns (copy it there to keep
it). Given that folder as `resume_from`, the loop continues with the
next epoch and ends exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from slimsweep.workers.families import compile_layers, family_of
from slimsweep.workers.finetune import load_trainable, trainable_parameters, trainable_state
from slimsweep.workers.heads import HEADS, Encoded, batch_loss, predict_logits
from slimsweep.workers.spec import EpochRow, RuntimeSpec, SpecError, TrialSpec
from torch import nn

OnEpoch = Callable[[EpochRow, str | None], None]


class LossNotFinite(SpecError):
    """The training loss became NaN or infinite: the trial stops at that epoch."""


CHECKPOINT_FILE = "state.pt"
CPU_EVAL_BATCH = 32
MAX_EVAL_BATCH = 256
# Bytes of activations and KV cache per token, per layer and hidden unit, in an eval
# forward pass (keys, values, attention and MLP intermediates, allocator slack).
EVAL_BYTES_PER_TOKEN_UNIT = 64


class Splits(Protocol):
    """What the loop reads from prepared data (`workers.data.Prepared` provides it)."""

    @property
    def train(self) -> Sequence[Encoded]: ...
    @property
    def valid(self) -> Sequence[Encoded]: ...
    @property
    def test(self) -> Sequence[Encoded]: ...
    @property
    def prefix_ids(self) -> Sequence[int]: ...
    @property
    def label_ids(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class TrainOutcome:
    rows: tuple[EpochRow, ...]
    best_epoch: int  # 1-based
    val_acc: float  # of the best epoch
    test_preds: tuple[int, ...]  # of the best epoch's weights, in test order
    train_tokens: int
    earlier_s: float  # wall time of this trial's runs before the restart; 0 from scratch


# --- early stopping: pure functions of the validation curve ---------------------------------


def best_epoch(val_history: Sequence[float]) -> int:
    """The 1-based epoch with the best validation accuracy; only a strictly greater value
    counts as an improvement, so a tie keeps the earlier epoch. 0 for an empty history."""
    best, best_at = -math.inf, 0
    for epoch, acc in enumerate(val_history, start=1):
        if acc > best:
            best, best_at = acc, epoch
    return best_at


def should_stop(val_history: Sequence[float], patience: int) -> bool:
    """True once `patience` epochs have passed without improving on the best epoch
    (patience < 1 turns early stopping off)."""
    if patience < 1 or not val_history:
        return False
    return len(val_history) - best_epoch(val_history) >= patience


# --- metrics --------------------------------------------------------------------------------


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    if not labels:
        return float("nan")
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)


def per_class_accuracy(
    preds: Sequence[int], labels: Sequence[int], n_classes: int
) -> tuple[float, ...]:
    """Recall of each class (nan for a class absent from `labels`): a model that collapsed
    onto one class shows 1.0 there and 0.0 elsewhere."""
    out = []
    for c in range(n_classes):
        hits = [p == c for p, y in zip(preds, labels, strict=True) if y == c]
        out.append(sum(hits) / len(hits) if hits else float("nan"))
    return tuple(out)


def majority_accuracy(labels: Sequence[int]) -> float:
    """The accuracy of always predicting the most frequent class of `labels`."""
    if not labels:
        return float("nan")
    return max(labels.count(c) for c in set(labels)) / len(labels)


# --- devices and sizes ----------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eval_batch_size(
    runtime: RuntimeSpec, model: nn.Module, max_tokens: int, device: torch.device
) -> int:
    """runtime.eval_batch_size if set; 32 on CPU; on CUDA as many rows as half the free memory
    holds by a rough per-token estimate (capped; sorted batches make the first the largest)."""
    if runtime.eval_batch_size > 0:
        return runtime.eval_batch_size
    if device.type != "cuda":
        return CPU_EVAL_BATCH
    cfg = model.config
    fam = family_of(cfg.model_type)
    hidden = getattr(cfg, fam.hidden_key)
    layers = getattr(cfg, fam.layer_key)
    per_row = max_tokens * max(layers, 1) * hidden * EVAL_BYTES_PER_TOKEN_UNIT
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(MAX_EVAL_BATCH, max(1, free // 2 // per_row)))


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16: autocast over the fp32 master weights; fp32: nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cpu":
        # Cheap on CPU; on CUDA it would need CUBLAS_WORKSPACE_CONFIG and slower kernels.
        torch.use_deterministic_algorithms(True, warn_only=True)


# --- the loop -------------------------------------------------------------------------------


@dataclass
class _State:
    """Everything the loop carries from epoch to epoch (and through a restart)."""

    rows: list[EpochRow]
    val_history: list[float]
    best_state: dict[str, torch.Tensor] | None
    train_tokens: int
    elapsed_s: float  # wall time of earlier runs of this trial (before a restart)

    @property
    def epoch(self) -> int:
        return len(self.val_history)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle": generator.get_state(),
    }


def _set_rng_state(rng: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["shuffle"])


def _save(
    state: _State,
    elapsed_s: float,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
) -> str:
    folder = tempfile.mkdtemp(prefix="slimsweep-ckpt-")
    # The best weights are the current ones whenever the last epoch was the best: skip the copy.
    best_is_current = best_epoch(state.val_history) == state.epoch
    torch.save(
        {
            "model": trainable_state(model),  # the frozen rest is rebuilt from the source
            "optimizer": optimizer.state_dict(),
            "best_state": None if best_is_current else state.best_state,
            "rng": _rng_state(gen),
            "rows": [dataclasses.asdict(r) for r in state.rows],
            "val_history": state.val_history,
            "train_tokens": state.train_tokens,
            "elapsed_s": elapsed_s,
        },
        Path(folder) / CHECKPOINT_FILE,
    )
    return folder


def _load(
    folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator
) -> _State:
    ckpt = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    load_trainable(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"], gen)
    return _State(
        rows=[EpochRow(**r) for r in ckpt["rows"]],
        val_history=list(ckpt["val_history"]),
        best_state=ckpt["best_state"] if ckpt["best_state"] is not None else trainable_state(model),
        train_tokens=ckpt["train_tokens"],
        elapsed_s=ckpt["elapsed_s"],
    )


def checkpoint_due(runtime: RuntimeSpec, epoch: int, since_last_s: float) -> bool:
    """Whether the end of `epoch` (1-based) writes a restart checkpoint, `since_last_s`
    seconds after the previous one (or the start of this run). A checkpoint holds weights and
    AdamW moments, 12 bytes per parameter (~19 GB for GPT2-XL), so the time floor bounds what
    writing them costs, and also what a restart can lose."""
    every = runtime.checkpoint_every
    return every > 0 and epoch % every == 0 and since_last_s >= runtime.checkpoint_min_s


def make_optimizer(spec: TrialSpec, model: nn.Module):
    """AdamW over the trainable parameters only (see `finetune`); fused (one kernel over all
    of them) on CPU and CUDA unless the runtime says no. On CPU the fused kernel is ~9x faster
    than torch's default per-tensor loop for a SmolLM2 embedding, and equal to it within float
    noise."""
    return torch.optim.AdamW(
        trainable_parameters(model),
        lr=spec.train.lr,
        weight_decay=spec.train.weight_decay,
        fused=spec.runtime.fused_adamw,
    )


def train_step(
    spec: TrialSpec,
    model: nn.Module,
    examples: Sequence[Encoded],
    label_ids: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    pad_id: int,
    device: torch.device,
) -> torch.Tensor:
    """One optimiser step on `examples`; returns the loss, detached and still on the device
    (reading it would synchronise the host every step)."""
    with autocast(spec.train.precision, device):
        loss = batch_loss(
            model,
            HEADS[spec.head],
            examples,
            label_ids,
            lm_loss=spec.train.lm_loss,
            pad_id=pad_id,
            last_position=spec.runtime.last_position_logits,
        )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train(
    spec: TrialSpec,
    model: nn.Module,
    data: Splits,
    *,
    pad_id: int,
    device: torch.device,
    on_epoch: OnEpoch | None = None,
    resume_from: str | None = None,
) -> TrainOutcome:
    """Fine-tune `model` (already on `device`) on data.train, select the epoch on data.valid,
    and predict data.test with the best epoch's weights."""
    t0 = time.monotonic()
    cfg, runtime = spec.train, spec.runtime
    head = HEADS[spec.head]
    label_ids = torch.tensor(list(data.label_ids), dtype=torch.long, device=device)
    if runtime.compile:
        compile_layers(model)
    optimizer = make_optimizer(spec, model)
    gen = torch.Generator().manual_seed(spec.seed)
    state = _State(rows=[], val_history=[], best_state=None, train_tokens=0, elapsed_s=0.0)
    if resume_from:
        state = _load(resume_from, model, optimizer, gen)
    earlier_s = state.elapsed_s
    longest = max(len(e.input_ids) for s in (data.valid, data.test) for e in s)
    eval_kw = {
        "prefix_ids": data.prefix_ids,
        "label_ids": label_ids,
        "pad_id": pad_id,
        "batch_size": eval_batch_size(runtime, model, longest, device),
        "last_position": runtime.last_position_logits,
        "prefix_cache": runtime.prefix_cache,
    }

    def predict(examples: Sequence[Encoded]) -> list[int]:
        model.eval()
        with autocast(cfg.precision, device):
            logits = predict_logits(model, head, examples, **eval_kw)
        return logits.argmax(dim=1).tolist()

    n = len(data.train)
    last_checkpoint = t0
    while state.epoch < cfg.epochs and not should_stop(state.val_history, cfg.patience):
        start = time.monotonic()
        model.train()
        loss_sum = torch.zeros((), device=device)
        order = torch.randperm(n, generator=gen).tolist()
        steps = 0
        for i in range(0, n, cfg.batch_size):
            examples = [data.train[j] for j in order[i : i + cfg.batch_size]]
            loss_sum += train_step(spec, model, examples, label_ids, optimizer, pad_id, device)
            state.train_tokens += sum(len(e.input_ids) for e in examples)
            steps += 1
        loss = loss_sum.item() / steps  # the epoch's one host sync
        if not math.isfinite(loss):  # diverged: every later epoch would be NaN too
            raise LossNotFinite(
                f"trial {spec.trial_id}: the training loss is {loss} at epoch {state.epoch + 1}; "
                f"training diverged: lower training.lr (now {cfg.lr:g})"
                + (" or use precision fp32" if cfg.precision != "fp32" else "")
            )
        valid = data.valid
        val_acc = accuracy(predict(valid), [e.label for e in valid])
        state.val_history.append(val_acc)
        if best_epoch(state.val_history) == state.epoch:
            state.best_state = trainable_state(model)
        wall = time.monotonic() - start
        row = EpochRow(spec.trial_id, state.epoch, loss, val_acc, wall)
        state.rows.append(row)
        if on_epoch is not None:
            folder = None
            if checkpoint_due(runtime, state.epoch, time.monotonic() - last_checkpoint):
                elapsed = state.elapsed_s + time.monotonic() - t0
                folder = _save(state, elapsed, model, optimizer, gen)
                last_checkpoint = time.monotonic()
            try:
                on_epoch(row, folder)
            finally:
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)

    if state.best_state is not None:
        load_trainable(model, state.best_state)
    test_preds = predict(data.test)
    best = best_epoch(state.val_history)
    return TrainOutcome(
        rows=tuple(state.rows),
        best_epoch=best,
        val_acc=state.val_history[best - 1] if best else float("nan"),
        test_preds=tuple(test_preds),
        train_tokens=state.train_tokens,
        earlier_s=earlier_s,
    )

"""The training loop: AdamW, epochs, validation, early stopping, best-epoch test, restarts.

One loop for every head (see `heads`) and for N >= 1 trials that differ only in seed
(`train_bundle`: one trial on its own model, several fused as one stacked model, see
`workers.fused`). Each trial is selected on its validation accuracy: the best epoch's weights
are kept (a CPU copy) and tested. No per-step host sync: the epoch's losses are summed on the
device and read once per epoch.

Restarts (a single trial): at the end of an epoch, when a checkpoint is due (`checkpoint_due`: every
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
from slimsweep.workers.fused import FuseError, Layout, Stack
from slimsweep.workers.heads import (
    HEADS,
    Encoded,
    batch_loss,
    collate,
    output_logits,
    predict_logits,
)
from slimsweep.workers.spec import EpochRow, RuntimeSpec, SpecError, TrialSpec
from torch import nn

OnEpoch = Callable[[EpochRow, str | None], None]


class LossNotFinite(SpecError):
    """The training loss became NaN or infinite: the trial stops at that epoch (in a bundle,
    that trial alone fails; the others go on)."""


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


def make_optimizer(spec: TrialSpec, model: nn.Module) -> torch.optim.AdamW:
    """`adamw` over the model's trainable parameters only (see `finetune`)."""
    return adamw(spec, trainable_parameters(model))


def adamw(spec: TrialSpec, params: Sequence[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW at the trial's lr and weight decay; fused (one kernel over all `params`) on CPU
    and CUDA unless the runtime says no. On CPU the fused kernel is ~9x faster than torch's
    default per-tensor loop for a SmolLM2 embedding, and equal to it within float noise."""
    return torch.optim.AdamW(
        params,
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
    and predict data.test with the best epoch's weights: `train_bundle` with one trial."""
    (out,) = train_bundle(
        [spec],
        [model],
        [data],
        pad_id=pad_id,
        device=device,
        on_epoch=on_epoch,
        resume_from=resume_from,
    )
    if isinstance(out, BaseException):
        raise out
    return out


@dataclass
class _Trial:
    """One trial of a bundle: its own data, data order, history and best weights."""

    spec: TrialSpec
    data: Splits
    order: torch.Generator  # the data order (seeded by the trial's seed)
    state: _State
    predict: Callable[[nn.Module, Sequence[Encoded]], list[int]]

    def finished(self) -> bool:
        cfg = self.spec.train
        return self.state.epoch >= cfg.epochs or should_stop(self.state.val_history, cfg.patience)


class SingleRunner:
    """One trial: its own model, as the worker always ran it (global dropout generator)."""

    def __init__(self, spec: TrialSpec, model: nn.Module, label_ids: torch.Tensor, pad_id: int):
        self.spec, self.model, self.label_ids, self.pad_id = spec, model, label_ids, pad_id
        self.optimizer = make_optimizer(spec, model)

    def step(self, batches: list[list[Encoded]], device: torch.device) -> torch.Tensor:
        args = (self.label_ids, self.optimizer, self.pad_id, device)
        return train_step(self.spec, self.model, batches[0], *args).reshape(1)

    def model_of(self, row: int) -> nn.Module:
        return self.model

    def train_mode(self) -> None:
        self.model.train()

    def keep(self, rows: Sequence[int]) -> None:
        pass


class FusedRunner:
    """N trials as one `Stack`: one forward/backward and one AdamW step for all."""

    def __init__(
        self,
        spec: TrialSpec,
        models: Sequence[nn.Module],
        label_ids: torch.Tensor,
        pad_id: int,
        generators: Sequence[torch.Generator],
    ):
        self.spec, self.label_ids, self.pad_id = spec, label_ids, pad_id
        self.stack = Stack(models)
        device = label_ids.device
        self.stack.module.to(device)  # the stacked parameters move in place
        self.stack.view.to(device)
        self.generators = list(generators)
        self.optimizer = adamw(spec, self.stack.params)

    def step(self, batches: list[list[Encoded]], device: torch.device) -> torch.Tensor:
        """Each trial's batch, padded to the longest prompt of all; per-trial mean losses [N]
        (their sum is what backward sees, so each trial gets its own gradient)."""
        head, rows = HEADS[self.spec.head], len(batches[0])
        examples = [e for b in batches for e in b]
        batch = collate(
            [e.input_ids for e in examples], [e.label for e in examples], self.pad_id, device
        )
        layout = Layout(
            rows=rows,
            widths=tuple(max(len(e.input_ids) for e in b) for b in batches),
            width=batch.input_ids.shape[1],
            generators=tuple(self.generators),
        )
        loss_fn = head.loss(self.spec.train.lm_loss)
        with autocast(self.spec.train.precision, device):
            out = self.stack.forward(layout, lambda m: output_logits(m, head, batch))
            losses = torch.stack(
                [
                    loss_fn(o, y, self.label_ids)
                    for o, y in zip(out.split(rows), batch.labels.split(rows), strict=True)
                ]
            )
        losses.sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses.detach()

    def model_of(self, row: int) -> nn.Module:
        return self.stack.load(row)

    def train_mode(self) -> None:
        self.stack.module.train()

    def keep(self, rows: Sequence[int]) -> None:
        self.stack.keep(rows, self.optimizer)
        self.generators = [self.generators[r] for r in rows]


def train_bundle(
    specs: Sequence[TrialSpec],
    models: Sequence[nn.Module],
    datas: Sequence[Splits],
    *,
    pad_id: int,
    device: torch.device,
    generators: Sequence[torch.Generator] = (),
    on_epoch: OnEpoch | None = None,
    on_done: Callable[[int, TrainOutcome | BaseException, nn.Module | None], None] | None = None,
    resume_from: str | None = None,
) -> list[TrainOutcome | BaseException]:
    """Train N >= 1 trials that differ only in seed, each as `train` would alone.

    One trial runs its own model. Several run fused (`workers.fused.Stack`): `generators` are
    their dropout generators, each where torch's global generator stood when that trial's
    separate run would start training. Every epoch each trial takes its own steps on its own
    data order, is validated with its own weights and stops on its own curve; a stopped trial
    is tested with its best weights and leaves the stack, the others go on. A trial whose
    loss is not finite fails alone. `on_epoch(row, checkpoint folder)` gets every trial's
    epoch rows (restart checkpoints for a single trial only: `folder` is None for a bundle);
    `on_done(i, outcome, model)` each trial's outcome (or error) as soon as it has one, with a
    model that holds that trial's best weights for the length of the call (None for an error)."""
    t0 = time.monotonic()
    spec, n = specs[0], len(specs)
    cfg, runtime = spec.train, spec.runtime
    head = HEADS[spec.head]
    label_ids = torch.tensor(list(datas[0].label_ids), dtype=torch.long, device=device)
    if n == 1:
        if runtime.compile:
            compile_layers(models[0])
        runner: SingleRunner | FusedRunner = SingleRunner(spec, models[0], label_ids, pad_id)
    else:
        steps_of = {len(d.train) for d in datas}
        if len(steps_of) > 1 or len({tuple(d.label_ids) for d in datas}) > 1:
            raise FuseError("a bundle's trials must have equal train sizes and label words")
        runner = FusedRunner(spec, models, label_ids, pad_id, generators)
    trials = []
    for s, d, m in zip(specs, datas, models, strict=True):
        longest = max(len(e.input_ids) for part in (d.valid, d.test) for e in part)
        eval_kw = {
            "prefix_ids": d.prefix_ids,
            "label_ids": label_ids,
            "pad_id": pad_id,
            "batch_size": eval_batch_size(runtime, m, longest, device),
            "last_position": runtime.last_position_logits,
            "prefix_cache": runtime.prefix_cache,
        }

        def predict(model: nn.Module, examples: Sequence[Encoded], kw=eval_kw) -> list[int]:
            model.eval()
            with autocast(cfg.precision, device):
                logits = predict_logits(model, head, examples, **kw)
            return logits.argmax(dim=1).tolist()

        state = _State(rows=[], val_history=[], best_state=None, train_tokens=0, elapsed_s=0.0)
        trials.append(_Trial(s, d, torch.Generator().manual_seed(s.seed), state, predict))
    if resume_from:
        trials[0].state = _load(resume_from, models[0], runner.optimizer, trials[0].order)
    earlier_s = trials[0].state.elapsed_s
    outcomes: list[TrainOutcome | BaseException | None] = [None] * n
    active = list(range(n))  # trial indices, in the runner's row order
    n_train = len(datas[0].train)
    last_checkpoint = t0

    def done(i: int, outcome: TrainOutcome | BaseException, model: nn.Module | None) -> None:
        outcomes[i] = outcome
        if on_done is not None:
            on_done(i, outcome, model)

    while True:
        keep = [r for r, i in enumerate(active) if outcomes[i] is None]
        for r, i in enumerate(active):
            if outcomes[i] is None and trials[i].finished():
                model = runner.model_of(r)
                done(i, _test(trials[i], model, earlier_s), model)
                keep.remove(r)
        if len(keep) < len(active):
            if keep:
                runner.keep(keep)
            active = [active[r] for r in keep]
        if not active:
            break
        start = time.monotonic()
        runner.train_mode()
        loss_sum = torch.zeros(len(active), device=device)
        orders = [torch.randperm(n_train, generator=trials[i].order).tolist() for i in active]
        steps = 0
        for b in range(0, n_train, cfg.batch_size):
            batches = [
                [trials[i].data.train[j] for j in order[b : b + cfg.batch_size]]
                for i, order in zip(active, orders, strict=True)
            ]
            loss_sum += runner.step(batches, device)
            for i, examples in zip(active, batches, strict=True):
                trials[i].state.train_tokens += sum(len(e.input_ids) for e in examples)
            steps += 1
        wall = time.monotonic() - start
        for r, (i, total) in enumerate(zip(active, loss_sum.tolist(), strict=True)):
            trial, state = trials[i], trials[i].state
            loss = total / steps
            if not math.isfinite(loss):
                # diverged: every later epoch would be NaN too
                error = LossNotFinite(
                    f"trial {trial.spec.trial_id}: the training loss is {loss} at epoch "
                    f"{state.epoch + 1}; training diverged: lower training.lr (now {cfg.lr:g})"
                    + (" or use precision fp32" if cfg.precision != "fp32" else "")
                )
                done(i, error, None)
                continue
            model = runner.model_of(r)
            valid = trial.data.valid
            val_acc = accuracy(trial.predict(model, valid), [e.label for e in valid])
            state.val_history.append(val_acc)
            if best_epoch(state.val_history) == state.epoch:
                state.best_state = trainable_state(model)
            row = EpochRow(trial.spec.trial_id, state.epoch, loss, val_acc, wall)
            state.rows.append(row)
            if on_epoch is None:
                continue
            folder = None
            if n == 1 and checkpoint_due(runtime, state.epoch, time.monotonic() - last_checkpoint):
                elapsed = state.elapsed_s + time.monotonic() - t0
                folder = _save(state, elapsed, model, runner.optimizer, trial.order)
                last_checkpoint = time.monotonic()
            try:
                on_epoch(row, folder)
            finally:
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
    return [o for o in outcomes if o is not None]


def _test(trial: _Trial, model: nn.Module, earlier_s: float) -> TrainOutcome:
    """The trial's outcome: its best epoch's weights predict its test set."""
    state = trial.state
    if state.best_state is not None:
        load_trainable(model, state.best_state)
    test_preds = trial.predict(model, trial.data.test)
    best = best_epoch(state.val_history)
    return TrainOutcome(
        rows=tuple(state.rows),
        best_epoch=best,
        val_acc=state.val_history[best - 1] if best else float("nan"),
        test_preds=tuple(test_preds),
        train_tokens=state.train_tokens,
        earlier_s=earlier_s,
    )

"""The training loop: early stopping on a scripted validation curve, the best epoch's weights
tested, determinism under one seed, restart from a checkpoint equal to an uninterrupted run,
both LM losses and bf16 autocast on CPU."""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from slimsweep.workers import train as train_mod
from slimsweep.workers.families import head_module, load_model
from slimsweep.workers.spec import DataSpec, ModelSpec, RuntimeSpec, TrainSpec, TrialSpec
from slimsweep.workers.tasks import TASKS
from slimsweep.workers.train import (
    CHECKPOINT_FILE,
    accuracy,
    best_epoch,
    majority_accuracy,
    per_class_accuracy,
    should_stop,
)

CPU = torch.device("cpu")
CUES = ("awful", "great")
FILLER = ("the", "film", "story", "was", "a", "day", "song", "city")


@dataclass(frozen=True)
class Ex:
    text: str
    label: int
    input_ids: tuple[int, ...]
    query_ids: tuple[int, ...]


@dataclass(frozen=True)
class Data:
    train: list[Ex]
    valid: list[Ex]
    test: list[Ex]
    prefix_ids: list[int]
    label_ids: list[int]


def make_data(tokenizer, n_train: int = 8, n_eval: int = 6) -> Data:
    task = TASKS["sst2"]
    rng = random.Random(0)
    demos = "Review: a great day\nSentiment: Positive\nReview: awful\nSentiment: Negative\n"
    prefix = tokenizer.encode(demos)

    def ex(i: int) -> Ex:
        label = i % 2
        words = [*rng.sample(FILLER, rng.randint(1, 4)), CUES[label]]
        text = " ".join(words)
        q = tuple(tokenizer.encode(task.template.format(text=text, label="")))
        return Ex(text, label, tuple(prefix) + q, q)

    return Data(
        train=[ex(i) for i in range(n_train)],
        valid=[ex(i) for i in range(n_eval)],
        test=[ex(i) for i in range(n_eval)],
        prefix_ids=prefix,
        label_ids=[tokenizer.encode(w)[0] for w in task.label_words],
    )


def make_spec(folder: Path, **train) -> TrialSpec:
    return TrialSpec(
        grid="test",
        model=ModelSpec(name="tiny", source=str(folder)),
        layers=2,
        task=TASKS["sst2"],
        head="prompt-lm",
        seed=3,
        data=DataSpec(train_size=8, valid_size=6, test_size=6),
        train=TrainSpec(**{"lr": 1e-3, "epochs": 3, "patience": 3, **train}),
        runtime=RuntimeSpec(device="cpu", checkpoint_min_s=0),  # every epoch
    )


def fit(spec: TrialSpec, **kw) -> train_mod.TrainOutcome:
    """Seed, load and train as run_trial does."""
    train_mod.seed_everything(spec.seed, CPU)
    loaded = load_model(spec)
    data = make_data(loaded.tokenizer)
    return train_mod.train(
        spec, loaded.model, data, pad_id=loaded.tokenizer.pad_token_id, device=CPU, **kw
    )


def with_runtime(spec: TrialSpec, **runtime) -> TrialSpec:
    return dataclasses.replace(spec, runtime=dataclasses.replace(spec.runtime, **runtime))


def numbers(rows) -> list[tuple]:
    """An epoch row without its wall time."""
    return [(r.epoch, r.train_loss, r.val_acc) for r in rows]


# --- pure functions -------------------------------------------------------------------------


def test_early_stopping_on_a_scripted_curve() -> None:
    curve = [0.5, 0.6, 0.6, 0.55, 0.6, 0.7]
    # best epoch 2; a tie (epoch 3, 5) is no improvement; patience 3 stops after epoch 5
    stops = [should_stop(curve[:n], patience=3) for n in range(1, len(curve) + 1)]
    assert stops == [False, False, False, False, True, False]
    assert best_epoch(curve[:5]) == 2
    assert best_epoch(curve) == 6
    assert not should_stop([], patience=3)
    assert not should_stop([0.9, 0.1, 0.1, 0.1], patience=0)  # patience < 1: no early stop


def test_metrics_show_a_collapsed_model() -> None:
    labels = [0, 0, 1, 1, 1, 2]
    preds = [1, 1, 1, 1, 1, 1]
    assert accuracy(preds, labels) == 0.5
    assert per_class_accuracy(preds, labels, 4)[:3] == (0.0, 1.0, 0.0)
    assert per_class_accuracy(preds, labels, 4)[3] != per_class_accuracy(preds, labels, 4)[3]
    assert majority_accuracy(labels) == 0.5


# --- the loop -------------------------------------------------------------------------------


def test_loop_stops_at_the_scripted_epoch_and_tests_the_best_weights(
    tiny_models, monkeypatch, tmp_path
) -> None:
    curve = iter([0.5, 0.7, 0.7, 0.6, 0.9])
    monkeypatch.setattr(train_mod, "accuracy", lambda preds, labels: next(curve))
    spec = make_spec(tiny_models["gpt2"], epochs=10, patience=2)
    kept: dict[int, Path] = {}

    def on_epoch(row, folder):
        kept[row.epoch] = Path(shutil.copytree(folder, tmp_path / str(row.epoch)))

    train_mod.seed_everything(spec.seed, CPU)
    loaded = load_model(spec)
    data = make_data(loaded.tokenizer)
    pad = loaded.tokenizer.pad_token_id
    out = train_mod.train(spec, loaded.model, data, pad_id=pad, device=CPU, on_epoch=on_epoch)

    assert [r.epoch for r in out.rows] == [1, 2, 3, 4]  # epochs 3, 4 did not improve on 2
    assert out.best_epoch == 2 and out.val_acc == 0.7
    best = torch.load(kept[2] / CHECKPOINT_FILE, weights_only=True)["model"]
    last = torch.load(kept[4] / CHECKPOINT_FILE, weights_only=True)["model"]
    now = loaded.model.state_dict()
    assert all(torch.equal(now[k], best[k]) for k in best)
    assert not all(torch.equal(now[k], last[k]) for k in last)


def test_same_seed_gives_identical_numbers(tiny_models) -> None:
    spec = make_spec(tiny_models["opt"], epochs=2)
    a, b = fit(spec), fit(spec)
    assert numbers(a.rows) == numbers(b.rows)
    assert a.test_preds == b.test_preds
    assert a.train_tokens == b.train_tokens > 0
    assert fit(dataclasses.replace(spec, seed=4)).rows[0].train_loss != a.rows[0].train_loss


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(
    tiny_models, tmp_path, family: str
) -> None:
    spec = make_spec(tiny_models[family], epochs=3)
    kept: dict[int, str] = {}

    def keep(row, folder):
        kept[row.epoch] = shutil.copytree(folder, tmp_path / str(row.epoch))

    whole = fit(spec, on_epoch=keep)
    assert sorted(kept) == [1, 2, 3]
    assert not any(Path(d).name.startswith("slimsweep-ckpt-") for d in kept.values())

    seen: list[int] = []
    resumed = fit(spec, resume_from=kept[1], on_epoch=lambda row, folder: seen.append(row.epoch))
    assert seen == [2, 3]
    assert numbers(resumed.rows) == numbers(whole.rows)
    assert resumed.test_preds == whole.test_preds
    assert resumed.best_epoch == whole.best_epoch
    assert resumed.train_tokens == whole.train_tokens


def test_checkpoints_are_due_every_n_epochs_and_no_sooner_than_the_time_floor() -> None:
    due = train_mod.checkpoint_due
    every_2 = RuntimeSpec(checkpoint_every=2, checkpoint_min_s=0)
    assert [due(every_2, epoch, 0.0) for epoch in (1, 2, 3, 4)] == [False, True, False, True]
    floor = RuntimeSpec(checkpoint_every=1, checkpoint_min_s=300)
    assert not due(floor, 7, 299.0) and due(floor, 7, 300.0)
    assert not due(RuntimeSpec(checkpoint_every=0, checkpoint_min_s=0), 1, 1e9)
    assert RuntimeSpec().checkpoint_min_s == 300  # by default at most one per 5 minutes


def test_checkpoints_only_every_n_epochs(tiny_models) -> None:
    spec = make_spec(tiny_models["gpt2"], epochs=3)
    spec = with_runtime(spec, checkpoint_every=2)
    folders: list[str | None] = []
    fit(spec, on_epoch=lambda row, folder: folders.append(folder))
    assert [f is not None for f in folders] == [False, True, False]
    assert not Path(folders[1]).exists()  # removed once on_epoch returned


@pytest.mark.parametrize("lm_loss", ["label-words", "full-vocab"])
def test_both_lm_losses_train(tiny_models, lm_loss: str) -> None:
    out = fit(make_spec(tiny_models["llama"], epochs=1, lm_loss=lm_loss))
    assert out.rows[0].train_loss > 0
    assert len(out.test_preds) == 6


def test_full_vocab_loss_is_larger_than_label_words_loss(tiny_models) -> None:
    words = fit(make_spec(tiny_models["gpt2"], epochs=1, lm_loss="label-words"))
    vocab = fit(make_spec(tiny_models["gpt2"], epochs=1, lm_loss="full-vocab"))
    # an untrained model spreads mass over ~50k tokens, not 2
    assert vocab.rows[0].train_loss > words.rows[0].train_loss + 1


def fit_recording_dtypes(spec: TrialSpec) -> tuple[train_mod.TrainOutcome, set[torch.dtype]]:
    """`fit`, with the dtypes the LM head's outputs had in every forward pass."""
    train_mod.seed_everything(spec.seed, CPU)
    loaded = load_model(spec)
    dtypes: set[torch.dtype] = set()
    head_module(loaded.model, spec.head).register_forward_hook(
        lambda _m, _i, out: dtypes.add(out.dtype)
    )
    data = make_data(loaded.tokenizer)
    out = train_mod.train(
        spec, loaded.model, data, pad_id=loaded.tokenizer.pad_token_id, device=CPU
    )
    return out, dtypes


def test_bf16_autocast_runs_on_cpu(tiny_models) -> None:
    bf16, bf16_dtypes = fit_recording_dtypes(
        make_spec(tiny_models["gpt2"], epochs=1, precision="bf16")
    )
    fp32, fp32_dtypes = fit_recording_dtypes(make_spec(tiny_models["gpt2"], epochs=1))
    # autocast ran: the head computed in bf16 (training and evaluation), fp32 without it
    assert (bf16_dtypes, fp32_dtypes) == ({torch.bfloat16}, {torch.float32})
    assert math.isfinite(bf16.rows[0].train_loss)
    assert bf16.rows[0].train_loss != fp32.rows[0].train_loss
    assert bf16.rows[0].train_loss == pytest.approx(fp32.rows[0].train_loss, rel=0.05)
    assert set(bf16.test_preds) <= {0, 1}


def test_padded_training_batches_count_real_tokens_only(tiny_models) -> None:
    from transformers import AutoTokenizer

    out = fit(make_spec(tiny_models["opt"], epochs=1, batch_size=3))
    train = make_data(AutoTokenizer.from_pretrained(tiny_models["opt"])).train
    assert out.train_tokens == sum(len(e.input_ids) for e in train)


def close_numbers(a: train_mod.TrainOutcome, b: train_mod.TrainOutcome) -> None:
    """Equal within float noise: losses to 1e-5, the same accuracies and predictions."""
    assert [r.train_loss for r in a.rows] == pytest.approx([r.train_loss for r in b.rows], 1e-5)
    assert [r.val_acc for r in a.rows] == [r.val_acc for r in b.rows]
    assert a.test_preds == b.test_preds


def test_fused_adamw_equals_the_per_tensor_loop(tiny_models) -> None:
    spec = make_spec(tiny_models["llama"], epochs=2)
    close_numbers(fit(spec), fit(with_runtime(spec, fused_adamw=False)))


@pytest.mark.slow  # Inductor compiles C++ on the CPU: ~20-50 s per family
@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2 trains with dropout, Llama not
def test_compiled_layers_give_the_eager_numbers(tiny_models, family: str) -> None:
    spec = make_spec(tiny_models[family], epochs=2)
    close_numbers(fit(with_runtime(spec, compile=True)), fit(spec))

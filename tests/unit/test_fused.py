"""Fused trials: several seeds of one cell trained as one stacked model must give each trial
the numbers it gets alone. First, today's single-trial worker pinned to literal numbers (the
loop must keep them when it learns to fuse); then fused bundles against separate runs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES as ALL_FAMILIES
from slimsweep.workers.export import WEIGHTS_FILE
from slimsweep.workers.run import bundle_id, run_bundle, run_trial
from slimsweep.workers.spec import (
    DataSpec,
    ModelSpec,
    RuntimeSpec,
    SelectionSpec,
    SpecError,
    TaskSpec,
    TrainSpec,
    TrialSpec,
)
from slimsweep.workers.train import LossNotFinite

HEADS = ("prompt-lm", "prompt-cls", "vanilla-cls")
FAMILIES = ("gpt2", "opt", "llama")  # the paper's, each with every head
REL = 1e-6


@pytest.fixture(scope="module")
def dropout_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny models with dropout on everywhere the family has it: GPT-2 (embeddings,
    attention, residual: 0.1 by default), OPT (hidden 0.1 by default), and attention (and
    GPT-NeoX's hidden) dropout set to 0.1 in the others."""
    out = {}
    for family, folder in tiny_models.items():
        copy = tmp_path_factory.mktemp(f"dropout-{family}")
        shutil.copytree(folder, copy, dirs_exist_ok=True)
        cfg = json.loads((copy / "config.json").read_text())
        for key in ("attention_dropout", "hidden_dropout"):  # what the family has of them
            if key in cfg:
                cfg[key] = 0.1
        (copy / "config.json").write_text(json.dumps(cfg))
        out[family] = copy
    return out


def make_spec(folder: Path, task: TaskSpec, head: str, seed: int, **runtime) -> TrialSpec:
    return TrialSpec(
        grid="fused",
        model=ModelSpec(name="tiny", source=str(folder)),
        layers=2,
        task=task,
        head=head,
        seed=seed,
        data=DataSpec(train_size=6, valid_size=6, test_size=6),
        train=TrainSpec(lr=1e-3, epochs=3, patience=2),
        runtime=RuntimeSpec(device="cpu", checkpoint_every=0, **runtime),
    )


def numbers(result, rows) -> tuple:
    return (
        [(r.epoch, r.train_loss, r.val_acc) for r in rows],
        result.best_epoch,
        result.val_acc,
        result.test_acc,
    )


# 3 x 5 positions per trial, fewer than the 16 inputs: W @ x^T, whose weight gradient needs no
# copy (the LM head at the last position); 40 x 5, more: x @ W^T, whose activations need none.
@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_a_stacked_linear_is_each_trials_linear_with_its_gradients(rows: int, bias: bool):
    from slimsweep.workers import fused

    torch.manual_seed(0)
    n, d_in, d_out = 3, 16, 24
    x = torch.randn(n * rows, 5, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, d_out, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, d_out, dtype=torch.float64, requires_grad=True) if bias else None
    out = fused._linear(x, w, b)
    want = torch.cat(
        [
            torch.nn.functional.linear(
                x[i * rows : (i + 1) * rows], w[i], b[i] if b is not None else None
            )
            for i in range(n)
        ]
    )
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w, *([b] if bias else [])], grad)
    expected = torch.autograd.grad(want, [x, w, *([b] if bias else [])], grad)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert got[1].is_contiguous() == (rows == 3)


# Today's worker (before fusion), run once and written down: (epoch, train loss, val acc) per
# epoch, best epoch, its val acc, test acc.
PINNED: dict[tuple[str, str], tuple] = {
    ("gpt2", "prompt-lm"): (
        [
            (1, 0.7528825600941976, 0.5),
            (2, 0.5292781194051107, 0.3333333333333333),
            (3, 0.3932134707768758, 0.3333333333333333),
        ],
        1,
        0.5,
        0.3333333333333333,
    ),
    ("gpt2", "prompt-cls"): (
        [
            (1, 0.7741549809773763, 0.5),
            (2, 0.592249592145284, 0.3333333333333333),
            (3, 0.4673916498819987, 0.3333333333333333),
        ],
        1,
        0.5,
        0.3333333333333333,
    ),
    ("gpt2", "vanilla-cls"): (
        [
            (1, 0.6946015357971191, 0.6666666666666666),
            (2, 0.4901629288991292, 0.6666666666666666),
            (3, 0.3895686864852905, 0.6666666666666666),
        ],
        1,
        0.6666666666666666,
        0.3333333333333333,
    ),
    ("opt", "prompt-lm"): (
        [
            (1, 0.7510960896809896, 0.5),
            (2, 0.5849016904830933, 0.3333333333333333),
            (3, 0.4766039450963338, 0.3333333333333333),
        ],
        1,
        0.5,
        0.3333333333333333,
    ),
    ("opt", "prompt-cls"): (
        [
            (1, 0.7462388674418131, 0.5),
            (2, 0.5835182269414266, 0.5),
            (3, 0.5184010664621989, 0.3333333333333333),
        ],
        1,
        0.5,
        0.3333333333333333,
    ),
    ("opt", "vanilla-cls"): (
        [
            (1, 0.7538818518320719, 0.16666666666666666),
            (2, 0.5693841775258383, 0.3333333333333333),
            (3, 0.42785998185475665, 0.5),
        ],
        3,
        0.5,
        0.5,
    ),
    ("llama", "prompt-lm"): (
        [(1, 0.7486062049865723, 0.5), (2, 0.6978578567504883, 0.5), (3, 0.6927396456400553, 0.5)],
        1,
        0.5,
        0.3333333333333333,
    ),
    ("llama", "prompt-cls"): (
        [(1, 0.7427991231282552, 0.5), (2, 0.6977371374766032, 0.5), (3, 0.6980870564778646, 0.5)],
        1,
        0.5,
        0.3333333333333333,
    ),
    ("llama", "vanilla-cls"): (
        [
            (1, 0.7249579429626465, 0.5),
            (2, 0.4834253390630086, 0.8333333333333334),
            (3, 0.3547373612721761, 0.6666666666666666),
        ],
        2,
        0.8333333333333334,
        0.5,
    ),
}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_single_trial_matches_pinned_numbers(dropout_models, local_tasks, family, head) -> None:
    spec = make_spec(dropout_models[family], local_tasks["sst2"], head, seed=11)
    rows, best, val, test = numbers(*run_trial(spec))
    want_rows, want_best, want_val, want_test = PINNED[family, head]
    assert [(e, a) for e, _, a in rows] == [(e, a) for e, _, a in want_rows]
    assert [loss for _, loss, _ in rows] == pytest.approx([w for _, w, _ in want_rows], rel=REL)
    assert (best, val, test) == (want_best, want_val, want_test)


SEEDS = (1, 2, 3, 4, 5)


def bundle_spec(folder: Path, task: TaskSpec, head: str, seed: int) -> TrialSpec:
    # Patience 1 over 3 epochs: some trials stop after epoch 2 while the others go on.
    spec = make_spec(folder, task, head, seed)
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, patience=1))


def assert_same_numbers(got: tuple, want: tuple) -> None:
    """Fused against separate: the same per-epoch validation accuracy, best epoch, its val and
    test accuracy; losses within 1e-4 relative (bmm against matmul rounding)."""
    rows, *rest = got
    assert [(e, a) for e, _, a in rows] == [(e, a) for e, _, a in want[0]]
    assert [loss for _, loss, _ in rows] == pytest.approx([w for _, w, _ in want[0]], rel=1e-4)
    assert rest == list(want[1:])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_bundle_equals_separate_runs(dropout_models, local_tasks, family, head) -> None:
    specs = [bundle_spec(dropout_models[family], local_tasks["sst2"], head, s) for s in SEEDS]
    alone = [run_trial(s) for s in specs]
    fused = run_bundle(specs)

    assert [r.trial_id for r, _ in fused] == [s.trial_id for s in specs]
    for (a_res, a_rows), (f_res, f_rows) in zip(alone, fused, strict=True):
        assert_same_numbers(numbers(f_res, f_rows), numbers(a_res, a_rows))
        assert (f_res.bundle_size, a_res.bundle_size, a_res.bundle_id) == (5, 1, "")
        assert f_res.bundle_id == bundle_id(specs)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fused_bundle_equals_separate_runs_in_every_family(dropout_models, local_tasks, family):
    specs = [
        bundle_spec(dropout_models[family], local_tasks["sst2"], "prompt-cls", s) for s in SEEDS[:3]
    ]
    alone = [numbers(*run_trial(s)) for s in specs]
    fused = run_bundle(specs)
    assert [r.bundle_size for r, _ in fused] == [3, 3, 3]
    for got, want in zip(fused, alone, strict=True):
        assert_same_numbers(numbers(*got), want)


def test_a_scored_selection_fuses_and_each_trial_saves_the_weights_of_its_separate_run(
    deep_tiny_models, local_tasks, tmp_path: Path
) -> None:
    """A magnitude selection keeps the same layers for every seed, so its seeds fuse; with
    save_model best each trial hands over its own best weights, as its separate run does."""
    from safetensors.torch import load_file

    def spec(seed: int) -> TrialSpec:
        base = bundle_spec(deep_tiny_models["llama"], local_tasks["sst2"], "prompt-lm", seed)
        runtime = dataclasses.replace(
            base.runtime, save_model="best", cache_dir=str(tmp_path / "cache")
        )
        return dataclasses.replace(
            base, selection=SelectionSpec(method="magnitude-l2"), runtime=runtime
        )

    def keeper(where: str):
        def on_weights(trial_id: str, folder: str) -> str:
            dest = tmp_path / where / trial_id
            shutil.copytree(folder, dest)
            return str(dest)

        return on_weights

    specs = [spec(s) for s in SEEDS[:3]]
    alone = [run_trial(s, on_weights=keeper("alone")) for s in specs]
    fused = run_bundle(specs, on_weights=keeper("fused"))

    for (f_res, f_rows), (a_res, a_rows) in zip(fused, alone, strict=True):
        assert f_res.bundle_size == 3 and f_res.kept_layers == a_res.kept_layers != (0, 1)
        assert_same_numbers(numbers(f_res, f_rows), numbers(a_res, a_rows))
        f_w, a_w = (load_file(Path(r.saved_model) / WEIGHTS_FILE) for r in (f_res, a_res))
        assert f_w.keys() == a_w.keys()
        for name in a_w:
            torch.testing.assert_close(f_w[name], a_w[name], rtol=1e-4, atol=1e-5)


def test_a_nan_fails_its_own_trial_and_the_bundle_goes_on(
    dropout_models, local_tasks, monkeypatch
) -> None:
    from slimsweep.workers import run as run_mod

    specs = [
        bundle_spec(dropout_models["gpt2"], local_tasks["sst2"], "prompt-lm", s) for s in SEEDS[:3]
    ]
    alone = [numbers(*run_trial(s)) for s in (specs[0], specs[2])]
    load = run_mod.load_model

    def poisoned(spec):
        loaded = load(spec)
        if spec.seed == specs[1].seed:
            with torch.no_grad():
                loaded.model.transformer.ln_f.weight.fill_(float("nan"))
        return loaded

    monkeypatch.setattr(run_mod, "load_model", poisoned)
    done: list[int] = []
    out = run_bundle(specs, on_done=lambda i, _: done.append(i))

    assert isinstance(out[1], LossNotFinite)
    assert str(out[1]) == (
        f"trial {specs[1].trial_id}: the training loss is nan at epoch 1; training diverged: "
        f"lower training.lr (now {specs[1].train.lr:g})"
    )
    assert done[0] == 1  # failed after its first epoch, before the others finished
    for got, want in zip((out[0], out[2]), alone, strict=True):
        assert_same_numbers(numbers(*got), want)


def test_seeds_with_samples_of_different_sizes_train_in_stacks_of_equal_size(
    dropout_models, local_tasks, monkeypatch
) -> None:
    """The authors' sampler caps short classes per seed, so one cell's seeds can have
    different train sizes; such a bundle trains in stacks of equal size, a lone one alone."""
    from slimsweep.workers import run as run_mod

    specs = [
        bundle_spec(dropout_models["gpt2"], local_tasks["sst2"], "prompt-lm", s) for s in SEEDS[:3]
    ]
    prepare = run_mod.prepare

    def short(spec, tokenizer, context_length):
        data = prepare(spec, tokenizer, context_length)
        if spec.seed == specs[1].seed:
            data.train = data.train[:-1]
        return data

    monkeypatch.setattr(run_mod, "prepare", short)
    alone = [numbers(*run_trial(s)) for s in specs]
    fused = run_bundle(specs)

    assert [(r.bundle_size, r.n_train) for r, _ in fused] == [(2, 6), (1, 5), (2, 6)]
    assert fused[0][0].bundle_id == bundle_id([specs[0], specs[2]]) and not fused[1][0].bundle_id
    for got, want in zip(fused, alone, strict=True):
        assert_same_numbers(numbers(*got), want)


def test_seeds_that_keep_different_layers_are_refused_a_bundle(dropout_models, local_tasks):
    specs = [
        dataclasses.replace(
            bundle_spec(dropout_models["gpt2"], local_tasks["sst2"], "prompt-lm", s),
            selection=SelectionSpec(method="random"),
        )
        for s in SEEDS[:2]
    ]
    with pytest.raises(SpecError, match=r"cannot train fused: .* a rule other than random"):
        run_bundle(specs)

"""Pinned numbers (as torchtune pins its recipes' losses): one tiny CPU trial per head under
the authors' protocol, its per-epoch training losses and validation accuracies and its test
accuracy asserted to fixed values. Any silent change to the protocol (sampling, prompts, label
ids, optimiser, weight decay, loss) or to the fast paths moves them and fails here. When a
change is intended, rerun with `-s` and paste the printed values.

The model is conftest's 4-layer random-init GPT-2 (torch.manual_seed(0), GPT-2's real BPE) kept
at 2 layers; the data is the seeded synthetic sentiment task, so nothing is downloaded.
"""

from __future__ import annotations

import pytest
from slimsweep.workers.run import run_trial
from slimsweep.workers.spec import DataSpec, ModelSpec, RuntimeSpec, TrainSpec, TrialSpec
from slimsweep.workers.tasks import TASKS

HEADS = ("prompt-lm", "prompt-cls", "vanilla-cls")
# The authors' code's protocol, scaled down: 4 training rows per class, 8 validation and test
# rows, one demonstration per class, their draws, AdamW with torch's default weight decay.
DATA = DataSpec(
    train_size=4,
    train_per_class=True,
    valid_size=8,
    test_size=8,
    sampler="authors",
    label_word_rule="first-subtoken",
)
TRAIN = TrainSpec(lr=1e-3, weight_decay=0.01, epochs=3, patience=3)
# head -> ([(epoch, train loss, val acc)], best epoch, test acc)
PINNED: dict[str, tuple[list[tuple[int, float, float]], int, float]] = {
    "prompt-lm": (
        [
            (1, 0.7155647873878479, 0.125),
            (2, 0.5605580806732178, 0.125),
            (3, 0.4665572941303253, 0.125),
        ],
        1,
        0.5,
    ),
    "prompt-cls": (
        [
            (1, 0.7095210552215576, 0.125),
            (2, 0.5563176274299622, 0.125),
            (3, 0.4619523286819458, 0.125),
        ],
        1,
        0.5,
    ),
    "vanilla-cls": (
        [
            (1, 0.7482224106788635, 0.25),
            (2, 0.6782407164573669, 0.75),
            (3, 0.6190865635871887, 0.625),
        ],
        2,
        0.125,
    ),
}
# The seeded synthetic pools' rows_fingerprint.
DATASET_FINGERPRINT = "rows:899e6a8993255634"


def pinned_spec(folder, head: str) -> TrialSpec:
    return TrialSpec(
        grid="pinned",
        model=ModelSpec(name="tiny-gpt2", source=str(folder)),
        layers=2,
        task=TASKS["synthetic-sentiment"],
        head=head,
        seed=42,
        data=DATA,
        train=TRAIN,
        runtime=RuntimeSpec(device="cpu", checkpoint_every=0),
    )


@pytest.mark.parametrize("head", HEADS)
def test_pinned_trial_numbers(tiny_models, head: str) -> None:
    result, rows = run_trial(pinned_spec(tiny_models["gpt2"], head))
    got = [(r.epoch, r.train_loss, r.val_acc) for r in rows]
    print(head, got, result.best_epoch, result.test_acc, result.dataset_fingerprint)
    curve, best, test_acc = PINNED[head]
    assert [(e, a) for e, _, a in got] == [(e, a) for e, _, a in curve]
    assert [loss for _, loss, _ in got] == pytest.approx([loss for _, loss, _ in curve], rel=1e-6)
    assert (result.best_epoch, result.test_acc) == (best, test_acc)
    assert (result.n_train, result.n_valid, result.n_test) == (8, 8, 8)
    assert result.dataset_fingerprint == DATASET_FINGERPRINT
    assert result.model_commit.startswith("local:")

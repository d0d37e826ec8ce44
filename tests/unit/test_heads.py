"""Heads: padding and last positions, and what each head's loss and class logits are."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from slimsweep.workers.heads import HEADS, LM_LOSSES, collate
from slimsweep.workers.spec import HEADS as SPEC_HEADS
from slimsweep.workers.spec import LM_LOSSES as SPEC_LM_LOSSES


def test_every_spec_head_and_lm_loss_has_an_entry() -> None:
    assert set(HEADS) == set(SPEC_HEADS)
    assert set(LM_LOSSES) == set(SPEC_LM_LOSSES)


def test_collate_right_pads_and_points_at_each_rows_last_real_token() -> None:
    batch = collate([(5, 6, 7), (8,), (9, 10)], [1, 0, 1], pad_id=0, device=torch.device("cpu"))
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.last.tolist() == [2, 0, 1]
    assert batch.labels.tolist() == [1, 0, 1]


def test_prompt_lm_class_logits_are_the_label_words_vocabulary_logits() -> None:
    vocab = torch.arange(20.0).reshape(2, 10)
    label_ids = torch.tensor([7, 3])
    got = HEADS["prompt-lm"].class_logits(vocab, label_ids)
    assert got.tolist() == [[7.0, 3.0], [17.0, 13.0]]


@pytest.mark.parametrize("head", ["prompt-cls", "vanilla-cls"])
def test_classification_heads_use_the_classifier_output_as_is(head: str) -> None:
    out = torch.tensor([[0.5, -1.0, 2.0]])
    assert torch.equal(HEADS[head].class_logits(out, torch.tensor([4, 5, 6])), out)
    # lm_loss does not change a classification head's loss
    labels = torch.tensor([2])
    for lm_loss in LM_LOSSES:
        loss = HEADS[head].loss(lm_loss)(out, labels, torch.tensor([4, 5, 6]))
        assert loss.item() == pytest.approx(F.cross_entropy(out, labels).item())


def test_label_words_loss_is_cross_entropy_over_the_label_words_only() -> None:
    vocab = torch.zeros(1, 10)
    vocab[0, 3], vocab[0, 7] = 2.0, 0.0  # label words: 7 (class 0), 3 (class 1)
    vocab[0, 9] = 50.0  # a non-label word the restricted loss must ignore
    loss = HEADS["prompt-lm"].loss("label-words")(vocab, torch.tensor([1]), torch.tensor([7, 3]))
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))


def test_full_vocab_loss_targets_the_label_words_token() -> None:
    vocab = torch.randn(2, 10)
    label_ids = torch.tensor([7, 3])
    labels = torch.tensor([1, 0])
    loss = HEADS["prompt-lm"].loss("full-vocab")(vocab, labels, label_ids)
    assert loss.item() == pytest.approx(F.cross_entropy(vocab, torch.tensor([3, 7])).item())
    restricted = HEADS["prompt-lm"].loss("label-words")(vocab, labels, label_ids)
    assert loss.item() > restricted.item()  # the whole vocabulary competes

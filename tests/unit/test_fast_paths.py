"""The worker's fast paths give what the plain paths give, for every family and head:
prefix KV cache vs the full prompt, last-position vs full-sequence logits, and right-padded
batches vs one example at a time. Logits agree within 1e-4 (CPU, fp32); predictions equal."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from slimsweep.workers.families import load_model
from slimsweep.workers.heads import HEADS, predict_logits
from slimsweep.workers.spec import ModelSpec, RuntimeSpec, TrialSpec
from slimsweep.workers.tasks import TASKS

TEXTS = [
    "a great film",
    "the story was awful and long",
    "fine",
    "the team played a quiet game in the city at night",
    "gold",
    "a river song",
    "the market day was a storm of votes and plans",
]


@dataclass(frozen=True)
class Ex:
    text: str
    label: int
    input_ids: tuple[int, ...]
    query_ids: tuple[int, ...]


def encode(tokenizer, head: str) -> tuple[list[Ex], list[int], list[int]]:
    """Examples of different lengths behind one shared demonstration prefix (none for
    vanilla-cls), and the label words' token ids (prompt-lm only, as data.prepare gives)."""
    task = TASKS["sst2"]
    words = [tokenizer.encode(w)[0] for w in task.label_words] if head == "prompt-lm" else []
    prefix: list[int] = []
    if head != "vanilla-cls":
        pairs = zip(TEXTS[:2], task.label_words, strict=True)
        demos = [task.template.format(text=t, label=w) for t, w in pairs]
        prefix = tokenizer.encode("\n".join(demos) + "\n")
    examples = []
    for i, text in enumerate(TEXTS):
        query = task.template.format(text=text, label="") if head != "vanilla-cls" else text
        q = tuple(tokenizer.encode(query))
        examples.append(Ex(text, i % 2, tuple(prefix) + q, q))
    return examples, prefix, words


def spec_for(folder, head: str) -> TrialSpec:
    return TrialSpec(
        grid="test",
        model=ModelSpec(name="tiny", source=str(folder)),
        layers=2,
        task=TASKS["sst2"],
        head=head,
        seed=0,
        runtime=RuntimeSpec(device="cpu"),
    )


@pytest.mark.parametrize("head", list(HEADS))
def test_fast_paths_match_plain_path(tiny_models, family: str, head: str) -> None:
    loaded = load_model(spec_for(tiny_models[family], head))
    model = loaded.model.eval()
    examples, prefix, words = encode(loaded.tokenizer, head)
    kw = {
        "prefix_ids": prefix,
        "label_ids": torch.tensor(words, dtype=torch.long),
        "pad_id": loaded.tokenizer.pad_token_id,
    }

    # The plain path: one example at a time, full logits, whole prompt.
    plain = predict_logits(
        model, HEADS[head], examples, batch_size=1, last_position=False, prefix_cache=False, **kw
    )
    variants = {
        "last-position": {"batch_size": 1, "last_position": True, "prefix_cache": False},
        "padded batches": {"batch_size": 4, "last_position": False, "prefix_cache": False},
        "prefix cache": {"batch_size": 1, "last_position": True, "prefix_cache": True},
        "cache, full logits": {"batch_size": 1, "last_position": False, "prefix_cache": True},
        "all fast paths": {"batch_size": 3, "last_position": True, "prefix_cache": True},
    }
    assert plain.shape == (len(examples), 2)
    for name, flags in variants.items():
        fast = predict_logits(model, HEADS[head], examples, **flags, **kw)
        torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4, msg=name)
        assert fast.argmax(1).tolist() == plain.argmax(1).tolist(), name


def test_prompt_lm_plain_path_is_the_models_next_token_logits(tiny_models) -> None:
    """The plain path is literally model(prompt).logits[-1] restricted to the label words."""
    loaded = load_model(spec_for(tiny_models["gpt2"], "prompt-lm"))
    model = loaded.model.eval()
    examples, prefix, words = encode(loaded.tokenizer, "prompt-lm")
    got = predict_logits(
        model,
        HEADS["prompt-lm"],
        examples,
        prefix_ids=prefix,
        label_ids=torch.tensor(words),
        pad_id=loaded.tokenizer.pad_token_id,
        batch_size=4,
    )
    with torch.no_grad():
        want = torch.stack(
            [model(torch.tensor([e.input_ids])).logits[0, -1, words] for e in examples]
        )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

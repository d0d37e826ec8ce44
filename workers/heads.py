"""Class logits and loss for each head: prompt-lm, prompt-cls, vanilla-cls.

Every head reads one position per sequence: the last real token. The fast paths compute the
decoder body's hidden states and apply the output layer (LM head or classification `score`)
to that one position only; the plain path runs the whole model (full sequence x vocabulary
logits for the LM head, the model's own pooling for classification) and picks the same
position. Both sit behind the same functions, chosen by `RuntimeSpec` flags, and the tests
hold them equal:

- `last_position_logits`: gather the last real position before the output layer;
- `prefix_cache`: in evaluation, encode the demonstration prefix (identical for every query)
  once and run only the query tokens against a copy of its KV cache;
- `eval_batch_size`: right-padded batches with an attention mask (1 = one query at a time).

Right padding is safe for every family here: attention is causal, so real tokens never see
the pads after them, and position ids count from the left as in an unpadded sequence.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from slimsweep.workers.families import family_of, head_module
from slimsweep.workers.tables import HEADS as HEAD_KINDS
from torch import nn
from transformers import DynamicCache


class Encoded(Protocol):
    """What the heads read from an example (`workers.data.Example` provides it)."""

    @property
    def label(self) -> int: ...
    @property
    def input_ids(self) -> tuple[int, ...]: ...
    @property
    def query_ids(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids; `last` is each row's last real position."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    last: torch.Tensor  # [B]
    labels: torch.Tensor  # [B]


def collate(
    seqs: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int, device: torch.device
) -> Batch:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        last=(lengths - 1).to(device),
        labels=torch.tensor(list(labels), dtype=torch.long).to(device),
    )


# --- the three heads ------------------------------------------------------------------------

# (output logits at the last position [B, O], labels [B], label token ids [C]) -> loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _label_words_loss(out: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor):
    # The authors' code: cross-entropy over the label words' logits only.
    return F.cross_entropy(out[:, label_ids].float(), labels)


def _full_vocab_loss(out: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor):
    # The other reading of the paper: next-token cross-entropy with the label word as target.
    return F.cross_entropy(out.float(), label_ids[labels])


def _class_loss(out: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor):
    return F.cross_entropy(out.float(), labels)


# train.lm_loss -> loss of the LM head
LM_LOSSES: dict[str, LossFn] = {"label-words": _label_words_loss, "full-vocab": _full_vocab_loss}


# loss kind (workers.tables.HeadKind.loss) -> (class logits from output logits, loss)
LossKind = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[str], LossFn]]
LOSS_KINDS: dict[str, LossKind] = {
    # output logits [B, V] over the vocabulary, read at the label words' ids [C]
    "lm": (lambda out, label_ids: out[:, label_ids], lambda lm_loss: LM_LOSSES[lm_loss]),
    # output logits [B, C] of a classifier: already the class logits
    "class": (lambda out, label_ids: out, lambda lm_loss: _class_loss),
}


@dataclass(frozen=True)
class Head:
    """How one head turns a model's output at the last position into class logits."""

    name: str
    # output logits [B, O], label token ids [C] -> class logits [B, C]
    class_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # train.lm_loss -> loss; a classification head has one loss whatever lm_loss says
    loss: Callable[[str], LossFn]
    # whether `model(...).logits` is already one row per sequence
    pooled_by_model: bool

    def output(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The model's output layer on final hidden states [B, H] -> output logits [B, O], as
        the model's own forward computes them (with the family's logit softcap, if any)."""
        out = head_module(model, self.name)(hidden)
        if HEAD_KINDS[self.name].classifier is None:
            key = family_of(model.config.model_type).logit_softcap_key
            cap = getattr(model.config, key, None) if key else None
            if cap:
                out = torch.tanh(out / cap) * cap
        return out


HEADS: dict[str, Head] = {
    name: Head(name, *LOSS_KINDS[kind.loss], pooled_by_model=kind.pooled_by_model)
    for name, kind in HEAD_KINDS.items()
}


# --- forward passes -------------------------------------------------------------------------


def body(model: nn.Module) -> nn.Module:
    """The decoder without its head (hidden states after the final norm), per family."""
    return family_of(model.config.model_type).get(model, "body")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(module: nn.Module) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; 4.x knows only the old name.
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_logits(
    model: nn.Module,
    head: Head,
    batch: Batch,
    *,
    last_position: bool = True,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """The output logits [B, O] at each row's last real position.

    With `cache` (a prefix's KV cache expanded over the batch), `batch` holds only the query
    tokens; the attention mask then covers the prefix too."""
    mask = batch.attention_mask
    extra: dict = {"use_cache": False}  # training and cache-less evaluation keep no KV cache
    if cache is not None:
        prefix = torch.ones(
            (mask.shape[0], cache.get_seq_length()), dtype=mask.dtype, device=mask.device
        )
        mask = torch.cat([prefix, mask], dim=1)
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    if last_position:
        decoder = body(model)
        if cache is not None:
            extra = {_cache_kwarg(decoder): cache, "use_cache": True}
        hidden = decoder(input_ids=batch.input_ids, attention_mask=mask, **extra).last_hidden_state
        return head.output(model, hidden[rows, batch.last])
    if cache is not None:
        extra = {_cache_kwarg(model): cache, "use_cache": True}
    logits = model(input_ids=batch.input_ids, attention_mask=mask, **extra).logits
    return logits if head.pooled_by_model else logits[rows, batch.last]


def batch_loss(
    model: nn.Module,
    head: Head,
    examples: Sequence[Encoded],
    label_ids: torch.Tensor,
    *,
    lm_loss: str,
    pad_id: int,
    last_position: bool = True,
) -> torch.Tensor:
    """Mean training loss over `examples` (full prompts, gradients through everything).
    `label_ids`: the label words' token ids on the model's device (prompt-lm; unused, and
    may be empty, for the classification heads)."""
    batch = collate(
        [e.input_ids for e in examples], [e.label for e in examples], pad_id, _device(model)
    )
    out = output_logits(model, head, batch, last_position=last_position)
    return head.loss(lm_loss)(out, batch.labels, label_ids)


@dataclass(frozen=True)
class PrefixCache:
    """The demonstration prefix's keys and values per layer, computed once per evaluation."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # [1, heads, P, head_dim] each

    @classmethod
    def encode(cls, model: nn.Module, prefix_ids: Sequence[int], device: torch.device):
        decoder = body(model)
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        # A cache made without the config keeps every position in every layer: the model's own
        # would keep only the last window of a sliding-window layer (Mistral, Qwen2, Gemma 2/3),
        # which `expand`'s plain layers cannot line up with the mask. The mask still applies
        # each layer's window, so the logits are the full prompt's.
        cache = DynamicCache()
        decoder(input_ids=ids, use_cache=True, **{_cache_kwarg(decoder): cache})
        return cls(tuple((layer.keys, layer.values) for layer in cache.layers))

    def expand(self, batch_size: int) -> DynamicCache:
        """A fresh cache for one batch: the model appends the query's keys to it, so each
        batch gets its own (the expanded views are copied when the first keys are appended)."""
        return DynamicCache(
            ddp_cache_data=[
                (k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                for k, v in self.layers
            ]
        )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    head: Head,
    examples: Sequence[Encoded],
    *,
    prefix_ids: Sequence[int],
    label_ids: torch.Tensor,
    pad_id: int,
    batch_size: int,
    last_position: bool = True,
    prefix_cache: bool = True,
) -> torch.Tensor:
    """Class logits [N, C] (float32, on CPU) for `examples`, in their order (`label_ids` as
    for `batch_loss`).

    Batches are formed over examples sorted by length (longest first, so a batch too large
    for memory fails at once), padded to their own longest row, then put back in order."""
    device = _device(model)
    cached = PrefixCache.encode(model, prefix_ids, device) if prefix_cache and prefix_ids else None
    seqs = [e.query_ids if cached else e.input_ids for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(seqs[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([seqs[i] for i in idx], [examples[i].label for i in idx], pad_id, device)
        cache = cached.expand(len(idx)) if cached else None
        logits = output_logits(model, head, batch, last_position=last_position, cache=cache)
        chunks.append(head.class_logits(logits, label_ids).float().cpu())
    sorted_logits = torch.cat(chunks)
    out = torch.empty_like(sorted_logits)
    out[order] = sorted_logits
    return out

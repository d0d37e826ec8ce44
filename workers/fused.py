"""Several trials' models as one: stacked parameters, batched leaf modules, per-trial dropout.

Trials that differ only in seed have models of identical shapes. `Stack` holds their weights
as one tensor per parameter, `[N, *shape]`, inside one copy of the Hugging Face module tree,
and runs all N in each forward/backward: inputs are the N trials' batches one after the other
(`N * rows` rows, padded to the longest prompt of the N), and each parameterised leaf applies
trial i's slice to trial i's rows (one `bmm` per linear layer instead of N matmuls). The
parameter-free parts of the model (attention, activations, masks) run on the N*rows batch as
they would on any batch. One AdamW step then updates every stacked tensor at once.

Why this and not `torch.func.vmap(functional_call)` over `stack_module_state`: measured with
torch 2.13 / transformers 5.24 on CPU, vmap fails as soon as a padding mask is passed (the HF
mask builder branches on tensor values: "data-dependent control flow"), and without one it
runs SDPA through vmap's per-sample fallback (no batching rule for the CPU kernel), so the
attention is not fused at all. Padded per-trial prompts need the mask; the batched leaves run
the unmodified HF forward.

Dropout: a separate run draws each dropout mask from torch's global generator, in forward
order, with the shape of its own batch (its rows, padded to its own longest prompt). Here each
trial has its own generator, started where the global one stood when its separate run began
training, and every dropout call draws trial i's mask with trial i's shape from it and pads it
to the common width. On CPU `bernoulli_` draws the same bits either way, so a fused trial sees
the masks of its separate run (tests/unit/test_fused.py). On CUDA PyTorch's dropout uses a
fused Philox kernel whose stream `bernoulli_` does not reproduce: fused CUDA trials draw
independent masks of the same distribution, not their separate run's (equal in law, not in
value). Attention dropout goes through the same path: a model on SDPA gets an attention
function that is SDPA's math path with the per-trial dropout (SDPA itself when attention
dropout is off); a model on eager attention keeps it, since it calls F.dropout.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from slimsweep.workers.spec import SpecError
from torch import nn

FUSED_ATTENTION = "slimsweep-fused"


class FuseError(SpecError):
    """A model has a part that fused training cannot batch; run its trials one by one."""


# --- what one forward needs to know about the trials ----------------------------------------


@dataclass(frozen=True)
class Layout:
    """The rows of one fused forward: trial i owns rows [i * rows, (i + 1) * rows)."""

    rows: int  # per trial
    widths: tuple[int, ...]  # each trial's own padded width (what its separate run sees)
    width: int  # the common width all rows are padded to
    generators: tuple[torch.Generator, ...]  # each trial's dropout generator

    @property
    def n(self) -> int:
        return len(self.widths)


_LAYOUT: list[Layout] = []  # the layout of the forward in progress (a stack of at most one)


def _layout() -> Layout:
    if not _LAYOUT:
        raise FuseError("a stacked model ran outside Stack.forward; call it through Stack")
    return _LAYOUT[-1]


# --- batched functional ops (active only inside a fused forward) ----------------------------

_ORIGINAL = {"linear": F.linear, "embedding": F.embedding, "layer_norm": F.layer_norm}
_ORIGINAL_DROPOUT = F.dropout


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    if weight.dim() == 2:
        return _ORIGINAL["linear"](x, weight, bias)
    n, out_features, in_features = weight.shape
    xs = x.reshape(n, -1, in_features)
    if xs.shape[1] < in_features:
        # Fewer rows than inputs (the LM head at the last position; short prompts): W @ x^T,
        # whose weight gradient bmm writes as [N, out, in] directly. x @ W^T leaves it
        # transposed, to be copied (and added to a tied embedding's gradient) at the cost of
        # the whole weight, e.g. 56M floats for SmolLM2's tied 49152 x 576 head, N = 2.
        xt = xs.transpose(1, 2)
        if bias is None:
            out = torch.bmm(weight, xt)
        else:
            out = torch.baddbmm(bias.unsqueeze(2), weight, xt)
        out = out.transpose(1, 2)
    else:
        wt = weight.transpose(1, 2)
        out = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, wt)
    return out.reshape(*x.shape[:-1], out_features)


def _embedding(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None, *a, **kw):
    if weight.dim() == 2:
        return _ORIGINAL["embedding"](ids, weight, padding_idx, *a, **kw)
    n, vocab, hidden = weight.shape
    lay = _layout()
    if ids.shape[0] != n * lay.rows:  # shared by every row (e.g. GPT-2's position ids [1, T])
        ids = ids.expand(n * lay.rows, *ids.shape[1:])
    trial = torch.arange(n, device=ids.device).repeat_interleave(lay.rows) * vocab
    offset = ids + trial.view(-1, *([1] * (ids.dim() - 1)))
    out = _ORIGINAL["embedding"](offset, weight.reshape(n * vocab, hidden), None, *a, **kw)
    if padding_idx is not None:  # as F.embedding's padding_idx: no gradient for that row
        out = torch.where((ids == padding_idx).unsqueeze(-1), out.detach(), out)
    return out


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if weight is None or weight.dim() == len(normalized_shape):
        return _ORIGINAL["layer_norm"](x, normalized_shape, weight, bias, eps)
    n = weight.shape[0]
    xs = _ORIGINAL["layer_norm"](x.reshape(n, -1, *normalized_shape), normalized_shape, eps=eps)
    out = xs * weight.unsqueeze(1)
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out.reshape(x.shape)


# Which dims of a dropout input are positions, by rank: hidden states [rows, T, H],
# attention weights [rows, heads, T, S].
_SEQ_DIMS: dict[int, tuple[int, ...]] = {2: (), 3: (1,), 4: (2, 3)}


def _dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
    if not training or p == 0.0:
        return _ORIGINAL_DROPOUT(x, p, training, inplace)
    lay = _layout()
    if x.dim() == 2 and x.shape[0] == lay.n * lay.rows * lay.width:
        # OPT flattens [rows, T, H] to [rows * T, H] around its MLP: same elements, same order
        return _dropout(x.reshape(lay.n * lay.rows, lay.width, -1), p).reshape(x.shape)
    dims = _SEQ_DIMS.get(x.dim())
    if dims is None or x.shape[0] != lay.n * lay.rows or any(x.shape[d] != lay.width for d in dims):
        raise FuseError(
            f"dropout on a tensor of shape {tuple(x.shape)} has no known layout; "
            f"set runtime.fuse: off for this model"
        )
    masks = []
    for width, gen in zip(lay.widths, lay.generators, strict=True):
        # What torch's CPU dropout does: bernoulli_(1 - p) on a tensor of the input's shape,
        # divided by 1 - p; here the shape of this trial's own batch, then padded.
        shape = [lay.rows, *x.shape[1:]]
        for d in dims:
            shape[d] = width
        noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=gen)
        noise.div_(1 - p)
        pad: list[int] = []
        for d in range(x.dim() - 1, 0, -1):
            pad += [0, x.shape[d] - shape[d]]
        masks.append(F.pad(noise, pad))
    return x * torch.cat(masks)


def _attention(
    module: nn.Module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    is_causal=None,
    **kwargs,
):
    """SDPA, or with attention dropout in training SDPA's math path (same order of operations)
    with the per-trial dropout."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if dropout == 0.0 or not module.training:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    root = math.sqrt(scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = (query * root) @ (key.transpose(-2, -1) * root)
    if attention_mask is None:
        t, s = scores.shape[-2:]
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=True)
    return (weights @ value).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FUSED_ATTENTION, _attention)
    AttentionMaskInterface.register(FUSED_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _batched_ops(layout: Layout) -> Iterator[None]:
    """Swap in the batched functional ops for one forward (the worker runs one at a time)."""
    _LAYOUT.append(layout)
    F.linear, F.embedding, F.layer_norm, F.dropout = _linear, _embedding, _layer_norm, _dropout
    try:
        yield
    finally:
        F.linear, F.embedding, F.layer_norm = (_ORIGINAL[k] for k in _ORIGINAL)
        F.dropout = _ORIGINAL_DROPOUT
        _LAYOUT.pop()


# --- leaves whose own forward cannot take stacked weights -----------------------------------


class _Conv1D(nn.Module):
    """GPT-2's Conv1D (x @ W + b, W stored [in, out]) over stacked weights."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]
        out = torch.baddbmm(self.bias.unsqueeze(1), x.reshape(n, -1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.weight.shape[-1])


class _ScaleNorm(nn.Module):
    """An RMSNorm-style module (one `weight` of the last dim, broadcast): its own forward,
    run over [N, rows..., H] with the weight as [N, 1, H]."""

    def __init__(self, inner: nn.Module, weight: nn.Parameter) -> None:
        super().__init__()
        self._inner = (inner,)  # a tuple: not a submodule, its own weight is not trained
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]
        xs = x.reshape(n, -1, x.shape[-1])
        out = torch.func.functional_call(self._inner[0], {"weight": self.weight.unsqueeze(1)}, xs)
        return out.reshape(x.shape)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"


def _is_scale_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and set(m._parameters) == {"weight"}


# Leaves with parameters a Stack can batch: those whose forward calls F.linear / F.embedding
# / F.layer_norm take the stacked tensors as they are (the batched ops above); the others are
# replaced by a module that batches them.
_AS_IS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.LayerNorm)
_REPLACED: dict[str, tuple[Callable[[nn.Module], bool], Callable[..., nn.Module]]] = {
    "conv1d": (_is_conv1d, lambda m, p: _Conv1D(p["weight"], p["bias"])),
    "scale-norm": (_is_scale_norm, lambda m, p: _ScaleNorm(m, p["weight"])),
}


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, _AS_IS):
        return "as-is"
    return next((k for k, (matches, _) in _REPLACED.items() if matches(module)), None)


def unfusable_part(model: nn.Module) -> str | None:
    """The first module with parameters that a Stack cannot batch, or None."""
    for name, module in model.named_modules():
        if any(p is not None for p in module._parameters.values()) and _kind(module) is None:
            return f"{name} ({type(module).__name__})"
    return None


# --- the stack ------------------------------------------------------------------------------


class Stack:
    """N models of one architecture trained as one. `view` is the first model, kept as a
    plain module: `load(i)` copies trial i's weights into it for evaluation."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        view = models[0]
        part = unfusable_part(view)
        if part is not None:
            raise FuseError(f"fused training cannot batch {part}; set runtime.fuse: off")
        _register_attention()
        self.view = view
        self.module = copy.deepcopy(view)
        if view.config._attn_implementation == "sdpa":
            # SDPA draws attention dropout inside its kernel; eager (e.g. Gemma 2's softcapped
            # attention) calls F.dropout, which the batched ops already make per trial.
            self.module.config._attn_implementation = FUSED_ATTENTION
        self.names = [name for name, _ in view.named_parameters()]  # tied weights once
        self.params = [
            nn.Parameter(torch.stack([m.get_parameter(name).detach() for m in models]))
            for name in self.names
        ]
        stacked = {
            id(self.module.get_parameter(name)): p
            for name, p in zip(self.names, self.params, strict=True)
        }
        for name, module in list(self.module.named_modules()):
            kind = _kind(module)
            if kind is None:
                continue
            own = {k: stacked[id(p)] for k, p in module._parameters.items() if p is not None}
            if kind == "as-is":
                module._parameters.update(own)
            else:
                parent, _, attr = name.rpartition(".")
                setattr(self.module.get_submodule(parent), attr, _REPLACED[kind][1](module, own))

    @property
    def n(self) -> int:
        return self.params[0].shape[0]

    def forward(self, layout: Layout, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """`fn(module)` (a forward pass over `layout`'s rows) with the batched ops on."""
        with _batched_ops(layout):
            return fn(self.module)

    @torch.no_grad()
    def load(self, i: int) -> nn.Module:
        """The plain model holding trial i's current weights."""
        for name, p in zip(self.names, self.params, strict=True):
            self.view.get_parameter(name).copy_(p[i])
        return self.view

    @torch.no_grad()
    def keep(self, rows: Sequence[int], optimizer: torch.optim.Optimizer) -> None:
        """Keep only the trials `rows` (in that order), in the weights and in the optimiser's
        moments: a stopped trial stops updating and costs nothing more."""
        index = torch.tensor(list(rows), device=self.params[0].device)
        for p in self.params:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape:
                    state[key] = value.index_select(0, index)
            p.data = p.data.index_select(0, index)

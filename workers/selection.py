"""Which decoder layers a trial keeps: `choose_layers(spec) -> Choice`.

Rule methods (first-k, random) need only the model's depth. Score methods run one score pass
over the full model (float32, evaluation mode; gradients for taylor only), on calibration text
where they need it, and keep the k best-scoring layers (angular: drop the best block). The
scores depend on the model, the method and the calibration text, not on k, the seed or the
head, so they are computed once per (model source + revision + GGUF file, method, calibration
data) and cached in the worker's cache folder; every other trial of the grid reads them.
`tables.SELECTIONS` lists the methods; `METHODS` implements each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from slimsweep.workers import synthetic
from slimsweep.workers.data import file_sha256, load_pools
from slimsweep.workers.families import (
    Family,
    cache_root,
    family_of,
    full_depth,
    load_full_lm,
)
from slimsweep.workers.heads import Batch, collate
from slimsweep.workers.spec import SpecError, TrialSpec, check_selection
from slimsweep.workers.tables import SELECTIONS
from slimsweep.workers.train import resolve_device
from torch import nn

# Synthetic calibration text is drawn with its own seed, not those of the synthetic task pools
# (data.SYNTHETIC_POOLS: 0 and 1), so it never repeats a trial's training examples.
CALIBRATION_SEED = 2
SCORE_BATCH = 8  # calibration texts per forward pass of the score pass

Scores = Any  # JSON-able: one float per layer, or (angular) a matrix over layer boundaries


@dataclass(frozen=True)
class Choice:
    kept: tuple[int, ...]  # ascending source layer indices
    scores: dict[int, float]  # what the trial's row records ({} for rule methods)


@dataclass(frozen=True)
class Method:
    # (full model, its family, calibration batches) -> scores; None: a rule, no score pass
    score: Callable[[nn.Module, Family, list[Batch]], Scores] | None
    # (scores or None, depth n, layers kept k, trial seed) -> the kept layers
    choose: Callable[[Scores, int, int, int], Choice]


# --- choosing from scores ------------------------------------------------------------------


def keep_first(scores: Scores, n: int, k: int, seed: int) -> Choice:
    return Choice(tuple(range(k)), {})


def keep_random(scores: Scores, n: int, k: int, seed: int) -> Choice:
    return Choice(tuple(sorted(random.Random(seed).sample(range(n), k))), {})


def keep_highest(scores: Sequence[float], n: int, k: int, seed: int) -> Choice:
    """The k layers with the highest scores; of equal scores, the earlier layer."""
    best = sorted(range(n), key=lambda i: (-scores[i], i))[:k]
    return Choice(tuple(sorted(best)), dict(enumerate(scores)))


def drop_closest_block(distance: Sequence[Sequence[float]], n: int, k: int, seed: int) -> Choice:
    """Drop the n - k contiguous layers whose input and output are closest: `distance[a][b]`
    is between the hidden states entering layer a and layer b (b = n: leaving the last).
    The row records each block's distance under its first layer; of equal ones, the earliest."""
    drop = n - k
    if drop == 0:
        return Choice(tuple(range(n)), {})
    blocks = {start: distance[start][start + drop] for start in range(n - drop + 1)}
    start = min(blocks, key=lambda s: (blocks[s], s))
    return Choice(tuple(i for i in range(n) if not start <= i < start + drop), blocks)


# --- score passes --------------------------------------------------------------------------


def _layers(model: nn.Module, fam: Family) -> nn.ModuleList:
    return fam.get(model, "layers")


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def layer_io(
    model: nn.Module, fam: Family, batch: Batch
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) hidden states [B, T, d] of each decoder layer, in order."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen.append((_hidden_in(args, kwargs), _hidden_out(output)))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in _layers(model, fam)]
    body = fam.get(model, "body")  # the hidden states suffice: no vocabulary logits
    try:
        body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def block_influence(model: nn.Module, fam: Family, batches: list[Batch]) -> list[float]:
    """ShortGPT's Block Influence: 1 - the mean cosine similarity of each layer's input and
    output hidden state, over every real calibration token."""
    sims = torch.zeros(len(_layers(model, fam)), dtype=torch.float64)
    tokens = 0
    for batch in batches:
        mask = batch.attention_mask.bool()
        for i, (x, y) in enumerate(layer_io(model, fam, batch)):
            sims[i] += F.cosine_similarity(x.double(), y.double(), dim=-1)[mask].sum().cpu()
        tokens += int(mask.sum())
    return (1 - sims / tokens).tolist()


def angular_distances(model: nn.Module, fam: Family, batches: list[Batch]) -> list[list[float]]:
    """Gromov et al.: the mean angular distance arccos(cos) / pi between the hidden states at
    every pair of layer boundaries (boundary a: entering layer a; n: leaving the last layer),
    at each text's last token. Cached as a whole, so every k reads the same matrix."""
    n = len(_layers(model, fam))
    total = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    rows = 0
    for batch in batches:
        io = layer_io(model, fam, batch)
        at = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        states = [io[0][0]] + [out for _, out in io]
        h = F.normalize(torch.stack([s[at, batch.last] for s in states]).double(), dim=-1)
        cos = torch.einsum("abd,cbd->acb", h, h).clamp(-1.0, 1.0)  # [n+1, n+1, B]
        total += (torch.arccos(cos) / math.pi).sum(-1).cpu()
        rows += len(at)
    return (total / rows).tolist()


def _magnitude(order: int) -> Callable[[nn.Module, Family, list[Batch]], list[float]]:
    def score(model: nn.Module, fam: Family, batches: list[Batch]) -> list[float]:
        """The L`order` norm of all of a layer's weights taken as one vector."""
        return [
            float(
                torch.linalg.vector_norm(
                    torch.stack(
                        [torch.linalg.vector_norm(p.double(), order) for p in m.parameters()]
                    ),
                    order,
                )
            )
            for m in _layers(model, fam)
        ]

    return score


def lm_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy over the batch's real tokens, number of targets)."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits[:, :-1]
    real = batch.attention_mask[:, 1:].bool()
    targets = batch.input_ids[:, 1:]
    return F.cross_entropy(logits[real].float(), targets[real], reduction="sum"), int(real.sum())


def taylor(model: nn.Module, fam: Family, batches: list[Batch]) -> list[float]:
    """Per layer, the sum over its weights of |weight x gradient| of the mean calibration LM
    loss (first-order Taylor estimate of the loss change if the weights were removed)."""
    tokens = sum(int(b.attention_mask[:, 1:].sum()) for b in batches)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in batches:
            loss, _ = lm_loss_sum(model, batch)
            (loss / tokens).backward()
    scores = [
        sum(
            float((p.double() * p.grad.double()).abs().sum())
            for p in m.parameters()
            if p.grad is not None
        )
        for m in _layers(model, fam)
    ]
    model.zero_grad(set_to_none=True)
    return scores


def _pass_through(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Replaces a layer's output with its input: the model computes as if it were deleted."""
    x = _hidden_in(args, kwargs)
    return (x, *output[1:]) if isinstance(output, tuple) else x


def perplexity_without(model: nn.Module, batches: list[Batch], skip: nn.Module) -> float:
    handle = skip.register_forward_hook(_pass_through, with_kwargs=True)
    try:
        sums = [lm_loss_sum(model, batch) for batch in batches]
    finally:
        handle.remove()
    return math.exp(float(sum(s for s, _ in sums)) / sum(n for _, n in sums))


def perplexity(model: nn.Module, fam: Family, batches: list[Batch]) -> list[float]:
    """Per layer, the calibration perplexity of the model with that layer removed: the higher,
    the more the layer matters, so keeping the highest drops those whose removal hurts least."""
    return [perplexity_without(model, batches, m) for m in _layers(model, fam)]


METHODS: dict[str, Method] = {
    "first-k": Method(score=None, choose=keep_first),
    "random": Method(score=None, choose=keep_random),
    "block-influence": Method(score=block_influence, choose=keep_highest),
    "angular": Method(score=angular_distances, choose=drop_closest_block),
    "magnitude-l1": Method(score=_magnitude(1), choose=keep_highest),
    "magnitude-l2": Method(score=_magnitude(2), choose=keep_highest),
    "taylor": Method(score=taylor, choose=keep_highest),
    "perplexity": Method(score=perplexity, choose=keep_highest),
}


# --- calibration text ----------------------------------------------------------------------


def _task_texts(spec: TrialSpec) -> list[str]:
    return [row["text"] for row in load_pools(spec.task)[0]]


def _synthetic_texts(spec: TrialSpec) -> list[str]:
    cal = spec.selection.calibration
    return [row["text"] for row in synthetic.generate(cal.name, cal.n_examples, CALIBRATION_SEED)]


def _file_texts(spec: TrialSpec) -> list[str]:
    cal = spec.selection.calibration
    if not Path(cal.name).is_file():
        raise SpecError(f"trial {spec.trial_id}: calibration.name {cal.name!r} is not a file")
    if cal.digest and file_sha256(cal.name) != cal.digest:
        raise SpecError(
            f"trial {spec.trial_id}: calibration file {cal.name!r} changed since the trial was "
            f"planned (its SHA-256 differs from calibration.digest); plan the grid again"
        )
    return [line for line in Path(cal.name).read_text().splitlines() if line.strip()]


# calibration.source -> the texts it reads, in order (a file: one text per non-empty line)
CALIBRATION_TEXTS: dict[str, Callable[[TrialSpec], list[str]]] = {
    "task": _task_texts,
    "synthetic": _synthetic_texts,
    "file": _file_texts,
}


def calibration_texts(spec: TrialSpec) -> list[str]:
    """The first `n_examples` texts of the calibration source."""
    cal = spec.selection.calibration
    texts = CALIBRATION_TEXTS[cal.source](spec)
    if len(texts) < cal.n_examples:
        raise SpecError(
            f"trial {spec.trial_id}: calibration source {cal.source} {cal.name!r} has "
            f"{len(texts)} texts, fewer than calibration.n_examples={cal.n_examples}; "
            f"lower n_examples"
        )
    return texts[: cal.n_examples]


def calibration_batches(spec: TrialSpec, tokenizer: Any, device: torch.device) -> list[Batch]:
    """The calibration texts tokenised (at most `max_tokens` each), right-padded in batches."""
    cal = spec.selection.calibration
    ids = [
        tokenizer(text, truncation=True, max_length=cal.max_tokens)["input_ids"]
        for text in calibration_texts(spec)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [
        collate(ids[i : i + SCORE_BATCH], [0] * len(ids[i : i + SCORE_BATCH]), pad, device)
        for i in range(0, len(ids), SCORE_BATCH)
    ]


# --- the score cache -----------------------------------------------------------------------


def score_key(spec: TrialSpec) -> dict[str, Any]:
    """What a method's scores depend on: the model's weights and, for a calibrated method,
    the calibration text (a task's full definition; a file's content, not its path)."""
    m, sel = spec.model, spec.selection
    key: dict[str, Any] = {"model": [m.source, m.revision, m.gguf_file], "method": sel.method}
    if SELECTIONS[sel.method].calibrated:
        cal = dataclasses.asdict(sel.calibration)
        if sel.calibration.source == "task":
            cal["task"] = dataclasses.asdict(spec.task)
        if sel.calibration.source == "file":
            cal["name"], cal["digest"] = "", file_sha256(sel.calibration.name)
        key["calibration"] = cal
    return key


def score_pass(spec: TrialSpec) -> Scores:
    """The method's scores, computed on the full model (the only place it is loaded)."""
    method = spec.selection.method
    device = resolve_device(spec.runtime.device)
    model, tokenizer = load_full_lm(spec)
    model.to(device)
    batches = calibration_batches(spec, tokenizer, device) if SELECTIONS[method].calibrated else []
    with torch.no_grad():  # taylor turns gradients back on for itself
        return METHODS[method].score(model, family_of(model.config.model_type), batches)


def cached_scores(spec: TrialSpec) -> Scores:
    """The scores from the cache, or from `score_pass` and then written to it. The file is
    written under a temporary name and renamed into place, so a reader never sees half of
    it; two trials racing both compute and the later rename wins with equal content."""
    key = score_key(spec)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(spec) / "selection-scores" / f"{spec.selection.method}-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())["scores"]
    scores = score_pass(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "scores": scores}, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return scores


def choose_layers(spec: TrialSpec) -> Choice:
    """The layers the trial keeps, by `spec.selection`, with the scores they were chosen by."""
    try:
        check_selection(spec.selection)
    except SpecError as err:
        raise SpecError(f"trial {spec.trial_id}: {err}") from err
    method = METHODS[spec.selection.method]
    n = full_depth(spec)
    if not 1 <= spec.layers <= n:
        raise SpecError(
            f"trial {spec.trial_id}: layers={spec.layers} but {spec.model.name!r} has "
            f"{n} layers; choose 1..{n}"
        )
    scores = cached_scores(spec) if method.score is not None else None
    return method.choose(scores, n, spec.layers, spec.seed)

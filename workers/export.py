"""A trial's weights: kept at the end of a trial, and turned into a standard Hugging Face folder.

Keeping (`runtime.save_model: best`): after training the model holds its best epoch's weights;
`save_trainable` writes the parameters that trained (tied weights once) to one safetensors
file. Everything else is rebuilt from the model source at export: `load_model(spec)` builds
the pruned model the trial started from (same kept layers, same seeded classifier), so a
mode that trains a few tensors keeps only those.

Exporting: `export_model` rebuilds that model, puts the kept tensors into it and writes it with
`save_pretrained` (safetensors; the config has the pruned layer count and per-layer settings
of the kept layers only) next to the tokenizer, so `from_pretrained` loads it with the Auto
class of the trial's head (`workers.tables.HEADS`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from slimsweep.workers.families import load_model
from slimsweep.workers.spec import SpecError, TrialSpec
from slimsweep.workers.tables import HEADS
from torch import nn

WEIGHTS_FILE = "trainable.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, as contiguous CPU copies (`named_parameters` yields
    a tied weight once)."""
    return {
        name: p.detach().to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def save_trainable(model: nn.Module, folder: str | Path, trial_id: str) -> Path:
    """Write the model's trainable parameters to `folder`/WEIGHTS_FILE."""
    from safetensors.torch import save_file

    path = Path(folder) / WEIGHTS_FILE
    save_file(trainable_state(model), str(path), metadata={"trial_id": trial_id})
    return path


@torch.no_grad()
def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor], trial_id: str) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        odd = sorted(set(params) ^ set(state))
        raise SpecError(
            f"trial {trial_id}: the kept weights do not match the model rebuilt from its source "
            f"({', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}); did model.source change "
            f"since the trial ran? Rerun the trial"
        )
    for name, p in params.items():
        if p.shape != state[name].shape:
            raise SpecError(
                f"trial {trial_id}: kept weight {name} has shape {tuple(state[name].shape)}, "
                f"the rebuilt model's {tuple(p.shape)}; did model.source change? Rerun the trial"
            )
        p.copy_(state[name])


def export_model(spec: TrialSpec, weights_dir: str | Path, out: str | Path) -> int:
    """Write the trial's pruned, fine-tuned model and its tokenizer to `out` as a Hugging Face
    folder; returns the exported model's parameter count (tied weights once)."""
    from safetensors.torch import load_file

    loaded = load_model(spec)
    model = loaded.model
    _load_trainable(model, load_file(str(Path(weights_dir) / WEIGHTS_FILE)), spec.trial_id)
    if HEADS[spec.head].classifier is not None:
        # The classifier's outputs named by the task's label words.
        model.config.id2label = dict(enumerate(spec.task.label_words))
        model.config.label2id = {w: i for i, w in enumerate(spec.task.label_words)}
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())

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

from slimsweep.workers.families import load_model
from slimsweep.workers.finetune import (
    apply_finetune,
    load_trainable,
    merge_adapters,
    trainable_state,
)
from slimsweep.workers.spec import SpecError, TrialSpec
from slimsweep.workers.tables import HEADS
from torch import nn

WEIGHTS_FILE = "trainable.safetensors"


def save_trainable(model: nn.Module, folder: str | Path, trial_id: str) -> Path:
    """Write the model's trainable parameters to `folder`/WEIGHTS_FILE."""
    from safetensors.torch import save_file

    path = Path(folder) / WEIGHTS_FILE
    save_file(trainable_state(model), str(path), metadata={"trial_id": trial_id})
    return path


def export_model(spec: TrialSpec, weights_dir: str | Path, out: str | Path) -> int:
    """Write the trial's pruned, fine-tuned model and its tokenizer to `out` as a Hugging Face
    folder; returns the exported model's parameter count (tied weights once)."""
    from safetensors.torch import load_file

    loaded = load_model(spec)
    # The model the trial trained (LoRA: with its adapters), its kept tensors put back, then
    # LoRA folded into the base weights.
    model = apply_finetune(spec, loaded.model)
    try:
        load_trainable(model, load_file(str(Path(weights_dir) / WEIGHTS_FILE)))
    except (ValueError, RuntimeError) as err:
        raise SpecError(
            f"trial {spec.trial_id}: the kept weights do not match the model rebuilt from its "
            f"source ({str(err).splitlines()[0]}); did model.source change since the trial "
            f"ran? Rerun the trial"
        ) from err
    model = merge_adapters(model)
    if HEADS[spec.head].classifier is not None:
        # The classifier's outputs named by the task's label words.
        model.config.id2label = dict(enumerate(spec.task.label_words))
        model.config.label2id = {w: i for i, w in enumerate(spec.task.label_words)}
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())

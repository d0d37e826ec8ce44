"""Torch-free fact tables that both halves read (the orchestrator imports this module
without torch). Adding a selection method or a fine-tune mode is one entry here plus
its implementation (`workers/selection.py` METHODS, `workers/finetune.py` APPLY) and
its tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SelectionMethod:
    """Which `layers` of a model a trial keeps."""

    calibrated: bool  # scored on calibration text, so `selection.calibration` is in the trial id
    description: str  # one line, for docs and `slimsweep plan`


SELECTIONS: dict[str, SelectionMethod] = {
    "first-k": SelectionMethod(
        False, "the first k layers (the paper's rule; 'reverse-order' pruning drops the last)"
    ),
    "random": SelectionMethod(False, "k layers drawn at random, seeded by the trial seed"),
    "block-influence": SelectionMethod(
        True, "ShortGPT: keep the k layers with the highest 1 - cos(input, output), all tokens"
    ),
    "angular": SelectionMethod(
        True,
        "Gromov et al.: drop the contiguous block whose input and output are closest in "
        "angular distance at the last token",
    ),
    "magnitude-l1": SelectionMethod(False, "keep the k layers with the largest L1 weight norm"),
    "magnitude-l2": SelectionMethod(False, "keep the k layers with the largest L2 weight norm"),
    "taylor": SelectionMethod(
        True, "keep the k layers with the largest sum of |weight x gradient| of the LM loss"
    ),
    "perplexity": SelectionMethod(
        True, "drop the layers whose removal alone raises calibration perplexity least"
    ),
}


@dataclass(frozen=True)
class Finetune:
    """A fine-tune mode: what trains after pruning. `spelling` is how a grid writes it."""

    name: str  # FinetuneSpec.mode
    spelling: str  # in a grid's `finetunes:` list
    trains: str  # what the optimiser updates, for docs and errors
    lora: bool = False  # reads the lora_* settings (peft adapters)
    needs_cuda: bool = False  # only runs on a CUDA device (bitsandbytes kernels)


FINETUNES: dict[str, Finetune] = {
    "full": Finetune("full", "full", "every parameter (the paper)"),
    "head-only": Finetune("head-only", "head-only", "the output head only (LM head or score)"),
    "last-n": Finetune(
        "last-n", "last-N", "the last N kept layers, the final norm and the output head"
    ),
    "lora": Finetune("lora", "lora", "LoRA adapters (peft) and a classifier head", lora=True),
    "qlora": Finetune(
        "qlora",
        "qlora",
        "LoRA adapters over a 4-bit (NF4) frozen base, and a classifier head",
        lora=True,
        needs_cuda=True,
    ),
}

# LoRA's default target modules per model family (FinetuneSpec.lora_targets = ()): the
# attention projections the LoRA paper adapts (query and value). A family fact: it moves into
# the FAMILIES table when that table lands here.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),  # GPT-2 fuses q, k, v into one Conv1D
    "opt": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
}

"""The fact tables both halves read (the orchestrator imports this module without torch):
here, the layer selection methods. Adding a method is one entry here plus its implementation
in `workers/selection.py` (`METHODS`) and its tests.
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

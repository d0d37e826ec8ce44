"""The fact tables both halves read: model families, head kinds, selection methods and
fine-tune modes. Plain frozen dataclasses, no torch, no transformers: the orchestrator
imports this module without the worker's dependencies.

Every difference between two families or two heads that the code acts on is a field here
(litgpt's per-family config table is the model), so adding a family, a head, a selection
method or a fine-tune mode is adding one entry plus its tests (and, for a selection method or
a fine-tune mode, its implementation: `workers/selection.py` METHODS, `workers/finetune.py`
APPLY); no code matches on a family's or a head's name.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One layout of Hugging Face decoder models, picked by `config.model_type`.

    Config keys are in config.json's spelling; parts are dotted attribute paths from the
    top-level HF model (the same paths hold for the *ForCausalLM and
    *ForSequenceClassification classes)."""

    name: str
    model_types: tuple[str, ...]  # the config.model_type values with this layout
    # config keys
    layer_key: str  # number of decoder layers
    context_key: str  # maximum sequence length
    hidden_key: str  # width of the residual stream
    ffn_key: str  # width of the MLP (a null value means 4 x hidden)
    heads_key: str  # attention heads
    kv_heads_key: str | None  # key/value heads of grouped-query attention; None: as many as heads
    # parts
    body: str  # the transformer without head: returns hidden states after the final norm
    layers: str  # the decoder layer list
    final_norm: str
    embeddings: str  # the token embedding
    lm_head: str  # the LM head
    # differences in computation
    learned_positions: bool  # a learned position-embedding table (else rotary)
    gated_mlp: bool  # MLP of three matrices (gate, up, down) rather than two
    # config keys holding one value per layer: cut with the layers when the model is pruned
    per_layer_keys: tuple[str, ...] = ()
    # config key of the cap that the LM head's forward applies to its logits
    # (cap * tanh(logits / cap)); a path that calls the LM head module itself must apply it
    logit_softcap_key: str | None = None
    # LoRA's default target modules (FinetuneSpec.lora_targets = ()): the attention projections
    # the LoRA paper adapts (query and value)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def get(self, model: Any, part: str) -> Any:
        """The module at this family's path for `part` (body, layers, final_norm, embeddings,
        lm_head)."""
        return operator.attrgetter(getattr(self, part))(model)


_LLAMA_KEYS = {
    "layer_key": "num_hidden_layers",
    "context_key": "max_position_embeddings",
    "hidden_key": "hidden_size",
    "ffn_key": "intermediate_size",
    "heads_key": "num_attention_heads",
    "kv_heads_key": "num_key_value_heads",
}
# Llama's layout (model.layers, model.norm, lm_head), shared by most decoders since 2023.
_LLAMA_PARTS = {
    "body": "model",
    "layers": "model.layers",
    "final_norm": "model.norm",
    "embeddings": "model.embed_tokens",
    "lm_head": "lm_head",
    "learned_positions": False,
    "gated_mlp": True,
}


def _llama_like(name: str, model_types: tuple[str, ...], **differences: Any) -> Family:
    return Family(name=name, model_types=model_types, **_LLAMA_KEYS, **_LLAMA_PARTS, **differences)


def _unique(pairs: Any) -> dict[str, Any]:
    """A registry from (name, entry) pairs; a name given twice is a bug in this file."""
    out: dict[str, Any] = {}
    for name, entry in pairs:
        if name in out:
            raise ValueError(f"{name!r} appears twice in a slimsweep table")
        out[name] = entry
    return out


FAMILIES: dict[str, Family] = _unique(
    (f.name, f)
    for f in (
        Family(
            name="gpt2",
            model_types=("gpt2",),
            layer_key="n_layer",
            context_key="n_positions",
            hidden_key="n_embd",
            ffn_key="n_inner",
            heads_key="n_head",
            kv_heads_key=None,
            body="transformer",
            layers="transformer.h",
            final_norm="transformer.ln_f",
            embeddings="transformer.wte",
            lm_head="lm_head",
            learned_positions=True,
            gated_mlp=False,
            lora_targets=("c_attn",),  # GPT-2 fuses q, k, v into one Conv1D
        ),
        Family(
            name="opt",
            model_types=("opt",),
            layer_key="num_hidden_layers",
            context_key="max_position_embeddings",
            hidden_key="hidden_size",
            ffn_key="ffn_dim",
            heads_key="num_attention_heads",
            kv_heads_key=None,
            body="model",
            layers="model.decoder.layers",
            final_norm="model.decoder.final_layer_norm",
            embeddings="model.decoder.embed_tokens",
            lm_head="lm_head",
            learned_positions=True,
            gated_mlp=False,
        ),
        # Llama 1-3 and SmolLM2 (model_type llama).
        _llama_like("llama", ("llama",)),
        _llama_like("mistral", ("mistral",)),
        # Qwen2 and Qwen2.5; layer_types says which layers use sliding-window attention.
        _llama_like("qwen2", ("qwen2",), per_layer_keys=("layer_types",)),
        _llama_like("qwen3", ("qwen3",), per_layer_keys=("layer_types",)),
        # Gemma scales its embeddings by sqrt(hidden) inside the body, so the body's output
        # needs nothing more; Gemma 2 and 3 soft-cap the final logits in the LM head's forward.
        _llama_like("gemma", ("gemma",)),
        _llama_like(
            "gemma2",
            ("gemma2",),
            per_layer_keys=("layer_types",),
            logit_softcap_key="final_logit_softcapping",
        ),
        _llama_like(
            "gemma3",
            ("gemma3_text",),  # the text-only Gemma 3 (1B; the text tower of the larger ones)
            per_layer_keys=("layer_types",),
            logit_softcap_key="final_logit_softcapping",
        ),
        # Pythia. Its checkpoints call the LM head embed_out; transformers 5 renames it to
        # lm_head when loading (conversion_mapping), and saves it as lm_head.
        Family(
            name="gpt_neox",
            model_types=("gpt_neox",),
            layer_key="num_hidden_layers",
            context_key="max_position_embeddings",
            hidden_key="hidden_size",
            ffn_key="intermediate_size",
            heads_key="num_attention_heads",
            kv_heads_key=None,
            body="gpt_neox",
            layers="gpt_neox.layers",
            final_norm="gpt_neox.final_layer_norm",
            embeddings="gpt_neox.embed_in",
            lm_head="lm_head",
            learned_positions=False,
            gated_mlp=False,
            lora_targets=("query_key_value",),  # fused q, k, v
        ),
    )
)

# config.model_type -> its family
MODEL_TYPES: dict[str, Family] = _unique((t, f) for f in FAMILIES.values() for t in f.model_types)


def unknown_model_type(model_type: str) -> str:
    """What to say about a model_type no family covers: the entry to add."""
    return (
        f"model_type {model_type!r} has no family (known: {', '.join(sorted(MODEL_TYPES))}); "
        f"add a Family entry covering it to FAMILIES in slimsweep/workers/tables.py, and a "
        f"tiny fixture of it to tests/conftest.py FAMILIES"
    )


@dataclass(frozen=True)
class HeadKind:
    """One way to turn a truncated model into a classifier (the grid's `heads:` values)."""

    name: str
    auto_class: str  # the transformers Auto class the model is loaded with
    # attribute of the new, seeded classifier (num_labels outputs); None: the family's LM head,
    # read at the label words' token ids
    classifier: str | None
    prompted: bool  # reads the template with demonstrations (else the bare text)
    # model(...).logits is already one row per sequence: HF's sequence classification models
    # pool at the last non-pad token themselves
    pooled_by_model: bool
    loss: str  # "lm": train.lm_loss over the LM head's logits; "class": cross-entropy over classes


HEADS: dict[str, HeadKind] = _unique(
    (h.name, h)
    for h in (
        HeadKind(
            name="prompt-lm",
            auto_class="AutoModelForCausalLM",
            classifier=None,
            prompted=True,
            pooled_by_model=False,
            loss="lm",
        ),
        HeadKind(
            name="prompt-cls",
            auto_class="AutoModelForSequenceClassification",
            classifier="score",
            prompted=True,
            pooled_by_model=True,
            loss="class",
        ),
        HeadKind(
            name="vanilla-cls",
            auto_class="AutoModelForSequenceClassification",
            classifier="score",
            prompted=False,
            pooled_by_model=True,
            loss="class",
        ),
    )
)


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

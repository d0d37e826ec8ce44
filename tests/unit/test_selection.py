"""Layer selection: each method picks the known answer on a model built so the answer is
known, the choosing rules on literal scores, calibration text, and the score cache (scores
computed once per cache key, however many trials read them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES as FIXTURE_FAMILIES
from slimsweep.workers import selection
from slimsweep.workers.families import family_of
from slimsweep.workers.run import run_trial
from slimsweep.workers.selection import (
    METHODS,
    calibration_batches,
    calibration_texts,
    choose_layers,
    drop_closest_block,
    keep_highest,
    keep_random,
    score_key,
)
from slimsweep.workers.spec import (
    CalibrationSpec,
    DataSpec,
    ModelSpec,
    RuntimeSpec,
    SelectionSpec,
    SpecError,
    TrainSpec,
    TrialSpec,
)
from slimsweep.workers.tables import SELECTIONS
from slimsweep.workers.tasks import TASKS

CALIBRATION = CalibrationSpec(source="synthetic", name="sentiment", n_examples=16, max_tokens=24)
IDENTITY = (3, 4)  # the layers made to pass hidden states through unchanged
# scored methods whose known answer needs no fitting: identity layers score as doing nothing
UNFITTED = ("block-influence", "angular", "magnitude-l1", "magnitude-l2", "taylor")
FIT = {"n_examples": 8, "max_tokens": 16}  # the perplexity test's calibration: one small batch


def make_spec(
    model: Path, method: str, cache: Path, layers: int = 4, seed: int = 0, **calibration
) -> TrialSpec:
    cal = CalibrationSpec(**{**CALIBRATION.__dict__, **calibration})
    return TrialSpec(
        grid="test",
        model=ModelSpec(name="tiny", source=str(model)),
        layers=layers,
        task=TASKS["synthetic-sentiment"],
        head="prompt-lm",
        seed=seed,
        selection=SelectionSpec(method=method, calibration=cal),
        runtime=RuntimeSpec(device="cpu", cache_dir=str(cache)),
    )


def test_every_method_has_an_implementation() -> None:
    assert list(METHODS) == list(SELECTIONS)


# --- choosing from scores ------------------------------------------------------------------


def test_keep_highest_keeps_the_k_best_in_ascending_order_earlier_on_ties() -> None:
    choice = keep_highest([0.1, 0.5, 0.3, 0.5, 0.2], 5, 3, seed=0)
    assert choice.kept == (1, 2, 3)
    assert choice.scores == {0: 0.1, 1: 0.5, 2: 0.3, 3: 0.5, 4: 0.2}
    assert keep_highest([1.0, 1.0, 1.0], 3, 2, seed=0).kept == (0, 1)


def test_drop_closest_block_drops_the_contiguous_block_of_least_distance() -> None:
    # distance[a][b] between the states entering layer a and layer b; 4 layers, boundaries 0..4
    distance = [
        [0.0, 0.3, 0.5, 0.6, 0.7],
        [0.3, 0.0, 0.4, 0.2, 0.6],
        [0.5, 0.4, 0.0, 0.3, 0.35],
        [0.6, 0.2, 0.3, 0.0, 0.1],
        [0.7, 0.6, 0.35, 0.1, 0.0],
    ]
    two = drop_closest_block(distance, 4, 2, seed=0)
    assert two.kept == (0, 3)  # block 1-2: distance[1][3] = 0.2 is the least of 0.5, 0.2, 0.35
    assert two.scores == {0: 0.5, 1: 0.2, 2: 0.35}
    assert drop_closest_block(distance, 4, 3, seed=0).kept == (0, 1, 2)  # layer 3: 0.1
    assert drop_closest_block(distance, 4, 4, seed=0).kept == (0, 1, 2, 3)


def test_random_is_seeded_sorted_and_k_long() -> None:
    assert keep_random(None, 6, 3, seed=0).kept == (0, 3, 5)  # random.Random(0).sample
    assert keep_random(None, 6, 3, seed=0) == keep_random(None, 6, 3, seed=0)
    assert keep_random(None, 6, 3, seed=1).kept == (0, 1, 4)
    many = keep_random(None, 32, 8, seed=5).kept
    assert len(set(many)) == 8 and list(many) == sorted(many)


def test_rule_methods_read_only_the_depth(deep_tiny_models, tmp_path: Path) -> None:
    folder = deep_tiny_models["gpt2"]
    assert choose_layers(make_spec(folder, "first-k", tmp_path, layers=3)).kept == (0, 1, 2)
    assert choose_layers(make_spec(folder, "random", tmp_path, layers=3)).kept == (0, 3, 5)
    assert not (tmp_path / "selection-scores").exists()


# --- known answers -------------------------------------------------------------------------


def _with_identity_layers(folder: Path, out: Path, fit: bool) -> Path:
    """The 6-layer fixture with layers 3 and 4 zeroed (every weight, norms included, so each
    passes its input through unchanged). fit: the other layers are first fitted to the
    calibration text, so that removing any of them raises its perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    layers = family_of(model.config.model_type).get(model, "layers")
    with torch.no_grad():
        for i in IDENTITY:
            for p in layers[i].parameters():
                p.zero_()
    if fit:
        trained = [p for i in (0, 1, 2, 5) for p in layers[i].parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        batches = calibration_batches(make_spec(folder, "perplexity", out, **FIT), tokenizer, "cpu")
        optimizer = torch.optim.AdamW(trained, lr=1e-2)
        for _ in range(20):  # evaluation mode: no dropout, the fit is deterministic
            for batch in batches:
                loss, n = selection.lm_loss_sum(model, batch)
                optimizer.zero_grad()
                (loss / n).backward()
                optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def identity_models(deep_tiny_models, tmp_path_factory) -> dict[str, Path]:
    return {
        f: _with_identity_layers(deep_tiny_models[f], tmp_path_factory.mktemp(f"id-{f}"), False)
        for f in FIXTURE_FAMILIES
    }


def hf_perplexity(folder: Path, spec: TrialSpec, deleted: int | None = None) -> float:
    """Calibration perplexity by transformers' own LM loss, optionally with one layer deleted
    from the model (an independent reference for the perplexity scores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if deleted is not None:
        fam = family_of(model.config.model_type)
        del fam.get(model, "layers")[deleted]
        setattr(model.config, fam.layer_key, getattr(model.config, fam.layer_key) - 1)
    losses, tokens = 0.0, 0
    for batch in calibration_batches(spec, AutoTokenizer.from_pretrained(folder), "cpu"):
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        with torch.no_grad():
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                labels=labels,
                use_cache=False,
            )
        n = int(batch.attention_mask[:, 1:].sum())
        losses, tokens = losses + out.loss.item() * n, tokens + n
    return math.exp(losses / tokens)


@pytest.mark.parametrize("method", UNFITTED)
@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_scored_methods_drop_the_layers_that_do_nothing(
    identity_models, tmp_path: Path, family: str, method: str
) -> None:
    choice = choose_layers(make_spec(identity_models[family], method, tmp_path))
    assert choice.kept == (0, 1, 2, 5)


@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_identity_layers_score_what_doing_nothing_scores(
    identity_models, tmp_path: Path, family: str
) -> None:
    def scores(method: str) -> dict[int, float]:
        return choose_layers(make_spec(identity_models[family], method, tmp_path)).scores

    for i in IDENTITY:
        assert scores("block-influence")[i] == pytest.approx(0.0, abs=1e-6)
        assert scores("magnitude-l1")[i] == 0.0 and scores("magnitude-l2")[i] == 0.0
        assert scores("taylor")[i] == 0.0
    assert scores("angular")[3] == pytest.approx(0.0, abs=1e-3)  # the block of layers 3-4
    # removing an identity layer leaves the perplexity as it is
    full = hf_perplexity(identity_models[family], make_spec(identity_models[family], "x", tmp_path))
    ppl = scores("perplexity")
    assert ppl[3] == pytest.approx(full, rel=1e-5) and ppl[4] == pytest.approx(full, rel=1e-5)


def test_perplexity_drops_the_layers_whose_removal_changes_nothing(
    deep_tiny_models, tmp_path: Path
) -> None:
    folder = _with_identity_layers(deep_tiny_models["llama"], tmp_path / "fitted", fit=True)
    spec = make_spec(folder, "perplexity", tmp_path, **FIT)
    choice = choose_layers(spec)
    assert choice.kept == (0, 1, 2, 5)
    full = hf_perplexity(folder, spec)
    assert choice.scores[3] == pytest.approx(full, rel=1e-5)
    assert min(choice.scores[i] for i in (0, 1, 2, 5)) > full


def test_perplexity_scores_equal_the_model_with_that_layer_deleted(
    deep_tiny_models, tmp_path: Path
) -> None:
    folder = deep_tiny_models["opt"]
    spec = make_spec(folder, "perplexity", tmp_path, **FIT)
    got = choose_layers(spec).scores
    for i in range(6):
        assert got[i] == pytest.approx(hf_perplexity(folder, spec, deleted=i), rel=1e-5)


# --- calibration ---------------------------------------------------------------------------


def test_synthetic_calibration_is_the_first_n_texts_of_its_own_seed(tmp_path: Path) -> None:
    from slimsweep.workers.synthetic import generate

    texts = calibration_texts(make_spec(tmp_path, "angular", tmp_path, n_examples=5))
    assert texts == [r["text"] for r in generate("sentiment", 5, 2)]
    assert texts != [r["text"] for r in generate("sentiment", 5, 0)]  # not the train pool's


def test_file_calibration_is_keyed_by_content_and_refused_when_changed(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "cal.txt"
    path.write_text("one text\n\nanother text\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    spec = make_spec(tmp_path, "perplexity", tmp_path, source="file", name=str(path), n_examples=2)
    spec_pinned = make_spec(
        tmp_path, "perplexity", tmp_path, source="file", name=str(path), n_examples=2, digest=digest
    )
    assert calibration_texts(spec_pinned) == ["one text", "another text"]
    before = score_key(spec)
    path.write_text("one text\nchanged text\n")
    assert score_key(spec) != before
    with pytest.raises(SpecError, match="changed since the trial was planned"):
        calibration_texts(spec_pinned)


def test_too_few_calibration_texts_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "cal.txt"
    path.write_text("only one\n")
    spec = make_spec(tmp_path, "taylor", tmp_path, source="file", name=str(path), n_examples=3)
    with pytest.raises(SpecError, match=r"has 1 texts, fewer than calibration\.n_examples=3"):
        calibration_texts(spec)


def test_uncalibrated_methods_do_not_key_their_scores_by_calibration(tmp_path: Path) -> None:
    a = make_spec(tmp_path, "magnitude-l1", tmp_path)
    b = make_spec(tmp_path, "magnitude-l1", tmp_path, n_examples=3)
    assert score_key(a) == score_key(b) and "calibration" not in score_key(a)
    c, d = (
        make_spec(tmp_path, "taylor", tmp_path),
        make_spec(tmp_path, "taylor", tmp_path, n_examples=3),
    )
    assert score_key(c) != score_key(d)


def test_unknown_method_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"selection\.method: unknown selection 'shortgpt'"):
        choose_layers(make_spec(tmp_path, "shortgpt", tmp_path))


# --- the score cache -----------------------------------------------------------------------


def test_scores_are_computed_once_per_cache_key(
    deep_tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = selection.score_pass

    def counting(spec: TrialSpec):
        calls.append(spec.selection.method)
        return real(spec)

    monkeypatch.setattr(selection, "score_pass", counting)
    folder = deep_tiny_models["opt"]
    first = choose_layers(make_spec(folder, "block-influence", tmp_path, layers=4, seed=0))
    # another k and seed: same model, method and calibration, so the cached scores
    again = choose_layers(make_spec(folder, "block-influence", tmp_path, layers=2, seed=7))
    assert calls == ["block-influence"]
    assert again.scores == first.scores
    assert again.kept == tuple(sorted(sorted(range(6), key=lambda i: -first.scores[i])[:2]))
    choose_layers(make_spec(folder, "block-influence", tmp_path, n_examples=8))  # other text
    choose_layers(make_spec(folder, "taylor", tmp_path))  # other method
    choose_layers(make_spec(folder, "random", tmp_path))  # no scores at all
    assert calls == ["block-influence", "block-influence", "taylor"]
    cached = sorted(p.name for p in (tmp_path / "selection-scores").iterdir())
    assert len(cached) == 3 and not [n for n in cached if n.startswith(".tmp-")]
    assert all(n.startswith(("block-influence-", "taylor-")) for n in cached)


def test_trial_row_records_kept_layers_and_scores(identity_models, local_tasks, tmp_path) -> None:
    spec = make_spec(identity_models["llama"], "block-influence", tmp_path)
    spec = TrialSpec.from_dict(
        {
            **json.loads(spec.to_json()),
            "task": json.loads(json.dumps(local_tasks["sst2"].__dict__)),
            "data": DataSpec(train_size=4, valid_size=4, test_size=4).__dict__,
            "train": TrainSpec(epochs=1, patience=1).__dict__,
        }
    )
    computed, _ = run_trial(spec)  # runs the score pass
    assert computed.kept_layers == (0, 1, 2, 5)
    scores = json.loads(computed.selection_scores_json)
    assert sorted(scores) == ["0", "1", "2", "3", "4", "5"]
    assert scores["3"] == pytest.approx(0.0, abs=1e-6)
    # from the cache: the same trial, number for number
    cached, _ = run_trial(spec)
    for name in ("kept_layers", "selection_scores_json", "val_acc", "test_acc", "best_epoch"):
        assert getattr(cached, name) == getattr(computed, name)

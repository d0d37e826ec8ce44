"""The data protocol: pools, seeded splits, demonstrations, prompts, token ids, limits."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pandas as pd
import pytest
from slimsweep.workers import data, synthetic
from slimsweep.workers.spec import DataSpec, ModelSpec, SpecError, TaskSpec, TrialSpec
from slimsweep.workers.tasks import TASKS

DIGEST = "0c400bf109290ddc4ec9f581bbe5e90542abd3914bd31228147320e221304e72"
SMALL = DataSpec(train_size=8, valid_size=8, test_size=8)
# What each task's prompt looks like, written out independently of the registry's templates.
LAYOUT = {
    "sst2": ("Review: ", "\nSentiment:", [" Negative", " Positive"]),
    "agnews": ("Article: ", "\nAnswer:", [" World", " Sports", " Business", " Technology"]),
    "trec": (
        "Question: ",
        "\nAnswer Type:",
        [" Abbreviation", " Entity", " Description", " Person", " Location", " Number"],
    ),
    "emoc": ("Dialogue: ", "\nEmotion:", [" Others", " Happy", " Sad", " Angry"]),
}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def pools(local_tasks) -> dict[str, tuple[list[dict], list[dict]]]:
    return {name: data.load_pools(task) for name, task in local_tasks.items()}


def make_spec(task: TaskSpec, head: str = "prompt-lm", seed: int = 0, **data_kw) -> TrialSpec:
    return TrialSpec(
        grid="test",
        model=ModelSpec(name="tiny", source="unused"),
        layers=1,
        task=task,
        head=head,
        seed=seed,
        data=dataclasses.replace(SMALL, **data_kw),
    )


def ids_of(rows: list[dict]) -> list[int]:
    return [r["idx"] for r in rows]


# --- pools -----------------------------------------------------------------------------------


def test_hub_pools_read_the_task_fields(local_tasks, pools) -> None:
    train, test = pools["trec"]  # text field "text", label field "coarse_label"
    assert (len(train), len(test)) == (60, 30)
    assert ids_of(train) == list(range(60))
    assert {r["label"] for r in train} == set(range(6))
    assert all(isinstance(r["text"], str) for r in train)


def test_old_field_names_fall_back_to_aliases(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        frame = pd.DataFrame({"text": ["a", "b"], "label-coarse": [0, 5]})
        frame.to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    task = dataclasses.replace(TASKS["trec"], dataset=str(tmp_path))
    train, _ = data.load_pools(task)
    assert [r["label"] for r in train] == [0, 5]


def test_missing_field_names_the_fields_present(local_tasks) -> None:
    task = dataclasses.replace(local_tasks["sst2"], text_field="review")
    with pytest.raises(SpecError, match=r"no field 'review' \(fields: sentence, label\)"):
        data.load_pools(task)


def test_missing_split_names_the_splits_present(local_tasks) -> None:
    task = dataclasses.replace(local_tasks["agnews"], test_split="validation")
    with pytest.raises(SpecError, match=r"no split 'validation' \(splits: train, test\)"):
        data.load_pools(task)


def test_label_out_of_range_is_a_spec_error(local_tasks) -> None:
    task = dataclasses.replace(local_tasks["agnews"], label_words=(" World", " Sports"))
    with pytest.raises(SpecError, match=r"label 2; labels must be integers 0..1"):
        data.load_pools(task)


def test_files_kind_reads_csv(tmp_path: Path) -> None:
    for split, n in (("train", 40), ("test", 10)):
        rows = [{"text": f"{split} row {i}", "label": i % 2} for i in range(n)]
        pd.DataFrame(rows).to_csv(tmp_path / f"{split}.csv", index=False)
    task = TaskSpec(
        name="mine",
        kind="files",
        dataset="mine",
        template="Review: {text}\nSentiment:{label}",
        label_words=(" Negative", " Positive"),
        data_files=(("train", str(tmp_path / "train.csv")), ("test", str(tmp_path / "test.csv"))),
    )
    train, test = data.load_pools(task)
    assert (len(train), len(test)) == (40, 10)
    assert train[3] == {"text": "train row 3", "label": 1, "idx": 3}
    missing = dataclasses.replace(task, data_files=(("train", str(tmp_path / "train.csv")),))
    with pytest.raises(SpecError, match="data_files has no 'test' file"):
        data.load_pools(missing)


def test_a_files_task_refuses_a_file_changed_since_its_digest(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("text,label\na,0\nb,1\n")
    paths = tuple((s, str(tmp_path / f"{s}.csv")) for s in ("train", "test"))
    task = TaskSpec(
        name="mine",
        kind="files",
        dataset="files",
        template="R: {text}\nS:{label}",
        label_words=(" no", " yes"),
        data_files=paths,
        # sha256 of "text,label\na,0\nb,1\n", computed independently (sha256sum)
        file_digests=tuple((s, DIGEST) for s, _ in paths),
    )
    assert len(data.load_pools(task)[0]) == 2
    (tmp_path / "train.csv").write_text("text,label\na,0\n")
    with pytest.raises(SpecError, match=r"train.csv' changed since the grid was loaded"):
        data.load_pools(task)


def test_rows_fingerprint_changes_with_any_row() -> None:
    train = [{"text": "a", "label": 0, "idx": 0}, {"text": "b", "label": 1, "idx": 1}]
    test = [{"text": "c", "label": 0, "idx": 0}]
    fp = data.rows_fingerprint(train, test)
    assert fp.startswith("rows:") and len(fp) == 21
    assert fp == data.rows_fingerprint([dict(r) for r in train], test)
    assert fp != data.rows_fingerprint([train[0], {**train[1], "label": 0}], test)
    assert fp != data.rows_fingerprint(train[:1], test)


def test_unknown_hub_dataset_is_a_spec_error(tmp_path: Path) -> None:
    task = dataclasses.replace(TASKS["sst2"], dataset=str(tmp_path / "absent"), config=None)
    with pytest.raises(SpecError, match="cannot load dataset"):
        data.load_pools(task)


# --- synthetic -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(synthetic.GENERATORS))
def test_synthetic_is_seeded_balanced_and_labelled(name: str) -> None:
    rows = synthetic.generate(name, 40, seed=7)
    assert rows == synthetic.generate(name, 40, seed=7)
    assert rows != synthetic.generate(name, 40, seed=8)
    n_classes = len(synthetic.GENERATORS[name].classes)
    assert [sum(r["label"] == c for r in rows) for c in range(n_classes)] == [40 // n_classes] * (
        n_classes
    )


def test_synthetic_rows_carry_their_class_cues() -> None:
    for row in synthetic.generate("sentiment", 50, seed=0):
        words = set(row["text"].replace(",", " ").replace(".", " ").split())
        assert len(words & set(synthetic.SENTIMENT_CUES[row["label"]])) >= 2
        assert not words & set(synthetic.SENTIMENT_CUES[1 - row["label"]])


def test_synthetic_task_pools_differ_between_train_and_test() -> None:
    train, test = data.load_pools(TASKS["synthetic-topic"])
    assert (len(train), len(test)) == (2000, 1000)
    assert train[:20] != test[:20]


def test_unknown_synthetic_generator_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="'weather' is not a synthetic generator"):
        synthetic.generate("weather", 4, 0)


# --- splits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(LAYOUT))
def test_demonstrations_are_one_per_class_and_held_out(local_tasks, pools, task: str) -> None:
    s = data.split(make_spec(local_tasks[task]), *pools[task])
    assert [r["label"] for r in s.demos] == list(range(len(LAYOUT[task][2])))
    demos = set(ids_of(s.demos))
    assert not demos & set(ids_of(s.train)) and not demos & set(ids_of(s.valid))
    assert not set(ids_of(s.train)) & set(ids_of(s.valid))
    assert (len(s.train), len(s.valid), len(s.test)) == (8, 8, 8)
    assert len(set(ids_of(s.test))) == 8


def test_same_seed_same_split_other_seed_other_split(local_tasks, pools) -> None:
    a = data.split(make_spec(local_tasks["agnews"], seed=42), *pools["agnews"])
    b = data.split(make_spec(local_tasks["agnews"], seed=42), *pools["agnews"])
    c = data.split(make_spec(local_tasks["agnews"], seed=43), *pools["agnews"])
    assert a == b
    assert ids_of(a.train) != ids_of(c.train)
    assert ids_of(a.test) != ids_of(c.test)


def test_heads_of_one_seed_share_train_and_valid(local_tasks, pools) -> None:
    lm = data.split(make_spec(local_tasks["sst2"], "prompt-lm"), *pools["sst2"])
    vanilla = data.split(make_spec(local_tasks["sst2"], "vanilla-cls"), *pools["sst2"])
    assert lm == vanilla


def test_train_per_class_takes_train_size_of_each_class(local_tasks, pools) -> None:
    spec = make_spec(local_tasks["agnews"], train_size=3, train_per_class=True)
    s = data.split(spec, *pools["agnews"])
    assert sorted(r["label"] for r in s.train) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(s.valid) == 8


def test_train_per_class_caps_a_short_class_at_what_it_has() -> None:
    # class 0 has 3 rows (1 becomes the demonstration), class 1 has 30: 2 + 5 train rows
    train = [{"text": f"t{i}", "label": int(i >= 3), "idx": i} for i in range(33)]
    test = [{"text": "x", "label": 0, "idx": 0}]
    spec = make_spec(TASKS["sst2"], train_size=5, valid_size=4, train_per_class=True)
    s = data.split(spec, train, test)
    assert sorted(r["label"] for r in s.train) == [0, 0, 1, 1, 1, 1, 1]
    assert len(s.valid) == 4 and {r["label"] for r in s.demos} == {0, 1}


def authors_setup(seed: int, train: list[dict], test: list[dict], n_test: int, per_class: int):
    """The authors' ICLDataModule.setup (ShuzhouYuan/GNNavi, acceleratorGNN/utils/preproc.py),
    transcribed: the reference the authors sampler must equal."""
    random.seed(seed)
    n_test = min(n_test, len(test))
    test_samples = random.sample(list(test), n_test)
    train_samples = list(train)
    random.shuffle(train_samples)
    val_samples = train_samples[:n_test]
    train_samples = train_samples[n_test:]
    selected_demo, selected_auxiliary = [], []
    for n in range(len({r["label"] for r in train})):
        pool = [x for x in train_samples if x["label"] == n]
        selected_demo.append(pool.pop(random.randint(0, len(pool))))
        selected_auxiliary.extend(random.sample(pool, min(per_class, len(pool))))
    return selected_demo, selected_auxiliary, val_samples, test_samples


@pytest.mark.parametrize(("task", "seed"), [("agnews", 0), ("agnews", 42), ("trec", 1)])
def test_authors_sampler_draws_the_rows_their_code_draws(local_tasks, pools, task, seed) -> None:
    spec = make_spec(local_tasks[task], seed=seed, train_size=3, train_per_class=True)
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, sampler="authors"))
    s = data.split(spec, *pools[task])
    demos, train, valid, test = authors_setup(seed, *pools[task], n_test=8, per_class=3)
    assert (s.demos, s.train, s.valid, s.test) == (demos, train, valid, test)
    assert len(s.train) == 3 * local_tasks[task].n_classes and len(s.valid) == len(s.test) == 8


def test_authors_sampler_uses_the_test_size_for_valid_when_the_test_pool_is_smaller(
    local_tasks, pools
) -> None:
    spec = make_spec(local_tasks["sst2"], train_size=2, train_per_class=True)
    spec = dataclasses.replace(
        spec, data=dataclasses.replace(spec.data, sampler="authors", valid_size=40, test_size=40)
    )
    s = data.split(spec, *pools["sst2"])
    assert len(s.test) == len(s.valid) == 30  # the test pool's 30 rows (SST-2: 872)


def test_authors_sampler_fails_where_their_inclusive_pop_fails(local_tasks, pools) -> None:
    # seed 0 on this TREC pool: randint(0, 9) returns 9 for class 5's 9 rows
    spec = make_spec(local_tasks["trec"], seed=0, train_size=3, train_per_class=True)
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, sampler="authors"))
    with pytest.raises(SpecError, match=r"draws index 9 of the 9 rows of class 5 .*IndexError"):
        data.split(spec, *pools["trec"])
    with pytest.raises(IndexError):
        authors_setup(0, *pools["trec"], n_test=8, per_class=3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_per_class": False}, "data.train_per_class: False with data.sampler authors"),
        ({"demos_per_class": 2}, "data.demos_per_class: 2 with data.sampler authors"),
        ({"valid_size": 9}, "data.valid_size: 9 differs from data.test_size 8"),
        ({"sampler": "mine"}, "data.sampler: 'mine' is not one of slimsweep, authors"),
    ],
)
def test_authors_sampler_refuses_settings_their_code_cannot_have(
    local_tasks, pools, change, message
) -> None:
    spec = make_spec(local_tasks["sst2"], train_per_class=True, sampler="authors")
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, **change))
    with pytest.raises(SpecError, match=re.escape(message)):
        data.split(spec, *pools["sst2"])


def test_pool_too_small_names_the_sizes(local_tasks, pools) -> None:
    spec = make_spec(local_tasks["sst2"], train_size=50, valid_size=20)
    msg = (
        r"60 train-pool rows; 2 demonstrations \+ data.train_size 50 \+ data.valid_size 20 need 72"
    )
    with pytest.raises(SpecError, match=msg):
        data.split(spec, *pools["sst2"])


def test_small_test_pool_is_used_whole(local_tasks, pools) -> None:
    s = data.split(make_spec(local_tasks["emoc"], test_size=1000), *pools["emoc"])
    assert sorted(ids_of(s.test)) == list(range(30))


def test_inclusive_draw_keeps_every_row_once_and_favours_the_last() -> None:
    for seed in range(20):
        order = data.draw_order(7, random.Random(seed), inclusive=True)
        assert sorted(order) == list(range(7))
    first_is_last = sum(data.draw_order(4, random.Random(s), True)[0] == 3 for s in range(2000))
    # The clamped extra index doubles the last row's chances: 2/5 rather than 1/4.
    assert 0.35 < first_is_last / 2000 < 0.45


def test_inclusive_draw_changes_the_split(local_tasks, pools) -> None:
    plain = data.split(make_spec(local_tasks["sst2"]), *pools["sst2"])
    off_by_one = data.split(
        make_spec(local_tasks["sst2"], inclusive_index_draw=True), *pools["sst2"]
    )
    assert ids_of(plain.train) != ids_of(off_by_one.train)
    assert not set(ids_of(off_by_one.train)) & set(ids_of(off_by_one.valid))


# --- prompts and tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(LAYOUT))
def test_prompts_match_the_templates_exactly(local_tasks, pools, tokenizer, task: str) -> None:
    head, tail, words = LAYOUT[task]
    spec = make_spec(local_tasks[task], label_word_rule="first-subtoken")
    prepared = data.prepare(spec, tokenizer, 512)
    s = data.split(spec, *pools[task])
    prefix = "".join(f"{head}{r['text']}{tail}{words[r['label']]}\n" for r in s.demos)
    for ex, row in zip(prepared.test, s.test, strict=True):
        assert ex.prompt == f"{prefix}{head}{row['text']}{tail}"
        assert ex.prompt.endswith(":")
        assert (ex.text, ex.label, ex.idx) == (row["text"], row["label"], row["idx"])
    demos = [f"{head}{r['text']}{tail}{words[r['label']]}" for r in s.demos]
    assert [d.prompt for d in prepared.demos] == demos


def test_build_prompt_is_prefix_plus_query() -> None:
    task = TASKS["sst2"]
    demos = [{"text": "bad", "label": 0}, {"text": "good film", "label": 1}]
    prompt = data.build_prompt(task, demos, "x {label} y")
    assert prompt == (
        "Review: bad\nSentiment: Negative\nReview: good film\nSentiment: Positive\n"
        "Review: x {label} y\nSentiment:"
    )
    assert prompt == data.build_prefix(task, demos) + data.build_query(task, "x {label} y")


@pytest.mark.parametrize("task", sorted(LAYOUT))
def test_prefix_and_query_ids_make_the_prompt_ids(local_tasks, tokenizer, task: str) -> None:
    spec = make_spec(local_tasks[task], label_word_rule="first-subtoken")
    prepared = data.prepare(spec, tokenizer, 512)
    assert prepared.prefix_ids
    for ex in prepared.train + prepared.valid + prepared.test:
        assert ex.input_ids == (*prepared.prefix_ids, *ex.query_ids)
        # GPT-2 BPE does not merge across the prefix's final newline: the same ids as one call.
        assert list(ex.input_ids) == tokenizer(ex.prompt).input_ids


def test_vanilla_cls_reads_the_text_alone(local_tasks, tokenizer) -> None:
    prepared = data.prepare(make_spec(local_tasks["sst2"], "vanilla-cls"), tokenizer, 512)
    assert prepared.prefix_ids == [] and prepared.demos == [] and prepared.label_ids == []
    for ex in prepared.test:
        assert ex.prompt == ex.text
        assert ex.query_ids == ex.input_ids == tuple(tokenizer(ex.text).input_ids)
    assert prepared.manifest["demos"] == [] and len(prepared.manifest["held_out"]) == 2


def test_manifest_lists_the_rows_used(local_tasks, pools, tokenizer) -> None:
    spec = make_spec(local_tasks["agnews"])
    prepared = data.prepare(spec, tokenizer, 512)
    s = data.split(spec, *pools["agnews"])
    m = prepared.manifest
    assert m["train"] == ids_of(s.train) == [e.idx for e in prepared.train]
    assert m["valid"] == ids_of(s.valid) and m["test"] == ids_of(s.test)
    assert m["demos"] == m["held_out"] == ids_of(s.demos)
    assert m["pool_sizes"] == {"train": 60, "test": 30}
    assert m["label_ids"] == prepared.label_ids
    json.dumps(m)  # goes into TrialResult.manifest_json


def test_label_words_must_be_single_tokens_by_default(local_tasks, tokenizer) -> None:
    msg = (
        r"label word ' Abbreviation' is 3 tokens \['ĠAb', 'bre', 'viation'\] .*"
        r"set data.label_word_rule: first-subtoken"
    )
    with pytest.raises(SpecError, match=msg):
        data.label_token_ids(local_tasks["trec"], tokenizer, "single-token")
    first = data.label_token_ids(local_tasks["trec"], tokenizer, "first-subtoken")
    assert first[0] == tokenizer(" Ab").input_ids[0]
    assert len(set(first)) == 6


def test_shared_first_subtokens_are_a_spec_error(tokenizer) -> None:
    task = dataclasses.replace(TASKS["sst2"], label_words=(" Pineapple", " Pinecone"))
    with pytest.raises(SpecError, match=r"' Pineapple' and ' Pinecone' share the token 'ĠPine'"):
        data.label_token_ids(task, tokenizer, "first-subtoken")


def test_classification_heads_do_not_need_single_token_words(local_tasks, tokenizer) -> None:
    prepared = data.prepare(make_spec(local_tasks["trec"], "prompt-cls"), tokenizer, 512)
    assert prepared.label_ids == [] and prepared.prefix_ids


def test_overflow_names_trial_example_and_lengths(local_tasks, tokenizer) -> None:
    spec = make_spec(local_tasks["sst2"], max_length=30)
    with pytest.raises(SpecError) as err:
        data.prepare(spec, tokenizer, 512)
    msg = str(err.value)
    assert spec.trial_id in msg and "example idx" in msg and "over the limit of 30" in msg
    assert "data.overflow: truncate-left" in msg


def test_truncate_left_drops_the_start_of_the_text(local_tasks, tokenizer) -> None:
    full = data.prepare(make_spec(local_tasks["sst2"]), tokenizer, 512)
    limit = len(full.prefix_ids) + 12  # room for the template and a few words of text
    spec = make_spec(local_tasks["sst2"], max_length=limit, overflow="truncate-left")
    prepared = data.prepare(spec, tokenizer, 512)
    assert prepared.prefix_ids == full.prefix_ids
    prefix = tokenizer.decode(prepared.prefix_ids)
    cut = prepared.manifest["truncated"]
    assert cut  # the fixture's texts do not all fit
    for name in ("train", "valid", "test"):
        for ex in getattr(prepared, name):
            assert len(ex.input_ids) <= limit
            assert ex.prompt.startswith(prefix) and ex.prompt.endswith("\nSentiment:")
            kept = ex.prompt[len(prefix) + len("Review: ") : -len("\nSentiment:")]
            assert ex.text.endswith(kept)
            assert (kept != ex.text) == (ex.idx in cut.get(name, []))
            assert list(ex.input_ids) == tokenizer(ex.prompt).input_ids


def test_max_length_beyond_the_context_is_a_spec_error(local_tasks, tokenizer) -> None:
    with pytest.raises(
        SpecError, match=r"data\.max_length 1024 exceeds the model's context of 512"
    ):
        data.prepare(make_spec(local_tasks["sst2"], max_length=1024), tokenizer, 512)


def test_prompt_template_must_end_with_the_label(local_tasks, tokenizer) -> None:
    task = dataclasses.replace(local_tasks["sst2"], template="{text} It was{label}.")
    with pytest.raises(SpecError, match=re.escape("must end with {label}")):
        data.prepare(make_spec(task), tokenizer, 512)

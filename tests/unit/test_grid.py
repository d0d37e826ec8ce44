"""Grid files: expansion, trial ids, and one clear error line per kind of mistake."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import GridError, load_grid
from slimsweep.orchestrator.plan import expand, pending

GRIDS = Path(__file__).resolve().parents[2] / "grids"

MINIMAL = """
name: t
models:
  - name: gpt2-xl
    source: openai-community/gpt2-xl
    layers: [48, 1]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "g.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(GridError) as e:
        load_grid(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "g.yaml") in msg
    return msg


def test_paper_grid_expands_to_600_distinct_trials():
    specs = expand(load_grid(GRIDS / "paper.yaml"))
    assert len(specs) == 600
    assert len({s.trial_id for s in specs}) == 600
    by_model = {
        m: sorted({s.layers for s in specs if s.model.name == m}) for m in ("gpt2-xl", "opt-1.3b")
    }
    assert by_model == {"gpt2-xl": [1, 2, 12, 24, 48], "opt-1.3b": [1, 2, 6, 12, 24]}


def test_trial_ids_are_stable_across_loads_and_ignore_runtime(tmp_path):
    a = [s.trial_id for s in expand(load_grid(GRIDS / "paper-text.yaml"))]
    b = [s.trial_id for s in expand(load_grid(GRIDS / "paper-text.yaml"))]
    assert a == b
    # Pinned literally: the same trial has the same id on every machine and every release
    # (the grid names hub ids, no local paths). A change here orphans stored results. These
    # are the ids of grids/paper.yaml before it followed the authors' code: paper-text.yaml
    # keeps its settings.
    assert (a[0], a[-1]) == ("8376026e5ed28074", "a61f49dffd5dd9a5")
    assert hashlib.sha256(",".join(a).encode()).hexdigest()[:16] == "b8feb12a7924eb0d"
    fast = write(tmp_path, MINIMAL + "runtime: {eval_batch_size: 8}\nresources: {gpus: 1}\n")
    slow = tmp_path / "h.yaml"
    slow.write_text(MINIMAL)
    assert [s.trial_id for s in expand(load_grid(fast))] == [
        s.trial_id for s in expand(load_grid(slow))
    ]


def test_paper_grid_ids_are_pinned():
    # The authors'-code protocol (per-class training rows, weight decay 0.01, their draws).
    a = [s.trial_id for s in expand(load_grid(GRIDS / "paper.yaml"))]
    assert (a[0], a[-1]) == ("e87e7a1d22fb532f", "d4702b17979f1dc2")
    assert hashlib.sha256(",".join(a).encode()).hexdigest()[:16] == "334cf1f683b4b7cc"


def test_paper_grids_differ_only_in_the_authors_code_settings():
    code, text = (load_grid(GRIDS / f"{n}.yaml") for n in ("paper", "paper-text"))
    assert (code.models, code.tasks, code.heads, code.seeds) == (
        text.models,
        text.tasks,
        text.heads,
        text.seeds,
    )
    assert dataclasses.replace(code.data, train_per_class=False, sampler="slimsweep") == text.data
    assert (code.train.weight_decay, text.train.weight_decay) == (0.01, 0.0)
    assert dataclasses.replace(code.train, weight_decay=0.0) == text.train


def test_a_files_task_id_follows_the_files_contents(tmp_path):
    (tmp_path / "train.csv").write_text(
        "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(40))
    )
    (tmp_path / "test.csv").write_text("text,label\na,0\nb,1\n")
    text = MINIMAL.replace(
        "tasks: [sst2]",
        "tasks: [{name: mine, files: {train: train.csv, test: test.csv}, "
        "template: 'R: {text}\\nS:{label}', label_words: [' no', ' yes']}]",
    )
    before = [s.trial_id for s in expand(load_grid(write(tmp_path, text)))]
    assert before == [s.trial_id for s in expand(load_grid(write(tmp_path, text)))]
    lines = (tmp_path / "train.csv").read_text().splitlines(keepends=True)
    (tmp_path / "train.csv").write_text("".join(lines[: len(lines) // 2]))  # cut in half
    after = [s.trial_id for s in expand(load_grid(write(tmp_path, text)))]
    assert set(before).isdisjoint(after)


def test_hub_and_synthetic_tasks_keep_their_ids_without_digests():
    spec = expand(load_grid(GRIDS / "demo.yaml"))[0]
    assert spec.task.file_digests == () and "file_digests" not in spec.identity()["task"]
    assert "sampler" not in spec.identity()["data"]


def test_changing_what_is_computed_changes_the_id(tmp_path):
    base = {s.trial_id for s in expand(load_grid(write(tmp_path, MINIMAL)))}
    lr = {
        s.trial_id for s in expand(load_grid(write(tmp_path, MINIMAL + "training: {lr: 1e-4}\n")))
    }
    assert base.isdisjoint(lr)


def test_demo_grid_validates():
    specs = expand(load_grid(GRIDS / "demo.yaml"))
    assert {s.layers for s in specs} == {1, 2, 30}


def test_fractions_and_all_resolve_against_known_depth(tmp_path):
    g = load_grid(write(tmp_path, MINIMAL.replace("[48, 1]", "[all, 0.5, 0.25, 2]")))
    assert g.models[0].layers == (48, 24, 12, 2)


def test_local_model_depth_comes_from_its_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    text = MINIMAL.replace("openai-community/gpt2-xl", "./m").replace("[48, 1]", "[5]")
    assert "exceeds the 4 layers" in error_of(tmp_path, text)


def test_pending_is_grid_minus_done(tmp_path):
    specs = expand(load_grid(write(tmp_path, MINIMAL)))
    assert pending(specs, [specs[0].trial_id]) == specs[1:]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: t\nmodels: [\n", "line 3: malformed YAML"),
        (MINIMAL + "sedes: [1]\n", "sedes: unknown key; did you mean 'seeds'?"),
        (
            MINIMAL.replace("heads: [prompt-lm]", "heads: [prompt-lmm]"),
            "heads[0]: unknown head 'prompt-lmm'; did you mean 'prompt-lm'?",
        ),
        (MINIMAL.replace("tasks: [sst2]", "tasks: [sst3]"), "tasks[0]: unknown task 'sst3'"),
        (MINIMAL.replace("seeds: [0]", "seeds: []"), "seeds: is empty"),
        (MINIMAL.replace("seeds: [0]", "seeds: [1, 1]"), "seeds[1]: duplicate value 1"),
        (MINIMAL.replace("seeds: [0]", "seeds: [a]"), "seeds[0]: expected an integer, got 'a'"),
        (MINIMAL.replace("[48, 1]", "[0]"), "layer count 0 is below 1"),
        (MINIMAL.replace("[48, 1]", "[49]"), "exceeds the 48 layers of model 'gpt2-xl'; use 1..48"),
        (MINIMAL.replace("[48, 1]", "[48, all]"), "resolves to 48 layers, listed already"),
        (MINIMAL + "training: {lr: fast}\n", "training.lr: expected a number"),
        (MINIMAL + "training: {epochs: 2.5}\n", "training.epochs: expected an integer"),
        (MINIMAL + "training: {precison: bf16}\n", "did you mean 'precision'?"),
        (
            MINIMAL + "training: {precision: fp8}\n",
            "training.precision: unknown precision 'fp8'; valid: fp32, bf16",
        ),
        (MINIMAL.replace("    layers: [48, 1]\n", ""), "models[0].layers: missing"),
        (MINIMAL.replace("[48, 1]", "[x]"), "expected a layer count"),
        (MINIMAL + "resources: {gpus: many}\n", "resources.gpus: expected a number >= 0 or 'auto'"),
    ],
)
def test_bad_grids_get_one_line_naming_key_and_fix(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_unknown_depth_rejects_fractions(tmp_path):
    text = MINIMAL.replace("openai-community/gpt2-xl", "someone/unknown").replace(
        "[48, 1]", "[0.5]"
    )
    assert "depth of model 'gpt2-xl', which is unknown" in error_of(tmp_path, text)


def test_cli_plan_prints_counts_and_exits_2_on_bad_grid(tmp_path, capsys):
    assert main(["plan", str(GRIDS / "paper.yaml")]) == 0
    assert "600 trials" in capsys.readouterr().out
    assert main(["plan", str(GRIDS / "paper.yaml"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len({r["trial_id"] for r in rows}) == 600 and set(rows[0]) >= {
        "model",
        "layers",
        "task",
        "head",
        "seed",
    }
    bad = write(tmp_path, MINIMAL + "sedes: [1]\n")
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_plan_shows_the_protocol_and_training_rows_per_task(capsys):
    assert main(["plan", str(GRIDS / "paper.yaml")]) == 0
    out, _ = capsys.readouterr()
    # 200 per class, capped: TREC's 86 abbreviations, less 500 validation rows drawn first
    assert "training rows per trial: agnews 800, emoc 800, sst2 400, trec ~1077" in out
    assert "weight decay 0.01" in out and "sampler authors, train 200 per class (capped)" in out
    assert "protocol  the paper's (authors-code)" in out
    assert main(["plan", str(GRIDS / "paper-text.yaml")]) == 0
    out, _ = capsys.readouterr()
    assert "training rows per trial: agnews 200, emoc 200, sst2 200, trec 200" in out
    assert "protocol  the paper's (paper-text)" in out


def test_cli_plan_warns_once_about_unpinned_hub_sources(tmp_path, capsys):
    assert main(["plan", str(GRIDS / "paper.yaml")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "slimsweep: warning: no revision pinned for model gpt2-xl, model opt-1.3b, dataset "
        "agnews, dataset emoc, dataset sst2, dataset trec:"
    )
    pinned = MINIMAL.replace("source: openai-community/gpt2-xl", "source: x/y\n    revision: abc")
    pinned = pinned.replace("tasks: [sst2]", "tasks: [{name: sst2, revision: def}]")
    assert main(["plan", str(write(tmp_path, pinned))]) == 0
    assert capsys.readouterr().err == ""
    assert main(["plan", str(GRIDS / "demo.yaml")]) == 0  # a package source, synthetic data
    assert capsys.readouterr().err == ""


def test_cli_output_cut_short_by_its_reader_ends_without_a_traceback():
    import subprocess
    import sys

    # The JSON plan of the paper grid (~90 KB) overflows a pipe's 64 KB buffer: the writer
    # meets the closed pipe for certain.
    cmd = f"'{sys.executable}' -m slimsweep.orchestrator.cli plan '{GRIDS / 'paper.yaml'}' "
    out = subprocess.run(cmd + "--format json | head -c 1", shell=True, capture_output=True)
    assert out.stdout.decode() == "["
    err = out.stderr.decode()  # only the warning about the grid's unpinned hub sources
    assert err.startswith("slimsweep: warning: no revision pinned") and err.count("\n") == 1

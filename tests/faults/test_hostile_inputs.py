"""Hostile and careless inputs at the CLI boundary: each is one line naming the fix, exit 2,
no traceback, nothing written outside the results root; anything unforeseen is one line and
exit 3 (`--debug` adds the traceback)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from slimsweep.orchestrator import cli
from slimsweep.orchestrator.cli import build_parser, main
from slimsweep.orchestrator.grid import load_grid

GRID = """\
name: g
models: [{name: m, source: openai-community/gpt2-xl, layers: [1]}]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0]
"""


def plan_error(tmp_path: Path, text: str | bytes, capsys) -> str:
    """`slimsweep plan` of a grid file with this content: exit 2 and one stderr line."""
    path = tmp_path / "g.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"slimsweep: error: {path}: ")
    return err


def billion_laughs(levels: int) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return GRID + "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (billion_laughs(9), "expands to 100001 YAML values (aliases included), over the 100000"),
        (GRID.replace("seeds: [0]", "seeds: &s [0, *s]"), "an alias refers to itself"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        (bytes(range(256)), "not UTF-8 text (byte 0x80 at offset 128)"),
        (GRID + "x: \0\n", "malformed YAML"),
        (
            GRID.replace("seeds: [0]", "seeds: [" + ", ".join(map(str, range(11))) + "]")
            + "max_trials: 10\n",
            "max_trials: the grid has 11 trials, over the limit of 10; shrink an axis, or set "
            "max_trials: 11",
        ),
        (GRID + "max_trials: 0\n", "max_trials: expected an integer >= 1, got 0"),
        (GRID.replace("[sst2]", "[{name: sst2, template: 5}]"), "tasks[0].template: expected text"),
        (GRID.replace("[sst2]", "[{name: [1]}]"), "tasks[0].name: expected text, got [1]"),
        (GRID.replace("[sst2]", "[{name: sst2, files: {train: [1]}}]"), "tasks[0].files: expected"),
        (GRID.replace("[sst2]", "[{name: sst2, label_words: 5}]"), "tasks[0].label_words"),
        (GRID.replace("[sst2]", "[sst2, {name: sst2}]"), "tasks[1]: task 'sst2' is listed already"),
        (GRID.replace("[sst2]", "[sst2, sst2]"), "tasks[1]: duplicate value 'sst2'"),
        (GRID.replace("name: g", "name: '..'"), "name: '..' cannot be a folder name"),
        (GRID.replace("name: g", "name: a/../../b"), "name: 'a/../../b' cannot be a folder"),
        (GRID.replace("name: g", "name: 5"), "name: expected text, got 5"),
        (GRID.replace("name: m,", "name: ../m,"), "models[0].name: '../m' cannot be a folder"),
        (GRID.replace("seeds: [0]", "seeds: ['" + "x" * 5000 + "']"), "seeds[0]: expected an"),
        (GRID + "resources: {cpus: .inf}\n", "resources.cpus: expected a positive number"),
        (GRID + "resources: {gpus: .nan}\n", "resources.gpus: expected a number >= 0"),
        (GRID + "resources: {custom: {1: 1}}\n", "resources.custom: resource names are text"),
        (GRID + "training: {lr: .inf}\n", "training.lr: inf is not a finite number"),
        (
            GRID.replace("[sst2]", '[{name: sst2, template: "{text} \\ud800{label}"}]'),
            "tasks[0].template: '{text} \\ud800{label}' is not valid Unicode",
        ),
        (GRID.replace("source: openai", 'source: "a\\0b/openai'), ""),
    ],
)
def test_a_hostile_grid_is_one_line_and_exit_2(tmp_path, capsys, text, expected):
    err = plan_error(tmp_path, text, capsys)
    assert expected in err
    assert len(err) < 400  # values are cut, never printed whole


def test_max_trials_lets_a_large_grid_through(tmp_path):
    seeds = ", ".join(map(str, range(11)))
    path = tmp_path / "g.yaml"
    path.write_text(GRID.replace("seeds: [0]", f"seeds: [{seeds}]") + "max_trials: 11\n")
    assert load_grid(path).n_trials == 11


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path, capsys):
    assert "over the 1048576 a grid may have" in plan_error(
        tmp_path, GRID + "description: '" + "x" * (1 << 20) + "'\n", capsys
    )


def test_a_local_model_whose_config_is_not_json_is_one_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    err = plan_error(tmp_path, GRID.replace("openai-community/gpt2-xl", "./m"), capsys)
    assert f"models[0].source: {tmp_path / 'm' / 'config.json'} is not a readable JSON" in err
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    assert "holds list, not a JSON object" in plan_error(
        tmp_path, GRID.replace("openai-community/gpt2-xl", "./m"), capsys
    )


FILES_TASK = (
    "[{name: mine, files: {train: %s, test: %s}, template: 'T: {text}\\nL:{label}', "
    "label_words: [' a', ' b']}]"
)


@pytest.mark.parametrize(
    ("train", "test", "expected"),
    [
        ("train.csv", "missing.csv", "tasks[0].files.test: '{d}/missing.csv' is not a file"),
        ("train.csv", "folder.csv", "tasks[0].files.test: '{d}/folder.csv' is not a file"),
        ("train.csv", "test.txt", "tasks[0].files: the files must share one extension"),
    ],
)
def test_a_tasks_data_files_are_checked_at_plan_time(tmp_path, capsys, train, test, expected):
    (tmp_path / "train.csv").write_text("text,label\na,0\n")
    (tmp_path / "test.txt").write_text("a")
    (tmp_path / "folder.csv").mkdir()
    text = GRID.replace("[sst2]", FILES_TASK % ("./" + train, "./" + test))
    assert expected.format(d=tmp_path) in plan_error(tmp_path, text, capsys)


def test_a_files_task_with_its_files_in_place_plans(tmp_path):
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).write_text("text,label\na,0\n")
    path = tmp_path / "g.yaml"
    path.write_text(GRID.replace("[sst2]", FILES_TASK % ("./train.csv", "./test.csv")))
    (task,) = load_grid(path).tasks
    assert dict(task.data_files) == {
        "train": str(tmp_path / "train.csv"),
        "test": str(tmp_path / "test.csv"),
    }


# --- folders that are files -------------------------------------------------------------------


@pytest.fixture()
def grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(GRID)
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["launch", "{grid}", "--dry-run", "--results", "{file}"],
        ["launch", "{grid}", "--dry-run", "--results", "{file}/below"],
        ["status", "{grid}", "--results", "{file}"],
        ["results", "{grid}", "--results", "{file}"],
        ["report", "{grid}", "--out", "{file}", "--results", "{tmp}/res"],
    ],
)
def test_a_results_or_out_folder_that_is_a_file_is_one_line(tmp_path, grid_file, capsys, argv):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    argv = [a.format(grid=grid_file, file=file, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{file} is a file, not a folder; give a folder" in err and err.count("\n") == 1
    assert file.read_text() == "keep me"


def test_query_refuses_a_grid_name_that_climbs_out_of_the_results_root(tmp_path, capsys):
    assert main(["query", "SELECT 1", "--grid", "..", "--results", str(tmp_path)]) == 2
    assert "--grid: '..' cannot be a folder name" in capsys.readouterr().err


def test_a_grid_folder_that_is_a_file_is_one_line(tmp_path, grid_file, capsys):
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "g").write_text("")
    assert main(["status", str(grid_file), "--results", str(tmp_path / "res")]) == 2
    assert "res/g is a file, not a folder" in capsys.readouterr().err


def test_nothing_is_written_outside_the_results_root(tmp_path, capsys):
    """A grid named to climb out of the results root is refused before anything is written."""
    grid = tmp_path / "deep" / "g.yaml"
    grid.parent.mkdir()
    grid.write_text(GRID.replace("name: g", "name: '..'"))
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["launch", str(grid), "--results", str(tmp_path / "deep" / "res")]) == 2
    assert sorted(p for p in tmp_path.rglob("*")) == before


# --- the last line of defence -----------------------------------------------------------------


def boom(args: argparse.Namespace) -> int:
    raise RuntimeError("the disk caught fire\nsecond line")


@pytest.mark.parametrize("flag_first", [True, False])
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    grid_file, capsys, monkeypatch, flag_first
):
    monkeypatch.setattr(cli, "cmd_plan", boom)
    assert main(["plan", str(grid_file)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("slimsweep: unexpected error: RuntimeError: the disk caught fire; ")
    assert "rerun with --debug" in err
    argv = (
        ["--debug", "plan", str(grid_file)] if flag_first else ["plan", str(grid_file), "--debug"]
    )
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "the disk caught fire" in err


def test_a_user_error_with_debug_shows_the_traceback_too(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(GRID + "sedes: [1]\n")
    assert main(["--debug", "plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("did you mean 'seeds'?")


def test_version_flag_prints_the_installed_version(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"slimsweep {importlib.metadata.version('slimsweep')}\n"


def test_every_argument_has_help_and_every_command_examples():
    parser = build_parser()
    assert "argument parsing" not in parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {
        "plan",
        "launch",
        "status",
        "run-trial",
        "results",
        "query",
        "report",
    }
    for name, command in [("slimsweep", parser), *sub.choices.items()]:
        assert "examples:\n  slimsweep " in command.format_help(), name
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (name, action.dest)


def test_no_error_message_leaks_a_traceback_for_a_missing_grid(capsys):
    assert main(["plan", os.devnull + "/nope.yaml"]) == 2
    assert json.dumps(capsys.readouterr().err).count("\\n") == 1


# --- warnings -----------------------------------------------------------------------------------


def test_warnings_are_one_line_each_without_a_source_path(grid_file, capsys, monkeypatch):
    import warnings

    def noisy(args: argparse.Namespace) -> int:
        for _ in range(3):
            warnings.warn("file trials/x.parquet is unreadable;\n  skipped", stacklevel=1)
        warnings.warn("file trials/x.parquet is unreadable;\n  skipped", stacklevel=1)
        warnings.warn("another thing", FutureWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "cmd_plan", noisy)
    assert main(["plan", str(grid_file)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "slimsweep: warning: file trials/x.parquet is unreadable; skipped",
        "slimsweep: warning: another thing",
    ]


# --- checks that need the model's tokenizer, made at plan time -----------------------------------

TOKENIZER_GRID = """\
name: tok
models: [{{name: tiny, source: '{model}', layers: [1]}}]
tasks:
  - {{name: mine, files: {{train: ./d.csv, test: ./d.csv}}, template: 'Q: {{text}}\\nA:{{label}}',
     label_words: [' Abbreviation', ' Entity']}}
  - {{name: other, files: {{train: ./d.csv, test: ./d.csv}}, template: 'Q: {{text}}\\nA:{{label}}',
     label_words: [' yes', ' no']}}
heads: [prompt-lm]
seeds: [0]
data: {{label_word_rule: {rule}}}
"""


@pytest.mark.parametrize("command", [["plan"], ["launch", "--dry-run"]])
def test_a_label_word_of_several_tokens_is_refused_at_plan_time(
    tiny_models, tmp_path, capsys, monkeypatch, command
):
    from slimsweep.workers import families

    loads = []
    real = families.load_tokenizer
    monkeypatch.setattr(families, "load_tokenizer", lambda spec: loads.append(1) or real(spec))
    (tmp_path / "d.csv").write_text("text,label\na,0\n")
    path = tmp_path / "g.yaml"
    path.write_text(TOKENIZER_GRID.format(model=tiny_models["gpt2"], rule="single-token"))
    argv = [command[0], str(path), *command[1:], "--results", str(tmp_path / "res")]
    assert main(argv if command[0] == "launch" else argv[:2]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: model 'tiny': task 'mine': label word " in err
    assert "' Abbreviation' is 3 tokens ['ĠAb', 'bre', 'viation'] for this tokenizer; set " in err
    assert "data.label_word_rule: first-subtoken, or use single-token words" in err
    assert not (tmp_path / "res").exists()

    path.write_text(TOKENIZER_GRID.format(model=tiny_models["gpt2"], rule="first-subtoken"))
    assert main(["plan", str(path)]) == 0
    assert loads == [1, 1]  # one tokenizer load per model and command, for both tasks

"""The `selections:` axis and the `calibration:` section of a grid: expansion order, which
trial ids they change (and which not), and one error line per mistake."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import GridError, load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.workers.spec import CalibrationSpec, SelectionSpec

MINIMAL = """
name: t
models:
  - name: gpt2-xl
    source: openai-community/gpt2-xl
    layers: [48, 1]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0, 1]
"""
SYNTHETIC = "calibration: {source: synthetic, name: sentiment, n_examples: 32, max_tokens: 64}\n"


def write(tmp_path: Path, text: str, name: str = "g.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def ids(tmp_path: Path, text: str) -> list[str]:
    return [s.trial_id for s in expand(load_grid(write(tmp_path, text)))]


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(GridError) as e:
        load_grid(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "g.yaml") in msg
    return msg


def test_default_is_first_k_and_keeps_trial_ids(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path, MINIMAL))
    assert grid.selections == (SelectionSpec(),)
    assert ids(tmp_path, MINIMAL + "selections: [first-k]\n") == ids(tmp_path, MINIMAL)


def test_selection_varies_after_head_and_before_seed(tmp_path: Path) -> None:
    specs = expand(load_grid(write(tmp_path, MINIMAL + "selections: [first-k, random]\n")))
    assert [(s.layers, s.selection.method, s.seed) for s in specs] == [
        (48, "first-k", 0),
        (48, "first-k", 1),
        (48, "random", 0),
        (48, "random", 1),
        (1, "first-k", 0),
        (1, "first-k", 1),
        (1, "random", 0),
        (1, "random", 1),
    ]
    assert [s.axes()["selection"] for s in specs[:4]] == ["first-k", "first-k", "random", "random"]
    assert len({s.trial_id for s in specs}) == 8
    # the first-k trials are those of the grid without a selection axis
    assert [s.trial_id for s in specs if s.selection.method == "first-k"] == ids(tmp_path, MINIMAL)


def test_calibration_is_in_the_id_only_of_methods_that_read_it(tmp_path: Path) -> None:
    grid = MINIMAL + "selections: [random, magnitude-l2, angular]\n"
    a = expand(load_grid(write(tmp_path, grid + SYNTHETIC)))
    b = expand(load_grid(write(tmp_path, grid + SYNTHETIC.replace("32", "16"))))
    assert a[2].selection == SelectionSpec("magnitude-l2", CalibrationSpec())
    assert a[4].selection == SelectionSpec(
        "angular",
        CalibrationSpec(source="synthetic", name="sentiment", n_examples=32, max_tokens=64),
    )
    changed = [x.selection.method for x, y in zip(a, b, strict=True) if x.trial_id != y.trial_id]
    assert set(changed) == {"angular"}


def test_a_calibration_file_is_identified_by_its_content(tmp_path: Path) -> None:
    (tmp_path / "cal.txt").write_text("first text\nsecond text\n")
    grid = MINIMAL + "selections: [perplexity]\ncalibration: {source: file, name: cal.txt}\n"
    cal = load_grid(write(tmp_path, grid)).selections[0].calibration
    assert cal.name == str(tmp_path / "cal.txt")  # relative to the grid file
    assert cal.digest == hashlib.sha256(b"first text\nsecond text\n").hexdigest()
    before = ids(tmp_path, grid)
    (tmp_path / "cal.txt").write_text("first text\nother text\n")
    assert ids(tmp_path, grid) != before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "selections: [angualr]\n",
            "selections[0]: unknown selection 'angualr'; did you mean 'angular'?",
        ),
        ("selections: [random, random]\n", "selections[1]: duplicate value 'random'"),
        ("selections: []\n", "selections: is empty"),
        (
            "selections: [random]\n" + SYNTHETIC,
            "calibration: no selection in this grid reads calibration text",
        ),
        (
            "selections: [taylor]\ncalibration: {source: web}\n",
            "calibration.source: 'web' is not a calibration source; choose one of task, "
            "synthetic, file",
        ),
        (
            "selections: [taylor]\ncalibration: {source: synthetic, name: poems}\n",
            "calibration.name: unknown generator 'poems'",
        ),
        (
            "selections: [taylor]\ncalibration: {source: file}\n",
            "calibration.name: missing; source file needs the text file as name",
        ),
        (
            "selections: [taylor]\ncalibration: {source: file, name: nowhere.txt}\n",
            "calibration.name: no such file",
        ),
        ("selections: [taylor]\ncalibration: {n_examples: 0}\n", "calibration.n_examples: 0"),
        ("selections: [taylor]\ncalibration: {digest: abc}\n", "calibration.digest: unknown key"),
    ],
)
def test_bad_selections_get_one_line_naming_key_and_fix(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert expected in error_of(tmp_path, MINIMAL + text)


def test_plan_shows_the_selection_axis(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = write(tmp_path, MINIMAL + "selections: [first-k, angular]\n" + SYNTHETIC)
    assert main(["plan", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "8 trials" in out and "selections  first-k, angular" in out
    assert "calibration  synthetic sentiment, 32 texts of <= 64 tokens" in out
    assert main(["plan", str(grid), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].split(",").index("selection")
    assert [line.split(",")[column] for line in lines[1:5]] == [
        "first-k",
        "first-k",
        "angular",
        "angular",
    ]


def test_selection_demo_grid_expands_to_one_trial_per_method_and_finetune() -> None:
    grids = Path(__file__).resolve().parents[2] / "grids"
    specs = expand(load_grid(grids / "selection-demo.yaml"))
    assert [(s.selection.method, s.finetune.label) for s in specs] == [
        ("first-k", "full"),
        ("first-k", "last-2"),
        ("random", "full"),
        ("random", "last-2"),
        ("block-influence", "full"),
        ("block-influence", "last-2"),
        ("magnitude-l2", "full"),
        ("magnitude-l2", "last-2"),
    ]
    assert {s.layers for s in specs} == {8}

"""Results: aggregation into the paper's tables (exact means, stds, seed counts, missing cells,
the average), filters, metrics, the comparison with the paper, output formats, SQL, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
from slimsweep.orchestrator import paper
from slimsweep.orchestrator import results as res
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import Grid, GridError, load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store, failure_result
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec

GRIDS_DIR = Path(__file__).resolve().parents[2] / "grids"
GRID_YAML = """\
name: mini
models:
  - name: gpt2-xl
    source: openai-community/gpt2-xl
    layers: [48, 1]
  - name: opt-1.3b
    source: facebook/opt-1.3b
    layers: [24, 1]
tasks: [agnews, sst2]
heads: [prompt-lm, vanilla-cls]
seeds: [0, 1, 2]
"""

PARAMS = {("gpt2-xl", 48): 1_557_611_200, ("gpt2-xl", 1): 112_000_000}
PARAMS |= {("opt-1.3b", 24): 1_315_758_080, ("opt-1.3b", 1): 157_000_000}
# Test accuracy by seed for a few cells; every other cell gets BASE + seed / 100.
ACC = {
    ("prompt-lm", "gpt2-xl", 48, "agnews"): {0: 0.80, 1: 0.82, 2: 0.87},
    ("prompt-lm", "gpt2-xl", 48, "sst2"): {0: 0.70, 1: 0.70, 2: 0.73},
    # incomplete: seed 2 missing
    ("prompt-lm", "gpt2-xl", 1, "sst2"): {0: 0.60, 1: 0.64},
    # one seed: no std
    ("prompt-lm", "opt-1.3b", 24, "agnews"): {1: 0.75},
    # missing entirely
    ("vanilla-cls", "opt-1.3b", 1, "agnews"): {},
}
BASE = 0.5


def acc_of(spec: TrialSpec) -> float | None:
    key = (spec.head, spec.model.name, spec.layers, spec.task.name)
    if key in ACC:
        return ACC[key].get(spec.seed)
    return BASE + spec.seed / 100


def write(store: Store, spec: TrialSpec, acc: float, device: str = "cuda:0") -> None:
    result = TrialResult(
        trial_id=spec.trial_id,
        status="ok",
        spec_json=spec.to_json(),
        n_params=PARAMS[(spec.model.name, spec.layers)],
        best_epoch=2,
        epochs_run=3,
        val_acc=acc - 0.1,
        test_acc=acc,
        majority_test_acc=0.5,
        wall_s=360.0,
        device=device,
        versions_json='{"torch": "2.13.0"}',
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:06:00+00:00",
    )
    epochs = [EpochRow(spec.trial_id, e, 1.0 / e, acc - 0.1 * (3 - e), 120.0) for e in (1, 2, 3)]
    store.write_result(result, epochs)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Grid:
    path = tmp_path_factory.mktemp("grids") / "mini.yaml"
    path.write_text(GRID_YAML)
    return load_grid(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, grid: Grid) -> str:
    root = tmp_path_factory.mktemp("results")
    store = Store(str(root / grid.name))
    for spec in expand(grid):
        acc = acc_of(spec)
        if acc is not None:
            write(store, spec, acc)
    # A trial of an earlier version of the grid (another lr): same axes, another trial_id.
    old = dataclasses.replace(expand(grid)[0], train=dataclasses.replace(grid.train, lr=1e-3))
    write(store, old, 0.10)
    return str(root)


@pytest.fixture(scope="module")
def df(results: str, grid: Grid) -> pd.DataFrame:
    return res.load_results(results, grid.name)


def cell(cells: pd.DataFrame, head: str, model: str, layers: int, task: str) -> pd.Series:
    hit = cells[
        (cells["head"] == head)
        & (cells.model == model)
        & (cells.layers == layers)
        & (cells.task == task)
    ]
    assert len(hit) == 1
    return hit.iloc[0]


def test_cell_is_mean_and_sample_std_over_seeds_in_percent(df, grid):
    cells = res.aggregate(df, grid=grid)
    c = cell(cells, "prompt-lm", "gpt2-xl", 48, "agnews")
    assert c["mean"] == pytest.approx(83.0)
    assert c["std"] == pytest.approx(statistics.stdev([80, 82, 87]))  # ddof=1: sqrt(13)
    assert (c.n, c.n_expected, c.status, c.missing_seeds) == (3, 3, "ok", ())
    assert c.params == "1.6B"


def test_trials_of_an_earlier_grid_version_are_not_averaged_in(df, grid):
    assert len(df) == len(expand(grid)) - 6 + 1  # 6 absent, 1 stale
    c = cell(res.aggregate(df, grid=grid), "prompt-lm", "gpt2-xl", 48, "agnews")
    assert c.n == 3 and c["mean"] == pytest.approx(83.0)


def test_incomplete_missing_and_single_seed_cells(df, grid):
    cells = res.aggregate(df, grid=grid)
    inc = cell(cells, "prompt-lm", "gpt2-xl", 1, "sst2")
    assert (inc.n, inc.status, inc.missing_seeds) == (2, "incomplete", (2,))
    assert inc["mean"] == pytest.approx(62.0)
    one = cell(cells, "prompt-lm", "opt-1.3b", 24, "agnews")
    assert one.n == 1 and one["mean"] == pytest.approx(75.0) and math.isnan(one["std"])
    assert one.missing_seeds == (0, 2)
    gone = cell(cells, "vanilla-cls", "opt-1.3b", 1, "agnews")
    assert (gone.n, gone.status) == (0, "missing") and math.isnan(gone["mean"])


def test_average_is_mean_of_task_means_only_when_every_task_has_a_result(df, grid):
    cells = res.aggregate(df, grid=grid)
    full = cell(cells, "prompt-lm", "gpt2-xl", 48, "average")
    assert full["mean"] == pytest.approx((83.0 + 71.0) / 2)
    assert (full.n, full.status) == (3, "ok")
    part = cell(cells, "prompt-lm", "gpt2-xl", 1, "average")
    assert part["mean"] == pytest.approx((51.0 + 62.0) / 2)
    assert (part.n, part.status) == (2, "incomplete")
    none = cell(cells, "vanilla-cls", "opt-1.3b", 1, "average")
    assert none.status == "missing" and math.isnan(none["mean"])


def test_every_grid_cell_appears_in_grid_order(df, grid):
    cells = res.aggregate(df, grid=grid)
    assert len(cells) == 2 * 4 * 3  # heads x (model, layers) x (tasks + average)
    tables = res.paper_table(df, grid=grid)
    assert list(tables) == ["prompt-lm", "vanilla-cls"]
    table = tables["prompt-lm"]
    assert list(table.index) == [
        ("gpt2-xl", 48, "1.6B"),
        ("gpt2-xl", 1, "112M"),
        ("opt-1.3b", 24, "1.3B"),
        ("opt-1.3b", 1, "157M"),
    ]
    assert list(dict.fromkeys(table.columns.get_level_values("task"))) == [
        "agnews",
        "sst2",
        "average",
    ]
    assert table.loc[("gpt2-xl", 48, "1.6B"), ("agnews", "mean")] == pytest.approx(83.0)
    assert table.loc[("gpt2-xl", 1, "112M"), ("sst2", "status")] == "incomplete"


def test_without_a_grid_expected_seeds_are_those_in_the_results(df):
    cells = res.aggregate(df)
    c = cell(cells, "prompt-lm", "opt-1.3b", 24, "agnews")
    assert c.n_expected == 3 and c.status == "incomplete"
    # The stale trial (lr 1e-3) is counted: without a grid there is no plan to hold it to.
    stale = cell(cells, "prompt-lm", "gpt2-xl", 48, "agnews")
    assert stale.n == 4


def test_filters_restrict_rows_tasks_and_seeds(df, grid):
    cells = res.aggregate(
        df, grid=grid, filters={"model": ["gpt2-xl"], "layers": ["48"], "seed": ["0", "1"]}
    )
    assert set(zip(cells.model, cells.layers, strict=True)) == {("gpt2-xl", 48)}
    c = cell(cells, "prompt-lm", "gpt2-xl", 48, "agnews")
    assert (c.n, c.n_expected, c.status) == (2, 2, "ok")
    assert c["mean"] == pytest.approx(81.0)
    only = res.aggregate(df, grid=grid, filters=res.parse_where(["task=sst2", "head=vanilla-cls"]))
    assert set(only.task) == {"sst2", "average"} and set(only["head"]) == {"vanilla-cls"}


def test_filter_mistakes_are_one_line_errors_naming_the_choices(df, grid):
    with pytest.raises(GridError, match=r"--where modle: unknown key; valid keys: grid, model"):
        res.aggregate(df, grid=grid, filters={"modle": ["x"]})
    with pytest.raises(GridError, match=r"--where model=gpt3: no such model.*gpt2-xl, opt-1.3b"):
        res.aggregate(df, grid=grid, filters={"model": ["gpt3"]})
    with pytest.raises(GridError, match=r"--where layers=x: expected a number"):
        res.aggregate(df, grid=grid, filters={"layers": ["x"]})
    with pytest.raises(GridError, match=r"expected KEY=VALUE"):
        res.parse_where(["layers"])


def test_metric_choice_and_unknown_metric(df, grid):
    c = cell(res.aggregate(df, "val_acc", grid=grid), "prompt-lm", "gpt2-xl", 48, "agnews")
    assert c["mean"] == pytest.approx(73.0)
    e = cell(res.aggregate(df, "epochs_run", grid=grid), "prompt-lm", "gpt2-xl", 48, "agnews")
    assert e["mean"] == 3.0  # not a percentage
    with pytest.raises(GridError, match=r"--metric acc: unknown metric; valid metrics: test_acc"):
        res.aggregate(df, "acc", grid=grid)
    with pytest.raises(GridError, match="the paper reports test accuracy only"):
        res.aggregate(df, "val_acc", grid=grid, compare=True)


def test_comparison_puts_the_paper_number_and_difference_beside_each_cell(df, grid):
    cells = res.aggregate(df, grid=grid, compare=True)
    c = cell(cells, "prompt-lm", "gpt2-xl", 48, "agnews")
    assert c.paper == pytest.approx(85.34)
    assert c["diff"] == pytest.approx(83.0 - 85.34)
    avg = cell(cells, "prompt-lm", "gpt2-xl", 48, "average")
    # the paper's mean over the two tasks shown (85.34, 68.97), not its 4-task 77.04
    assert avg.paper == pytest.approx(77.155) and avg["diff"] == pytest.approx(77.0 - 77.155)
    assert avg.protocol == "paper-text" and avg.no_paper == ""
    v = cell(cells, "vanilla-cls", "opt-1.3b", 24, "sst2")
    assert v.paper == pytest.approx(68.35) and v["diff"] == pytest.approx(51.0 - 68.35)
    gone = cell(cells, "vanilla-cls", "opt-1.3b", 1, "agnews")
    assert gone.paper == pytest.approx(81.86) and math.isnan(gone["diff"])


def test_an_average_is_compared_with_the_papers_average_over_the_same_tasks(df, grid):
    cells = res.aggregate(df, grid=grid, filters={"task": ["sst2"]}, compare=True)
    avg = cell(cells, "prompt-lm", "gpt2-xl", 48, "average")
    assert avg["mean"] == pytest.approx(71.0) and avg.paper == pytest.approx(68.97)


def grid_with(tmp_path, extra: str) -> Grid:
    path = tmp_path / "other.yaml"
    path.write_text(GRID_YAML.replace("name: mini", "name: other") + extra)
    return load_grid(path)


def test_trials_of_another_protocol_get_no_paper_number_and_say_why(tmp_path):
    grid = grid_with(tmp_path, "training: {weight_decay: 0.05}\ndata: {train_size: 64}\n")
    store = Store(str(tmp_path / "r" / grid.name))
    for spec in expand(grid):
        write(store, spec, 0.5)
    df = res.load_results(str(tmp_path / "r"), grid.name)
    cells = res.aggregate(df, grid=grid, compare=True)
    assert cells["paper"].isna().all() and cells["diff"].isna().all()
    lines = res.notes(cells)
    why = [n for n in lines if n.startswith("No paper number")]
    assert why == [
        "No paper number for gpt2-xl 48, 1; opt-1.3b 24, 1 (prompt-lm, vanilla-cls): its "
        "protocol is not the paper's (nearest: paper-text): data.train_size 64 (paper: 200); "
        "training.weight_decay 0.05 (paper: 0.0)."
    ]


def test_a_model_named_like_the_papers_from_another_source_is_not_compared():
    spec = expand(load_grid(GRIDS_DIR / "paper-text.yaml"))[0]
    other = dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, source="someone/gpt2-xl-finetuned")
    )
    assert paper.protocol_of(spec) == ("paper-text", "")
    name, why = paper.protocol_of(other)
    assert name == "" and why == (
        "its protocol is not the paper's (nearest: paper-text): model.source "
        "someone/gpt2-xl-finetuned (paper: openai-community/gpt2-xl)"
    )


def test_the_paper_grids_follow_the_paper_protocols():
    for name, protocol in (("paper", "authors-code"), ("paper-text", "paper-text")):
        specs = expand(load_grid(GRIDS_DIR / f"{name}.yaml"))
        assert {paper.protocol_of(s) for s in specs} == {(protocol, "")}


def test_params_are_labelled_as_the_paper_prints_them_for_its_own_models(tmp_path):
    # 112.7M parameters rounds to 113M; the paper prints 112M for GPT2-XL's 1 layer
    assert res.human_count(112_700_000) == "113M"
    assert res._params_label("gpt2-xl", 1, 112_700_000, {"openai-community/gpt2-xl"}) == "112M"
    assert res._params_label("gpt2-xl", 1, 112_700_000, {"/models/mine"}) == "113M"
    assert res._params_label("opt-1.3b", 2, 208_000_000, {"facebook/opt-1.3b"}) == "297M"


def test_the_papers_known_errors_are_noted_beside_their_rows(df, grid):
    notes = res.notes(res.aggregate(df, grid=grid, compare=True))
    assert not any("297M" in n or "copying error" in n for n in notes)  # rows not shown
    shown = {("prompt-lm", "gpt2-xl", 24): {"trec"}, ("vanilla-cls", "opt-1.3b", 2): {"sst2"}}
    assert paper.errata_notes(shown) == list(paper.ERRATA.values())


def test_majority_class_baseline_is_a_row_of_every_accuracy_table(df, grid):
    text = res.render(res.aggregate(df, grid=grid), "markdown")
    assert "| majority class |  |  | 50.00 | 50.00 | 50.00 |" in text
    assert "chance level" in text
    wall = res.render(res.aggregate(df, "wall_s", grid=grid), "markdown")
    assert "majority class" not in wall


def test_comparison_without_a_grid_names_cells_no_trial_ran(df):
    # gpt2-xl on agnews only, opt-1.3b on sst2 only: the other two cells have no trials
    part = df[
        ((df.model == "gpt2-xl") & (df.task == "agnews"))
        | ((df.model == "opt-1.3b") & (df.task == "sst2"))
    ]
    cells = res.aggregate(part[part["head"] == "prompt-lm"], compare=True)
    gone = cell(cells, "prompt-lm", "gpt2-xl", 1, "sst2")
    assert math.isnan(gone.paper) and gone.no_paper == "no trial ran"
    assert cell(cells, "prompt-lm", "gpt2-xl", 1, "agnews").paper == pytest.approx(85.30)
    # 48 layers, agnews also holds a trial of the grid's earlier lr: unlike trials, no number
    mixed = cell(cells, "prompt-lm", "gpt2-xl", 48, "agnews")
    assert math.isnan(mixed.paper) and mixed.no_paper == "its trials ran under different protocols"


def test_paper_reference_is_packaged_with_all_three_tables():
    ref = paper.reference()
    assert len(ref) == 3 * 10 * 5
    assert set(ref["head"]) == {"prompt-lm", "prompt-cls", "vanilla-cls"}
    row = ref[(ref["head"] == "prompt-cls") & (ref.model == "opt-1.3b") & (ref.layers == 1)]
    assert dict(zip(row.task, row.value, strict=True))["trec"] == pytest.approx(82.56)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1_557_611_200, "1.6B"),
        (819_000_000, "819M"),
        (12_300_000_000, "12B"),
        (1234, "1.2K"),
        (12, "12"),
        (None, ""),
    ],
)
def test_parameter_counts_are_human_formatted(n, text):
    assert res.human_count(n) == text


def test_markdown_shows_cells_marks_and_notes(df, grid):
    text = res.render(res.aggregate(df, grid=grid), "markdown")
    assert "### prompt-lm: test accuracy (%)" in text
    assert "| model | layers | params | agnews | sst2 | average |" in text
    assert "| gpt2-xl | 48 | 1.6B | 83.00 ± 3.61 (3) | 71.00 ± 1.73 (3) | 77.00 (3) |" in text
    assert "62.00 ± 2.83 (2)*" in text and "75.00 (1)*" in text and "| — |" in text
    assert "fewer seeds than the 3 expected" in text


def test_markdown_comparison_cell(df, grid):
    text = res.render(res.aggregate(df, grid=grid, compare=True), "markdown")
    assert "83.00 ± 3.61 (3) [paper 85.34, -2.34]" in text


def test_csv_is_wide_with_full_precision(df, grid):
    text = res.render(res.aggregate(df, grid=grid, compare=True), "csv")
    flat = pd.read_csv(pd.io.common.StringIO(text))
    assert list(flat.columns[:4]) == ["head", "model", "layers", "params"]
    assert {"agnews.mean", "agnews.std", "agnews.n", "agnews.status", "average.diff"} <= set(
        flat.columns
    )
    row = flat[(flat["head"] == "prompt-lm") & (flat.model == "gpt2-xl") & (flat.layers == 48)]
    assert row["agnews.std"].item() == pytest.approx(math.sqrt(13))
    assert row["agnews.paper"].item() == pytest.approx(85.34)


def test_json_is_one_record_per_cell(df, grid):
    records = json.loads(res.render(res.aggregate(df, grid=grid), "json"))
    assert len(records) == 24
    one = next(
        r
        for r in records
        if (r["head"], r["model"], r["layers"], r["task"])
        == ("prompt-lm", "opt-1.3b", 24, "agnews")
    )
    assert one["std"] is None and one["n"] == 1 and one["missing_seeds"] == [0, 2]


def test_latex_marks_incomplete_and_missing(df, grid):
    text = res.render(res.aggregate(df, grid=grid), "latex", "test_acc")
    assert "\\begin{tabular}{lrrrrr}" in text
    assert "gpt2-xl & 48 & 1.6B & $83.00 \\pm 3.61$" in text
    assert "$62.00 \\pm 2.83^{*}$" in text and " & -- & " in text


def test_load_results_reads_every_grid_and_skips_partial_and_corrupt_files(tmp_path, grid):
    root = tmp_path / "results"
    specs = expand(grid)
    write(Store(str(root / "a")), specs[0], 0.5)
    write(Store(str(root / "b")), specs[1], 0.6)
    (root / "b" / "trials" / "x.parquet.tmp-123").write_bytes(b"half a file")
    assert sorted(res.load_results(str(root)).test_acc) == [0.5, 0.6]
    (root / "b" / "trials" / "broken.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="broken.parquet"):
        assert list(res.load_results(str(root), "b").test_acc) == [0.6]
    assert len(res.load_epochs(str(root))) == 6
    assert res.load_results(str(tmp_path / "nowhere")).empty


def test_sql_over_trials_and_epochs(results, grid):
    out = res.query(
        "SELECT head, count(*) AS n FROM trials GROUP BY head ORDER BY head", results, grid.name
    )
    assert out.to_dict("records") == [
        {"head": "prompt-lm", "n": 22},
        {"head": "vanilla-cls", "n": 21},
    ]
    best = res.query(
        "SELECT max(e.val_acc) AS v FROM epochs e JOIN trials t USING (trial_id) "
        "WHERE t.model = 'gpt2-xl' AND t.layers = 48 AND t.task = 'agnews' AND t.seed = 2 "
        "AND t.head = 'prompt-lm'",
        results,
    )
    assert best.v.item() == pytest.approx(0.87)
    assert res.query("SELECT count(*) AS n FROM failed", results).n.item() == 0


def test_sql_error_is_one_line_with_duckdbs_message(results):
    with pytest.raises(GridError, match=r"^SQL error: .*(trials|nope)") as e:
        res.query("SELECT * FROM nope", results)
    assert "\n" not in str(e.value)


def test_query_result_formats(results):
    out = res.query("SELECT 1 AS a, 'x' AS b", results)
    assert res.render_frame(out, "csv") == "a,b\n1,x\n"
    assert json.loads(res.render_frame(out, "json")) == [{"a": 1, "b": "x"}]
    assert res.render_frame(out, "markdown") == "| a | b |\n| --- | --- |\n| 1 | x |"


# --- the CLI -------------------------------------------------------------------------------


def test_cli_results_markdown_by_default(grid, results, capsys):
    assert main(["results", grid.path, "--results", results]) == 0
    out = capsys.readouterr().out
    assert "### vanilla-cls: test accuracy (%)" in out and "83.00 ± 3.61 (3)" in out


def test_cli_results_json_with_filters_and_paper(grid, results, capsys):
    argv = ["results", grid.path, "--results", results, "--format", "json"]
    argv += ["--where", "model=gpt2-xl", "--where", "layers=48", "--compare", "paper"]
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)
    assert {(r["model"], r["layers"]) for r in records} == {("gpt2-xl", 48)}
    assert all("paper" in r and "diff" in r for r in records)


def test_cli_results_errors_are_one_line(grid, results, tmp_path, capsys):
    assert main(["results", grid.path, "--results", results, "--metric", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimsweep: error: --metric nope") and "\n" not in err
    assert main(["results", grid.path, "--results", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no results for grid 'mini'" in err and f"slimsweep launch {grid.path}" in err


def test_cli_query(grid, results, capsys):
    sql = "SELECT count(*) AS n FROM trials WHERE status = 'ok'"
    assert main(["query", sql, "--results", results, "--grid", grid.path, "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n43\n"
    assert main(["query", "SELEC 1", "--results", results]) == 2
    assert capsys.readouterr().err.startswith("slimsweep: error: SQL error: Parser Error")


def test_cli_query_takes_a_grid_name(results, capsys):
    assert (
        main(["query", "SELECT count(*) AS n FROM trials", "--results", results, "--grid", "mini"])
        == 0
    )
    assert capsys.readouterr().out.split() == ["n", "43"]


def test_uri_results_root_and_failed_table(tmp_path, grid):
    root = f"file://{tmp_path}/results"
    specs = expand(grid)
    write(Store(f"{root}/mini"), specs[0], 0.5)
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError as e:
        Store(f"{root}/mini").write_failure(failure_result(specs[1], e, wall_s=2.0))
    assert list(res.load_results(root).test_acc) == [0.5]
    assert list(res.load_failures(root, "mini").error_message) == ["CUDA out of memory"]
    out = res.query("SELECT seed, error_type FROM failed", root, "mini")
    assert out.to_dict("records") == [{"seed": 1, "error_type": "RuntimeError"}]


def test_no_rows_render_empty_tables_in_every_format(df):
    cells = res.aggregate(df.iloc[:0])
    assert cells.empty
    assert res.render(cells, "csv").strip() == "head,model,layers,params"
    assert json.loads(res.render(cells, "json")) == []
    assert res.render(cells, "markdown").startswith("Each cell: mean")

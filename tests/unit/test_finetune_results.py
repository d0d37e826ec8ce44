"""Results, query and report grouped by selection and finetune: a row per (model, layers,
selection, finetune) when a grid has several, the paper's table when it has the defaults,
old rows without those columns read as first-k/full, --where on them, the accuracy lines per
method and the picture of the layers each method kept."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from slimsweep.orchestrator import report as rep
from slimsweep.orchestrator import results as res
from slimsweep.orchestrator.grid import Grid, GridError, load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import Store
from slimsweep.workers.spec import EpochRow, SelectionSpec, TrialResult, TrialSpec

GRID = """\
name: ft
models:
  - name: gpt2-xl
    source: openai-community/gpt2-xl
    layers: [48, 12]
tasks: [sst2]
heads: [prompt-lm]
seeds: [0, 1]
finetunes: [full, last-3, {lora: {r: 16}}]
"""
# test accuracy per (layers, finetune label), the same for both seeds
ACC = {
    (48, "full"): 0.90,
    (48, "last-3"): 0.85,
    (48, "lora-r16"): 0.80,
    (12, "full"): 0.70,
    (12, "last-3"): 0.65,
    (12, "lora-r16"): 0.60,
}


def result(spec: TrialSpec, acc: float, kept: tuple[int, ...] = ()) -> TrialResult:
    return TrialResult(
        trial_id=spec.trial_id,
        status="ok",
        spec_json=spec.to_json(),
        kept_layers=kept or tuple(range(spec.layers)),
        n_params=1_000_000 * spec.layers,
        test_acc=acc,
        val_acc=acc,
        majority_test_acc=0.5,
        wall_s=60.0,
        device="cpu",
    )


def epochs(spec: TrialSpec, acc: float) -> list[EpochRow]:
    return [EpochRow(spec.trial_id, e, 1.0, acc, 1.0) for e in (1, 2)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Grid:
    path = tmp_path_factory.mktemp("grids") / "ft.yaml"
    path.write_text(GRID)
    return load_grid(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, grid: Grid) -> str:
    root = tmp_path_factory.mktemp("results")
    store = Store(str(root / grid.name))
    for spec in expand(grid):
        acc = ACC[(spec.layers, spec.finetune.label)]
        store.write_result(result(spec, acc), epochs(spec, acc))
    return str(root)


def test_each_finetune_is_its_own_row(grid, results) -> None:
    cells = res.aggregate(res.load_results(results, grid.name), grid=grid)
    text = res.render(cells)
    assert "| model | layers | finetune | params | sst2 | average |" in text
    assert "| gpt2-xl | 48 | full | 1.6B | 90.00 ± 0.00 (2) | 90.00 (2) |" in text
    assert "| gpt2-xl | 48 | last-3 | 1.6B | 85.00 ± 0.00 (2) | 85.00 (2) |" in text
    assert "| gpt2-xl | 12 | lora-r16 | 450M | 60.00 ± 0.00 (2) | 60.00 (2) |" in text
    rows = [line.split(" | ")[2] for line in text.splitlines() if line.startswith("| gpt2-xl")]
    assert rows == ["full", "last-3", "lora-r16"] * 2  # grid order: depth, then finetune


def test_where_picks_finetunes_and_selections(grid, results) -> None:
    df = res.load_results(results, grid.name)
    cells = res.aggregate(df, grid=grid, filters={"finetune": ["last-3"]})
    assert list(cells[cells["task"] == "sst2"]["mean"]) == pytest.approx([85.0, 65.0])
    assert "| model | layers | finetune | params |" in res.render(cells)  # not the default
    both = res.aggregate(df, grid=grid, filters={"selection": ["first-k"]})
    assert len(both[both["task"] == "sst2"]) == 6
    with pytest.raises(GridError, match="no such finetune; valid values: full, last-3, lora-r16"):
        res.aggregate(df, grid=grid, filters={"finetune": ["last-4"]})


def test_csv_json_and_latex_carry_the_finetune(grid, results) -> None:
    cells = res.aggregate(res.load_results(results, grid.name), grid=grid)
    csv = res.render(cells, "csv").splitlines()
    assert csv[0].startswith("head,model,layers,finetune,params,sst2.mean")
    records = json.loads(res.render(cells, "json"))
    assert {r["finetune"] for r in records} == {"full", "last-3", "lora-r16"}
    assert "selection" not in records[0]  # every row keeps the first layers: not shown
    latex = res.render(cells, "latex")
    assert "Model & Layers & Fine-tune & Params & sst2 & average" in latex
    assert "\\begin{tabular}{lrlrrr}" in latex


def test_old_rows_without_the_new_axes_read_as_first_k_and_full(tmp_path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(GRID.replace("finetunes: [full, last-3, {lora: {r: 16}}]\n", ""))
    grid = load_grid(path)
    store = Store(str(tmp_path / "results" / grid.name))
    spec = expand(grid)[0]
    store.write_result(result(spec, 0.9), epochs(spec, 0.9))
    file = tmp_path / "results" / grid.name / "trials" / f"{spec.trial_id}.parquet"
    old = pq.read_table(file).drop_columns(["selection", "finetune"])
    pq.write_table(old, file)
    df = res.load_results(str(tmp_path / "results"), grid.name)
    assert (df["selection"].iloc[0], df["finetune"].iloc[0]) == ("first-k", "full")
    text = res.render(res.aggregate(df, grid=grid))
    assert "| model | layers | params | sst2 | average |" in text
    assert "| gpt2-xl | 48 | 1.6B | 90.00 (1)* | 90.00 (1)* |" in text


def test_the_paper_is_compared_with_first_k_full_rows_only(grid, results) -> None:
    cells = res.aggregate(res.load_results(results, grid.name), grid=grid, compare=True)
    sst2 = cells[(cells["task"] == "sst2") & (cells["layers"] == 48)].set_index("finetune")
    assert sst2.loc["last-3", "no_paper"] == (
        "the paper keeps the first layers and fine-tunes them all (first-k, full)"
    )
    assert pd.isna(sst2.loc["last-3", "paper"]) and pd.isna(sst2.loc["lora-r16", "paper"])


def test_accuracy_plot_has_a_line_per_finetune(grid, results) -> None:
    cells = res.aggregate(res.load_results(results, grid.name), grid=grid)
    fig = rep.accuracy_figure(cells, "acc")
    ax = fig.axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert lines == {
        "majority class": [50.0, 50.0],
        "full": [70.0, 90.0],
        "last-3": [65.0, 85.0],
        "lora-r16": [60.0, 80.0],
    }


def test_kept_layers_picture_shades_each_methods_share(tmp_path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(GRID.replace("layers: [48, 12]", "layers: [3]"))
    grid = load_grid(path)
    base = next(s for s in expand(grid) if s.finetune.label == "full")
    rows = []
    # first-k keeps 0, 1, 2 in both seeds; random keeps {0, 5, 9} then {0, 7, 9}
    for seed, method, kept in (
        (0, "first-k", (0, 1, 2)),
        (1, "first-k", (0, 1, 2)),
        (0, "random", (0, 5, 9)),
        (1, "random", (0, 7, 9)),
    ):
        spec = dataclasses.replace(base, seed=seed, selection=SelectionSpec(method=method))
        rows.append(dataclasses.asdict(result(spec, 0.8, kept)) | spec.axes())
    trials = pd.DataFrame(rows)
    fig = rep.kept_layers_figure(trials, {"gpt2-xl": 12})
    shares = fig.axes[0].images[0].get_array().tolist()
    assert shares == [
        [1.0, 1.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1.0, 0, 0, 0, 0, 0.5, 0, 0.5, 0, 1.0, 0, 0],
    ]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["first-k", "random"]
    assert fig.axes[0].get_title() == "gpt2-xl: 3 of 12 layers kept"


def test_report_shows_the_finetunes(grid, results, tmp_path) -> None:
    out = rep.build_report(grid, results, tmp_path / "report")
    md = Path(out.markdown).read_text()
    assert "| model | layers | finetune | params | sst2 | average |" in md
    assert "kept_layers.png" not in md  # one selection: nothing to compare
    curves = rep.curves_figure(res.load_epochs(results, grid.name), "prompt-lm")
    labels = {line.get_label() for line in curves.axes[0].lines}
    assert labels == {
        "48 layers · full",
        "48 layers · last-3",
        "48 layers · lora-r16",
        "12 layers · full",
        "12 layers · last-3",
        "12 layers · lora-r16",
    }


def test_report_pictures_the_layers_each_selection_kept(tmp_path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        GRID.replace("layers: [48, 12]", "layers: [2]").replace(
            "finetunes: [full, last-3, {lora: {r: 16}}]", "selections: [first-k, random]"
        )
    )
    grid = load_grid(path)
    store = Store(str(tmp_path / "results" / grid.name))
    kept = {"first-k": (0, 1), "random": (10, 40)}
    for spec in expand(grid):
        store.write_result(result(spec, 0.8, kept[spec.selection.label]), epochs(spec, 0.8))
    out = rep.build_report(grid, str(tmp_path / "results"), tmp_path / "report")
    md = Path(out.markdown).read_text()
    assert "| model | layers | selection | params | sst2 | average |" in md
    assert "## Layers kept per selection method" in md and "![kept_layers.png]" in md
    assert (tmp_path / "report" / "kept_layers.png").stat().st_size > 0

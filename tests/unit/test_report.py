"""The report: files rendered, every head and task mentioned, one line per head in the
accuracy plot, training curves, run costs by device kind, failures and provenance."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
from slimsweep.orchestrator import report as rep
from slimsweep.orchestrator.cli import main
from slimsweep.orchestrator.grid import Grid, GridError, load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.results import aggregate, load_epochs, load_results, notes
from slimsweep.orchestrator.store import Store, failure_result
from slimsweep.workers.spec import EpochRow, TrialResult, TrialSpec

DEMO = Path(__file__).resolve().parents[2] / "grids" / "demo.yaml"
TWO_HEADS = """\
name: two
models:
  - name: gpt2-xl
    source: openai-community/gpt2-xl
    layers: [48, 12, 1]
tasks: [agnews, sst2]
heads: [prompt-lm, vanilla-cls]
seeds: [0, 42]
"""


def write(store: Store, spec: TrialSpec, acc: float, device: str, wall_s: float) -> None:
    result = TrialResult(
        trial_id=spec.trial_id,
        status="ok",
        spec_json=spec.to_json(),
        n_params=1000 * spec.layers,
        best_epoch=2,
        epochs_run=3,
        val_acc=acc,
        test_acc=acc,
        majority_test_acc=0.4,
        wall_s=wall_s,
        device=device,
        versions_json='{"torch": "2.13.0", "transformers": "5.24.0"}',
        started_at=f"2026-01-0{1 + spec.seed % 2}T00:00:00+00:00",
        finished_at=f"2026-01-0{1 + spec.seed % 2}T01:00:00+00:00",
    )
    epochs = [EpochRow(spec.trial_id, e, 1.0 / e, acc * e / 3, wall_s / 3) for e in (1, 2, 3)]
    store.write_result(result, epochs)


def fill(grid: Grid, root: Path, device: str = "cpu", fail: int = 0) -> str:
    """Results for every trial of `grid`, the last `fail` recorded as failures instead."""
    store = Store(str(root / grid.name))
    specs = expand(grid)
    for i, spec in enumerate(specs[: len(specs) - fail]):
        write(store, spec, 0.5 + 0.01 * spec.layers + 0.001 * i, device, 1800.0)
    for spec in specs[len(specs) - fail :]:
        try:
            raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")
        except RuntimeError as e:
            store.write_failure(failure_result(spec, e, wall_s=900.0, device=device))
    return str(root)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Grid, str]:
    grid = load_grid(DEMO)
    return grid, fill(grid, tmp_path_factory.mktemp("results"), fail=1)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Grid, str]:
    path = tmp_path_factory.mktemp("grids") / "two.yaml"
    path.write_text(TWO_HEADS)
    grid = load_grid(path)
    return grid, fill(grid, tmp_path_factory.mktemp("results"), device="cuda:0")


def solid_lines(ax) -> list[str]:
    return [line.get_label() for line in ax.lines if line.get_linestyle() == "-"]


def test_demo_report_renders_with_every_section(demo, tmp_path):
    grid, results = demo
    report = rep.build_report(grid, results, tmp_path / "report")
    assert report.html.is_file() and report.markdown.is_file()
    assert {p.name for p in report.images} == {"accuracy_vs_layers.png", "curves_prompt-lm.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in report.images)
    page = report.html.read_text()
    for text in (
        "prompt-lm",
        "synthetic-sentiment",
        "smollm2-135m",
        "Run costs",
        "Failures",
        "Provenance",
        "CUDA out of memory",
        "data:image/png;base64,",
    ):
        assert text in page
    assert "Tried to allocate" not in page  # one line per failure
    md = report.markdown.read_text()
    assert "![accuracy_vs_layers.png](accuracy_vs_layers.png)" in md
    assert "| smollm2-135m | 30 |" in md and "(1)*" in md  # the failed seed: one seed left


def test_demo_plot_has_one_line_per_head(demo):
    grid, results = demo
    cells = aggregate(load_results(results, grid.name), grid=grid)
    fig = rep.accuracy_figure(cells, "test accuracy (%)")
    assert len(fig.axes) == 2  # one model x (one task + average)
    for ax in fig.axes:
        assert solid_lines(ax) == ["prompt-lm"]
        assert [int(t) for t in ax.get_xticks()] == [1, 2, 30]


def test_demo_compared_with_the_paper_says_the_paper_has_no_such_rows(demo):
    grid, results = demo
    cells = aggregate(load_results(results, grid.name), grid=grid, compare=True)
    assert cells["paper"].isna().all()
    assert notes(cells)[-1] == (
        "No paper number for smollm2-135m 1, 2, 30 (prompt-lm): the paper has no model "
        "smollm2-135m (it reports gpt2-xl, opt-1.3b)."
    )


def test_plots_draw_the_majority_class_baseline(two):
    grid, results = two
    cells = aggregate(load_results(results, grid.name), grid=grid)
    fig = rep.accuracy_figure(cells, "test accuracy (%)")
    for ax in fig.axes:
        dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
        assert [line.get_label() for line in dotted] == ["majority class"]
        assert list(dotted[0].get_ydata()) == [40.0, 40.0]


def test_report_says_which_protocol_each_run_used(tmp_path):
    text = (Path(__file__).resolve().parents[2] / "grids" / "paper.yaml").read_text()
    path = tmp_path / "p.yaml"
    path.write_text(text.replace("[48, 24, 12, 2, 1]", "[1]").replace("[24, 12, 6, 2, 1]", "[1]"))
    specs = expand(load_grid(path))
    changed = [dataclasses.replace(s, train=dataclasses.replace(s.train, lr=1e-3)) for s in specs]
    rows = rep.protocol_rows(specs + changed[:3])
    assert [r[:2] for r in rows] == [["authors-code", "120"], ["not the paper's", "3"]]
    assert rows[0][2] == (
        "sampler authors, train 200 per class (capped), valid 1000, test 1000, "
        "1 demo(s)/class, label words first-subtoken"
    )
    assert rows[0][3] == (
        "adamw lr 5e-05 weight decay 0.01, batch 1, ≤50 epochs, patience 15, fp32, loss label-words"
    )


def test_cost_table_is_in_depth_order():
    trials = pd.DataFrame(
        {"model": ["m", "m", "m", "n"], "layers": [1, 12, 2, 4], "device": [""] * 4}
    ).assign(wall_s=3600.0)
    failures = pd.DataFrame({"model": [], "layers": [], "wall_s": []})
    table = rep.costs(trials, failures)
    assert list(zip(table.model, table.layers, strict=True)) == [
        ("m", 12),
        ("m", 2),
        ("m", 1),
        ("n", 4),
        ("total", ""),
    ]


def test_two_heads_two_lines_and_dashed_paper_lines(two):
    grid, results = two
    cells = aggregate(load_results(results, grid.name), grid=grid, compare=True)
    fig = rep.accuracy_figure(cells, "test accuracy (%)")
    assert [ax.get_title() for ax in fig.axes] == [
        "gpt2-xl · agnews",
        "gpt2-xl · sst2",
        "gpt2-xl · average",
    ]
    for ax in fig.axes:
        assert solid_lines(ax) == ["prompt-lm", "vanilla-cls"]
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert [line.get_label() for line in dashed] == ["prompt-lm (paper)", "vanilla-cls (paper)"]
    agnews = fig.axes[0].lines[1]  # prompt-lm (paper)
    assert list(agnews.get_ydata()) == [85.30, 86.42, 85.34]  # layers 1, 12, 48
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "prompt-lm",
        "prompt-lm (paper)",
        "vanilla-cls",
        "vanilla-cls (paper)",
        "majority class",
    ]


def test_curves_one_line_per_depth_mean_over_seeds(two):
    grid, results = two
    epochs = load_epochs(results, grid.name)
    fig = rep.curves_figure(epochs, "vanilla-cls", ["gpt2-xl"], ["agnews", "sst2"])
    ax = fig.axes[0]
    assert ax.get_title() == "gpt2-xl · agnews"
    assert [line.get_label() for line in ax.lines] == ["48 layers", "12 layers", "1 layer"]
    e = epochs[(epochs["head"] == "vanilla-cls") & (epochs.task == "agnews") & (epochs.layers == 1)]
    assert list(ax.lines[2].get_ydata()) == pytest.approx(
        list(e.groupby("epoch").val_acc.mean() * 100)
    )


def test_costs_sum_wall_hours_by_device_kind_and_failures():
    trials = pd.DataFrame(
        {
            "model": ["m", "m", "m", "n"],
            "layers": [2, 2, 1, 4],
            "device": ["cuda:0", "cpu", "NVIDIA H100 80GB HBM3", ""],
            "wall_s": [3600.0, 1800.0, 7200.0, 360.0],
        }
    )
    failures = pd.DataFrame({"model": ["m"], "layers": [2], "wall_s": [900.0]})
    table = rep.costs(trials, failures)
    assert table.to_dict("records") == [
        {
            "model": "m",
            "layers": 2,
            "trials": 2,
            "GPU hours": 1.0,
            "CPU hours": 0.5,
            "failed": 1,
            "failed hours": 0.25,
        },
        {
            "model": "m",
            "layers": 1,
            "trials": 1,
            "GPU hours": 2.0,
            "CPU hours": 0.0,
            "failed": 0,
            "failed hours": 0.0,
        },
        {
            "model": "n",
            "layers": 4,
            "trials": 1,
            "GPU hours": 0.0,
            "CPU hours": 0.1,
            "failed": 0,
            "failed hours": 0.0,
        },
        {
            "model": "total",
            "layers": "",
            "trials": 4,
            "GPU hours": 3.0,
            "CPU hours": 0.6,
            "failed": 1,
            "failed hours": 0.25,
        },
    ]


def test_provenance_names_versions_devices_dates_and_the_grid(two):
    grid, results = two
    trials = load_results(results, grid.name)
    rows = dict(rep.provenance(grid, results, trials, stale=0))
    assert rows["versions"] == "torch 2.13.0; transformers 5.24.0"
    assert rows["devices"] == "cuda:0 × 24"
    assert rows["first started"] == "2026-01-01T00:00:00+00:00"
    assert rows["last finished"] == "2026-01-01T01:00:00+00:00"  # seeds 0 and 42: both even
    assert rows["trials"] == "24 finished of 24 planned"
    assert rows["grid file"].startswith(f"{grid.path} (sha256 ")


def test_report_with_paper_comparison_and_stale_trials(two, tmp_path):
    grid = two[0]
    results = fill(grid, tmp_path / "results", device="cuda:0")
    stale = dataclasses.replace(expand(grid)[0], train=dataclasses.replace(grid.train, lr=1e-3))
    write(Store(f"{results}/{grid.name}"), stale, 0.1, "cpu", 1.0)
    report = rep.build_report(grid, results, tmp_path / "r", compare=True)
    page = report.html.read_text()
    assert "[paper 85.34, " in page and "dashed: the paper" in page
    assert "1 stored trial(s) of an earlier version of the grid" in page
    assert "vanilla-cls" in page and "sst2" in page


def test_report_without_results_says_how_to_launch(tmp_path):
    grid = load_grid(DEMO)
    with pytest.raises(GridError, match=r"no results for grid 'demo'.*slimsweep launch"):
        rep.build_report(grid, str(tmp_path / "none"), tmp_path / "out")


def test_cli_report(demo, tmp_path, capsys):
    results = demo[1]
    out = tmp_path / "cli"
    assert main(["report", str(DEMO), "--results", results, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"report: {out / 'index.html'}")
    assert (out / "report.md").is_file() and (out / "accuracy_vs_layers.png").is_file()

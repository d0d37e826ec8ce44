"""The report of a grid: one self-contained HTML page (images inline) and a Markdown twin
(images as PNG files next to it), built from the same blocks.

Sections: the paper's tables (optionally beside the paper's numbers), accuracy against layers
kept (one subplot per model and task, one line per head, the band is ± one std over seeds),
training curves (validation accuracy per epoch, mean over seeds, one line per depth), run
costs (wall hours by device kind), failures, and provenance (versions, devices, dates, the
grid file). Figures are built on `matplotlib.figure.Figure` directly (Agg, no pyplot state).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import importlib.metadata
import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from slimsweep.orchestrator import paper
from slimsweep.orchestrator.grid import Grid
from slimsweep.orchestrator.plan import describe_data, describe_train, expand
from slimsweep.orchestrator.results import (
    AVERAGE,
    METRICS,
    aggregate,
    display_rows,
    load_rows,
    markdown_table,
    no_results,
    notes,
    planned,
    to_tables,
)
from slimsweep.workers.spec import HEADS, TrialSpec

# A head keeps its colour in every figure.
HEAD_COLORS = {h: f"C{i}" for i, h in enumerate(HEADS)}
# Substrings of TrialResult.device that mean an accelerator (e.g. "cuda:0", "NVIDIA H100").
GPU_MARKERS = ("cuda", "gpu", "nvidia", "rocm", "mps")
ERROR_CHARS = 200


# --- figures -------------------------------------------------------------------------------


def _head_color(head: str) -> str:
    return HEAD_COLORS.get(head, "C9")


def _figsize(rows: int, cols: int) -> tuple[float, float]:
    """About 3.4 x 2.9 inches per subplot; wide enough for a title over a single one."""
    return max(3.4 * cols, 5.5), 2.9 * rows + 0.6


def _layer_axis(ax: object, layers: list[int]) -> None:
    """Layer counts span 1..48: a log2 axis with a tick at each depth of the grid."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(layers, [str(k) for k in layers])
    ax.minorticks_off()
    ax.set_xlabel("layers kept")
    ax.grid(alpha=0.3)


def accuracy_figure(cells: pd.DataFrame, metric_label: str) -> Figure:
    """One subplot per model (rows) and task, the average last (columns); in each, one line
    per head: the mean over seeds against layers kept, a band of ± one std; a dotted grey line
    at the majority-class accuracy (the chance level). With the paper's numbers
    (`cells.paper`), a dashed line per head beside it."""
    models = list(dict.fromkeys(cells["model"]))
    tasks = list(dict.fromkeys(cells["task"]))
    heads = list(dict.fromkeys(cells["head"]))
    fig = Figure(figsize=_figsize(len(models), len(tasks)), layout="constrained")
    axes = fig.subplots(len(models), len(tasks), squeeze=False)
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            sub = cells[(cells["model"] == model) & (cells["task"] == task)]
            for head in heads:
                h = sub[sub["head"] == head].sort_values("layers")
                color = _head_color(head)
                if h["mean"].notna().any():
                    ax.plot(h["layers"], h["mean"], marker="o", color=color, label=head)
                    ax.fill_between(
                        h["layers"],
                        h["mean"] - h["std"].fillna(0),
                        h["mean"] + h["std"].fillna(0),
                        color=color,
                        alpha=0.15,
                        linewidth=0,
                    )
                if "paper" in h and h["paper"].notna().any():
                    ax.plot(
                        h["layers"],
                        h["paper"],
                        linestyle="--",
                        marker="x",
                        color=color,
                        alpha=0.7,
                        label=f"{head} (paper)",
                    )
            chance = sub["majority"].mean() if "majority" in sub else float("nan")
            if pd.notna(chance):
                ax.axhline(chance, color="0.5", linestyle=":", label="majority class")
            _layer_axis(ax, sorted(sub["layers"].unique()))
            ax.set_title(f"{model} · {task}", fontsize=10)
            if j == 0:
                ax.set_ylabel(metric_label)
    _figure_legend(fig, axes.flat)
    return fig


def _figure_legend(fig: Figure, axes: object) -> None:
    """One legend for the figure, each label once, above the subplots."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside upper center", ncols=len(seen))


def curves_figure(
    epochs: pd.DataFrame,
    head: str,
    models: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
) -> Figure:
    """Validation accuracy (%) per epoch for one head: a subplot per model and task (in the
    given order, else as found), one line per depth, the mean over the seeds that reached that
    epoch (early stopping ends some seeds sooner)."""
    e = epochs[epochs["head"] == head]
    models = [m for m in models or dict.fromkeys(e["model"]) if (e["model"] == m).any()]
    tasks = [t for t in tasks or dict.fromkeys(e["task"]) if (e["task"] == t).any()]
    fig = Figure(figsize=_figsize(len(models), len(tasks)), layout="constrained")
    axes = fig.subplots(len(models), len(tasks), squeeze=False)
    fig.suptitle(f"{head}: validation accuracy (mean over seeds)")
    for i, model in enumerate(models):
        depths = sorted(e.loc[e["model"] == model, "layers"].unique(), reverse=True)
        colors = {k: f"C{n}" for n, k in enumerate(depths)}
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            sub = e[(e["model"] == model) & (e["task"] == task)]
            curves = sub.groupby(["layers", "epoch"])["val_acc"].mean().mul(100)
            for k in depths:
                if k in curves.index.get_level_values("layers"):
                    c = curves.loc[k]
                    ax.plot(
                        c.index, c.values, color=colors[k], label=f"{k} layer{'s' if k > 1 else ''}"
                    )
            ax.set_title(f"{model} · {task}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("val accuracy (%)")
                ax.legend(fontsize=8)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# --- tables --------------------------------------------------------------------------------


def device_kind(device: str) -> str:
    return "GPU" if any(m in (device or "").lower() for m in GPU_MARKERS) else "CPU"


def costs(trials: pd.DataFrame, failures: pd.DataFrame) -> pd.DataFrame:
    """Wall hours per model and depth (models as they appear, deepest first): finished trials by
    device kind (a trial packed onto a shared GPU counts its full wall time), and the hours of
    failed attempts."""
    ok = trials.assign(kind=trials["device"].map(device_kind), hours=trials["wall_s"] / 3600)
    bad = failures.assign(hours=failures["wall_s"] / 3600)
    keys = ["model", "layers"]
    table = ok.groupby(keys, sort=False).size().rename("trials").to_frame()
    for kind in ("GPU", "CPU"):
        hours = ok[ok["kind"] == kind].groupby(keys)["hours"].sum()
        table[f"{kind} hours"] = hours.reindex(table.index).fillna(0.0)
    table["failed"] = bad.groupby(keys).size().reindex(table.index).fillna(0).astype(int)
    table["failed hours"] = bad.groupby(keys)["hours"].sum().reindex(table.index).fillna(0.0)
    # As the tables: models in order of appearance, deepest first.
    models = list(dict.fromkeys(table.index.get_level_values("model")))
    table = table.reset_index()
    table = table.sort_values(
        ["model", "layers"], key=lambda c: c.map(models.index) if c.name == "model" else -c
    )
    total = {"model": "total", "layers": "", **{c: table[c].sum() for c in table if c not in keys}}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def failure_rows(failures: pd.DataFrame) -> list[list[str]]:
    cols = ["head", "model", "layers", "task", "seed", "trial_id", "error_type"]
    return [
        [*(str(r[c]) for c in cols), str(r["error_message"]).splitlines()[0][:ERROR_CHARS]]
        for _, r in failures.sort_values(["model", "layers", "task", "head", "seed"]).iterrows()
    ]


def protocol_rows(specs: Sequence[TrialSpec]) -> list[list[str]]:
    """One row per distinct data and training settings among `specs`: the paper protocol they
    follow (or what differs from the nearest), how many trials, and the settings."""
    groups: dict[str, list[TrialSpec]] = {}
    for s in specs:
        key = json.dumps([dataclasses.asdict(s.data), dataclasses.asdict(s.train)], sort_keys=True)
        groups.setdefault(key, []).append(s)
    rows = []
    for group in groups.values():
        found = {paper.protocol_of(s) for s in group}
        names = sorted({n for n, _ in found if n})
        label = ", ".join(names) if len(found) == 1 and names else "not the paper's"
        d, t = group[0].data, group[0].train
        rows.append([label, str(len(group)), describe_data(d), describe_train(t)])
    return rows


def provenance(grid: Grid, results: str, trials: pd.DataFrame, stale: int) -> list[list[str]]:
    """Where the numbers come from: code, grid, store, machines, package versions, dates."""
    versions: dict[str, set[str]] = {}
    for text in trials["versions_json"].dropna().unique():
        for pkg, v in json.loads(text or "{}").items():
            versions.setdefault(pkg, set()).add(str(v))
    devices = Counter(trials["device"].fillna("").replace("", "unknown"))
    grid_text = Path(grid.path).read_bytes()
    rows = [
        ["slimsweep", importlib.metadata.version("slimsweep")],
        ["grid file", f"{grid.path} (sha256 {hashlib.sha256(grid_text).hexdigest()[:12]})"],
        ["results", f"{results.rstrip('/')}/{grid.name}"],
        ["trials", f"{len(trials)} finished of {len(expand(grid))} planned"],
        ["first started", str(trials["started_at"].replace("", pd.NA).dropna().min())],
        ["last finished", str(trials["finished_at"].replace("", pd.NA).dropna().max())],
        ["devices", ", ".join(f"{d} × {n}" for d, n in devices.most_common())],
        ["versions", "; ".join(f"{p} {', '.join(sorted(v))}" for p, v in sorted(versions.items()))],
        ["report generated", datetime.now(UTC).isoformat(timespec="seconds")],
    ]
    if stale:
        rows.append(["not shown", f"{stale} stored trial(s) of an earlier version of the grid"])
    return rows


# --- the document: blocks rendered twice ---------------------------------------------------


@dataclass(frozen=True)
class Block:
    kind: str  # h1 | h2 | h3 | p | table | image | pre
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def _table(header: list[str], rows: list[list[str]]) -> Block:
    return Block("table", header=tuple(header), rows=tuple(tuple(r) for r in rows))


def _html_table(b: Block, images: dict[str, bytes]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_image(b: Block, images: dict[str, bytes]) -> str:
    data = base64.b64encode(images[b.text]).decode()
    return f'<img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'


HTML_BLOCKS: dict[str, Callable[[Block, dict[str, bytes]], str]] = {
    "h1": lambda b, _: f"<h1>{html.escape(b.text)}</h1>",
    "h2": lambda b, _: f"<h2>{html.escape(b.text)}</h2>",
    "h3": lambda b, _: f"<h3>{html.escape(b.text)}</h3>",
    "p": lambda b, _: f"<p>{html.escape(b.text)}</p>",
    "pre": lambda b, _: f"<pre>{html.escape(b.text)}</pre>",
    "table": _html_table,
    "image": _html_image,
}
MD_BLOCKS: dict[str, Callable[[Block], str]] = {
    "h1": lambda b: f"# {b.text}",
    "h2": lambda b: f"## {b.text}",
    "h3": lambda b: f"### {b.text}",
    "p": lambda b: b.text,
    "pre": lambda b: f"```\n{b.text}\n```",
    "table": lambda b: markdown_table(b.header, b.rows),
    "image": lambda b: f"![{b.text}]({b.text})",
}
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:110em}"
    "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}td:first-child{text-align:left}"
    "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
)


def to_html(title: str, blocks: list[Block], images: dict[str, bytes]) -> str:
    body = "\n".join(HTML_BLOCKS[b.kind](b, images) for b in blocks)
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def to_markdown(blocks: list[Block]) -> str:
    return "\n\n".join(MD_BLOCKS[b.kind](b) for b in blocks) + "\n"


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    html: Path
    markdown: Path
    images: tuple[Path, ...]


def report_blocks(
    grid: Grid, results: str, *, compare: bool = False, metric: str = "test_acc"
) -> tuple[list[Block], dict[str, bytes]]:
    """The report's content: blocks of text and tables, and PNG images by file name."""
    stored = load_rows(results, grid.name)
    trials = planned(stored.trials, grid)
    failures = planned(stored.failures, grid)
    if trials.empty and failures.empty:
        raise no_results(grid, results)
    epochs = stored.epochs
    epochs = epochs[epochs["trial_id"].isin(set(trials["trial_id"]))]
    label = METRICS[metric].label
    cells = aggregate(trials, metric, grid=grid, compare=compare)

    images: dict[str, bytes] = {"accuracy_vs_layers.png": png_bytes(accuracy_figure(cells, label))}
    models = [m.spec.name for m in grid.models]
    tasks = [t.name for t in grid.tasks]
    for head in grid.heads:
        if (epochs["head"] == head).any():
            images[f"curves_{head}.png"] = png_bytes(curves_figure(epochs, head, models, tasks))

    blocks = [
        Block("h1", f"slimsweep report: {grid.name}"),
        Block(
            "p",
            f"{len(trials)} of {len(expand(grid))} trials finished, "
            f"{len(failures)} failed. Metric: {label}.",
        ),
        Block("h2", "Protocol"),
        Block(
            "p",
            "The data and training settings of the finished trials, and which of the paper's "
            "protocols they follow (authors-code: the authors' released code, grids/paper.yaml; "
            "paper-text: the paper's text, grids/paper-text.yaml).",
        ),
        _table(
            ["protocol", "trials", "data", "training"],
            protocol_rows([TrialSpec.from_json(t) for t in trials["spec_json"]]),
        ),
        Block("h2", "Tables"),
    ]
    for head, table in to_tables(cells).items():
        blocks += [Block("h3", head), _table(*display_rows(table))]
    blocks += [Block("p", n) for n in notes(cells)]
    blocks += [
        Block("h2", "Accuracy against layers kept"),
        Block(
            "p",
            "Mean over seeds; the band is ± one standard deviation; dotted grey: the "
            "majority-class accuracy"
            + ("; dashed: the paper." if compare else ".")
            + f" The last column ({AVERAGE}) is the mean over tasks.",
        ),
        Block("image", "accuracy_vs_layers.png"),
        Block("h2", "Training curves"),
    ]
    curves = [n for n in images if n.startswith("curves_")]
    blocks += [Block("image", n) for n in curves] or [Block("p", "No epoch rows.")]
    cost = costs(trials, failures)
    blocks += [
        Block("h2", "Run costs"),
        Block(
            "p",
            "Wall hours of finished trials by device kind, and of failed attempts. "
            "Trials sharing a GPU each count their full wall time.",
        ),
        _table(list(cost.columns), [[_fmt(v) for v in r] for r in cost.itertuples(index=False)]),
        Block("h2", "Failures"),
    ]
    if failures.empty:
        blocks.append(Block("p", "None."))
    else:
        header = ["head", "model", "layers", "task", "seed", "trial", "error", "message"]
        blocks.append(_table(header, failure_rows(failures)))
    stale = len(stored.trials) - len(trials)
    blocks += [
        Block("h2", "Provenance"),
        _table(["", ""], provenance(grid, results, trials, stale)),
        Block("pre", Path(grid.path).read_text().rstrip("\n")),
    ]
    return blocks, images


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def build_report(
    grid: Grid, results: str, out: str | Path, *, compare: bool = False, metric: str = "test_acc"
) -> Report:
    """Writes `out/index.html` (self-contained), `out/report.md` and the PNGs it links."""
    blocks, images = report_blocks(grid, results, compare=compare, metric=metric)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in images.items():
        (out / name).write_bytes(data)
        paths.append(out / name)
    title = f"slimsweep report: {grid.name}"
    (out / "index.html").write_text(to_html(title, blocks, images))
    (out / "report.md").write_text(to_markdown(blocks))
    return Report(html=out / "index.html", markdown=out / "report.md", images=tuple(paths))

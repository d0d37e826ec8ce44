"""Results: the store's rows as DataFrames, the paper's tables, the comparison with the paper,
and SQL over it all.

Aggregation is a set of pure functions over the trial rows (`orchestrator.store` columns):

    load_rows(results, grid)      trials, epochs, failures of one grid (or of every grid under a
                                  results root), each trial once
    aggregate(df, metric, ...)    one row per cell: head x model x layers x task (and "average")
    paper_table(df, metric, ...)  the paper's shape: one wide table per head
    render(cells, fmt)            markdown | csv | json | latex

A cell is the mean over seeds, its sample standard deviation (ddof=1; NaN when one seed) and
the number of seeds behind it. Accuracies are shown in percent, as in the paper. A cell with
fewer seeds than expected is "incomplete": expected are the grid's seeds when a grid is given,
otherwise every seed found in the (filtered) results. The "average" column is the mean over
tasks of the per-task means (the paper's average), computed only when every task has a result.
Each cell also carries the mean majority-class accuracy of its trials (the chance level).
With the paper (`with_paper`), a cell gets the paper's number only where its trials follow
one of the paper's protocols (`orchestrator.paper`), and an average only the paper's mean over
the same tasks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
from slimsweep.orchestrator import paper
from slimsweep.orchestrator.grid import Grid, GridError
from slimsweep.orchestrator.plan import expand
from slimsweep.orchestrator.store import (
    AXIS_FIELDS,
    EPOCHS_SCHEMA,
    SPEC_COLUMNS,
    TRIALS_SCHEMA,
    Ignored,
    Store,
    StoreWarning,
    join,
    notice,
)
from slimsweep.workers.spec import HEADS, TrialSpec

AVERAGE = paper.AVERAGE
CELL_KEYS = ("head", "model", "layers", "task")
# Cell states and how the human formats mark them.
OK, INCOMPLETE, MISSING = "ok", "incomplete", "missing"
MARKS = {OK: "", INCOMPLETE: "*", MISSING: "—"}
FORMATS = ("markdown", "csv", "json", "latex")


@dataclass(frozen=True)
class Metric:
    label: str
    percent: bool  # stored as a fraction, shown (and compared with the paper) in percent


# Columns a table can aggregate. Only test_acc has reference numbers in the paper.
METRICS: dict[str, Metric] = {
    "test_acc": Metric("test accuracy (%)", True),
    "val_acc": Metric("best validation accuracy (%)", True),
    "majority_test_acc": Metric("majority-class test accuracy (%)", True),
    "best_epoch": Metric("best epoch", False),
    "epochs_run": Metric("epochs run", False),
    "wall_s": Metric("wall time (s)", False),
    "peak_mem_bytes": Metric("peak memory (bytes)", False),
    "train_tokens": Metric("training tokens", False),
}

AXES = tuple(f.name for f in AXIS_FIELDS)  # grid, model, layers, task, head, seed
# --where keys: the grid axes and the flattened spec settings (lr, precision, lm_loss, ...).
FILTER_KEYS = (*AXES, *SPEC_COLUMNS)
_FILTER_TYPES: dict[str, pa.DataType] = {k: TRIALS_SCHEMA.field(k).type for k in FILTER_KEYS}
MAJORITY = "majority class"  # the label of the baseline row in the human tables


# --- loading -------------------------------------------------------------------------------


def grid_stores(results: str, grid: str | None = None) -> dict[str, Store]:
    """{grid folder name: its store}: of one grid (`<results>/<grid>`), or of every grid
    folder under `results`."""
    if grid is not None:
        return {grid: Store(join(results, grid))}
    root = Store(results)
    root.check()
    infos = root.fs.get_file_info(pafs.FileSelector(root.root, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    return {n: Store(join(results, n)) for n in names}


@dataclass(frozen=True)
class Rows:
    """The rows of one grid or of every grid under a results root (see `load_rows`)."""

    trials: pd.DataFrame  # one row per finished trial
    epochs: pd.DataFrame  # the finished trials' epoch rows
    failures: pd.DataFrame  # failure rows of trials that have not succeeded since


def load_rows(results: str, grid: str | None = None) -> Rows:
    """Trials, epochs and failures of grid `grid` under the results root `results` (a folder
    or a pyarrow.fs URI), or of every grid there, in one read of each store. Each trial id of
    a grid counts once: in a store (see `Store.scan`) and across grid folders, where a copied
    folder's rows (their `grid` column names another folder that holds them too) are left
    out. What was left out is named once, in one StoreWarning line."""
    stores = grid_stores(results, grid)
    scanned = {name: store.scan(notify=False) for name, store in stores.items()}
    prefix = (lambda _: "") if grid is not None else (lambda name: f"{name}/")
    ignored = [
        dataclasses.replace(i, path=prefix(name) + i.path)
        for name, c in scanned.items()
        for i in c.ignored
    ]

    def frame(kind: str, schema: pa.Schema) -> pd.DataFrame:
        tables = [getattr(c, kind) for c in scanned.values()]
        df = pa.concat_tables([schema.remove_metadata().empty_table(), *tables]).to_pandas()
        folders = [name for name, c in scanned.items() for _ in range(getattr(c, kind).num_rows)]
        return df.assign(_folder=pd.Series(folders, dtype="object"))

    trials = frame("trials", TRIALS_SCHEMA)
    epochs = frame("epochs", EPOCHS_SCHEMA)
    failures = frame("failures", TRIALS_SCHEMA)
    # A (grid, trial id) seen in two folders: keep the folder named after the grid.
    trials = trials.sort_values("_folder", key=lambda f: f != trials["grid"], kind="stable")
    copies = trials.duplicated(["grid", "trial_id"])
    dropped = trials[copies]
    ignored += [
        Ignored(f"{folder}/trials/{trial_id}.parquet", f"a copy of grid '{g}''s trial")
        for folder, trial_id, g in zip(
            dropped["_folder"], dropped["trial_id"], dropped["grid"], strict=True
        )
    ]
    trials = trials[~copies].sort_index()
    kept = set(zip(trials["_folder"], trials["trial_id"], strict=True))
    epochs = epochs[_pairs(epochs, "_folder").isin(kept)]
    done = set(zip(trials["grid"], trials["trial_id"], strict=True))
    failures = failures[~_pairs(failures, "grid").isin(done)]
    failures = failures.drop_duplicates(["grid", "trial_id"])
    where = stores[grid].uri if grid is not None else results
    damaged = sum(len(c.damaged) for c in scanned.values())
    if line := notice(where, ignored, damaged):
        warnings.warn(line, StoreWarning, stacklevel=2)
    return Rows(
        trials=trials.drop(columns="_folder").reset_index(drop=True),
        epochs=epochs.drop(columns="_folder").reset_index(drop=True),
        failures=failures.drop(columns="_folder").reset_index(drop=True),
    )


def _pairs(df: pd.DataFrame, key: str) -> pd.Series:
    """(df[key], trial_id) per row, for membership tests."""
    return pd.Series(list(zip(df[key], df["trial_id"], strict=True)), index=df.index, dtype=object)


def load_results(results: str, grid: str | None = None) -> pd.DataFrame:
    """Finished trials (one row each): `load_rows(...).trials`."""
    return load_rows(results, grid).trials


def load_epochs(results: str, grid: str | None = None) -> pd.DataFrame:
    """Epoch rows (trial_id, epoch, train_loss, val_acc, wall_s and the axes) of finished
    trials: `load_rows(...).epochs`."""
    return load_rows(results, grid).epochs


def load_failures(results: str, grid: str | None = None) -> pd.DataFrame:
    """Failure rows of trials that have not succeeded since: `load_rows(...).failures`."""
    return load_rows(results, grid).failures


def no_results(grid: Grid, results: str) -> GridError:
    command = shlex.join(["slimsweep", "launch", grid.path, "--results", results])
    return GridError(
        f"no results for grid '{grid.name}' in {join(results, grid.name)}; run them with "
        f"`{command}`"
    )


def planned(df: pd.DataFrame, grid: Grid) -> pd.DataFrame:
    """The rows of the grid's current trials. A grid folder can also hold trials of an earlier
    version of the grid file (say another lr): same axes, another trial_id; they must not
    be averaged with the current ones."""
    ids = {s.trial_id for s in expand(grid)}
    return df[df["trial_id"].isin(ids)]


# --- filters -------------------------------------------------------------------------------


def parse_where(items: Sequence[str]) -> dict[str, list[str]]:
    """`["model=gpt2-xl", "layers=1,2"]` -> {"model": ["gpt2-xl"], "layers": ["1", "2"]}.
    A key given twice accumulates values; values of one key are alternatives (OR)."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise GridError(f"--where {item!r}: expected KEY=VALUE[,VALUE...], e.g. layers=1,2")
        out.setdefault(key.strip(), []).extend(v.strip() for v in value.split(","))
    return out


def _coerce(key: str, value: Any) -> Any:
    kind = _FILTER_TYPES[key]
    if not isinstance(value, str):
        return value
    try:
        if pa.types.is_integer(kind):
            return int(value)
        if pa.types.is_floating(kind):
            return float(value)
    except ValueError:
        raise GridError(f"--where {key}={value}: expected a number") from None
    if pa.types.is_boolean(kind):
        if value.lower() not in ("true", "false"):
            raise GridError(f"--where {key}={value}: expected true or false")
        return value.lower() == "true"
    return value


def check_filters(filters: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """Filter values typed like their columns; an unknown key is a GridError naming the keys."""
    out = {}
    for key, values in filters.items():
        if key not in _FILTER_TYPES:
            raise GridError(f"--where {key}: unknown key; valid keys: {', '.join(FILTER_KEYS)}")
        out[key] = [_coerce(key, v) for v in values]
    return out


def apply_filters(df: pd.DataFrame, filters: Mapping[str, Sequence[Any]]) -> pd.DataFrame:
    for key, values in check_filters(filters).items():
        df = df[df[key].isin(values)]
    return df


def metric_of(name: str) -> Metric:
    if name not in METRICS:
        raise GridError(f"--metric {name}: unknown metric; valid metrics: {', '.join(METRICS)}")
    return METRICS[name]


# --- the layout of the tables --------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What the tables show: heads, rows (model, layers), task columns and expected seeds."""

    heads: tuple[str, ...]
    rows: tuple[tuple[str, int], ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]


def _keep(values: Iterable[Any], key: str, filters: Mapping[str, Sequence[Any]]) -> list[Any]:
    return [v for v in values if key not in filters or v in filters[key]]


def _head_order(head: str) -> tuple[int, str]:
    return (HEADS.index(head) if head in HEADS else len(HEADS), head)


def layout(df: pd.DataFrame, grid: Grid | None, filters: Mapping[str, Sequence[Any]]) -> Layout:
    """The grid's axes (in grid order) when given, else what the results hold: heads in the
    paper's order, models by name, layers deepest first (as the paper's tables)."""
    if grid is not None:
        heads = list(grid.heads)
        rows = [(m.spec.name, k) for m in grid.models for k in m.layers]
        tasks = [t.name for t in grid.tasks]
        seeds = list(grid.seeds)
    else:
        heads = sorted(df["head"].unique(), key=_head_order)
        pairs = df[["model", "layers"]].drop_duplicates()
        rows = sorted(
            zip(pairs.model, pairs.layers.astype(int), strict=True), key=lambda r: (r[0], -r[1])
        )
        tasks = sorted(df["task"].unique())
        seeds = sorted(int(s) for s in df["seed"].unique())
    rows = [r for r in rows if r[0] in filters.get("model", [r[0]])]
    rows = [r for r in rows if r[1] in filters.get("layers", [r[1]])]
    return Layout(
        heads=tuple(_keep(heads, "head", filters)),
        rows=tuple(rows),
        tasks=tuple(_keep(tasks, "task", filters)),
        seeds=tuple(_keep(seeds, "seed", filters)),
    )


def _check_axis_values(
    df: pd.DataFrame, grid: Grid | None, filters: Mapping[str, Sequence[Any]]
) -> None:
    """A filter on an axis that matches no value of the grid or results is a typo: say so."""
    known: dict[str, set[Any]] = {k: set(df[k].dropna().unique()) for k in AXES}
    if grid is not None:
        known["grid"].add(grid.name)
        known["model"] |= {m.spec.name for m in grid.models}
        known["layers"] |= {k for m in grid.models for k in m.layers}
        known["task"] |= {t.name for t in grid.tasks}
        known["head"] |= set(grid.heads)
        known["seed"] |= set(grid.seeds)
    for key, values in filters.items():
        if key in known and not known[key] & set(values):
            valid = ", ".join(str(v) for v in sorted(known[key], key=str)) or "none"
            raise GridError(
                f"--where {key}={','.join(map(str, values))}: no such {key}; valid values: {valid}"
            )


# --- aggregation ---------------------------------------------------------------------------


def human_count(n: float | None) -> str:
    """1_557_611_200 -> '1.6B', 819_000_000 -> '819M', as the paper writes parameter counts."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    for unit, base in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= base:
            v = n / base
            return f"{v:.1f}{unit}" if round(v, 1) < 10 else f"{v:.0f}{unit}"
    return str(int(n))


def _specs_by_cell(
    data: pd.DataFrame, grid: Grid | None
) -> dict[tuple[str, str, int, str], list[TrialSpec]]:
    """The trial specs behind each cell: the grid's (finished or not) when given, else those of
    the stored rows."""
    specs = (
        expand(grid)
        if grid is not None
        else [TrialSpec.from_json(t) for t in data["spec_json"].drop_duplicates()]
    )
    out: dict[tuple[str, str, int, str], list[TrialSpec]] = {}
    for s in specs:
        out.setdefault((s.head, s.model.name, s.layers, s.task.name), []).append(s)
    return out


def _params_label(model: str, layers: int, count: float | None, sources: set[str]) -> str:
    """The paper's label for a row of the paper's model (as printed, e.g. 112M where the count
    rounds to 113M); else the count, human-formatted."""
    label = paper.params_labels().get((model, layers))
    if label and sources and sources <= set(paper.PAPER_SOURCES.get(model, ())):
        return label
    return human_count(count)


def aggregate(
    df: pd.DataFrame,
    metric: str = "test_acc",
    *,
    grid: Grid | None = None,
    filters: Mapping[str, Sequence[Any]] | None = None,
    compare: bool = False,
) -> pd.DataFrame:
    """One row per cell (head, model, layers, task; task "average" for the row average) with
    columns params (the paper's label for the paper's models, else the median n_params of the
    cell's head/model/layers, formatted), mean, std (ddof=1), n (seeds with a value),
    n_expected, missing_seeds, status (ok | incomplete | missing), majority (the mean
    majority-class test accuracy of the cell's trials, for accuracy metrics) and, with
    `compare`, protocol, paper, diff (mean - paper, in points) and no_paper (why a cell has no
    paper number); see `with_paper`.

    With a grid, only the grid's current trials count (see `planned`) and every cell of the
    grid appears, missing or not."""
    m = metric_of(metric)
    if compare and metric != "test_acc":
        raise GridError(
            f"--compare paper: the paper reports test accuracy only; drop --metric "
            f"{metric} or use --metric test_acc"
        )
    filters = check_filters(filters or {})
    if grid is not None:
        df = planned(df, grid)
    _check_axis_values(df, grid, filters)
    data = apply_filters(df, filters)
    lay = layout(data, grid, filters)
    scale = 100.0 if m.percent else 1.0
    values = data.dropna(subset=[metric])
    per_seed = values.groupby(list(CELL_KEYS))
    stats = per_seed[metric].agg(["mean", "std", "count"])
    seeds = per_seed["seed"].agg(lambda s: {int(x) for x in s})
    majority = data.groupby(list(CELL_KEYS))["majority_test_acc"].mean() * 100
    params = data.groupby(["head", "model", "layers"])["n_params"].median()
    by_cell = _specs_by_cell(data, grid)
    sources: dict[str, set[str]] = {}
    for (_, model, _, _), specs in by_cell.items():
        sources.setdefault(model, set()).update(s.model.source for s in specs)
    expected = set(lay.seeds)

    records = []
    for head in lay.heads:
        for model, layers in lay.rows:
            row = []
            for task in lay.tasks:
                key = (head, model, layers, task)
                n = int(stats["count"].get(key, 0))
                have = seeds.get(key, set())
                missing = tuple(sorted(expected - have))
                status = MISSING if n == 0 else INCOMPLETE if missing else OK
                row.append(
                    {
                        "task": task,
                        "mean": stats["mean"].get(key, math.nan) * scale,
                        "std": stats["std"].get(key, math.nan) * scale,
                        "n": n,
                        "missing_seeds": missing,
                        "status": status,
                        "majority": majority.get(key, math.nan) if m.percent else math.nan,
                    }
                )
            row.append(_average(row))
            label = _params_label(
                model, layers, params.get((head, model, layers)), sources.get(model, set())
            )
            for cell in row:
                cell.update(head=head, model=model, layers=layers, params=label)
                cell["n_expected"] = len(expected)
            records.extend(row)
    columns = [
        *CELL_KEYS,
        "params",
        "mean",
        "std",
        "n",
        "n_expected",
        "missing_seeds",
        "status",
        "majority",
    ]
    cells = pd.DataFrame.from_records(records, columns=columns)
    cells["layers"] = cells["layers"].astype("int64")
    cells["n"] = cells["n"].astype("int64")
    return with_paper(cells, by_cell) if compare else cells


def _mean_of_all(values: Sequence[float]) -> float:
    """The mean of `values`; NaN when there are none or any is NaN."""
    if not values or any(pd.isna(v) for v in values):
        return math.nan
    return sum(values) / len(values)


def _average(row: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's average: the mean of the task means; none if a task has no result. Its n
    is the fewest seeds behind any task; it is incomplete when any task is."""
    statuses = {c["status"] for c in row}
    if not row or MISSING in statuses:
        mean, status = math.nan, MISSING
    else:
        mean = sum(c["mean"] for c in row) / len(row)
        status = INCOMPLETE if INCOMPLETE in statuses else OK
    missing = sorted({s for c in row for s in c["missing_seeds"]})
    return {
        "task": AVERAGE,
        "mean": mean,
        "std": math.nan,
        "n": min((c["n"] for c in row), default=0),
        "missing_seeds": tuple(missing),
        "status": status,
        "majority": _mean_of_all([c["majority"] for c in row]),
    }


# --- the paper -----------------------------------------------------------------------------


def _cell_protocol(specs: Sequence[TrialSpec]) -> tuple[str, str]:
    """(paper protocol name, "") when every trial of a cell follows the same one; else ("",
    why not)."""
    found = {paper.protocol_of(s) for s in specs}
    if not found:
        return "", "no trial ran"
    if len(found) == 1:
        return found.pop()
    names = {name for name, _ in found}
    if len(names) > 1 or "" in names:
        return "", "its trials ran under different protocols"
    return names.pop(), ""


def _not_in_paper(ref: pd.DataFrame, head: str, model: str, layers: int, task: str) -> str:
    """Why the paper's tables have no such cell ("" when they have it; the average counts
    as present: its number comes from the row's tasks)."""
    models = list(dict.fromkeys(ref.model))
    tasks = list(dict.fromkeys(ref.task[ref.task != AVERAGE]))
    if model not in models:
        return f"the paper has no model {model} (it reports {', '.join(models)})"
    depths = list(dict.fromkeys(ref.layers[ref.model == model]))
    if layers not in depths:
        shown = ", ".join(map(str, depths))
        return f"the paper has no {model} with {layers} layers (it reports {shown})"
    if task != AVERAGE and task not in tasks:
        return f"the paper has no task {task} (it reports {', '.join(tasks)})"
    if head not in set(ref["head"]):
        return f"the paper has no head {head}"
    return ""


def with_paper(
    cells: pd.DataFrame, specs: Mapping[tuple[str, str, int, str], Sequence[TrialSpec]]
) -> pd.DataFrame:
    """Adds, per cell: `protocol` (the paper protocol its trials follow, "" if none), `paper`
    (the paper's number for the same head, model, depth and task, only where the protocol is
    the paper's; for the average, the mean of the paper's numbers over the tasks shown, only
    where every shown task has one), `diff` = mean - paper, and `no_paper`: why a cell has no
    paper number ("" where it has one)."""
    ref = paper.reference()
    ref_value = {
        (h, m, k, t): v
        for h, m, k, t, v in zip(
            ref["head"], ref.model, ref.layers, ref.task, ref.value, strict=True
        )
        if t != AVERAGE
    }
    out = cells.copy()
    protocol, value, why = [], [], []
    for c in out.itertuples(index=False):
        key = (c.head, c.model, c.layers, c.task)
        name, reason = ("", "") if c.task == AVERAGE else _cell_protocol(specs.get(key, ()))
        reason = _not_in_paper(ref, c.head, c.model, c.layers, c.task) or reason
        protocol.append(name)
        value.append(math.nan if reason else ref_value.get(key, math.nan))
        why.append(reason)
    out["protocol"], out["paper"], out["no_paper"] = protocol, value, why
    rows = ["head", "model", "layers"]
    for _, group in out.groupby(rows, sort=False):
        tasks_part = group[group["task"] != AVERAGE]
        avg = group.index[group["task"] == AVERAGE]
        names = set(tasks_part["protocol"])
        out.loc[avg, "paper"] = _mean_of_all(list(tasks_part["paper"]))
        out.loc[avg, "protocol"] = names.pop() if len(names) == 1 else ""
    out["diff"] = out["mean"] - out["paper"]
    return out


# --- the paper's table shape ---------------------------------------------------------------


def to_tables(cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per head, a wide table: index (model, layers, params), columns (task, field) with the
    tasks in order and "average" last; fields mean, std, n, status, majority [, paper, diff]."""
    fields = [c for c in ("mean", "std", "n", "status", "majority", "paper", "diff") if c in cells]
    tables = {}
    for head in dict.fromkeys(cells["head"]):
        c = cells[cells["head"] == head]
        tasks = list(dict.fromkeys(c["task"]))
        rows = list(dict.fromkeys(zip(c.model, c.layers, c.params, strict=True)))
        wide = c.set_index(["model", "layers", "params", "task"])[fields].unstack("task")
        wide = wide.swaplevel(axis=1).reindex(
            index=pd.MultiIndex.from_tuples(rows, names=["model", "layers", "params"]),
            columns=pd.MultiIndex.from_product([tasks, fields], names=["task", "field"]),
        )
        tables[head] = wide
    return tables


def paper_table(
    df: pd.DataFrame,
    metric: str = "test_acc",
    *,
    grid: Grid | None = None,
    filters: Mapping[str, Sequence[Any]] | None = None,
    compare: bool = False,
) -> dict[str, pd.DataFrame]:
    """The paper's Tables II-IV for any results: `to_tables(aggregate(...))`."""
    return to_tables(aggregate(df, metric, grid=grid, filters=filters, compare=compare))


# --- rendering -----------------------------------------------------------------------------


def _num(x: float, signed: bool = False) -> str:
    return "" if pd.isna(x) else f"{x:+.2f}" if signed else f"{x:.2f}"


def cell_text(cell: Mapping[str, Any]) -> str:
    """'85.34 ± 0.52 (5)', '85.34 (1)*' (one seed, fewer than expected), '—' (no result);
    with the paper: '... [paper 85.34, +0.00]'."""
    if cell["status"] == MISSING:
        text = MARKS[MISSING]
    else:
        spread = "" if pd.isna(cell["std"]) else f" ± {cell['std']:.2f}"
        text = f"{cell['mean']:.2f}{spread} ({cell['n']}){MARKS[cell['status']]}"
    if "paper" in cell and not pd.isna(cell["paper"]):
        text += f" [paper {_num(cell['paper'])}, {_num(cell['diff'], signed=True) or '—'}]"
    return text


def majority_row(table: pd.DataFrame) -> list[float] | None:
    """Per task of a wide table, the mean majority-class accuracy of its cells (the chance level
    its accuracies read against); None when the table has none (a metric other than accuracy)."""
    tasks = list(dict.fromkeys(table.columns.get_level_values("task")))
    if "majority" not in table.columns.get_level_values("field"):
        return None
    values = [table[(t, "majority")].astype(float).mean() for t in tasks]
    return None if all(pd.isna(v) for v in values) else values


def display_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """A wide table (see `to_tables`) as header and rows of cell texts, for people; the last
    row is the majority-class baseline when the table has one."""
    tasks = list(dict.fromkeys(table.columns.get_level_values("task")))
    header = ["model", "layers", "params", *tasks]
    rows = []
    for (model, layers, params), r in table.iterrows():
        rows.append([model, str(layers), params, *(cell_text(r[t]) for t in tasks)])
    baseline = majority_row(table)
    if baseline is not None:
        rows.append([MAJORITY, "", "", *(_num(v) or MARKS[MISSING] for v in baseline)])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _rows_text(keys: Sequence[tuple[str, str, int]]) -> str:
    """(head, model, layers) keys as 'gpt2-xl 48, 1; opt-1.3b 24 (prompt-lm, vanilla-cls)'."""
    by_model: dict[str, list[int]] = {}
    for _, model, layers in keys:
        by_model.setdefault(model, [])
        if layers not in by_model[model]:
            by_model[model].append(layers)
    heads = ", ".join(dict.fromkeys(h for h, _, _ in keys))
    rows = "; ".join(f"{m} {', '.join(map(str, ks))}" for m, ks in by_model.items())
    return f"{rows} ({heads})"


def paper_notes(cells: pd.DataFrame) -> list[str]:
    """With the paper: what the brackets mean, which paper protocols the compared cells
    follow, one line per reason why cells have no paper number, and the paper's known errors
    among the rows shown."""
    out = []
    compared = cells[cells["paper"].notna()]
    if len(compared):
        out.append(
            "[paper X, ±D]: the paper's number and ours minus the paper's, in points; the "
            "paper's average is the mean of its numbers over the tasks shown."
        )
        names = ", ".join(sorted(set(compared["protocol"]) - {""}))
        out.append(f"Compared cells follow the paper's protocol: {names}.")
    reasons: dict[str, list[tuple[str, str, int]]] = {}
    for c in cells[cells["no_paper"] != ""].itertuples(index=False):
        keys = reasons.setdefault(c.no_paper, [])
        if (c.head, c.model, c.layers) not in keys:
            keys.append((c.head, c.model, c.layers))
    out += [f"No paper number for {_rows_text(k)}: {why}." for why, k in reasons.items()]
    shown: dict[tuple[str, str, int], set[str]] = {}
    for c in cells.itertuples(index=False):
        shown.setdefault((c.head, c.model, c.layers), set()).add(c.task)
    return out + paper.errata_notes(shown)


def notes(cells: pd.DataFrame) -> list[str]:
    """What the marks mean, which cells are incomplete or missing, the baseline row, and with
    the paper `paper_notes`."""
    expected = int(cells["n_expected"].max()) if len(cells) else 0
    out = [
        "Each cell: mean ± sample standard deviation (ddof=1; none for one seed) over seeds, "
        "(n) the number of seeds. The average is the mean of the task means.",
    ]
    tasks = cells[cells["task"] != AVERAGE]
    incomplete = int((tasks["status"] == INCOMPLETE).sum())
    missing = int((tasks["status"] == MISSING).sum())
    if incomplete:
        out.append(f"*: {incomplete} cell(s) have fewer seeds than the {expected} expected.")
    if missing:
        out.append(f"—: {missing} cell(s) have no result (no average for their rows).")
    if "majority" in cells and cells["majority"].notna().any():
        out.append(
            f"{MAJORITY}: the accuracy of always predicting the most frequent class of each "
            "trial's test rows, averaged: the chance level to read the accuracies against."
        )
    if "paper" in cells:
        out += paper_notes(cells)
    return out


def _flat(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per head x model x layers, columns `<task>.<field>`: for spreadsheets."""
    parts = []
    for head, table in to_tables(cells).items():
        wide = table.copy()
        wide.columns = [f"{t}.{f}" for t, f in wide.columns]
        parts.append(wide.reset_index().assign(head=head))
    if not parts:
        return pd.DataFrame(columns=["head", "model", "layers", "params"])
    flat = pd.concat(parts, ignore_index=True)
    return flat[["head", *(c for c in flat.columns if c != "head")]]


def _latex_escape(text: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
    ):
        text = text.replace(a, b)
    return text


def _latex_cell(cell: Mapping[str, Any]) -> str:
    if cell["status"] == MISSING:
        text = "--"
    else:
        spread = "" if pd.isna(cell["std"]) else f" \\pm {cell['std']:.2f}"
        star = "^{*}" if cell["status"] == INCOMPLETE else ""
        text = f"${cell['mean']:.2f}{spread}{star}$"
    if "paper" in cell and not pd.isna(cell["paper"]):
        text += f" ({_num(cell['paper'])}, {_num(cell['diff'], signed=True) or '--'})"
    return text


def _latex(cells: pd.DataFrame, metric: str) -> str:
    out = []
    for head, table in to_tables(cells).items():
        tasks = list(dict.fromkeys(table.columns.get_level_values("task")))
        out.append(f"% {head}: {METRICS[metric].label}, mean $\\pm$ std over seeds")
        out.append("\\begin{tabular}{lrr" + "r" * len(tasks) + "}")
        out.append("\\toprule")
        out.append(" & ".join(["Model", "Layers", "Params", *map(_latex_escape, tasks)]) + r" \\")
        out.append("\\midrule")
        for (model, layers, params), r in table.iterrows():
            row = [_latex_escape(model), str(layers), params, *(_latex_cell(r[t]) for t in tasks)]
            out.append(" & ".join(row) + r" \\")
        baseline = majority_row(table)
        if baseline is not None:
            out.append("\\midrule")
            row = [MAJORITY, "", "", *(_num(v) or "--" for v in baseline)]
            out.append(" & ".join(row) + r" \\")
        out.extend(["\\bottomrule", "\\end{tabular}", ""])
    return "\n".join(out)


def _json(cells: pd.DataFrame) -> str:
    records = cells.assign(missing_seeds=cells["missing_seeds"].map(list)).to_dict("records")
    clean = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
        for r in records
    ]
    return json.dumps(clean, indent=1)


def render(cells: pd.DataFrame, fmt: str = "markdown", metric: str = "test_acc") -> str:
    """Cells as text. markdown and latex round to 2 decimals for people; csv (wide, one row per
    head x model x layers) and json (one record per cell) keep full precision."""
    if fmt == "csv":
        return _flat(cells).to_csv(index=False)
    if fmt == "json":
        return _json(cells)
    if fmt == "latex":
        return _latex(cells, metric)
    if fmt != "markdown":
        raise GridError(f"--format {fmt}: unknown format; valid formats: {', '.join(FORMATS)}")
    out = []
    for head, table in to_tables(cells).items():
        out.append(f"### {head}: {METRICS[metric].label}\n")
        out.append(markdown_table(*display_rows(table)) + "\n")
    out.extend(notes(cells))
    return "\n".join(out)


# --- SQL -----------------------------------------------------------------------------------


def connect(results: str, grid: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with tables `trials`, `epochs` and `failed` (the store's rows,
    read through the store, so local folders and object-store URIs behave the same), and
    nothing else: it reaches no file, URL or extension (COPY ... TO, EXPORT DATABASE,
    ATTACH of a file, read_csv, INSTALL/LOAD fail), and that setting is locked."""
    con = duckdb.connect()
    rows = load_rows(results, grid)
    sources = {
        "trials": (rows.trials, TRIALS_SCHEMA),
        "epochs": (rows.epochs, EPOCHS_SCHEMA),
        "failed": (rows.failures, TRIALS_SCHEMA),
    }
    for name, (df, schema) in sources.items():
        # Through Arrow with the store's schema, so empty tables keep their column types.
        table = pa.Table.from_pandas(df, schema=schema.remove_metadata(), preserve_index=False)
        con.register(name, table)
    # A read-only window on the results: DuckDB's own switches, not a parse of the SQL.
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def query(sql: str, results: str, grid: str | None = None) -> pd.DataFrame:
    """Run one SQL statement over `trials`, `epochs` and `failed`; a DuckDB error becomes a
    one-line GridError with DuckDB's message."""
    con = connect(results, grid)
    try:
        return con.execute(sql).df()
    except duckdb.Error as e:
        first = str(e).splitlines()[0]
        raise GridError(f"SQL error: {first} (tables: trials, epochs, failed)") from None
    finally:
        con.close()


QUERY_FORMATS = ("table", "csv", "json", "markdown")


def render_frame(df: pd.DataFrame, fmt: str = "table") -> str:
    """A query result as text."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=1, date_format="iso")
    if fmt == "markdown":
        return markdown_table(list(df.columns), df.astype(str).values.tolist())
    return df.to_string(index=False)

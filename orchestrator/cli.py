"""The `slimsweep` command: argument parsing and printing only.

Exit codes (EXIT_CODES): user errors (`GridError`, `SpecError`) print as one line on stderr
and exit 2; any other exception is the CLI's last line of defence: one line and exit 3
(`--debug` adds the traceback). Heavy modules (torch, ray) are imported inside the commands
that need them, so `plan` stays instant.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

from slimsweep.orchestrator.grid import Grid, GridError, load_grid
from slimsweep.orchestrator.plan import (
    check_label_words,
    describe_data,
    describe_fusion,
    describe_train,
    expand,
    gpu_hours,
    train_rows,
    unpinned,
)
from slimsweep.workers.spec import SpecError, TrialSpec, check_name, cut
from slimsweep.workers.tables import SELECTIONS

DEFAULT_RESULTS = "results"
USER_ERROR, UNEXPECTED_ERROR, INTERRUPTED = 2, 3, 130
EXIT_CODES = """exit codes:
  0    done
  1    trials failed or are missing (launch, status)
  2    a mistake in the grid or the command line: one line names it and the fix
  3    an unexpected error: one line; rerun with --debug for the traceback
  130  interrupted"""


def results_root(args: argparse.Namespace, grid: Grid | None = None) -> str:
    """--results wins over the grid's `results:`, which wins over ./results."""
    root = args.results or (grid.results if grid else None) or DEFAULT_RESULTS
    check_folder(root, "--results" if args.results else "results folder")
    return root


def check_folder(path: str, what: str) -> None:
    """GridError when a local folder to write in is a file, or lies under one (a URI is the
    store's to check)."""
    if "://" in path and not path.startswith("file://"):
        return
    p = Path(path.removeprefix("file://")).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise GridError(
                    f"{what} {path}: {q} is a file, not a folder; give a folder (it is created "
                    f"when missing)"
                )
            return


def _hours(h: float) -> str:
    return f"{h:.1f}" if h >= 0.05 else "< 0.1"


def paper_protocol(specs: list[TrialSpec]) -> str:
    """Which of the paper's protocols the trials follow, for `plan`."""
    from slimsweep.orchestrator.paper import protocol_of

    found = {protocol_of(s) for s in specs}
    names = sorted({name for name, _ in found if name})
    if len(found) == 1 and names:
        return f"the paper's ({names[0]}): --compare paper compares these trials"
    reasons = sorted({why for _, why in found if why})
    return reasons[0] if reasons else "not the paper's: its trials follow different protocols"


def cmd_plan(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    check_label_words(grid)
    specs = expand(grid)
    loose = unpinned(grid)
    if loose:
        print(
            f"slimsweep: warning: no revision pinned for {', '.join(loose)}: a hub update "
            f"changes their trials under the same ids (rows record model_commit and "
            f"dataset_fingerprint); pin with `revision:`",
            file=sys.stderr,
        )
    if args.format == "table":
        print(f"grid '{grid.name}' ({grid.path}): {len(specs)} trials")
        for m in grid.models:
            depth = f" of {m.depth}" if m.depth else ""
            print(f"  model {m.spec.name:<14} {m.spec.source}  layers {list(m.layers)}{depth}")
        print(f"  tasks  {', '.join(t.name for t in grid.tasks)}")
        print(f"  heads  {', '.join(grid.heads)}")
        print(f"  selections  {', '.join(s.method for s in grid.selections)}")
        cal = next(
            (s.calibration for s in grid.selections if SELECTIONS[s.method].calibrated), None
        )
        if cal is not None:
            source = f"{cal.source} {cal.name}".strip()
            print(f"  calibration  {source}, {cal.n_examples} texts of <= {cal.max_tokens} tokens")
        print(f"  finetunes  {', '.join(f.label for f in grid.finetunes)}")
        print(f"  seeds  {', '.join(map(str, grid.seeds))}")
        per_model = Counter(s.model.name for s in specs)
        print("  trials per model: " + ", ".join(f"{k} {v}" for k, v in per_model.items()))
        print(f"  data      {describe_data(grid.data)}")
        print(f"  training  {describe_train(grid.train)}")
        sizes = ", ".join(f"{t.name} {train_rows(t, grid.data)}" for t in grid.tasks)
        print(f"  training rows per trial: {sizes}")
        print(f"  protocol  {paper_protocol(specs)}")
        print(f"  fusion    {describe_fusion(grid.runtime.fuse, specs)}")
        cost = gpu_hours(specs)
        unknown = f"; {cost.unknown} trials of unknown shape not counted" if cost.unknown else ""
        print(
            f"  GPU-hours, an estimate (one trial at a time on an H100, fp32 step costs "
            f"measured there): at most {_hours(cost.hours)} (all {grid.train.epochs} epochs), "
            f"{_hours(cost.hours_at_20)} if early stopping ends trials at epoch 20{unknown}"
        )
        return 0
    rows = [s.axes() for s in specs]
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    else:
        print(",".join(rows[0]))
        for r in rows:
            print(",".join(str(v) for v in r.values()))
    return 0


def find_trial(grid: Grid, trial_id: str) -> TrialSpec:
    matches = [s for s in expand(grid) if s.trial_id.startswith(trial_id)]
    if len(matches) != 1:
        what = "no trial" if not matches else f"{len(matches)} trials"
        raise GridError(
            f"{grid.path}: {what} with id '{trial_id}'; list ids with `slimsweep plan "
            f"{grid.path} --format csv`"
        )
    return matches[0]


def grid_results(args: argparse.Namespace, grid: Grid) -> str:
    """The grid's own results folder or URI: <results root>/<grid name>."""
    from slimsweep.orchestrator.store import join

    folder = join(results_root(args, grid), grid.name)
    check_folder(folder, "results folder")
    return folder


def rerun_hint(args: argparse.Namespace, grid: Grid, resume: bool) -> str:
    """The command that runs the grid's missing (`resume`: and failed) trials, carrying the
    --results it was given, quoted for a shell: it can be copied as it is."""
    words = ["slimsweep", "launch", grid.path]
    words += ["--results", args.results] if args.results else []
    words += ["--resume"] if resume else []
    what = "to rerun the failed trials" if resume else "to run the missing trials"
    return f"{what}: {shlex.join(words)}"


def cmd_launch(args: argparse.Namespace) -> int:
    from slimsweep.orchestrator.launch import launch

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise GridError(f"--max-concurrent {args.max_concurrent}: give at least 1")
    grid = load_grid(args.grid)
    check_label_words(grid)
    summary = launch(
        grid,
        grid_results(args, grid),
        address=args.address,
        max_concurrent=args.max_concurrent,
        resume=args.resume,
        dry_run=args.dry_run,
        rerun=frozenset(find_trial(grid, t).trial_id for t in args.rerun),
    )
    if not summary.dry_run:
        print(
            f"grid '{grid.name}': {summary.total - summary.missing}/{summary.total} trials done"
            f"{f', {summary.failed} failed in this launch' if summary.failed else ''}"
        )
        if summary.unsent:
            print(
                f"{summary.unsent} finished trial record(s) wait in {summary.unsent_dir} (the "
                f"store did not answer); the next launch uploads them"
            )
        if summary.failed or summary.failed_before_skipped:
            print(rerun_hint(args, grid, resume=True))
        elif summary.missing:
            print(rerun_hint(args, grid, resume=False))
    return summary.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from slimsweep.orchestrator.launch import status

    grid = load_grid(args.grid)
    st = status(grid, grid_results(args, grid))
    print(f"grid '{st.grid}': results in {st.results}")
    print(f"  done {st.done}/{st.total}, failed {len(st.failures)}, missing {st.missing}")
    for trial_id, error in st.failures:
        print(f"  failed {trial_id}: {error}")
    for trial_id, problem in st.damaged:
        print(f"  damaged {trial_id}: {problem}; the next launch reruns it")
    if st.ignored:
        print(f"  {st.ignored}")
    if st.unsent:
        print(f"  {st.unsent} finished trial(s) wait in {st.unsent_dir}; the next launch uploads")
    if st.running:
        print(f"  a launch is running: {st.running}")
    if st.failures:
        print(rerun_hint(args, grid, resume=True))
    elif st.missing:
        print(rerun_hint(args, grid, resume=False))
    return st.exit_code


def read_spec(path: str) -> TrialSpec:
    """A TrialSpec from a JSON file (as `TrialSpec.to_json()` writes it)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec file ({e.strerror})") from e
    try:
        spec = TrialSpec.from_json(text)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SpecError(
            f"{path}: not a TrialSpec JSON ({type(e).__name__}: {cut(str(e))}); write one with "
            f"TrialSpec.to_json()"
        ) from e
    try:
        spec.validate()
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from e
    return spec


def cmd_run_trial(args: argparse.Namespace) -> int:
    import dataclasses

    from slimsweep.orchestrator.launch import encode_record
    from slimsweep.workers.run import run_trial

    if bool(args.spec) == bool(args.grid or args.trial) or (args.grid and not args.trial):
        raise GridError("run-trial: give a grid and --trial ID, or --spec FILE (not both)")
    spec = read_spec(args.spec) if args.spec else find_trial(load_grid(args.grid), args.trial)
    # In-process: nobody to hand restart checkpoints to, so write none.
    spec = dataclasses.replace(spec, runtime=dataclasses.replace(spec.runtime, checkpoint_every=0))
    # With --json, stdout carries only the record; progress goes to stderr.
    log = sys.stderr if args.json else sys.stdout
    a = spec.axes()
    print(
        f"trial {spec.trial_id}: model {a['model']} layers {a['layers']} task {a['task']} "
        f"head {a['head']} seed {a['seed']} selection {a['selection']} finetune {a['finetune']}",
        file=log,
        flush=True,
    )

    def on_epoch(row, _checkpoint_dir: str | None) -> None:
        print(
            f"  epoch {row.epoch}: train loss {row.train_loss:.4f}  val acc {row.val_acc:.3f}"
            f"  ({row.wall_s:.1f} s)",
            file=log,
            flush=True,
        )

    result, epochs = run_trial(spec, on_epoch=on_epoch)
    if args.json:
        print(json.dumps(json.loads(encode_record(result, epochs)), indent=1))
        return 0
    per_class = ", ".join(f"{x:.3f}" for x in result.test_acc_per_class)
    print(
        f"best epoch {result.best_epoch} of {result.epochs_run}: val acc {result.val_acc:.3f}, "
        f"test acc {result.test_acc:.3f} (per class {per_class}; majority class "
        f"{result.majority_test_acc:.3f})"
    )
    print(
        f"  {result.n_params / 1e6:.1f} M params ({result.n_trainable_params / 1e6:.1f} M "
        f"trained), kept layers {list(result.kept_layers)}, "
        f"train/valid/test {result.n_train}/{result.n_valid}/{result.n_test}, "
        f"{result.train_tokens} train tokens"
    )
    print(
        f"  {result.wall_s:.1f} s on {result.device}, peak memory "
        f"{result.peak_mem_bytes / 2**30:.2f} GiB"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slimsweep.orchestrator.export import export_trial

    grid = load_grid(args.grid)
    spec = find_trial(grid, args.trial)
    done = export_trial(grid, grid_results(args, grid), spec.trial_id, args.out)
    print(
        f"trial {done.trial_id}: {done.n_params / 1e6:.1f} M params written to {done.out} "
        f"(model card README.md); load it with transformers.{done.auto_class}.from_pretrained"
    )
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from slimsweep.orchestrator import results as res

    grid = load_grid(args.grid)
    root = results_root(args, grid)
    df = res.load_results(root, grid.name)
    if df.empty:
        raise res.no_results(grid, root)
    cells = res.aggregate(
        df,
        args.metric,
        grid=grid,
        filters=res.parse_where(args.where),
        compare=args.compare == "paper",
    )
    print(res.render(cells, args.format, args.metric).rstrip("\n"))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from slimsweep.orchestrator import results as res

    # --grid: a grid file (its name and `results:`) or just a grid name under the results root.
    grid, name = None, args.grid
    if args.grid and (args.grid.endswith((".yaml", ".yml")) or "/" in args.grid):
        grid = load_grid(args.grid)
        name = grid.name
    elif name is not None:
        check_name(name, "--grid")  # a folder under the results root, never above it
    out = res.query(args.sql, results_root(args, grid), name)
    print(res.render_frame(out, args.format).rstrip("\n"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from slimsweep.orchestrator.report import build_report

    grid = load_grid(args.grid)
    check_folder(args.out, "--out")
    report = build_report(grid, results_root(args, grid), args.out, compare=args.compare == "paper")
    print(f"report: {report.html} (and {report.markdown.name}, {len(report.images)} images)")
    return 0


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


RESULTS_HELP = (
    "results root, a folder or URI (s3://, gs://); default: the grid's results:, else ./results"
)


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command (`slimsweep --debug plan G`, `... G --debug`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, also print the Python traceback",
    )
    p = argparse.ArgumentParser(
        prog="slimsweep",
        description="Layer-pruning sweeps of LLMs: a YAML grid of trials run on Ray Tune, each "
        "result a Parquet row.",
        epilog=_examples(
            "slimsweep plan grids/demo.yaml",
            "slimsweep launch grids/demo.yaml",
            "slimsweep status grids/demo.yaml",
            "slimsweep results grids/demo.yaml",
            "slimsweep report grids/demo.yaml --out reports/demo",
        )
        + "\n\n"
        + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"slimsweep {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, *examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=_examples(*examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    sp = command(
        "plan",
        "expand a grid into trials and summarise them; checks the grid, starts nothing",
        "slimsweep plan grids/paper.yaml",
        "slimsweep plan grids/paper.yaml --format csv > trials.csv",
    )
    sp.add_argument("grid", help="the grid file (YAML; docs/grid-format.md)")
    sp.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default="table",
        help="table: counts per axis (default); json, csv: one row per trial with its id",
    )
    sp.set_defaults(func=cmd_plan)

    sp = command(
        "launch",
        "run the grid's missing trials on Ray Tune",
        "slimsweep launch grids/demo.yaml                 # on a private local Ray",
        "slimsweep launch grids/paper.yaml --dry-run      # what would run",
        "slimsweep launch grids/paper.yaml --resume       # also rerun failed trials",
        "slimsweep launch grids/paper.yaml --address auto --results s3://bucket/sweeps",
    )
    sp.add_argument("grid", help="the grid file (YAML; docs/grid-format.md)")
    sp.add_argument(
        "--address",
        help="join a running Ray cluster: auto (on its head) or HOST:PORT; default: start a "
        "private local Ray for this launch (RAY_ADDRESS is ignored)",
    )
    sp.add_argument("--results", help=RESULTS_HELP)
    sp.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at once")
    sp.add_argument("--resume", action="store_true", help="also rerun failed trials")
    sp.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
    sp.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="ID",
        help="run this trial again even if done (an id or unique prefix; repeatable), e.g. "
        "after setting runtime.save_model: best to keep its weights",
    )
    sp.set_defaults(func=cmd_launch)

    sp = command(
        "status",
        "done / failed / missing trials of a grid, with each failure's error",
        "slimsweep status grids/demo.yaml",
        "slimsweep status grids/paper.yaml --results s3://bucket/sweeps",
    )
    sp.add_argument("grid", help="the grid file (YAML)")
    sp.add_argument("--results", help=RESULTS_HELP)
    sp.set_defaults(func=cmd_status)

    sp = command(
        "run-trial",
        "run one trial in this process and print its record",
        "slimsweep run-trial grids/demo.yaml --trial 8376026e   # an id prefix from `plan`",
        "slimsweep run-trial --spec trial.json --json",
    )
    sp.add_argument("grid", nargs="?", help="the grid file holding the trial")
    sp.add_argument("--trial", help="the trial's id (a unique prefix is enough)")
    sp.add_argument("--spec", help="a TrialSpec JSON file instead of a grid and --trial")
    sp.add_argument("--json", action="store_true", help="print the record as JSON")
    sp.set_defaults(func=cmd_run_trial)

    sp = command(
        "export",
        "write a trial's pruned model as a Hugging Face folder with a model card",
        "slimsweep export grids/demo.yaml --trial 3f2a --out models/best",
        "slimsweep export grids/paper.yaml --trial e87e7a1d --out /tmp/gpt2xl-2 --results s3://bucket/sweeps",
    )
    sp.add_argument("grid", help="the grid file holding the trial")
    sp.add_argument("--trial", required=True, help="the trial's id (a unique prefix is enough)")
    sp.add_argument("--out", required=True, help="a new or empty folder to write the model to")
    sp.add_argument("--results", help=RESULTS_HELP)
    sp.set_defaults(func=cmd_export)

    sp = command(
        "results",
        "the paper's tables for a grid: mean ± std over seeds",
        "slimsweep results grids/paper.yaml",
        "slimsweep results grids/paper.yaml --where head=prompt-lm --format latex",
        "slimsweep results grids/paper.yaml --compare paper",
    )
    sp.add_argument("grid", help="the grid file (YAML)")
    sp.add_argument("--results", help=RESULTS_HELP)
    sp.add_argument(
        "--format",
        choices=("markdown", "csv", "json", "latex"),
        default="markdown",
        help="output format (default markdown)",
    )
    sp.add_argument("--metric", default="test_acc", help="test_acc (default), val_acc, ...")
    sp.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=V[,V]",
        help="keep only rows whose axis KEY is one of the values; repeatable",
    )
    sp.add_argument(
        "--compare", choices=("paper",), help="add the paper's numbers and the differences"
    )
    sp.set_defaults(func=cmd_results)

    sp = command(
        "query",
        "SQL (DuckDB) over tables trials, epochs, failed",
        'slimsweep query "SELECT model, layers, avg(test_acc) FROM trials GROUP BY ALL"',
        'slimsweep query "SELECT * FROM failed" --grid grids/paper.yaml --format csv',
    )
    sp.add_argument("sql", help="one SQL statement over the tables trials, epochs and failed")
    sp.add_argument("--results", help=RESULTS_HELP)
    sp.add_argument("--grid", help="one grid only: a grid file or a grid name")
    sp.add_argument(
        "--format",
        choices=("table", "csv", "json", "markdown"),
        default="table",
        help="output format (default table)",
    )
    sp.set_defaults(func=cmd_query)

    sp = command(
        "report",
        "an HTML + Markdown report: tables, plots, costs",
        "slimsweep report grids/demo.yaml --out reports/demo",
        "slimsweep report grids/paper.yaml --out reports/paper --compare paper",
    )
    sp.add_argument("grid", help="the grid file (YAML)")
    sp.add_argument("--out", required=True, help="folder for index.html, report.md, PNGs")
    sp.add_argument("--results", help=RESULTS_HELP)
    sp.add_argument(
        "--compare", choices=("paper",), help="add the paper's numbers and the differences"
    )
    sp.set_defaults(func=cmd_report)
    return p


def _version() -> str:
    try:
        return importlib.metadata.version("slimsweep")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def one_line_warnings() -> None:
    """Python warnings as `slimsweep: warning: <message>`, one line without the source path,
    each distinct message once per command (a store's notice comes from every reader a
    command uses)."""
    seen: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        text = " ".join(str(message).split()) or category.__name__
        if text not in seen:
            seen.add(text)
            print(f"slimsweep: warning: {text}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():
            if not debug:
                one_line_warnings()
            return args.func(args)
    except (GridError, SpecError) as e:
        if debug:
            traceback.print_exc()
        print(f"slimsweep: error: {e}", file=sys.stderr)
        return USER_ERROR
    except BrokenPipeError:
        # The reader went away (`slimsweep plan ... | head`): stop quietly, and keep Python
        # from failing again while it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("slimsweep: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # the last line of defence: no user sees a traceback unasked
        if debug:
            traceback.print_exc()
        first = (str(e).strip() or "no message").splitlines()[0]
        hint = "" if debug else "; rerun with --debug for the traceback"
        print(
            f"slimsweep: unexpected error: {type(e).__name__}: {cut(first)}{hint} (if it is "
            f"not your environment, it is a bug: please report it)",
            file=sys.stderr,
        )
        return UNEXPECTED_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""The `slimsweep` command: argument parsing and printing only.

User errors (`GridError`, `SpecError`) print as one line on stderr and exit 2. Heavy modules
(torch, ray) are imported inside the commands that need them, so `plan` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from slimsweep.orchestrator.grid import Grid, GridError, load_grid
from slimsweep.orchestrator.plan import expand
from slimsweep.workers.spec import SpecError, TrialSpec

DEFAULT_RESULTS = "results"


def results_root(args: argparse.Namespace, grid: Grid | None = None) -> str:
    """--results wins over the grid's `results:`, which wins over ./results."""
    return args.results or (grid.results if grid else None) or DEFAULT_RESULTS


def cmd_plan(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    specs = expand(grid)
    if args.format == "table":
        print(f"grid '{grid.name}' ({grid.path}): {len(specs)} trials")
        for m in grid.models:
            depth = f" of {m.depth}" if m.depth else ""
            print(f"  model {m.spec.name:<14} {m.spec.source}  layers {list(m.layers)}{depth}")
        print(f"  tasks  {', '.join(t.name for t in grid.tasks)}")
        print(f"  heads  {', '.join(grid.heads)}")
        print(f"  seeds  {', '.join(map(str, grid.seeds))}")
        per_model = Counter(s.model.name for s in specs)
        print("  trials per model: " + ", ".join(f"{k} {v}" for k, v in per_model.items()))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimsweep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("plan", help="expand a grid into trials and summarise them")
    sp.add_argument("grid")
    sp.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sp.set_defaults(func=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (GridError, SpecError) as e:
        print(f"slimsweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

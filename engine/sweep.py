"""Many runs of the pipeline, one output_dir each, then one report: a VTAB-1k or few-shot sweep.

    python -m engine.sweep --config configs/vtab1k.yaml --grid data.task=@vtab1k --set search.max_params=290000
    python -m engine.sweep --config configs/fewshot.yaml --grid data.dataset=oxford_pets,food-101 \\
        --grid data.shots=1,2,4,8,16 --grid data.seed=0,1,2
    torchrun --nproc_per_node 8 -m engine.sweep --config configs/vtab1k.yaml --grid data.task=@vtab1k

Each combination of the --grid values runs train.py, search.py and retrain.py (or --stages) in this
process, with `output_dir` set to `<config's output_dir>/<values joined by '-'>`. Every stage
resumes or skips what is done, so a stopped sweep is continued by running the same command. A
combination whose stage fails is recorded and the sweep goes on with the next one; a combination
whose config does not validate stops the sweep before anything runs (all of them are listed); a signal
(Ctrl-C, SIGTERM) stops the whole sweep after the running stage saved its checkpoint. At the end
the runs are tabulated by `engine.report`; the exit status is 1 if any combination failed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from . import distributed as dist
from .cli import main as run_stage
from .config import load_config
from .report import VTAB_GROUPS, ReportError, find_runs, report

# Named lists for --grid values.
NAMED_VALUES = {"@vtab1k": [task for tasks in VTAB_GROUPS.values() for task in tasks]}
STAGES = ("train", "search", "retrain")


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid {item}: expected key.path=v1,v2,... (or a named list: {', '.join(NAMED_VALUES)})")
        listed = NAMED_VALUES.get(values) or [v for v in values.split(",") if v]
        if values.startswith("@") and values not in NAMED_VALUES:
            raise ValueError(f"--grid {item}: unknown named list {values!r}; known: {', '.join(NAMED_VALUES)}")
        grid.append((key.strip(), listed))
    return grid


def _fill(setting: str, chosen: dict[str, str]) -> str:
    """A --set value with {key} replaced by this combination's value of that grid key, so that runs
    can point at each other: retrain.subnet=runs/vtab1k/{data.task}/search/result.yaml."""
    for key, value in chosen.items():
        setting = setting.replace("{" + key + "}", value)
    return setting


def _settings(fixed: list[str], grid, values, base: Path) -> list[str]:
    """The --set list of one combination: the fixed ones (placeholders filled), its grid values, its output_dir."""
    chosen = {key: value for (key, _), value in zip(grid, values)}
    return [*[_fill(s, chosen) for s in fixed], *[f"{k}={v}" for k, v in chosen.items()], f"output_dir={base / '-'.join(values)}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values to sweep (repeatable: every combination runs); @vtab1k = the 19 VTAB-1k tasks")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = parser.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
        # {key} placeholders are filled per combination; the base output_dir does not depend on them
        base = Path(load_config(args.config, [s for s in args.set if "{" not in s]).output_dir)
    except ValueError as err:  # ConfigError included: its message names the file and every key
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not grid:
        parser.error("--grid is required (e.g. --grid data.task=@vtab1k)")
    combos = list(itertools.product(*[values for _, values in grid]))
    # Every combination's config is checked before anything runs: a typo must not surface hours in.
    problems = []
    for values in combos:
        try:
            load_config(args.config, _settings(args.set, grid, values, base))
        except ValueError as err:  # one line per problem, each naming its combination
            problems += [f"error: [{'-'.join(values)}] {line}" for line in str(err).splitlines()]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    failed: list[str] = []
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)  # torchrun: rank 0 speaks
    with dist.held_process_group():
        code = _run_all(args, grid, combos, base, failed, say)
    if code:
        return code
    try:
        runs, unfinished = find_runs([str(base)])
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if runs or unfinished:
        say(report(runs, unfinished)[0], end="")
    if failed:
        say(f"[sweep] {len(failed)} of {len(combos)} combinations failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def _run_all(args, grid, combos, base: Path, failed: list[str], say) -> int:
    """The stages of every combination; a signal's exit code if one stopped it, else 0."""
    for n, values in enumerate(combos, 1):
        name = "-".join(values)
        sets = _settings(args.set, grid, values, base)
        say(f"[sweep {n}/{len(combos)}] {name}", file=sys.stderr, flush=True)
        for stage in args.stages:
            code = run_stage(stage, ["--config", args.config, *[a for s in sets for a in ("--set", s)]])
            if code > 128:  # stopped by a signal after saving: the user wants the sweep to stop too
                say(f"[sweep] stopped at {name} ({stage}); run the same command to continue", file=sys.stderr)
                return code
            if code != 0:
                failed.append(f"{name} ({stage}.py exited with {code})")
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())

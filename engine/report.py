"""One table of many finished runs: a VTAB-1k or few-shot sweep, as the paper reports it.

    python -m engine.report runs/vtab1k                  # every run under it (each task's output_dir)
    python -m engine.report runs/vtab1k runs/lora --json runs/report.json

A run is finished when its `retrain/metrics.json` exists; runs without one are listed as unfinished.
Runs of the same task and method (other seeds) are averaged, with the sample standard deviation.
VTAB-1k tasks are grouped natural / specialized / structured; the paper's "average" is the mean of
the three group means, and the mean over all tasks is shown beside it. A group missing some of its
tasks shows how many it holds, e.g. `80.1 (5/7)`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from supernet import WriteError, atomic_write_text

# VTAB-1k's 19 tasks under the folder names of the common layout (NOAH's), in the order papers print them.
VTAB_GROUPS = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"),
}
# Other spellings of the same tasks found in other layouts.
VTAB_ALIASES = {"cifar100": "cifar", "flowers102": "oxford_flowers102", "pets": "oxford_iiit_pet",
                "oxford_pet": "oxford_iiit_pet", "pcam": "patch_camelyon", "retinopathy": "diabetic_retinopathy",
                "clevr_distance": "clevr_dist", "dsprites_location": "dsprites_loc",
                "dsprites_orientation": "dsprites_ori", "smallnorb_azimuth": "smallnorb_azi",
                "smallnorb_elevation": "smallnorb_ele"}
GROUP_OF = {task: group for group, tasks in VTAB_GROUPS.items() for task in tasks}


class ReportError(ValueError):
    """A path or run file that cannot be read; the message names it."""


@dataclass
class Run:
    path: str
    kind: str
    task: str  # VTAB-1k task, few-shot dataset, image folder's name, or "demo"
    shots: int | None
    seed: int  # the few-shot list seed, else the retraining seed
    method: str
    adapter_params: int
    top1: float
    top5: float | None
    evaluations: dict[str, float]  # evaluate.py --out <run>/retrain/evaluate.json: folder name (or split) -> top-1


def _read(path: Path, parse):
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ReportError(f"{path}: cannot read ({' '.join(str(err).split())})") from None


def method_label(run_dir: Path, cfg: dict, metrics: dict) -> str:
    """glora with its space's name and the budget its search had (runs under other budgets are other
    methods); a preset by name, lora with its rank."""
    method = metrics.get("method", "glora")
    if method == "lora":
        return f"lora{(cfg.get('retrain') or {}).get('rank', 8)}"
    if method != "glora":
        return method
    space = cfg.get("space")
    label = "glora " + (Path(space).stem if isinstance(space, str) else "(inline space)")
    own = metrics.get("subnet_from_search", True)
    # another run's search result (retraining seeds of one search) counts as that search's method
    result = run_dir / "search" / "result.yaml" if own else Path(str(metrics.get("subnet", "")))
    doc = _read(result, yaml.safe_load) if result.name == "result.yaml" and result.is_file() else None
    if isinstance(doc, dict) and "budget" in doc:
        budget = (doc["budget"] or {}).get("max_params")
        return label + (f" <={budget:,}" if budget else "")
    return label if own else label + " (given sub-network)"


def load_run(run_dir: Path) -> Run:
    metrics_path = run_dir / "retrain" / "metrics.json"
    metrics = _read(metrics_path, json.loads)
    config_path = next((p for p in (run_dir / "retrain" / "config.yaml", run_dir / "config.yaml") if p.is_file()), None)
    if config_path is None:
        raise ReportError(f"{run_dir}: retrain/config.yaml not found beside {metrics_path.name}")
    cfg = _read(config_path, yaml.safe_load)
    if not isinstance(metrics, dict) or "test_top1" not in metrics or not isinstance(cfg, dict):
        raise ReportError(f"{metrics_path}: not a retrain metrics file (no test_top1)")
    data = cfg.get("data") or {}
    kind = data.get("kind", "demo")
    shots, seed = None, (cfg.get("retrain") or {}).get("seed", 0)
    if kind == "vtab1k":
        task = VTAB_ALIASES.get(data.get("task"), data.get("task"))
    elif kind == "fewshot":  # the few-shot list seed, not the retraining one
        task, shots, seed = data.get("dataset"), data.get("shots"), data.get("seed", 0)
    elif kind == "imagefolder":
        task = Path(str(data.get("root"))).name
    else:
        task = kind
    return Run(str(run_dir), kind, str(task), shots, int(seed), method_label(run_dir, cfg, metrics),
               int(metrics.get("adapter_params", 0)), float(metrics["test_top1"]), metrics.get("test_top5"),
               _evaluations(run_dir / "retrain" / "evaluate.json"))


def _evaluations(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    results = _read(path, json.loads)
    if not isinstance(results, list) or not all(isinstance(r, dict) and "top1" in r for r in results):
        raise ReportError(f"{path}: expected evaluate.py's --out list of results")
    return {(Path(r["folder"]).name if "folder" in r else f"{r.get('split', 'test')} split"): float(r["top1"])
            for r in results}


def find_runs(paths: list[str]) -> tuple[list[Run], list[str]]:
    """Finished runs and the directories of unfinished ones under the given paths."""
    run_dirs: set[Path] = set()
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise ReportError(f"{given}: not a directory")
        for cfg_file in root.rglob("config.yaml"):
            stage = cfg_file.parent
            run_dirs.add(stage.parent if stage.name in ("retrain", "search") else stage)
    finished, unfinished = [], []
    for run_dir in sorted(run_dirs):
        if (run_dir / "retrain" / "metrics.json").is_file():
            finished.append(load_run(run_dir))
        else:
            unfinished.append(str(run_dir))
    return finished, unfinished


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.1f}" + (f"±{std:.1f}" if std is not None else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def vtab_summary(runs: list[Run]) -> tuple[str, dict]:
    by_method: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    params: dict[str, list[int]] = defaultdict(list)
    for run in runs:
        by_method[run.method][run.task].append(run.top1)
        params[run.method].append(run.adapter_params)
    present = [t for tasks in VTAB_GROUPS.values() for t in tasks if any(t in m for m in by_method.values())]
    others = sorted({t for m in by_method.values() for t in m} - set(GROUP_OF))
    header = ["method", "adapter params (mean)", *present, *others, *VTAB_GROUPS, "average (of groups)", "mean (of tasks)"]
    rows, summary = [], {}
    for method in sorted(by_method):
        tasks = {t: statistics.fmean(v) for t, v in by_method[method].items()}
        groups = {}
        cells = [method, f"{statistics.fmean(params[method]):,.0f}"]
        cells += [_cell(by_method[method][t]) if t in tasks else "" for t in present + others]
        for group, members in VTAB_GROUPS.items():
            held = [tasks[t] for t in members if t in tasks]
            groups[group] = statistics.fmean(held) if held else None
            cells.append("" if not held else f"{groups[group]:.1f}" + ("" if len(held) == len(members) else f" ({len(held)}/{len(members)})"))
        complete = all(t in tasks for t in GROUP_OF)
        average = statistics.fmean(groups.values()) if complete else None
        mean = statistics.fmean(tasks.values()) if tasks else None
        cells += [f"{average:.1f}" if average is not None else "needs all 19 tasks",
                  f"{mean:.1f}" + ("" if complete else f" ({len(tasks)} tasks)")]
        rows.append(cells)
        summary[method] = {"tasks": tasks, "groups": groups, "average_of_groups": average, "mean_of_tasks": mean}
    return _table(header, rows), summary


def fewshot_summary(runs: list[Run]) -> tuple[str, dict]:
    cells: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cells[(run.task, run.method)][run.shots].append(run.top1)
    shots = sorted({run.shots for run in runs})
    rows, summary = [], {}
    for (dataset, method), by_shots in sorted(cells.items()):
        rows.append([dataset, method, *[_cell(by_shots[k]) if k in by_shots else "" for k in shots]])
        summary[f"{dataset}/{method}"] = {str(k): _mean_std(v)[0] for k, v in by_shots.items()}
    return _table(["dataset", "method", *[f"{k}-shot" for k in shots]], rows), summary


def evaluations_summary(runs: list[Run]) -> tuple[str, dict]:
    """Rows of (data, method), a column per evaluated folder or split: the domain generalisation table."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        data = run.task + (f" {run.shots}-shot" if run.kind == "fewshot" else "")
        for name, top1 in run.evaluations.items():
            cells[(data, run.method)][name].append(top1)
    names = sorted({name for run in runs for name in run.evaluations})
    rows = [[data, method, *[_cell(v[n]) if n in v else "" for n in names]] for (data, method), v in sorted(cells.items())]
    summary = {f"{data}/{method}": {n: _mean_std(v[n])[0] for n in v} for (data, method), v in cells.items()}
    return _table(["data", "method", *names], rows), summary


def report(runs: list[Run], unfinished: list[str]) -> tuple[str, dict]:
    parts = ["## Runs", _table(["run", "data", "method", "adapter params", "test top-1", "top-5"], [
        [r.path, r.task + (f" {r.shots}-shot seed {r.seed}" if r.kind == "fewshot" else f" seed {r.seed}"), r.method,
         f"{r.adapter_params:,}", f"{r.top1:.2f}", f"{r.top5:.2f}" if r.top5 is not None else ""] for r in runs])]
    result: dict = {"runs": [asdict(r) for r in runs], "unfinished": unfinished}
    vtab = [r for r in runs if r.kind == "vtab1k"]
    if vtab:
        table, result["vtab1k"] = vtab_summary(vtab)
        parts += ["## VTAB-1k (test top-1 %, mean±std over runs of a task)", table]
    fewshot = [r for r in runs if r.kind == "fewshot"]
    if fewshot:
        table, result["fewshot"] = fewshot_summary(fewshot)
        parts += ["## Few-shot (test top-1 %, mean±std over list seeds)", table]
    evaluated = [r for r in runs if r.evaluations]
    if evaluated:
        table, result["evaluations"] = evaluations_summary(evaluated)
        parts += ["## Other evaluations (evaluate.py --out <run>/retrain/evaluate.json; top-1 %, mean±std over runs)", table]
    if unfinished:
        parts += [f"Unfinished (no retrain/metrics.json): {len(unfinished)}", *[f"- {u}" for u in unfinished]]
    return "\n\n".join(parts) + "\n", result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="directories holding runs (searched recursively)")
    parser.add_argument("--json", metavar="FILE", help="also write every run and the summaries as JSON")
    args = parser.parse_args(argv)
    try:
        runs, unfinished = find_runs(args.paths)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs and not unfinished:
        print(f"error: {', '.join(args.paths)}: no runs found (a run is an output_dir with config.yaml)", file=sys.stderr)
        return 2
    text, result = report(runs, unfinished)
    print(text, end="")
    if args.json:
        try:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        except WriteError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

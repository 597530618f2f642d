"""The comparison's report, generated from each track's results.json.

Per track (``results-<track>[-quick].md`` and ``.png`` beside the JSON): the replica's tables
(benchmarks/minivtab/report.py: per task and group, mean ± std over seeds, few-shot and DG, lr
selection) with the track's groups and method order; each GLoRA variant against the LoRA whose
count is its budget *and* against the best rival that fits the same budget (win / loss only beyond
the larger seed spread); the LoRA-family option chosen for GLoRA on val200; the CPU seconds of
each method's whole pipeline; the methods the track refuses.

Across tracks (``docs/benchmarks/compare-results.md`` and the README's headline block, full mode
only): one row per method with its mean over each track's tasks, its adapter parameters and its CPU
seconds per task.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from benchmarks.minivtab import report as R

from .tracks import get_track

PAIRS = [("glora_small", "lora4"), ("glora_middle", "lora4"), ("glora_large", "lora8"), ("glora_large_bestopt", "lora8"),
         ("glora_large_inherited", "lora8")]
REPO = Path(__file__).resolve().parents[2]
README_BEGIN, README_END = "<!-- compare:headline:begin -->", "<!-- compare:headline:end -->"


def is_glora(method: str, spec: dict | None) -> bool:
    return bool(spec and "space" in spec and spec.get("space") != "noah")


def method_summary(data: dict) -> dict[str, dict]:
    """Per method on the VTAB-style tasks: mean adapter params, the mean over tasks of the seed
    means, the spread over seeds of the per-seed task average (where every task has that seed),
    the tasks it ran on, and the mean CPU seconds of one task's pipeline."""
    runs = [r for k, r in data.get("runs", {}).items() if k.startswith("vtab/") and "test_top1" in r]
    out = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        mr = [r for r in runs if r["method"] == m]
        tasks = list(dict.fromkeys(r["task"] for r in mr))
        per_task = {t: statistics.mean(r["test_top1"] for r in mr if r["task"] == t) for t in tasks}
        per_seed = []
        for s in sorted({r["seed"] for r in mr}):
            v = [r["test_top1"] for r in mr if r["seed"] == s]
            if len(v) == len(tasks):
                per_seed.append(statistics.mean(v))
        cpu = [c["cpu_s"] for k, c in data.get("cost", {}).items() if k.split("/")[-1] == m]
        out[m] = {"params": statistics.mean(r["adapter_params"] for r in mr), "mean": statistics.mean(per_task.values()),
                  "std": statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0, "per_task": per_task, "tasks": tasks,
                  "cpu_s": statistics.mean(cpu) if cpu else None}
    return out


def val_score(data: dict, method: str, tasks: list[str]) -> float | None:
    """A method's mean over ``tasks`` of its val200 top-1 at its chosen lr (the lr selection's best):
    how the best rival is picked, so that no choice in the report looks at a test split."""
    v = []
    for t in tasks:
        sel = data.get("lr_selection", {}).get(f"{t}/{method}")
        if not sel:
            return None
        v.append(max(sel["val_top1"].values()))
    return statistics.mean(v) if v else None


def best_rival(data: dict, methods: dict[str, dict], summ: dict, cap: int, tasks: list[str]) -> str | None:
    """The non-GLoRA method within ``cap`` adapter parameters that ran every task of ``tasks`` and
    scores best on val200 (at its chosen lr, averaged over the tasks)."""
    rivals = {m: val_score(data, m, tasks) for m in summ if not is_glora(m, methods.get(m)) and m in methods
              and summ[m]["params"] <= cap and set(tasks) <= set(summ[m]["tasks"])}
    rivals = {m: v for m, v in rivals.items() if v is not None}
    return max(rivals, key=rivals.get) if rivals else None


def best_rival_table(data: dict, methods: dict[str, dict], tasks: list[str]) -> str:
    """Each GLoRA variant against the strongest non-GLoRA method whose adapter count fits the
    variant's budget (its budget LoRA's count), picked on val200 over the tasks both ran."""
    summ = method_summary(data)
    budgets = data.get("meta", {}).get("budgets", {})
    runs = [r for k, r in data.get("runs", {}).items() if k.startswith("vtab/") and "test_top1" in r]
    head = ["GLoRA variant", "budget", "best rival in budget (params)"] + tasks + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, spec in methods.items():
        if not is_glora(g, spec) or g not in summ or spec.get("budget") not in budgets:
            continue
        cap = budgets[spec["budget"]]
        gt = summ[g]["tasks"]
        best = best_rival(data, methods, summ, cap, gt)
        if best is None:
            continue
        cells = [g, f"{spec['budget']} = {cap:,}", f"{best} ({summ[best]['params']:,.0f})"]
        for t in tasks:
            a = [r["test_top1"] for r in runs if r["method"] == g and r["task"] == t]
            b = [r["test_top1"] for r in runs if r["method"] == best and r["task"] == t]
            cells.append(R._verdict(a, b) if a and b else "–")
        d = summ[g]["mean"] - statistics.mean(summ[best]["per_task"][t] for t in gt)
        cells.append(f"{d:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def verdict(data: dict, methods: dict[str, dict], tasks: list[str]) -> str:
    """In words, from the numbers: for each GLoRA variant run on every task, its wins, ties and
    losses against the best rival in its budget, and where it comes closest or wins most."""
    summ = method_summary(data)
    budgets = data.get("meta", {}).get("budgets", {})
    runs = [r for k, r in data.get("runs", {}).items() if k.startswith("vtab/") and "test_top1" in r]
    out = []
    for g, spec in methods.items():
        if not is_glora(g, spec) or g not in summ or spec.get("budget") not in budgets or set(summ[g]["tasks"]) != set(tasks):
            # (a set: the runs list tasks in the order they finished, not the track's)
            continue
        best = best_rival(data, methods, summ, budgets[spec["budget"]], tasks)
        if best is None:
            continue
        words, diffs = {"win": 0, "tie": 0, "loss": 0}, {}
        for t in tasks:
            a = [r["test_top1"] for r in runs if r["method"] == g and r["task"] == t]
            b = [r["test_top1"] for r in runs if r["method"] == best and r["task"] == t]
            v = R._verdict(a, b)
            diffs[t] = statistics.mean(a) - statistics.mean(b)
            for w in words:
                words[w] += v.endswith(w)
        top = max(diffs, key=diffs.get)
        d = summ[g]["mean"] - summ[best]["mean"]
        beats = "beats" if words["win"] and not words["loss"] and d > 0 else "does not beat"
        out.append(f"- **{g}** {beats} {best} ({summ[best]['params']:,.0f} params) within {spec['budget']}'s count: "
                   f"{d:+.1f} points on the mean, {words['win']} win(s), {words['tie']} tie(s), {words['loss']} loss(es) over "
                   f"{len(tasks)} tasks; its best task is {top} ({diffs[top]:+.1f}).")
    return "\n".join(out)


def ablation_table(data: dict, methods: dict[str, dict]) -> str:
    """GLoRA-large against the same with a longer supernet, retrained and inherited, on the tasks
    the longer one ran: test top-1 (mean ± std over seeds) and the supernet's epochs."""
    runs = [r for k, r in data.get("runs", {}).items() if k.startswith("vtab/") and "test_top1" in r]
    long = [m for m, s in methods.items() if is_glora(m, s) and s.get("tasks")]
    tasks = sorted({r["task"] for r in runs if r["method"] in long})
    if not tasks:
        return ""
    epochs = data.get("meta", {}).get("settings", {}).get("epochs", 0)
    head = ["method", "supernet epochs"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ["glora_large", "glora_large_inherited", *long]:
        owner = methods[m].get("base", m) if methods[m].get("inherit") else m
        x = methods.get(owner, {}).get("supernet_x", 1)
        cells = [m, f"{round(epochs * x)}"]
        for t in tasks:
            cells.append(R._fmt(R._ms([r["test_top1"] for r in runs if r["method"] == m and r["task"] == t])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def screen_note(screen: dict | None) -> str:
    """The options a screen kept and dropped, with the val200 scores of LoRA with each."""
    if not screen:
        return ""
    val, ref = screen["val_top1"], screen["preset"]
    opts = {k.removeprefix(f"{ref}_"): v for k, v in val.items() if k != ref}
    dropped = [o for o in opts if o not in screen["kept"]]
    fmt = lambda os: ", ".join(f"{o} {opts[o]:.1f}" for o in os) or "none"  # noqa: E731
    return f" (screened on {ref}'s val200, {val[ref]:.1f}: tried {fmt(screen['kept'])}; not tried {fmt(dropped)})"


def total_cpu_s(data: dict) -> float:
    """CPU seconds of every run once (cells share supernets, lr selections and seed runs): the
    supernets and searches, the lr-selection and option-score runs, the seeds' runs and the few-shot
    runs with their own supernets."""
    cpu = 0.0
    methods = {x.get("method") for x in data.get("runs", {}).values()}
    for k, r in data.get("runs", {}).items():
        if k.endswith("/supernet"):
            cpu += r.get("supernet_cpu_s", 0.0) + r.get("search_cpu_s", 0.0)
        elif k.startswith("fewshot/"):
            cpu += r.get("cpu_s", 0.0) + r.get("supernet_cpu_s", 0.0) + r.get("search_cpu_s", 0.0)
        elif r.get("chosen") not in methods:
            cpu += r.get("cpu_s", 0.0)  # a seed run a select_lora method took from its base is counted there
    cpu += sum(sum(s.get("cpu_s", {}).values()) for s in data.get("lr_selection", {}).values())
    cpu += sum(s.get("cpu_s", 0.0) for s in data.get("option_scores", {}).values())
    return cpu


def cost_note(data: dict) -> str:
    meta = data.get("meta", {})
    inv = meta.get("invocations") or []
    if not inv:
        return ""
    wall = sum(i["wall_s"] for i in inv)
    cpu = total_cpu_s(data)
    return (f"\nWall time of this track{'' if meta.get('finished') else ' so far'}: {wall / 3600:.2f} h over {len(inv)} invocation(s), "
            f"{meta.get('workers', '?')} single-threaded workers; CPU seconds recorded in the cells: {cpu:,.0f}"
            f"{'' if meta.get('finished') else ' (not finished)'}.\n")


def write_report(results_path: Path) -> str:
    results_path = Path(results_path)
    data = json.loads(results_path.read_text())
    meta = data.get("meta", {})
    track = get_track(meta.get("track", "vit"))
    methods = track.methods
    md = R.write_report(results_path, track.groups, list(methods), PAIRS, fewshot_name=track.fewshot_dataset)
    tasks = [t for ts in track.groups.values() for t in ts
             if any(r.get("task") == t and r.get("track") == "vtab" for r in data.get("runs", {}).values())]
    said = verdict(data, methods, tasks)
    if said:
        md = "### Verdict: GLoRA against the best rival in its budget (picked on val200)\n\n" + said + "\n\n" + md
    rival = best_rival_table(data, methods, tasks)
    ablation = ablation_table(data, methods)
    if ablation:
        md += "\n### The supernet's length (one task, fixed before the run)\n\n" + ablation + "\n"
    if rival:
        md += ("\n### GLoRA against the best rival within its budget (the non-GLoRA method that scores best on val200; "
               "difference of test seed means, points; win/loss only when larger than the bigger seed spread)\n\n" + rival + "\n")
    if data.get("option_selection"):
        md += "\n### LoRA-family option chosen for GLoRA-large on val200 (val top-1 % at glora_large's lr)\n\n" + "\n".join(
            f"- {k} (lr {s.get('lr', 0):g}): " + ", ".join(f"{c.split('@')[-1]}: {v:.1f}" for c, v in s["val_top1"].items())
            + f" -> {s['chosen']}" + screen_note(s.get("screen")) for k, s in sorted(data["option_selection"].items())) + "\n"
    refused = meta.get("refused") or {}
    if refused:
        md += "\n### Methods this track does not run\n\n" + "\n".join(f"- {m}: {why}" for m, why in sorted(refused.items())) + "\n"
    md += cost_note(data)
    Path(f"{results_path.with_suffix('')}.md").write_text(md)
    return md


def headline(paths: dict[str, Path]) -> str:
    """One row per method: each track's mean test top-1 over its tasks (± std over seeds), adapter
    parameters and CPU seconds per task; – where the method does not run on the track."""
    summ, finished = {}, {}
    for name, p in paths.items():
        data = json.loads(Path(p).read_text())
        summ[name] = method_summary(data)
        finished[name] = bool(data.get("meta", {}).get("finished"))
    order = []
    for name in paths:
        for m in get_track(name).methods:
            if m not in order and any(m in summ[n] for n in paths):
                order.append(m)
    head = ["method"]
    for name in paths:
        ntasks = len({t for s in summ[name].values() for t in s["tasks"]})
        head += [f"{name}: mean of {ntasks} tasks" + ("" if finished[name] else " (partial)"), f"{name}: params", f"{name}: CPU s/task"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in order:
        cells = [m]
        for name in paths:
            s = summ[name].get(m)
            if s is None:
                cells += ["–", "–", "–"]
                continue
            full = len(s["tasks"]) == len({t for x in summ[name].values() for t in x["tasks"]})
            acc = f"{s['mean']:.1f}±{s['std']:.1f}" if s["std"] else f"{s['mean']:.1f}"
            cells += [acc if full else f"{acc} ({'/'.join(s['tasks'])})", f"{s['params']:,.0f}",
                      f"{s['cpu_s']:,.0f}" if s["cpu_s"] is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


HEADLINE_ROWS = ["linear", "full", "lora4", "lora8", "best rival <= lora8", "glora_small", "glora_middle", "glora_large",
                 "glora_large_inherited", "glora_large_bestopt"]


def _cell(s: dict, n_tasks: int) -> str:
    acc = f"{s['mean']:.1f}±{s['std']:.1f}" if s["std"] else f"{s['mean']:.1f}"
    if len(s["tasks"]) < n_tasks:
        acc += f" ({len(s['tasks'])}/{n_tasks} tasks)"
    cpu = f", {s['cpu_s']:,.0f} CPU s" if s["cpu_s"] is not None else ""
    return f"{acc} ({s['params']:,.0f} params{cpu})"


def headline_compact(paths: dict[str, Path]) -> str:
    """The README's headline: per track, the baselines, LoRA, the strongest non-GLoRA method within
    lora8's count (picked on val200) and
    GLoRA's variants; each cell the mean over tasks ± std over seeds (adapter params, CPU s per task)."""
    cols, finished = {}, {}
    for name, p in paths.items():
        data = json.loads(Path(p).read_text())
        summ = method_summary(data)
        methods = get_track(name).methods
        n = len({t for s in summ.values() for t in s["tasks"]})
        cap = data.get("meta", {}).get("budgets", {}).get("lora8")
        col = {m: _cell(summ[m], n) for m in HEADLINE_ROWS if m in summ}
        all_tasks = list(dict.fromkeys(t for s in summ.values() for t in s["tasks"]))
        best = best_rival(data, methods, summ, cap, all_tasks) if cap else None
        if best is not None:
            col["best rival <= lora8"] = f"{best}: {_cell(summ[best], n)}"
        cols[name], finished[name] = col, bool(data.get("meta", {}).get("finished"))
    head = ["method"] + [f"{name}" + ("" if finished[name] else " (run not finished)") for name in paths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in HEADLINE_ROWS:
        if any(m in cols[n] for n in paths):
            lines.append("| " + " | ".join([m] + [cols[n].get(m, "–") for n in paths]) + " |")
    return "\n".join(lines)


def write_summary(paths: dict[str, Path], doc: Path | None = None, readme: Path | None = None) -> str:
    """docs/benchmarks/compare-results.md (the headline, then each track's report) and the README's
    headline block between its markers."""
    doc = doc or REPO / "docs" / "benchmarks" / "compare-results.md"
    table = headline(paths)
    parts = ["# The comparison's results (generated by `python -m benchmarks.compare --report-only`)\n",
             "Mean test top-1 % over each track's VTAB-style tasks (mean ± std over 3 seeds of the task average), "
             "adapter parameters (head excluded) and the CPU seconds of one task's whole pipeline (lr selection, "
             "supernet, search, option candidates, seeds). Setup and protocol: [compare.md](compare.md).\n", table, ""]
    for name, p in paths.items():
        png = Path(p).with_suffix(".png")
        parts += [f"## Track `{name}`\n", f"![accuracy against adapter parameters]({_rel(png, doc.parent)})\n",
                  Path(f"{Path(p).with_suffix('')}.md").read_text()]
    doc.write_text("\n".join(parts))
    readme = readme or REPO / "README.md"
    text = readme.read_text()
    if README_BEGIN in text and README_END in text:
        block = f"{README_BEGIN}\n{headline_compact(paths)}\n{README_END}"
        text = re.sub(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), lambda _: block, text, flags=re.S)
        readme.write_text(text)
    return table


def _rel(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)

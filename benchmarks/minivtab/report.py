"""Tables (markdown, paper style: tasks as columns, group averages, mean ± spread over seeds) and a plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .prepare import GROUPS

ORDER = ["linear", "full", "bitfit", "ssf", "lora4", "lora8", "glora_small", "glora_middle", "glora_large"]


def _ms(vals):
    if not vals:
        return None
    m = statistics.mean(vals)
    s = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return m, s, len(vals)


def _fmt(x):
    if x is None:
        return "–"
    m, s, n = x
    return f"{m:.1f}" if n == 1 else f"{m:.1f}±{s:.1f}"


def _order(runs: list[dict], order: list[str] | None) -> list[str]:
    """``order``'s methods that have runs, then any other method with runs, in order of appearance."""
    seen = list(dict.fromkeys(r["method"] for r in runs))
    order = order or ORDER
    return [m for m in order if m in seen] + [m for m in seen if m not in order]


def _cpu(data: dict, method: str) -> str:
    """Mean CPU seconds of one task's whole pipeline for ``method`` (lr selection, supernet,
    search, seeds), from the driver's ``cost`` records; – where the run predates them."""
    v = [c["cpu_s"] for k, c in data.get("cost", {}).items() if k.split("/")[-1] == method]
    return f"{statistics.mean(v):,.0f}" if v else "–"


def vtab_table(data: dict, groups: dict | None = None, order: list[str] | None = None) -> str:
    groups = groups or GROUPS
    runs = [r for k, r in data["runs"].items() if k.startswith("vtab/") and "test_top1" in r]
    tasks = [t for g in groups.values() for t in g if any(r["task"] == t for r in runs)]
    methods = _order(runs, order)
    groups = {g: [t for t in ts if t in tasks] for g, ts in groups.items()}
    groups = {g: ts for g, ts in groups.items() if ts}
    head = ["method", "adapter params", "lr"] + tasks + [f"{g} avg" for g in groups] + ["mean", "wall s/run"]
    if data.get("cost"):
        head.append("CPU s/task")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        mr = [r for r in runs if r["method"] == m]
        cells = [m, f"{statistics.mean(r['adapter_params'] for r in mr):,.0f}",
                 "/".join(sorted({f"{r['lr']:g}" if r.get("init") != "inherit" else "none (inherited)" for r in mr}))]
        per_task = {t: [r["test_top1"] for r in mr if r["task"] == t] for t in tasks}
        cells += [_fmt(_ms(per_task[t])) for t in tasks]
        seeds = sorted({r["seed"] for r in mr})
        # group / overall averages: average over tasks per seed, then mean ± spread over seeds
        def avg_over(ts):
            per_seed = []
            for s in seeds:
                v = [r["test_top1"] for r in mr if r["seed"] == s and r["task"] in ts]
                if len(v) == len(ts):
                    per_seed.append(sum(v) / len(v))
            return _ms(per_seed)
        cells += [_fmt(avg_over(ts)) for ts in groups.values()]
        cells.append(_fmt(avg_over(tasks)))
        cells.append(f"{statistics.mean(r['wall_s'] + r.get('supernet_s', 0) + r.get('search_s', 0) for r in mr):.0f}")
        if data.get("cost"):
            cells.append(_cpu(data, m))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRS = [("glora_small", "lora4"), ("glora_middle", "lora4"), ("glora_large", "lora8")]


def _verdict(a: list[float], b: list[float]) -> str:
    """win / loss when the mean difference exceeds the larger seed spread (population std), else tie."""
    (ma, sa, na), (mb, sb, nb) = _ms(a), _ms(b)
    d = ma - mb
    if min(na, nb) < 2:
        return f"{d:+.1f} (1 seed)"
    return f"{d:+.1f} " + ("win" if d > max(sa, sb) else "loss" if -d > max(sa, sb) else "tie")


def comparison_table(data: dict, groups: dict | None = None, pairs: list[tuple[str, str]] | None = None) -> str:
    """Each GLoRA space against the LoRA whose parameter count is its budget, per task (and per
    few-shot setting): the difference of the seed means and a verdict."""
    runs = list(data["runs"].values())
    vt = [r for r in runs if r.get("track") == "vtab" and "test_top1" in r]
    fs = [r for r in runs if r.get("track") == "fewshot"]
    tasks = [t for g in (groups or GROUPS).values() for t in g if any(r["task"] == t for r in vt)]
    shots = sorted({r["shots"] for r in fs})
    cols = tasks + [f"{k}-shot" for k in shots]
    head = ["GLoRA vs budget LoRA", "params (GLoRA / LoRA)"] + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, lo in pairs or PAIRS:
        gv = [r for r in vt if r["method"] == g] + [r for r in fs if r["method"] == g]
        lv = [r for r in vt if r["method"] == lo] + [r for r in fs if r["method"] == lo]
        if not gv or not lv:
            continue
        # the counts of the VTAB runs, as in the main table (a few-shot search picks its own sub-network)
        pg, pl = ([r for r in v if r["track"] == "vtab"] or v for v in (gv, lv))
        cells = [f"{g} vs {lo}", f"{statistics.mean(r['adapter_params'] for r in pg):,.0f} / {statistics.mean(r['adapter_params'] for r in pl):,.0f}"]
        for t in tasks:
            a = [r["test_top1"] for r in gv if r["track"] == "vtab" and r["task"] == t]
            b = [r["test_top1"] for r in lv if r["track"] == "vtab" and r["task"] == t]
            cells.append(_verdict(a, b) if a and b else "–")
        for k in shots:
            a = [r["test_top1"] for r in gv if r["track"] == "fewshot" and r["shots"] == k]
            b = [r["test_top1"] for r in lv if r["track"] == "fewshot" and r["shots"] == k]
            cells.append(_verdict(a, b) if a and b else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def fewshot_table(data: dict, order: list[str] | None = None, domains=("inverted", "edges", "blurred")) -> str:
    runs = [r for k, r in data["runs"].items() if k.startswith("fewshot/")]
    if not runs:
        return ""
    shots = sorted({r["shots"] for r in runs})
    methods = _order(runs, order)
    head = ["method"] + [f"{k}-shot" for k in shots] + ["DG source"] + [f"DG {d}" for d in domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        mr = [r for r in runs if r["method"] == m]
        cells = [m] + [_fmt(_ms([r["test_top1"] for r in mr if r["shots"] == k])) for k in shots]
        dg = [r for r in mr if "dg" in r]
        cells.append(_fmt(_ms([r["test_top1"] for r in dg])))
        cells += [_fmt(_ms([r["dg"][d] for r in dg])) for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict, path: Path, order: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for k, r in data["runs"].items() if k.startswith("vtab/") and "test_top1" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for m in _order(runs, order):
        mr = [r for r in runs if r["method"] == m]
        tasks = sorted({r["task"] for r in mr})
        acc = statistics.mean(statistics.mean(r["test_top1"] for r in mr if r["task"] == t) for t in tasks)
        params = statistics.mean(r["adapter_params"] for r in mr)
        ax.scatter([max(params, 1)], [acc], s=60, marker="*" if m.startswith("glora") else "o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters (head excluded; linear plotted at 1)")
    ax.set_ylabel("mean test accuracy over tasks (%)")
    ax.set_title(f"{data['meta'].get('track', 'mini-VTAB')} ({data['meta']['mode']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _edge(sel: dict) -> str:
    """A chosen lr at an end of every value tried: the grid's extensions ran out before the score
    turned, so a better lr may lie beyond it."""
    lrs = [float(k) for k in sel["val_top1"]]
    return " (at the edge of the values tried)" if len(lrs) > 1 and sel["chosen"] in (min(lrs), max(lrs)) else ""


def write_report(results_path: Path, groups: dict | None = None, order: list[str] | None = None,
                 pairs: list[tuple[str, str]] | None = None, fewshot_name: str = "digits") -> str:
    results_path = Path(results_path)
    data = json.loads(results_path.read_text())
    md = "### VTAB-style tasks (test top-1 %, mean±std over seeds)\n\n" + vtab_table(data, groups, order) + "\n"
    fs = fewshot_table(data, order)
    if fs:
        md += f"\n### Few-shot {fewshot_name} and domain generalisation (16-shot, test on shifted renderings)\n\n" + fs + "\n"
    cmp = comparison_table(data, groups, pairs)
    if cmp:
        md += ("\n### GLoRA against the LoRA whose parameter count is its budget (difference of seed means, "
               "points; win/loss only when larger than the bigger seed spread)\n\n" + cmp + "\n")
    sel = data.get("lr_selection", {})
    if sel:
        md += "\n### Learning-rate selection (val200 top-1 %, seed 0)\n\n" + "\n".join(
            f"- {k}: " + ", ".join(f"{lr}: {v:.1f}" for lr, v in s["val_top1"].items()) + f" -> {s['chosen']:g}" + _edge(s)
            for k, s in sorted(sel.items())) + "\n"
    stem = results_path.with_suffix("")
    Path(f"{stem}.md").write_text(md)
    plot(data, Path(f"{stem}.png"), order)
    print(md)
    return md

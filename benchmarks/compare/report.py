"""The comparison's report for one track's results.json: the replica's tables and plot
(benchmarks/minivtab/report.py) with the track's task groups and method order, each GLoRA variant
against the LoRA whose parameter count is its budget (win/loss only beyond the larger seed spread),
the CPU seconds of each method's whole pipeline per task, and the methods the track refuses."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.minivtab import report as R

from .tracks import get_track

PAIRS = [("glora_small", "lora4"), ("glora_middle", "lora4"), ("glora_large", "lora8"), ("glora_large_bestopt", "lora8")]


def write_report(results_path: Path) -> str:
    results_path = Path(results_path)
    meta = json.loads(results_path.read_text()).get("meta", {})
    track = get_track(meta.get("track", "vit"))
    md = R.write_report(results_path, track.groups, list(track.methods), PAIRS)
    data = json.loads(results_path.read_text())
    extra = ""
    if data.get("option_selection"):
        extra += "\n### LoRA-family option chosen for GLoRA on val200 (best lr's val top-1 %)\n\n" + "\n".join(
            f"- {k}: " + ", ".join(f"{c.split('@')[-1]}: {v:.1f}" for c, v in s["val_top1"].items()) + f" -> {s['chosen']}"
            for k, s in sorted(data["option_selection"].items())) + "\n"
    refused = meta.get("refused") or {}
    if refused:
        extra += "\n### Methods this track does not run\n\n" + "\n".join(f"- {m}: {why}" for m, why in sorted(refused.items())) + "\n"
    if extra:
        md += extra
        Path(f"{results_path.with_suffix('')}.md").write_text(md)
    return md

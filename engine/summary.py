"""A short, honest summary of a finished pipeline run (what `make demo` prints at the end).

    python -m engine.summary --config configs/demo.yaml [--baseline runs/demo-lora]

``--baseline DIR`` adds the test accuracy of another finished run beside GLoRA's (the demo
retrains the LoRA preset there, at the parameter budget GLoRA's search was held to).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import yaml

import methods
from supernet import TENSORS

from .config import ConfigError, load_config


def choice_counts(subnet: dict[str, dict[str, str]]) -> str:
    """How often each choice was picked per support tensor across the layers, e.g.
    ``A: lora4 x5, vector x3 | B: ...`` (the paper's layer-wise configuration, in one line; NOAH's
    modules likewise)."""
    parts = []
    first = next(iter(subnet.values()), {})
    for tensor in (TENSORS if set(first) <= set(TENSORS) else list(first)):
        counts = Counter(str(choices.get(tensor, "none")) for choices in subnet.values())
        parts.append(f"{tensor}: " + ", ".join(f"{c} x{n}" for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))
    return " | ".join(parts)


def _metrics(output_dir: Path) -> dict:
    retrain = output_dir / "retrain" / "metrics.json"
    if not retrain.is_file():
        raise FileNotFoundError(f"{retrain}: not found; run train.py, search.py and retrain.py first")
    return json.loads(retrain.read_text())


def _method(m: dict) -> str:
    return "GLoRA" if m.get("method", "glora") == "glora" else str(m["method"])


def compare(output_dir: Path, baselines: list[Path]) -> list[str]:
    """One line per run, GLoRA's first: method, test top-1 and trainable adapter parameters."""
    rows = [(_method(m), m) for m in map(_metrics, [output_dir, *baselines])]
    width = max(len(name) for name, _ in rows)
    return [f"compare:  {name:<{width}}  test top-1 {m['test_top1']:6.2f}%  with {m['adapter_params']:>9,} adapter parameters"
            f" ({m['test_images']} test images)" for name, m in rows]


def summarise(output_dir: Path, baselines: list[Path] = ()) -> str:
    m = _metrics(output_dir)
    lines = ["", "=== GLoRA pipeline summary ==="]
    result = output_dir / "search" / "result.yaml"
    if not methods.get(m.get("method", "glora")).searched:
        lines.append(f"search:   not used: retrain trained the {m['method']!r} preset")
    elif not m.get("subnet_from_search", True):
        lines.append(f"search:   not used: retrain trained the sub-network in {m['subnet']}")
    elif result.is_file():
        r = yaml.safe_load(result.read_text())
        lines.append(f"search:   best of {r['evaluated']} candidates: {r['accuracy']:.2f}% validation accuracy, "
                     f"{r['params']:,} adapter parameters (budget {r['budget']['max_params'] or 'none'})")
        lines.append(f"chosen:   {choice_counts(r['subnet'])}")
    top5 = f", top-5 {m['test_top5']:.2f}%" if "test_top5" in m else ""
    added = m.get("merged_added_biases") or []
    count = (f"the base architecture's count plus the biases the merge gave {len(added)} bias-free layer(s); "
             f"load it with supernet.load_merged") if added else "the base architecture's count"
    merged = "merged_model_params" in m
    held = (f"the merged model has {m['merged_model_params']:,}, {count}" if merged else
            f"the adapted model has {m['model_params']:,}; it cannot merge: {m['inference']}, "
            f"{m['inference_forward_ratio']:.2f}x the base model's forward time")
    lines += [
        f"retrain:  {'merged' if merged else 'adapted'} model test accuracy {m['test_top1']:.2f}%{top5} on {m['test_images']} test images",
        f"trained:  {m['adapter_params']:,} adapter + {m['head_params']:,} head parameters "
        f"({m['trainable_params']:,} trainable; {held})",
        "artifacts: " + ", ".join(f"{path}{what}" for path, what in (
            (output_dir / "retrain" / "merged.safetensors", " (plain timm weights)"),
            (output_dir / "retrain" / "adapted.safetensors", " (evaluate.py loads it)"),
            (output_dir / "retrain" / "adapter.safetensors", " + subnet.yaml"),
            (output_dir / "search" / "pareto.png", ""),
        ) if path.is_file()),
        f"tensorboard: .venv/bin/tensorboard --logdir {output_dir}",
    ]
    if baselines:
        lines += compare(output_dir, list(baselines))
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--baseline", action="append", default=[], metavar="DIR",
                        help="another finished run folder to compare with (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        print(summarise(Path(cfg.output_dir), [Path(b) for b in args.baseline]))
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

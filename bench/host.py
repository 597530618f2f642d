"""The host-bound regime, measured on any machine: ``python -m bench.host [--rounds N] [--out PATH]``.

At batch 64 on a GPU a GLoRA training step is bound by the host (Python and per-operation
dispatch), not by arithmetic: on the H200, step time divided by kernel launches came to 46-50 µs
for every contender, and the ratios followed the launch counts. This benchmark recreates that
regime on a CPU. The model has vit_base's depth and its 48 adapted linear layers but a width of
64, on 32 px images at batch 2 and one thread, so the arithmetic of each operation is negligible
and a step costs what its operations and Python cost.

It times the three training pairs of :mod:`bench.run` (and the frozen-model floor) interleaved,
step by step, and counts the operations each step dispatches (views excluded), the host-side
stand-in for kernel launches. Results go to ``bench/results-host.json``. The targets are the
issue's; this is a proxy for the GPU at moderate batch sizes, not one of the issue's own modes.
"""

from __future__ import annotations

import argparse
import collections
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import contenders as C
from .contenders import ModelSpec
from .run import FLOORS, ROOT, TARGETS, TRAIN_PAIRS, _met, interleave, machine_info, make_batch, paired_ratio

DEFAULT_OUT = ROOT / "runs" / "bench" / "results-host.json"
# Views and allocations: no kernel on a GPU (they still cost dispatch, which the timing sees).
VIEWS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "as_strided",
    "slice", "select", "unsqueeze", "squeeze", "unbind", "split", "split_with_sizes", "detach", "alias",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "_record_function_enter_new", "_record_function_exit",
})


@dataclass
class HostSettings:
    model: str = "vit_base_patch16_224"
    width: int = 64
    heads: int = 2
    img_size: int = 32
    batch: int = 2
    threads: int = 1
    warmup: int = 5
    rounds: int = 40
    count_steps: int = 3
    seed: int = 0
    depth: int | None = None  # None: the model's own (12 blocks for vit_base); tests shrink it
    amp: bool = False  # bf16 autocast, as bench.run --device cuda: adds the casts a GPU step launches

    def spec(self) -> ModelSpec:
        kwargs: dict[str, Any] = dict(embed_dim=self.width, num_heads=self.heads, img_size=self.img_size)
        if self.depth is not None:
            kwargs["depth"] = self.depth
        return ModelSpec(self.model, kwargs, self.img_size)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step, steps: int) -> tuple[float, dict[str, float]]:
    """Operations one call of ``step`` dispatches (views excluded), averaged over ``steps`` calls, and the ten most frequent."""
    total: collections.Counter[str] = collections.Counter()
    for _ in range(steps):
        with _CountOps() as mode:
            step()
        total.update(mode.counts)
    top = {k: v / steps for k, v in total.most_common(10)}
    return sum(total.values()) / steps, top


def run(s: HostSettings, out: Path | None, log=print) -> dict[str, Any]:
    torch.set_num_threads(s.threads)
    spec = s.spec()
    base = spec.build(s.seed)
    x, y = make_batch(spec, s.batch, "cpu", s.seed)
    names = [n for pair in TRAIN_PAIRS.values() for n in pair] + [f for fl in FLOORS.values() for f in fl]
    steps = {n: C.train_step(C.build_train_contender(n, base, s.seed), x, y, s.amp) for n in names}
    times = interleave(steps, s.warmup, s.rounds)
    medians = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    ratios = {key: paired_ratio(times[a], times[b]) for key, (a, b) in TRAIN_PAIRS.items()}
    floor = {f"{f}_vs_{key.split('_vs_', 1)[1]}": paired_ratio(times[f], times[TRAIN_PAIRS[key][1]])  # as bench.run names it
             for key, fl in FLOORS.items() for f in fl}
    ops, top = {}, {}
    for n, step in steps.items():
        ops[n], top[n] = ops_per_step(step, s.count_steps)
    doc = dict(
        ratios=ratios, floor=floor, targets={k: list(TARGETS[k]) for k in ratios},
        met={k: _met(k, v) for k, v in ratios.items()}, median_s=medians, ops_per_step=ops, top_ops=top,
        settings=asdict(s), spec=spec.to_json(), **machine_info(),
    )
    log(format_table(doc))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {out}")
    return doc


def format_table(doc: dict[str, Any]) -> str:
    lines = [f"{'key':<36} {'target':>8} {'ratio':>7}   ops/step (ours / peer)", "-" * 78]
    for key, value in doc["ratios"].items():
        cmp, target = doc["targets"][key]
        a, b = TRAIN_PAIRS[key]
        verdict = "ok" if doc["met"][key] else "MISS"
        lines.append(f"{key:<36} {cmp + str(target):>8} {value:7.3f} {verdict:>4}   {doc['ops_per_step'][a]:.0f} / {doc['ops_per_step'][b]:.0f}")
    for key, value in doc["floor"].items():
        lines.append(f"{'(floor) ' + key:<36} {'':>8} {value:7.3f}        {doc['ops_per_step']['frozen']:.0f}")
    lines.append("median ms per step: " + ", ".join(f"{n} {t * 1e3:.2f}" for n, t in doc["median_s"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=HostSettings.rounds, help="measured rounds (default %(default)s)")
    p.add_argument("--warmup", type=int, default=HostSettings.warmup)
    p.add_argument("--depth", type=int, default=None, help="transformer blocks (default: the model's own)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast, as on the GPU (default: fp32)")
    p.add_argument("--out", type=Path, default=None, help="default: runs/bench/results-host.json (results-host-amp.json with --amp)")
    args = p.parse_args(argv)
    out = args.out or (DEFAULT_OUT.with_name("results-host-amp.json") if args.amp else DEFAULT_OUT)
    return run(HostSettings(rounds=args.rounds, warmup=args.warmup, depth=args.depth, amp=args.amp), out)


if __name__ == "__main__":
    main()

"""The LoRA family's costs: ``python -m bench.lorafamily [--quick] [--out PATH]``.

Each option of the ``lora:`` block (docs/lora-family.md) trains the ``lora`` preset (B = lora8 on
every linear layer of the blocks) of the same base model, built, hooked and initialised by the
code the trainer runs (engine/lorasetup.py); its training step (forward, cross-entropy, backward,
the option's hooks, AdamW) is timed interleaved with plain LoRA's, round after round, and the
ratio is the median of the per-round ratios with its 95% interval (bench.run's method). The GLoRA
supernet's step with LoRA-Pro is timed against the supernet's own. The one-off initialisations
(PiSSA's SVDs; LoRA-GA's gradient estimate and SVDs) are timed once and given in steps of plain LoRA.

Targets (issue: the LoRA family): LoRA-Pro's step at most 1.3x plain LoRA's.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import methods
from engine import distributed as dist
from engine.loraconfig import LoraOptions
from engine.lorasetup import initialize_factors, layer_options, lora_hooks
from engine.optim import adamw
from methods.hooks import merged_param_groups
from supernet import SubnetSampler, apply_glora, load_space

from .contenders import LARGE_SPACE, ModelSpec
from .run import interleave, machine_info, make_batch, paired_ratio_ci

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results-lorafamily.json"
REPORT = ROOT / "docs" / "benchmarks" / "lora-family.md"

# option name -> the lora block (the lora preset at rank 8 takes it)
OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"lora_alpha": 16, "use_rslora": True},
    "loraplus": {"loraplus_lr_ratio": 16},
    "lora_pro": {"lora_pro": True},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "lora_ga": {"init_lora_weights": "lora_ga"},
}
TARGETS = {"lora_pro_vs_lora_step": ("<=", 1.30)}
RANK = 8


def _lora_model(base: torch.nn.Module, lora: LoraOptions) -> torch.nn.Module:
    method = methods.get("lora")
    model = copy.deepcopy(base)
    method.apply(model, method.settings(size=RANK), load_space(LARGE_SPACE), **layer_options(lora))
    return model


def _step(model: torch.nn.Module, hooks: list, x: torch.Tensor, y: torch.Tensor, before: Callable[[], Any] | None = None):
    """One training step as engine/trainer.py takes it (no AMP, no clipping): hooks included."""
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = merged_param_groups(hooks, named, 1e-4, 1e-4)
    opt = adamw([p for _, p in named] if groups is None else groups, lr=1e-4, weight_decay=1e-4)
    count = [0]

    def step() -> None:
        if before is not None:
            before()
        loss = F.cross_entropy(model(x), y)
        for h in hooks:
            extra = h.extra_loss(model)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        for h in hooks:
            h.after_backward(model, count[0])
        opt.step()
        for h in hooks:
            h.after_step(model, count[0], 10**6)
        opt.zero_grad(set_to_none=True)
        count[0] += 1

    return step


def bench(spec: ModelSpec, batch: int, warmup: int, steps: int, ga_batches: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    base = spec.build(0)
    x, y = make_batch(spec, batch, "cpu", 0)
    data = TensorDataset(*make_batch(spec, batch * ga_batches, "cpu", 1))
    info = dist.DistInfo()
    fns, init_s = {}, {}
    for name, block in OPTIONS.items():
        lora = LoraOptions(**block, **({"lora_ga_batches": ga_batches} if name == "lora_ga" else {}))
        model = _lora_model(base, lora)
        t0 = time.perf_counter()
        line = initialize_factors(model, lora, data, batch, 0, info)
        if line is not None:
            init_s[name] = time.perf_counter() - t0
            log(f"{name}: {line} ({init_s[name]:.2f} s)")
        fns[name] = _step(model, lora_hooks(model, lora), x, y)
    log(f"timing {len(fns)} lora-preset steps on {spec.label}, batch {batch}: {warmup} warm-up + {steps} rounds")
    times = interleave(fns, warmup, steps)
    ratios = {}
    for name in OPTIONS:
        if name != "lora":
            r, ci = paired_ratio_ci(times[name], times["lora"])
            ratios[f"{name}_vs_lora_step"] = {"ratio": r, "ci95": ci}
            log(f"{name}_vs_lora_step: {r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    lora_step = sorted(times["lora"])[len(times["lora"]) // 2]
    # the GLoRA supernet, with and without LoRA-Pro, drawing the same sub-networks
    sn_fns = {}
    for name, lora in (("supernet", LoraOptions()), ("supernet_lora_pro", LoraOptions(lora_pro=True))):
        model = apply_glora(copy.deepcopy(base), LARGE_SPACE, **layer_options(lora))
        gen, sampler = torch.Generator().manual_seed(0), SubnetSampler(model)
        sn_fns[name] = _step(model, lora_hooks(model, lora), x, y, before=lambda s=sampler, g=gen: s(g))
    log(f"timing the supernet with and without LoRA-Pro: {warmup} warm-up + {steps} rounds")
    sn_times = interleave(sn_fns, warmup, steps)
    r, ci = paired_ratio_ci(sn_times["supernet_lora_pro"], sn_times["supernet"])
    ratios["supernet_lora_pro_vs_supernet_step"] = {"ratio": r, "ci95": ci}
    log(f"supernet_lora_pro_vs_supernet_step: {r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    return {
        "model": spec.to_json(), "label": spec.label, "batch": batch, "rounds": steps, "rank": RANK,
        "median_step_s": {n: sorted(t)[len(t) // 2] for n, t in {**times, **sn_times}.items()},
        "ratios": ratios,
        "init_s": init_s,
        "init_in_lora_steps": {n: s / lora_step for n, s in init_s.items()},
        "lora_ga_batches": ga_batches,
        "threads": torch.get_num_threads(),
        "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "machine": machine_info(),
    }


def _met(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    return value <= target if op == "<=" else value >= target


def report(doc: dict[str, Any]) -> str:
    """The markdown page of a result (docs/benchmarks/lora-family.md)."""
    lines = ["# The LoRA family: step and initialisation costs", "",
             "Generated by `python -m bench.lorafamily` (bench/lorafamily.py) from `bench/results-lorafamily.json`; "
             f"{doc['machine']['machine']['processor']} CPU, {doc['threads']} threads, torch {doc['machine']['torch']}. The `lora` preset "
             f"(B = lora{doc['rank']} on every linear layer of the blocks) of a randomly initialised {doc['label']} at "
             f"{doc['model']['img_size']} px, batch {doc['batch']}; each option's training step (forward, loss, backward, "
             f"its hooks, AdamW) timed interleaved with plain LoRA's over {doc['rounds']} rounds. Ratio: the median of the "
             "per-round ratios, with its 95% interval.", "",
             "| option | step / plain LoRA | 95% interval | median step (s) | target |", "|---|---|---|---|---|"]
    steps = doc["median_step_s"]
    lines.append(f"| lora (plain) | 1 | | {steps['lora']:.3f} | |")
    for key, v in doc["ratios"].items():
        name = key.replace("_vs_lora_step", "").replace("_vs_supernet_step", "")
        target = ""
        if key in TARGETS:
            op, t = TARGETS[key]
            target = f"{op} {t} ({'met' if _met(key, v['ratio']) else 'MISSED'})"
        label = "GLoRA supernet + LoRA-Pro (vs the supernet)" if key.startswith("supernet") else name
        lines.append(f"| {label} | {v['ratio']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | {steps.get(name, float('nan')):.3f} | {target} |")
    lines += ["", "One-off initialisation before the first step:", "", "| init | seconds | in plain-LoRA steps |", "|---|---|---|"]
    for name, s in doc["init_s"].items():
        what = f"{name} ({doc['lora_ga_batches']} gradient batches + SVDs)" if name == "lora_ga" else f"{name} (SVDs)"
        lines.append(f"| {what} | {s:.2f} | {doc['init_in_lora_steps'][name]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2-block ViT at 32 px: seconds, for the tests")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; "
                                                             "--quick writes nothing unless given)")
    ap.add_argument("--report", type=Path, default=None, help=f"the markdown page (default {REPORT.relative_to(ROOT)} for a full run)")
    args = ap.parse_args(argv)
    if args.quick:
        spec = ModelSpec("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}, 32, 10)
        doc = bench(spec, batch=8, warmup=1, steps=3, ga_batches=2)
    else:
        doc = bench(ModelSpec("vit_small_patch16_224"), batch=16, warmup=1, steps=7, ga_batches=8)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    page = args.report or (None if args.quick else REPORT)
    if page is not None:
        page.write_text(report(doc))
    return doc


if __name__ == "__main__":
    main()

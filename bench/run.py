"""GLoRA speed and memory benchmark: ``python -m bench.run [--quick] [--device cpu|cuda] [--out PATH]``.

Every ratio compares two contenders built from the same base weights, fed the same inputs and
timed interleaved step by step (A, B, A, B, ...) on the same thread count. A ratio is the median
of the per-round ratios ``t_A / t_B``; the raw median times are stored next to it, and so is a
distribution-free 95% confidence interval of that median (``ci95``, from the order statistics of
the per-round ratios), so a reading near its target can be told from noise.

Peak memory (``*_peak_mem``) is the extra memory one training step needs above the resting state
(weights, optimizer state): on CPU each contender runs in a fresh subprocess with glibc's mmap
threshold pinned (so freed tensors go back to the OS) and the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) is read after the warm-up steps; on CUDA it is
``max_memory_allocated`` above ``memory_allocated``.

The convolution pairs (:data:`CONV_TARGETS`, docs/convolutions.md) run once, on a CNN of their own
(``--conv-model``), and are kept in the results' ``conv`` section.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from engine.compiling import COMPILE_MODES

from . import contenders as C
from .contenders import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "bench" / "results.json"

# key -> (numerator, denominator, comparison, target)
TARGETS: dict[str, tuple[str, float]] = {
    "supernet_vs_lora_step": ("<=", 1.20),
    "subnet_vs_peft_glora_step_lora": ("<=", 0.70),
    "subnet_vs_peft_glora_step_vector": ("<=", 0.50),
    "merged_vs_base_forward": ("<=", 1.02),
    "search_eval_vs_forward": (">=", 0.95),
    "supernet_vs_lora_peak_mem": ("<=", 1.20),
}
KEYS = tuple(TARGETS)

# The convolution benchmark (docs/convolutions.md), on a CNN of its own (CONV_MODEL), kept in the
# results' "conv" section: a sub-network with B = lora8 only (LoRA) on the ungrouped convolutions
# against PEFT's LoRA on the same ones, and a merged sub-network of the conv space against the
# untouched CNN (merged convolutions are plain: ~1.0).
CONV_TARGETS: dict[str, tuple[str, float]] = {
    "conv_subnet_vs_peft_lora_step": ("<=", 1.10),
    "conv_merged_vs_base_forward": ("<=", 1.02),
}
CONV_KEYS = tuple(CONV_TARGETS)
CONV_MODEL = "tf_efficientnet_lite0"
ALL_TARGETS = {**TARGETS, **CONV_TARGETS}

TRAIN_PAIRS = {
    "supernet_vs_lora_step": ("supernet", "peft_lora"),
    "subnet_vs_peft_glora_step_lora": ("subnet_lora", "peft_glora_lora"),
    "subnet_vs_peft_glora_step_vector": ("subnet_vector", "peft_glora_vector"),
}

# Contenders timed in the same rounds as a pair, reported beside its ratio (no target): the
# frozen model bounds from below what the vector sub-network can cost.
FLOORS = {"subnet_vs_peft_glora_step_vector": ("frozen",)}

FULL_MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")


@dataclass
class Settings:
    device: str = "cpu"
    batch: int = 8
    amp: bool = False  # bf16 autocast (cuda)
    compile: bool = False  # torch.compile every fixed-architecture training contender (not the supernet pair)
    compile_mode: str = "default"  # torch.compile's mode with compile (engine.compiling.COMPILE_MODES)
    threads: int = 2
    warmup: int = 3
    steps: int = 10
    fwd_warmup: int = 3
    fwd_steps: int = 20
    val_images: int = 200
    val_batch: int = 50
    search_warmup: int = 1
    candidates: int = 5
    mem_warmup: int = 1
    mem_steps: int = 2
    seed: int = 0
    keys: tuple[str, ...] = KEYS + CONV_KEYS  # what to measure (--only): a short GPU loan can time just the pairs it needs


def quick_settings() -> Settings:
    return Settings(warmup=1, steps=4, fwd_warmup=2, fwd_steps=12, val_images=32, val_batch=16, candidates=3, mem_steps=1)


def full_settings(model: str) -> Settings:
    if "base" in model:  # ~4x the cost of vit_small: fewer rounds keep the full run near 15 min
        return Settings(warmup=2, steps=5, fwd_steps=10, val_images=48, val_batch=24, candidates=3)
    if "small" in model:
        return Settings(val_images=100, mem_steps=3)
    return Settings(mem_steps=3, steps=20)  # the vector pair sits near its target here: more rounds narrow its interval


def cuda_settings() -> Settings:
    return Settings(device="cuda", batch=64, amp=True, warmup=5, steps=20, fwd_steps=50, val_images=1024, val_batch=256, candidates=5)


# -- timing -------------------------------------------------------------------------------------
def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def interleave(fns: dict[str, Callable[[], Any]], warmup: int, steps: int, device: str = "cpu") -> dict[str, list[float]]:
    """Run the callables in turn, round after round; seconds per call of the measured rounds."""
    sync = _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def paired_ratio_ci(num: list[float], den: list[float]) -> tuple[float, list[float]]:
    """:func:`paired_ratio` and the :func:`median_ci` interval of the same per-round ratios."""
    rounds = [a / b for a, b in zip(num, den)]
    return statistics.median(rounds), list(median_ci(rounds))


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A confidence interval for the median of the distribution ``values`` were drawn from.

    Distribution-free: the count of draws below the true median is Binomial(n, 1/2), so the k-th
    smallest and k-th largest values bracket it with probability ``1 - 2 P(Bin <= k - 1)``; k is
    the largest that keeps that at ``level`` or more. With too few values for that (n < 6 at 95%)
    no interval reaches ``level`` and the whole range is returned.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci: no values")
    k, below = 0, 0.0  # k: the widest-apart ranks accepted so far; below = P(Bin(n, 1/2) <= k - 1)
    while k < (n + 1) // 2:
        below_next = below + math.comb(n, k) / 2**n
        if 1 - 2 * below_next < level:
            break
        k, below = k + 1, below_next
    return (xs[0], xs[-1]) if k == 0 else (xs[k - 1], xs[n - k])


def make_batch(spec: ModelSpec, batch: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, spec.img_size, spec.img_size, generator=g)
    y = torch.randint(spec.num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


# -- peak memory --------------------------------------------------------------------------------
def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _memory_child(payload: dict[str, Any]) -> dict[str, int]:
    """Runs in a fresh process: build one contender, warm up, then peak RSS over the measured steps."""
    torch.set_num_threads(payload["threads"])
    spec = ModelSpec.from_json(payload["spec"])
    base = spec.build(payload["seed"])
    contender = C.build_train_contender(payload["contender"], base, payload["seed"])
    del base
    x, y = make_batch(spec, payload["batch"], "cpu", payload["seed"])
    step = C.train_step(contender, x, y)
    for _ in range(payload["warmup"]):
        step()
    gc.collect()
    rss0 = _proc_status_kb("VmRSS")
    _reset_peak_rss()
    for _ in range(payload["steps"]):
        step()
    peak = _proc_status_kb("VmHWM")
    return dict(peak_delta_bytes=(peak - rss0) * 1024, rss_before_bytes=rss0 * 1024, peak_bytes=peak * 1024)


def peak_memory(spec: ModelSpec, name: str, s: Settings) -> dict[str, int]:
    if s.device == "cuda":
        torch.cuda.empty_cache()
        base = spec.build(s.seed)
        contender = C.build_train_contender(name, base, s.seed)
        del base
        x, y = make_batch(spec, s.batch, "cuda", s.seed)
        step = C.train_step(contender, x, y, amp=s.amp)
        for _ in range(s.mem_warmup):
            step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(s.mem_steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del step, contender, x, y
        gc.collect()
        torch.cuda.empty_cache()
        return dict(peak_delta_bytes=peak - before, rss_before_bytes=before, peak_bytes=peak)
    payload = dict(spec=spec.to_json(), contender=name, seed=s.seed, batch=s.batch, threads=s.threads, warmup=s.mem_warmup, steps=s.mem_steps)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="4096", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--memory-child", json.dumps(payload)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- one model ----------------------------------------------------------------------------------
@dataclass
class _Timings:
    """One model's timed pairs: median seconds and images per second per contender, the ratios and
    the 95% interval of each timed ratio's median."""

    ratios: dict[str, float] = field(default_factory=dict)
    ci: dict[str, list[float]] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)
    images_per_s: dict[str, float] = field(default_factory=dict)

    def record(self, times: dict[str, list[float]], images: int) -> None:
        for name, t in times.items():
            self.medians[name] = statistics.median(t)
            self.images_per_s[name] = images / self.medians[name]


def bench_model(spec: ModelSpec, s: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    dev = s.device
    base = spec.build(s.seed).to(dev)
    x, y = make_batch(spec, s.batch, dev, s.seed)
    t = _Timings()
    ratios, ci, medians, images_per_s, record = t.ratios, t.ci, t.medians, t.images_per_s, t.record

    # training steps
    floor: dict[str, float] = {}
    checked: dict[str, float] = {}  # compiled contenders: relative gradient difference from eager
    for key, (a, b) in TRAIN_PAIRS.items():
        if key not in s.keys:
            continue
        names = (a, b, *FLOORS.get(key, ()))
        compiled = s.compile and key != "supernet_vs_lora_step"  # the supernet would recompile for every sub-network
        mode = s.compile_mode if compiled else False
        built = {n: C.build_train_contender(n, base, s.seed, mode) for n in names}
        for n, c in built.items():
            if c.compile_mode is not None:  # a compiled graph that computes something else is not timed
                checked[n] = C.check_compiled(c, x, y, s.amp)
                log(f"    {n}: compiled gradients within {checked[n]:.1e} of eager (relative)")
        steps = {n: C.train_step(c, x, y, s.amp) for n, c in built.items()}
        del built
        times = interleave(steps, s.warmup, s.steps, dev)
        record(times, s.batch)
        ratios[key], ci[key] = paired_ratio_ci(times[a], times[b])
        log(f"  {key}: {ratios[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}] ({a} {medians[a]:.3f} s, {b} {medians[b]:.3f} s)")
        for n in names[2:]:
            fkey = f"{n}_vs_{key.split('_vs_', 1)[1]}"  # frozen_vs_peft_glora_step_vector
            floor[fkey] = paired_ratio(times[n], times[b])
            log(f"    {fkey}: {floor[fkey]:.3f} ({n} {medians[n]:.3f} s)")
        del steps, times
        gc.collect()

    if "merged_vs_base_forward" in s.keys:
        _bench_merged(C.merged(base, s.seed), base, x, s, ratios, ci, record, log)
    if "search_eval_vs_forward" in s.keys:
        _bench_search(spec, base, s, ratios, ci, record, log)
    mem = _bench_memory(spec, s, ratios, log) if "supernet_vs_lora_peak_mem" in s.keys else {}
    return dict(ratios=ratios, ci95=ci, floor=floor, median_s=medians, images_per_s=images_per_s, memory=mem,
                compiled_grad_rel_diff=checked, settings=asdict(s), spec=spec.to_json())


def _bench_merged(merged, base, x, s: Settings, ratios, ci, record, log, prefix: str = "") -> None:
    """Inference of the merged model against the untouched one: ``<prefix>merged_vs_base_forward``."""
    a, b, key = f"{prefix}merged_forward", f"{prefix}base_forward", f"{prefix}merged_vs_base_forward"
    times = interleave({a: C.forward_fn(merged, x, s.amp), b: C.forward_fn(base, x, s.amp)}, s.fwd_warmup, s.fwd_steps, s.device)
    record(times, s.batch)
    ratios[key], ci[key] = paired_ratio_ci(times[a], times[b])
    log(f"  {key}: {ratios[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]")


def bench_conv(spec: ModelSpec, s: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The convolution pairs (:data:`CONV_TARGETS`) on the CNN ``spec``, timed as the others are."""
    dev = s.device
    base = spec.build(s.seed).to(dev)
    x, y = make_batch(spec, s.batch, dev, s.seed)
    t = _Timings()
    ratios, ci, medians, images_per_s, record = t.ratios, t.ci, t.medians, t.images_per_s, t.record
    key = "conv_subnet_vs_peft_lora_step"
    if key in s.keys:
        a, b = "conv_subnet_lora", "peft_lora_conv"
        steps = {n: C.train_step(C.build_train_contender(n, base, s.seed), x, y, s.amp) for n in (a, b)}
        times = interleave(steps, s.warmup, s.steps, dev)
        record(times, s.batch)
        ratios[key], ci[key] = paired_ratio_ci(times[a], times[b])
        log(f"  {key}: {ratios[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}] ({a} {medians[a]:.3f} s, {b} {medians[b]:.3f} s, "
            f"{len(C.conv_target_names(base))} convolutions)")
        del steps, times
        gc.collect()
    if "conv_merged_vs_base_forward" in s.keys:
        _bench_merged(C.merged_conv(base, s.seed).to(dev), base, x, s, ratios, ci, record, log, prefix="conv_")
    return dict(ratios=ratios, ci95=ci, median_s=medians, images_per_s=images_per_s, settings=asdict(s), spec=spec.to_json())


def _bench_search(spec: ModelSpec, base, s: Settings, ratios, ci, record, log) -> None:
    """Candidates scored per second x images per candidate against plain forward images per second."""
    dev = s.device
    g = torch.Generator().manual_seed(s.seed + 1)
    n_val = s.val_images
    vx = torch.randn(n_val, 3, spec.img_size, spec.img_size, generator=g)
    vy = torch.randint(spec.num_classes, (n_val,), generator=g)
    batches = [(vx[i : i + s.val_batch].to(dev), vy[i : i + s.val_batch].to(dev)) for i in range(0, n_val, s.val_batch)]
    scorer = C.CandidateScorer(base, batches, s.amp)
    from supernet.subnet import sample_config
    from supernet.model import layer_choices

    choices = layer_choices(scorer.supernet)
    candidates = iter([sample_config(choices, g) for _ in range(s.search_warmup + s.candidates)])
    times = interleave({"search_candidate": lambda: scorer.score(next(candidates)), "search_forward": lambda: scorer.evaluate(base)}, s.search_warmup, s.candidates, dev)
    record(times, n_val)
    ratios["search_eval_vs_forward"], ci["search_eval_vs_forward"] = paired_ratio_ci(times["search_forward"], times["search_candidate"])
    log(f"  search_eval_vs_forward: {ratios['search_eval_vs_forward']:.3f}")


def _bench_memory(spec: ModelSpec, s: Settings, ratios, log) -> dict[str, Any]:
    """Peak memory of one training step, the supernet's against PEFT LoRA's."""
    mem = {name: peak_memory(spec, name, s) for name in ("supernet", "peft_lora")}
    if min(m["peak_delta_bytes"] for m in mem.values()) <= 0:
        raise RuntimeError(f"peak memory measurement found no growth during a step: {mem}")
    ratios["supernet_vs_lora_peak_mem"] = mem["supernet"]["peak_delta_bytes"] / mem["peft_lora"]["peak_delta_bytes"]
    log(f"  supernet_vs_lora_peak_mem: {ratios['supernet_vs_lora_peak_mem']:.3f}")
    return mem


# -- whole run ----------------------------------------------------------------------------------
def _met(key: str, value: float) -> bool:
    op, target = ALL_TARGETS[key]
    return value <= target if op == "<=" else value >= target


def machine_info() -> dict[str, Any]:
    import timm

    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), python=platform.python_version(), loadavg=list(os.getloadavg()))
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return dict(machine=info, torch=torch.__version__, timm=timm.__version__, peft=peft_version)


def run(specs: list[ModelSpec], settings_for: Callable[[ModelSpec], Settings], out: Path | None, log: Callable[[str], None] = print,
        conv_spec: ModelSpec | None = None) -> dict[str, Any]:
    """Benchmark every model in turn; ``out`` is rewritten after each one, so a long run keeps what it measured.
    ``conv_spec``: the CNN of the convolution pairs (:data:`CONV_TARGETS`), run last, in the results' "conv" section."""
    results: dict[str, Any] = {k: {} for k in KEYS}
    per_model: dict[str, Any] = {}
    t0 = time.perf_counter()
    load_start = list(os.getloadavg())
    doc: dict[str, Any] = {}
    for spec in specs:
        s = settings_for(spec)
        if s.device == "cpu":
            torch.set_num_threads(s.threads)
        log(f"{spec.label} (batch {s.batch}, {'bf16' if s.amp else 'fp32'}, {s.device}, {s.threads if s.device == 'cpu' else '-'} threads"
            f"{f', sub-network pairs compiled ({s.compile_mode})' if s.compile else ''})")
        res = bench_model(spec, s, log)
        per_model[spec.label] = res
        for k, v in res["ratios"].items():
            results[k][spec.label] = v
        doc = dict(
            results,
            targets={k: dict(op=op, value=v) for k, (op, v) in TARGETS.items()},
            met={k: {m: _met(k, v) for m, v in results[k].items()} for k in KEYS},
            ci95={k: {m: per_model[m]["ci95"][k] for m in per_model if k in per_model[m]["ci95"]} for k in KEYS},
            models=per_model,
            wall_s=time.perf_counter() - t0,
            **machine_info(),
        )
        # Other processes on the machine make CPU timings noisy: the load averages are kept.
        doc["machine"]["loadavg_start"] = load_start
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=2) + "\n")
    s = settings_for(conv_spec) if conv_spec is not None else None
    if s is not None and any(k in s.keys for k in CONV_KEYS):
        if s.device == "cpu":
            torch.set_num_threads(s.threads)
        log(f"{conv_spec.label} at {conv_spec.img_size} px, convolutions (batch {s.batch}, {'bf16' if s.amp else 'fp32'}, {s.device})")
        res = bench_conv(conv_spec, s, log)
        conv = {k: {conv_spec.label: v} for k, v in res["ratios"].items()}
        doc["conv"] = dict(conv, targets={k: dict(op=op, value=v) for k, (op, v) in CONV_TARGETS.items()},
                           met={k: {m: _met(k, v) for m, v in conv[k].items()} for k in conv},
                           ci95={k: {conv_spec.label: res["ci95"][k]} for k in res["ci95"]}, models={conv_spec.label: res})
        doc["wall_s"] = time.perf_counter() - t0
        if not doc.get("machine"):
            doc.update(machine_info())
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _within_noise(key: str, interval: list[float] | None) -> bool:
    """Whether the target lies inside the ratio's 95% interval: the verdict could go either way."""
    return interval is not None and interval[0] <= ALL_TARGETS[key][1] <= interval[1]


def format_table(doc: dict[str, Any]) -> str:
    models = list(doc["models"])
    width = max(27, *(len(m) for m in models))

    def cell(k: str, m: str) -> str:
        if m not in doc[k]:  # this model was not measured on k
            return "-".rjust(width)
        interval = doc.get("ci95", {}).get(k, {}).get(m)
        ci = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        verdict = ("ok" if doc["met"][k][m] else "MISS") + ("~" if _within_noise(k, interval) else " ")
        return f"{doc[k][m]:.3f} {ci:>16} {verdict:>5}".rjust(width)

    head = f"{'key':42} {'target':>8}  " + "  ".join(f"{m:>{width}}" for m in models)
    lines = [head, "-" * len(head)]
    for k in KEYS:
        if not any(m in doc[k] for m in models):
            continue  # not measured (--only)
        op, v = TARGETS[k]
        lines.append(f"{k:42} {op + format(v, '.2f'):>8}  " + "  ".join(cell(k, m) for m in models))
    conv = doc.get("conv")
    for k in CONV_KEYS if conv else ():
        for m, v in conv.get(k, {}).items():
            interval = conv["ci95"].get(k, {}).get(m)
            ci = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
            verdict = ("ok" if conv["met"][k][m] else "MISS") + ("~" if _within_noise(k, interval) else " ")
            op, target = CONV_TARGETS[k]
            lines.append(f"{k:42} {op + format(target, '.2f'):>8}  {f'{v:.3f} {ci:>16} {verdict:>5}'.rjust(width)}  ({m})")
    for k in sorted({k for m in models for k in doc["models"][m].get("floor", {})}):
        cells = "  ".join(f"{doc['models'][m].get('floor', {}).get(k, math.nan):.3f} {'':>16} {'':>5}".rjust(width) for m in models)
        lines.append(f"{'(floor) ' + k:42} {'':>8}  {cells}")
    lines.append("[lo, hi]: 95% interval of the median ratio over the measured rounds; ~: the target lies inside it,")
    lines.append("so more rounds could turn the verdict either way (peak memory is one measurement: no interval)")
    lines.append("")
    lines.append("median seconds per call (images/s):")
    for m in models:
        med, ips = doc["models"][m]["median_s"], doc["models"][m]["images_per_s"]
        lines.append(f"  {m}: " + ", ".join(f"{n} {med[n]:.3f} ({ips[n]:.1f})" for n in med))
        mem = doc["models"][m]["memory"]
        if mem:
            lines.append(f"  {m} peak step memory (MiB above rest): " + ", ".join(f"{n} {v['peak_delta_bytes'] / 2**20:.0f}" for n, v in mem.items()))
    for m, res in (conv or {}).get("models", {}).items():
        lines.append(f"  {m} (convolutions): " + ", ".join(f"{n} {res['median_s'][n]:.3f} ({res['images_per_s'][n]:.1f})" for n in res["median_s"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (< 60 s on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16 autocast, batch 64, vit_base_patch16_224")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--models", nargs="+", help="timm model names (default: by mode)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON kwargs for timm.create_model, e.g. a tiny test model")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--threads", type=int, help="CPU threads (default 2)")
    p.add_argument("--batch", type=int, help="override the training batch size (default 8 on cpu, 64 on cuda)")
    p.add_argument("--warmup", type=int, help="override warm-up rounds")
    p.add_argument("--steps", type=int, help="override measured rounds (all measurements)")
    p.add_argument("--val-images", type=int, help="override validation images per candidate")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides of the sub-network pairs and the frozen model "
                   "(as retrain.compile does ours); the supernet pair, merged inference and search stay eager")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode with --compile; reduce-overhead replays CUDA graphs on a GPU")
    p.add_argument("--conv-model", default=CONV_MODEL, help=f"the CNN of the convolution pairs (default {CONV_MODEL})")
    p.add_argument("--conv-img-size", type=int, help="its input size (default 224; 64 with --quick)")
    p.add_argument("--only", nargs="+", choices=KEYS + CONV_KEYS, metavar="KEY",
                   help="measure only these keys (default all); a training pair's floor comes with it")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_child:
        print(json.dumps(_memory_child(json.loads(args.memory_child))))
        return None
    import timm

    if not timm.is_model(args.conv_model):
        p.error(f"--conv-model: unknown timm model {args.conv_model} (timm.list_models() names them)")
    unknown = [m for m in args.models or [] if not timm.is_model(m)]
    if unknown:
        p.error(f"--models: unknown timm model(s) {', '.join(unknown)} (timm.list_models() names them)")

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench.run: --device cuda was asked for but torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
        models = args.models or ["vit_base_patch16_224"]
        quick = dict(warmup=2, steps=5, fwd_steps=10, val_images=256, candidates=2) if args.quick else {}
        base_settings: Callable[[str], Settings] = lambda m: replace(cuda_settings(), **quick)  # noqa: E731
    elif args.quick:
        models = args.models or ["vit_tiny_patch16_224"]
        base_settings = lambda m: quick_settings()  # noqa: E731
    else:
        models = args.models or list(FULL_MODELS)
        base_settings = full_settings

    def settings_for(spec: ModelSpec) -> Settings:
        s = base_settings(spec.name)
        if args.warmup is not None:
            s = replace(s, warmup=args.warmup, fwd_warmup=args.warmup, search_warmup=args.warmup, mem_warmup=max(1, args.warmup))
        if args.steps is not None:
            s = replace(s, steps=args.steps, fwd_steps=args.steps, candidates=args.steps, mem_steps=args.steps)
        if args.threads is not None:
            s = replace(s, threads=args.threads)
        if args.batch is not None:
            s = replace(s, batch=args.batch)
        if args.val_images is not None:
            s = replace(s, val_images=args.val_images, val_batch=min(s.val_batch, args.val_images))
        if args.compile:
            s = replace(s, compile=True, compile_mode=args.compile_mode)
        if args.only:
            s = replace(s, keys=tuple(k for k in KEYS + CONV_KEYS if k in args.only))
        return s

    img_size = int(args.model_kwargs.get("img_size", 224))
    specs = [ModelSpec(m, dict(args.model_kwargs), img_size, args.num_classes) for m in models]
    conv_size = args.conv_img_size or (64 if args.quick and args.device == "cpu" else 224)
    conv_spec = ModelSpec(args.conv_model, {}, conv_size, args.num_classes)
    doc = run(specs, settings_for, args.out, conv_spec=conv_spec)
    print()
    print(format_table(doc))
    print(f"\nwrote {args.out} ({doc['wall_s']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()

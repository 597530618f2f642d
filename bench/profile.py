"""Where a training step's time goes, per contender: ``python -m bench.profile [--device cpu|cuda] [--compile-mode MODE] [--out DIR]``.

Runs a few steps of each training contender of :mod:`bench.run` under ``torch.profiler`` and
writes one table per contender (``DIR/profile-<contender>.txt``, ops sorted by self time on the
device that runs them), plus the number of kernel launches per step: on a GPU a step made of
many small kernels is bound by launches, not arithmetic.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine.compiling import COMPILE_MODES

from . import contenders as C
from .contenders import ModelSpec
from .run import Settings, cuda_settings, make_batch


def profile_contender(name: str, spec: ModelSpec, device: str, batch: int, amp: bool, steps: int, out: Path,
                      compile_mode: str | None = None) -> str:
    base = spec.build(0).to(device)
    x, y = make_batch(spec, batch, device, 0)
    c = C.build_train_contender(name, base, 0, compile_mode or False)
    if compile_mode:
        C.check_compiled(c, x, y, amp)  # a wrong compiled graph is not worth profiling
    step = C.train_step(c, x, y, amp)
    for _ in range(3):  # the first compiles; CUDA graphs are recorded on a later one
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    # a replayed CUDA graph counts as one launch (cudaGraphLaunch), whatever it holds
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")) / steps
    suffix = f"-compiled-{compile_mode}" if compile_mode else ""
    (out / f"profile-{name}{suffix}.txt").write_text(events.table(sort_by=sort, row_limit=40, max_name_column_width=70) + "\n")
    del step, c, base
    gc.collect()
    return f"{name}: {launches:.0f} kernel launches per step" if device == "cuda" else name


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="timm model name (default: vit_base_patch16_224 on cuda, vit_tiny_patch16_224 on cpu)")
    p.add_argument("--contenders", nargs="+", default=list(C.TRAIN_CONTENDERS), choices=C.TRAIN_CONTENDERS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/profile"))
    p.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile each contender in this mode first "
                   "(as bench.run --compile; not the supernet, which changes sub-network every step)")
    args = p.parse_args(argv)
    if args.compile_mode and "supernet" in args.contenders:
        p.error("--compile-mode: the supernet cannot be compiled (it changes sub-network every step); leave it out of --contenders")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.profile: --device cuda was asked for but torch.cuda.is_available() is False")
    cuda = args.device == "cuda"
    spec = ModelSpec(args.model or ("vit_base_patch16_224" if cuda else "vit_tiny_patch16_224"))
    args.out.mkdir(parents=True, exist_ok=True)
    if not cuda:
        torch.set_num_threads(2)
    for name in args.contenders:
        batch = (cuda_settings() if cuda else Settings()).batch  # bench.run's batch for the device
        print(profile_contender(name, spec, args.device, batch, cuda, args.steps, args.out, args.compile_mode), flush=True)
    print(f"wrote {args.out}/profile-*.txt")


if __name__ == "__main__":
    main()

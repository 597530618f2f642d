"""The comparison driver (issue 25): every method that applies to a track, through the replica's
driver (benchmarks/minivtab/run.py: lr selection on val200 with grid extension, supernet +
search + retrain for GLoRA, seeds, resumable results.json under a lock, cells claimed by workers).

    python -m benchmarks.compare --list                      # the methods of each track, and why some are refused
    python -m benchmarks.compare --quick                     # both tracks, < 15 min on 2 cores
    python -m benchmarks.compare --track cnn                 # one track in full; rerun to resume
    python -m benchmarks.compare --report-only [--quick]

Results: benchmarks/compare/results-<track>[-quick].json (the replica's format, plus ``cost``: the
CPU seconds of each cell's whole pipeline, and ``option_selection``: the LoRA-family option each
``select_lora`` GLoRA method took on val200).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.minivtab.run import PROTOCOL, Results, Runner, run_workers, track_settings
from benchmarks.minivtab.track import Track, describe

from .tracks import TRACKS, get_track, refusal

HERE = Path(__file__).resolve().parent
SMALL_SEARCH = {"population": 10, "top_k": 4, "mutation_count": 5, "crossover_count": 5, "generations": 3}
FULL_SEARCH = {"population": 20, "top_k": 5, "mutation_count": 10, "crossover_count": 10, "generations": 8}
FEWSHOT_METHODS = ["linear", "bitfit", "lora8", "glora_large"]

# Per track: tasks None = all of the track's, methods None = every method of the track. Both full
# modes are cut to fit the 8-hour budget by the arithmetic in docs/benchmarks/compare.md (python -m
# benchmarks.compare.measure, on an idle machine): no counting or location task (on the replica every
# adapter method scored >= 99.5 on both, so they separate nothing); on the CNN a 5-generation search
# and a small search for the few-shot supernets. The ViT keeps the replica's protocol otherwise.
VIT_FULL_TASKS = ["digits", "digits_noisy", "orientation"]
CNN_FULL_TASKS = ["mnist", "fashion", "mnist_noisy", "orientation"]
CNN_SEARCH = {**FULL_SEARCH, "generations": 5}
MODES = {
    "vit": {
        "quick": {"tasks": ["digits"], "methods": ["linear", "lora4", "adapter", "glora_middle"], "seeds": [0], "epochs": 8,
                  "lr_grid_size": 2, "lr_extend": 1, "search": SMALL_SEARCH, "fewshot": None, "dg": False},
        "full": {"tasks": VIT_FULL_TASKS, "methods": None, "seeds": [0, 1, 2], "epochs": 20, "lr_grid_size": 3, "lr_extend": 2,
                 "search": FULL_SEARCH, "dg": True,
                 "fewshot": {"methods": FEWSHOT_METHODS, "shots": [1, 2, 4, 8, 16], "seeds": [0, 1, 2], "epochs": 40}},
    },
    "cnn": {
        "quick": {"tasks": ["mnist"], "methods": ["linear", "lora4", "glora_large", "glora_large_inherited"], "seeds": [0], "epochs": 4,
                  "lr_grid_size": 2, "lr_extend": 1, "search": SMALL_SEARCH, "fewshot": None, "dg": False},
        "full": {"tasks": CNN_FULL_TASKS, "methods": None, "seeds": [0, 1, 2], "epochs": 6, "lr_grid_size": 3, "lr_extend": 1,
                 "search": CNN_SEARCH, "dg": True,
                 "fewshot": {"methods": FEWSHOT_METHODS, "shots": [1, 2, 4, 8, 16], "seeds": [0, 1, 2], "epochs": 20,
                             "search": SMALL_SEARCH}},
    },
}
# the tests' end-to-end mode (tests/test_compare.py): every code path, minimal work, any track
SMOKE = {"tasks": None, "methods": None, "seeds": [0], "epochs": 1, "lr_grid_size": 1, "lr_extend": 1,
         "search": {"population": 4, "top_k": 2, "mutation_count": 2, "crossover_count": 2, "generations": 1},
         "fewshot": {"methods": ["lora4"], "shots": [16], "seeds": [0], "epochs": 1}, "dg": True}


def modes_for(track: str) -> dict:
    return {**MODES[track], "smoke": SMOKE}


def results_path(track: str, mode: str) -> Path:
    return HERE / f"results-{track}{'' if mode == 'full' else '-' + mode}.json"


def prepare_data(track: Track) -> Path:
    """The track's task folders (cached by content hash)."""
    if track.name == "cnn":
        from .cnn_tasks import prepare_cached

        return prepare_cached(HERE / "data")
    from benchmarks.minivtab.prepare import prepare_cached

    return prepare_cached(HERE.parent / "minivtab" / "data")


class BackboneChanged(RuntimeError):
    """The results were measured on other weights than the checkpoint found now."""


def backbone_sha256(results: Path, ckpt: Path | str) -> str:
    """The checkpoint's sha256; raises BackboneChanged (results untouched) where ``results``
    recorded another one for the same backbone name: resuming would mix two backbones in one table.
    ``ckpt`` may be ``package:NAME`` (the CNN track's weights): the package's weights file is hashed."""
    from engine.pretrained import resolve_checkpoint

    ckpt = Path(ckpt)
    h = hashlib.sha256()
    with open(resolve_checkpoint(str(ckpt)), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    sha = h.hexdigest()
    old = json.loads(results.read_text()).get("meta", {}) if results.is_file() else {}
    if old.get("backbone") == ckpt.name and old.get("backbone_sha256") not in (None, sha):
        raise BackboneChanged(f"{results}: its runs used {ckpt.name} with sha256 {old['backbone_sha256'][:16]}, but {ckpt} "
                              f"has {sha[:16]}; put back the file they used (benchmarks/compare/backbones/ keeps the ViT's) "
                              f"or move {results.name} away to start the track over")
    return sha


def method_table(track: Track) -> list[tuple[str, str, str | None]]:
    """(method, what it is, why it is refused or None) for every method of the track."""
    return [(m, describe(spec), refusal(track, m)) for m, spec in track.methods.items()]


def run_track(name: str, mode: str, workers: int, path: Path | None = None, phase: str | None = None,
              claims: str | None = None, log=print) -> Path:
    import torch

    track = get_track(name)
    modes = modes_for(name)
    path = path or results_path(name, mode)
    # A method the track refuses (its own one-line MethodError) is never run; the reasons go into the
    # results. Workers filter the same way.
    refused = {m: why for m in track.methods if (why := refusal(track, m))}
    track = dataclasses.replace(track, methods={m: s for m, s in track.methods.items() if m not in refused})
    ckpt = track.checkpoint()
    root = prepare_data(track)
    if phase:  # a worker: the parent has written the metadata already
        Runner(mode, Path(ckpt), root, Results(path), log=log, track=track, modes=modes).run(phase, Path(claims))
        return path
    t0 = time.time()
    sha = backbone_sha256(path, ckpt)
    meta = {"mode": mode, "track": name, "settings": modes[mode], "backbone": Path(ckpt).name, "backbone_sha256": sha, "protocol": PROTOCOL,
            "track_settings": track_settings(track),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per worker",
            "lr_grid": {m: track.grid(m, modes[mode]["lr_grid_size"]) for m in track.methods}, "workers": workers}
    results = Results(path, meta)
    runner = Runner(mode, Path(ckpt), root, results, log=log, track=track, modes=modes)
    results.put("meta", "refused", refused)
    results.put("meta", "budgets", runner.budgets)
    # One entry per invocation, its wall time kept up to date while it runs: a run that spans several
    # sessions (each stopped at any point) still adds up to its true wall time.
    invocations = [*(results.get("meta", "invocations") or []), {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0}]

    def tick() -> None:
        invocations[-1]["wall_s"] = round(time.time() - t0, 1)
        results.put("meta", "invocations", invocations)

    tick()
    for ph in ("vtab", "fewshot"):
        if workers > 1:
            argv = ["--track", name, "--mode", mode, "--results", str(path)]
            run_workers(argv, workers, runner.runs / "claims", ph, module="benchmarks.compare", on_tick=tick)
        else:
            runner.run(ph)
        tick()
    results.put("meta", "total_wall_s", round(sum(i["wall_s"] for i in invocations), 1))
    results.put("meta", "finished", True)
    return path


def main(argv=None) -> int:
    import argparse

    import torch

    from benchmarks.minivtab import fmnist

    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--track", choices=[*TRACKS, "all"], default="all")
    p.add_argument("--quick", action="store_true", help="a few cells per track, < 15 min on 2 cores")
    p.add_argument("--mode", choices=["quick", "full", "smoke"], help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)  # set for worker processes
    p.add_argument("--list", action="store_true", help="print each track's methods (and why some are refused), then exit")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--phase", choices=["vtab", "fewshot"], help=argparse.SUPPRESS)
    p.add_argument("--claims", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    mode = args.mode or ("quick" if args.quick else "full")
    names = list(TRACKS) if args.track == "all" else [args.track]
    if args.list:
        for name in names:
            print(f"## {name}")
            for m, what, why in method_table(get_track(name)):
                print(f"- {m}: {what}" + (f"  [REFUSED: {why}]" if why else ""))
        return 0
    torch.set_num_threads(1)  # measured: on 2 shared cores 1 thread per worker is ~10x faster than 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .report import write_report, write_summary

    for name in names:
        path = Path(args.results) if args.results else results_path(name, mode)
        if not args.report_only:
            try:
                run_track(name, mode, args.workers, path, args.phase, args.claims)
            except (fmnist.FashionMNISTMissing, BackboneChanged) as err:
                print(err, file=sys.stderr)
                return 2
        if not args.phase:
            if not path.is_file():
                print(f"{path}: no results yet; run without --report-only first", file=sys.stderr)
                if len(names) == 1 or not any(results_path(n, mode).is_file() for n in names):
                    return 2
                continue
            write_report(path)
    if mode == "full" and not args.phase:
        paths = {n: results_path(n, "full") for n in TRACKS if results_path(n, "full").is_file()}
        for n, p_ in paths.items():
            if n not in names:  # the summary quotes every track's report: one --track run writes the others' too
                write_report(p_)
        if paths:
            write_summary(paths)
    return 0

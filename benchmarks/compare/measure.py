"""The CNN track's input resolution, chosen by measurement: ``python -m benchmarks.compare.measure``.

For each candidate resolution, one training step (batch 64: forward, cross-entropy, backward, AdamW)
and one evaluation batch (128 images, no gradient) of EfficientNet-Lite0 with the real ImageNet
weights, 1 thread, for the two kinds of model every cell trains: the ``lora`` preset (rank 4 on
every convolution, configs/space/conv.yaml) and the GLoRA conv supernet (a fresh random sub-network
each step, as train.py draws it). The median of ``--steps`` timed steps after 2 warm-up steps; the
JSON goes to ``--out`` and docs/benchmarks/compare.md turns it into the 8-hour arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _median_s(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(resolutions=(32, 48, 64), steps: int = 5, batch: int = 64, eval_batch: int = 128, log=print) -> dict:
    import methods
    from bench.lorafamily import _step  # the trainer's step, as the LoRA-family benchmark times it
    from engine.config import ModelConfig
    from engine.models import build_model
    from supernet import SubnetSampler, apply_glora, load_space

    from .tracks import CNN_CHECKPOINT, cnn_track

    torch.set_num_threads(1)
    track = cnn_track()
    space = load_space(track.space("large"))  # = configs/space/conv.yaml (tests/test_compare.py)
    out = {"threads": 1, "batch": batch, "eval_batch": eval_batch, "steps": steps, "torch": torch.__version__, "by_resolution": {}}
    base = build_model(ModelConfig(**track.model_config(CNN_CHECKPOINT)), 10)
    for res in resolutions:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(batch, 3, res, res, generator=g), torch.randint(0, 10, (batch,), generator=g)
        xe = torch.randn(eval_batch, 3, res, res, generator=g)
        row = {}
        import copy

        lora = methods.get("lora")
        m = copy.deepcopy(base)
        lora.apply(m, lora.settings(size=4), space)
        row["lora4_train_step_s"] = _median_s(_step(m, [], x, y), 2, steps)
        m.eval()
        with torch.no_grad():
            row["lora4_eval_batch_s"] = _median_s(lambda: m(xe), 1, steps)
        sn = apply_glora(copy.deepcopy(base), space)
        gen, sampler = torch.Generator().manual_seed(0), SubnetSampler(sn)
        row["supernet_train_step_s"] = _median_s(_step(sn, [], x, y, before=lambda: sampler(gen)), 2, steps)
        sn.eval()
        with torch.no_grad():
            row["supernet_eval_batch_s"] = _median_s(lambda: (sampler(gen), sn(xe)), 1, steps)
        out["by_resolution"][str(res)] = {k: round(v, 4) for k, v in row.items()}
        log(f"{res} px: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return out


def supernet_lr_probe(lrs, task: str = "mnist", root: Path | None = None, log=print) -> dict:
    """The CNN's glora_large supernet at each lr (the full mode's epochs and search, seed 0) on
    ``task``'s train800, scored on val200: the largest and smallest sub-networks after training, and
    the best sub-network the search finds. How tracks.CNN_SUPERNET_LR was chosen."""
    import tempfile

    import yaml

    from benchmarks.minivtab.run import Results, Runner

    from .run import modes_for, prepare_data
    from .tracks import cnn_track

    track = cnn_track()
    data = prepare_data(track)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner("full", Path(track.checkpoint()), data, Results(Path(tmp) / "results.json"), log=log, track=track,
                        modes=modes_for("cnn"), runs_root=Path(tmp))
        for lr in lrs:
            run = Path(tmp) / f"lr{lr:g}"
            runner.supernet("glora_large", run, {"kind": "vtab1k", "root": str(data / "vtab"), "task": task}, runner.m["epochs"], lr)
            ev = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
            best = yaml.safe_load((run / "search" / "result.yaml").read_text())["accuracy"]
            out[f"{lr:g}"] = {"largest": ev["acc_largest"], "smallest": ev["acc_smallest"], "search_best": best}
            log(f"supernet lr {lr:g} on {task}: val200 largest {ev['acc_largest']}, smallest {ev['acc_smallest']}, search best {best}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 48, 64])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "measure-cnn.json"))
    p.add_argument("--supernet-lr", type=float, nargs="+", metavar="LR",
                   help="instead: the CNN's supernet at these lrs, scored on mnist's val200 (about 2 min each)")
    args = p.parse_args(argv)
    if args.supernet_lr:
        torch.set_num_threads(1)
        print(json.dumps(supernet_lr_probe(args.supernet_lr), indent=1))
        return 0
    res = measure(tuple(args.resolutions), args.steps)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

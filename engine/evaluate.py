"""The evaluation entry point: a merged checkpoint on the val or test split of a run config's data."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from supernet import load_merged

from . import distributed as D
from .cli import INPUT_ERRORS, _fail
from .config import ConfigError, load_config
from .data import build_splits
from .models import build_model, load_state_file
from .stages import _data_config, probe_input_size
from .trainer import ShardSampler, evaluate


def main(doc: str | None = None, argv=None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="merged.safetensors (or any full state dict of the model)")
    parser.add_argument("--split", choices=["val", "test"], default="test", help="val: the search split, test: the final one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        info = D.setup(cfg.retrain.device, "retrain.device")
        phase = "search" if args.split == "val" else "final"
        _, ds, num_classes = build_splits(_data_config(cfg), phase, probe_input_size(cfg))
        cfg.model.pretrained, cfg.model.checkpoint = False, None
        model = build_model(cfg.model, num_classes)
        # strict, after giving bias-free layers the biases the merge may have created (C or E on them)
        load_merged(model, load_state_file(args.checkpoint), args.checkpoint)
        model.to(info.device)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.retrain.eval_batch_size, sampler=ShardSampler(len(ds), info))
        result = evaluate(model, loader, info, cfg.retrain.precision, topk=(1, 5) if num_classes > 5 else (1,))
    except INPUT_ERRORS as err:  # as the stage CLIs: the config first, unless the error is the config's own
        return _fail(str(err) if isinstance(err, ConfigError) else f"{args.config}: {err}", 2)
    finally:
        D.cleanup()
    if info.is_main:
        print(json.dumps({"checkpoint": args.checkpoint, "split": args.split, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

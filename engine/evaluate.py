"""The evaluation entry point: a merged checkpoint on the val or test split of a run config's data,
or on test-only image folders (out-of-domain sets such as ImageNet-V2, -Sketch, -A and -R)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from supernet import (WriteError, atomic_write_text, create_merged_model, load_merged, merged_input_spec,
                      timm_classifier_outputs)

from methods.export import create_adapted_model, is_adapted, load_adapted

from . import distributed as dist
from .cli import INPUT_ERRORS, _fail
from .config import ConfigError, load_config
from .data import DataError, build_folder_eval, build_splits, load_class_names, run_class_names
from .models import build_model, input_size, load_state_file
from .recipes.common import probe_input
from .trainer import ShardSampler, evaluate


def _parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run config (needed for --split; optional with --folder, where the "
                                          "model, input size and normalisation then come from the checkpoint's metadata)")
    parser.add_argument("--checkpoint", required=True, help="merged.safetensors (or any full state dict of the model), or the adapted.safetensors of a method that cannot merge")
    parser.add_argument("--split", choices=["val", "test"], help="val: the search split, test: the final one (the default without --folder)")
    parser.add_argument("--folder", action="append", default=[], metavar="DIR",
                        help="score on DIR/<class>/.../<image> instead of the config's data (repeatable: one JSON line each)")
    parser.add_argument("--classes", metavar="FILE",
                        help="with --folder: class names, line i naming output i by its first field "
                             "(default: the run's own class names; folders named 0, 1, ... are output indices)")
    parser.add_argument("--all-classes", action="store_true",
                        help="with --folder: let every output compete, even when a folder holds only some classes "
                             "(default: only the folder's classes do, as ImageNet-A and -R are scored)")
    parser.add_argument("--out", metavar="FILE", help="also write the results as a JSON list (written whole, at the end); "
                        "as <output_dir>/retrain/evaluate.json, python -m engine.report tabulates them")
    parser.add_argument("--batch-size", type=int, metavar="N", help="default: retrain.eval_batch_size, or 128 without --config")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="DataLoader workers decoding images; default: data.num_workers, or up to 8 (one per CPU) without --config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _from_checkpoint(path: str) -> tuple[torch.nn.Module, int, tuple, tuple]:
    """Without a run config: the model from the merged file's metadata, the input size and mean/std it
    was trained with (files from before that metadata: the model's size and ImageNet's statistics)."""
    model = create_adapted_model(path) if is_adapted(path) else create_merged_model(path)
    spec = merged_input_spec(path)
    return (model, int(spec.get("size") or input_size(model)), tuple(spec.get("mean") or IMAGENET_DEFAULT_MEAN),
            tuple(spec.get("std") or IMAGENET_DEFAULT_STD))


def main(doc: str | None = None, argv=None) -> int:
    parser = _parser(doc)
    args = parser.parse_args(argv)
    if args.folder and args.split:
        parser.error("--split and --folder exclude each other: --folder scores the folders instead of a split")
    if not args.folder and (args.classes or args.all_classes):
        parser.error("--classes and --all-classes apply to --folder only")
    if (args.batch_size is not None and args.batch_size < 1) or (args.workers is not None and args.workers < 0):
        parser.error("--batch-size must be at least 1 and --workers at least 0")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out {args.out}: its folder does not exist")
    if args.config is None and (not args.folder or args.set):
        parser.error("--config is needed for a split of the run's data and for --set; with --folder alone, "
                     "the model comes from the checkpoint's metadata")
    results, info, names_missing, cfg = [], None, None, None
    try:
        if args.config is not None:
            cfg = load_config(args.config, args.set)
        info = dist.setup(cfg.retrain.device if cfg else "auto", "retrain.device")
        try:
            names = load_class_names(args.classes) if args.classes else None
        except DataError as err:  # the file named on the command line, not the config, is at fault
            return _fail(str(err), 2)
        if cfg is None:
            model, img_size, mean, std = _from_checkpoint(args.checkpoint)
            num_classes, batch_size, precision, workers = model.num_classes, 128, "fp32", min(8, os.cpu_count() or 1)
        else:
            img_size, mean, std = probe_input(cfg)
            data = cfg.data
            state = load_state_file(args.checkpoint)
            if args.folder:  # the head's size from the checkpoint: the run's data need not be at hand
                num_classes = data.num_classes or timm_classifier_outputs(cfg.model.name, cfg.model.kwargs, state)
                if names is None:
                    try:
                        names = run_class_names(data)
                    except DataError as err:  # the run's data is elsewhere: folders named by index still work
                        names_missing = str(err)
            if not args.folder or num_classes is None:
                phase = "search" if args.split == "val" else "final"
                _, ds, num_classes = build_splits(data, phase, img_size, mean, std, cache=())
            cfg.model.pretrained, cfg.model.checkpoint = False, None
            model = build_model(cfg.model, num_classes)
            if is_adapted(args.checkpoint):  # a method that cannot merge: adapted as the file says
                load_adapted(model, args.checkpoint)
            else:  # strict, after giving bias-free layers the biases the merge may have created (C or E on them)
                load_merged(model, state, args.checkpoint)
            batch_size, precision, workers = cfg.retrain.eval_batch_size, cfg.retrain.precision, cfg.data.num_workers
        batch_size = args.batch_size or batch_size
        workers = workers if args.workers is None else args.workers
        model.to(info.device)

        def score(ds, classes=None) -> dict:
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), info), num_workers=workers)
            competing = num_classes if classes is None else len(classes)
            return evaluate(model, loader, info, precision, topk=(1, 5) if competing > 5 else (1,), classes=classes)

        if not args.folder:
            results.append({"checkpoint": args.checkpoint, "split": args.split or "test", **score(ds)})
        for folder in args.folder:
            try:
                fe = build_folder_eval(folder, names, num_classes, img_size, mean, std, names_missing)
                restricted = not args.all_classes and len(fe.classes) < num_classes
                result = score(fe.dataset, fe.classes if restricted else None)
            except DataError as err:  # names its folder or image already; the config is not at fault
                return _fail(str(err), 2)
            results.append({"checkpoint": args.checkpoint, "folder": folder, **result, "classes": len(fe.classes),
                            "outputs": num_classes, "restricted": restricted, "mapped_by": fe.mapped_by})
            if info.is_main:  # as each folder finishes: a long list of folders shows progress
                print(json.dumps(results[-1]), flush=True)
    except INPUT_ERRORS as err:  # as the stage CLIs: the config first, unless the error is the config's own
        return _fail(str(err) if isinstance(err, ConfigError) or cfg is None else f"{args.config}: {err}", 2)
    finally:
        dist.cleanup()
    if info.is_main and not args.folder:
        print(json.dumps(results[0]))
    if info.is_main and args.out:
        try:
            atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        except WriteError as err:
            return _fail(str(err), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

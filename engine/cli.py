"""Command-line plumbing shared by train.py, search.py and retrain.py.

Bad input (config, data, space, weights files) exits with status 2 and one line per problem,
never a traceback; an interrupted run exits with 128 + the signal number after saving.
"""

from __future__ import annotations

import argparse
import signal
import sys

from supernet import AdapterError, MergeError, SpaceError, WriteError

from .checkpoint import CheckpointError
from .compiling import CompileError
from .config import ConfigError, load_config
from .data import DataError
from .distributed import DeviceError
from .models import ModelError
from .trainer import TrainError

INPUT_ERRORS = (ConfigError, SpaceError, DataError, ModelError, AdapterError, CheckpointError, DeviceError)


def parse_args(stage: str, argv=None, doc: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"{stage}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start this stage afresh even if output_dir holds a run of another configuration")
    return parser.parse_args(argv)


def _fail(msg: str, code: int) -> int:
    for line in str(msg).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return code


def main(stage: str, argv=None, doc: str | None = None) -> int:
    from . import distributed as dist
    from .recipes.retrain import run_retrain
    from .recipes.search import run_search
    from .recipes.train import run_train

    args = parse_args(stage, argv, doc)
    runner = {"train": run_train, "search": run_search, "retrain": run_retrain}[stage]
    info = None
    try:
        cfg = load_config(args.config, args.set)
        info = dist.setup(getattr(cfg, stage).device, f"{stage}.device")
        status = runner(cfg, info, args.config, overwrite=args.overwrite)
    except INPUT_ERRORS as err:
        return _fail(str(err) if isinstance(err, ConfigError) else f"{args.config}: {err}", 2)
    except (TrainError, MergeError, CompileError, WriteError) as err:
        return _fail(str(err), 1)
    except OSError as err:  # any other file the run could not write (logs, folders): still one line
        return _fail(f"{err.filename + ': ' if err.filename else ''}{err.strerror or err}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        dist.cleanup()
    if status != "done":
        print(f"{stage}: stopped by {status}; a checkpoint was saved, rerun the same command to resume", file=sys.stderr)
        return 128 + int(getattr(signal, status, signal.SIGTERM))
    return 0

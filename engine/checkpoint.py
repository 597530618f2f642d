"""Training checkpoints: written to a temporary file and renamed, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from supernet import atomic_write


class CheckpointError(ValueError):
    """A checkpoint is unreadable, unsafe, or from another run."""


# Fault-injection tests set this to hold a checkpoint write open (seconds) so a kill lands inside it.
_PAUSE_ENV = "GLORA_TEST_PAUSE_IN_CHECKPOINT_WRITE"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)

    def write(tmp: str) -> None:
        torch.save(state, tmp)
        if pause:
            time.sleep(pause)

    atomic_write(path, write)


def safe_torch_load(path: str | Path, error: type[Exception], what: str = "file") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file.

    Pickled custom objects are refused by the restricted unpickler, so nothing is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise error(f"{path}: empty {what}")
    try:
        with warnings.catch_warnings():
            # Files pickled with protocol 4 (older torch.save, e.g. released pretrained weights) load
            # fine; torch still warns on each of them, which only alarms a user.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refusals, truncation, wrong format
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise error(f"{path}: refused or unreadable with weights_only=True ({first[:200]})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (see :func:`safe_torch_load`)."""
    state = safe_torch_load(path, CheckpointError, "checkpoint file")
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint of this project (no 'step'/'model')")
    return state

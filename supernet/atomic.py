"""Atomic file writes: every write goes to a temporary file in the target folder, is flushed to
disk, then renamed over the target, so a crash mid-write never leaves a half-written file under
the real name."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError


class WriteError(OSError):
    """A file could not be written (disk full, no permission); whatever was under its name is intact."""


# Below this much free space, a failed write is reported as a full disk: torch.save then only says
# "unexpected pos 576 vs 534", and safetensors wraps the errno in its own error type.
_FULL_DISK_BYTES = 1 << 20


def _write_failure(path: Path, err: BaseException) -> WriteError:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < _FULL_DISK_BYTES:
        reason = f"no space left on the device ({free:,} bytes free)"
    else:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
    return WriteError(f"{path}: cannot write: {reason}; the file already under this name, if any, is intact")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename the temporary file to ``path``. A failure
    (disk full, no permission; also torch's and safetensors' own errors for them) raises
    :class:`WriteError` naming ``path``, with the temporary file removed and ``path`` untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_failure(path, err) from err
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as err:
        failure = _write_failure(path, err)  # before the partial file is removed: it holds the space
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise failure from err
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))

"""Run logging: TensorBoard events, ``metrics.jsonl`` and console lines. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


class Tracker:
    def __init__(self, log_dir: str | Path, enabled: bool = True, tb_subdir: str = "tb"):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._tb = None
        self._tb_dir = self.log_dir / tb_subdir
        self._jsonl = self.log_dir / "metrics.jsonl"

    @property
    def tb(self):
        if self._tb is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir))
        return self._tb

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        """Scalars to TensorBoard as ``kind/name`` and one JSON line with everything."""
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(f"{kind}/{key}", value, step)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self._jsonl.open("a") as fh:
            fh.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

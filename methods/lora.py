"""LoRA (Hu et al. 2021): W = W0 + B A with rank-r factors, B zero at the start (GLoRA's B = lora_r)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodError
from .glora_path import glora_preset


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise MethodError(f"rank: must be a positive integer, got {self.rank!r}")


METHOD = glora_preset("lora", "low-rank update B·A of every targeted weight", LoraSettings,
                      lambda s: dict(A="none", B=f"lora{s.rank}", C="none", D="none", E="none"), size="rank")

"""The ``lora:`` block of the train and retrain sections (docs/lora-family.md): LoRA's scale of the
low-rank GLoRA tensors, with PEFT's names, and its checks across keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import methods
from methods.noah import NoahSpace
from supernet import LoraScaling, SpaceError

from .schema import check, positive


@dataclass
class LoraOptions:
    """LoRA's scale s of every low-rank GLoRA tensor (A, B, C lora_r; vector, scalar and none are not scaled), with PEFT's names (docs/lora-family.md): s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (rsLoRA), r the rank of the active choice. Saved with the adapter and supernet files."""

    lora_alpha: float | None = field(default=None, metadata=check(positive))  # null: s = 1 (unscaled, as before this key); PEFT's default is 8
    use_rslora: bool = False  # s = lora_alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023); needs lora_alpha

    def scaling(self) -> LoraScaling | None:
        """What :func:`supernet.apply_glora` takes (None: s = 1)."""
        return None if self.lora_alpha is None else LoraScaling(self.lora_alpha, self.use_rslora)


def lora_checks(cfg, problems: list[str]) -> None:
    """train.lora and retrain.lora: use_rslora needs lora_alpha; a scale only where there are GLoRA layers to scale."""
    for section in ("train", "retrain"):
        lora = getattr(cfg, section).lora
        if lora.use_rslora and lora.lora_alpha is None:
            problems.append(f"{section}.lora.use_rslora: rsLoRA scales by lora_alpha / sqrt(r), so it needs {section}.lora.lora_alpha")

    def noah() -> bool:  # a space that failed to parse was reported already
        try:
            return isinstance(cfg.search_space, NoahSpace)
        except (SpaceError, methods.MethodError, OSError, TypeError, ValueError):
            return False

    if cfg.train.lora.lora_alpha is not None and noah():
        problems.append("train.lora.lora_alpha: scales GLoRA's low-rank tensors; a NOAH supernet has none (leave it null)")
    r = cfg.retrain
    if r.lora.lora_alpha is None:
        return
    if r.preset is not None and not methods.get(r.preset).lora_scaling:
        takes = ", ".join(m for m in methods.PRESETS if methods.get(m).lora_scaling)
        problems.append(f"retrain.lora.lora_alpha: scales GLoRA's low-rank tensors; preset {r.preset} has none "
                        f"(the presets that take it: {takes})")
    elif r.preset is None and noah():
        problems.append("retrain.lora.lora_alpha: scales GLoRA's low-rank tensors; a NOAH sub-network has none (leave it null)")

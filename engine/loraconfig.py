"""The ``lora:`` block of the train and retrain sections (docs/lora-family.md): the LoRA family's
options for GLoRA's low-rank tensors and the GLoRA-path presets, with PEFT's names, and their
checks across keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import methods
from methods.noah import NoahSpace
from supernet import LoraScaling, SpaceError

from .schema import at_most, check, positive


@dataclass
class LoraOptions:
    """The LoRA family on every low-rank GLoRA tensor (A, B, C lora_r) and the lora preset, PEFT's names (docs/lora-family.md). Saved with the adapter and supernet files."""

    # LoRA's scale s = lora_alpha / r (or / sqrt(r) with use_rslora), r the active rank; vector, scalar and none are not scaled
    lora_alpha: float | None = field(default=None, metadata=check(positive))  # null: s = 1 (unscaled, as before this key); PEFT's default is 8
    use_rslora: bool = False  # s = lora_alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023); needs lora_alpha
    # The factors' start, in offset form (the model still starts at W0): PiSSA (B's top singular triplets of W0),
    # LoRA-GA (the SVD of the first full gradient, estimated over lora_ga_batches batches)
    init_lora_weights: Literal["default", "pissa", "lora_ga"] = "default"
    lora_ga_batches: int = field(default=8, metadata=check(at_most(1024, "each is a forward and backward pass")))  # LoRA-GA: batches G is averaged over (authors: 8-64)
    use_dora: bool = False  # DoRA: a learned magnitude per output row times the direction of the adapted weight
    loraplus_lr_ratio: float | None = field(default=None, metadata=check(positive))  # LoRA+: down factors learn this much faster (authors: 16)
    lora_pro: bool = False  # LoRA-Pro: factor gradients whose equivalent gradient best approximates the full one

    def scaling(self) -> LoraScaling | None:
        """What :func:`supernet.apply_glora` takes (None: s = 1)."""
        return None if self.lora_alpha is None else LoraScaling(self.lora_alpha, self.use_rslora)

    def set_keys(self) -> list[str]:
        """The options that differ from their defaults (lora_ga_batches counts only with lora_ga)."""
        default = LoraOptions()
        return [k for k in ("lora_alpha", "use_rslora", "init_lora_weights", "use_dora", "loraplus_lr_ratio", "lora_pro")
                if getattr(self, k) != getattr(default, k)]


def _kinds(space, tensor: str) -> set[str]:
    """The choice kinds ``space`` (a GLoRA space) allows ``tensor``, over all its layers."""
    choices = space.choices.get(tensor, ()) if hasattr(space, "choices") else ()
    return {getattr(c, "kind", str(c)) for c in choices}


def lora_checks(cfg, problems: list[str]) -> None:
    """train.lora and retrain.lora: each option only where there are GLoRA low-rank tensors for it,
    and no combination that cannot hold."""
    for section in ("train", "retrain"):
        lora = getattr(cfg, section).lora
        if lora.use_rslora and lora.lora_alpha is None:
            problems.append(f"{section}.lora.use_rslora: rsLoRA scales by lora_alpha / sqrt(r), so it needs {section}.lora.lora_alpha")
        if lora.init_lora_weights == "lora_ga" and cfg.model.head_init == "zero":
            problems.append(f"{section}.lora.init_lora_weights: lora_ga starts from the gradient that reaches the layers through the "
                            f"head, and model.head_init: zero lets none through; use model.head_init: timm, or another init")

    def noah() -> bool:  # a space that failed to parse was reported already
        try:
            return isinstance(cfg.search_space, NoahSpace)
        except (SpaceError, methods.MethodError, OSError, TypeError, ValueError):
            return False

    def space_kinds(tensor: str) -> set[str]:
        try:
            return _kinds(cfg.search_space, tensor)
        except (SpaceError, methods.MethodError, OSError, TypeError, ValueError):
            return {"lora"}  # reported already; do not add a second line about it

    keys = cfg.train.lora.set_keys()
    if keys and noah():
        problems.append(f"train.lora.{keys[0]}: acts on GLoRA's low-rank tensors; a NOAH supernet has none (leave the lora block unset)")
    elif keys:
        _init_checks("train", cfg.train.lora, {t: space_kinds(t) for t in "ABC"}, problems)
    r = cfg.retrain
    if r.preset is None and r.init == "supernet" and cfg.train.lora.use_dora and not r.lora.use_dora:
        problems.append("retrain.lora.use_dora: the supernet is trained with DoRA (train.lora.use_dora) and retrain.init: supernet "
                        "takes its magnitudes, which cannot be dropped without changing the sub-network; set it true too")
    keys = r.lora.set_keys()
    if keys and r.preset is None and r.init == "inherit":
        problems.append(f"retrain.lora.{keys[0]}: retrain.init: inherit keeps the supernet's sub-network as trained, with "
                        f"train.lora's options; leave retrain.lora unset")
        return
    if not keys:
        return
    if r.preset is not None and not methods.get(r.preset).lora_scaling:
        takes = ", ".join(m for m in methods.PRESETS if methods.get(m).lora_scaling)
        problems.append(f"retrain.lora.{keys[0]}: acts on GLoRA's low-rank tensors; preset {r.preset} has none "
                        f"(the presets that take the lora block: {takes})")
        return
    if r.preset is None and noah():
        problems.append(f"retrain.lora.{keys[0]}: acts on GLoRA's low-rank tensors; a NOAH sub-network has none (leave the lora block unset)")
        return
    if r.preset is not None:
        # the preset's one choice per tensor, at the run's size (its low-rank tensors: LoRA's B)
        m, choice = methods.get(r.preset), {}
        if m.glora_choice is not None:
            try:
                choice = m.glora_choice(m.settings(size=r.rank, **r.method_args))
            except (methods.MethodError, TypeError, ValueError):
                pass  # its settings are reported by the method_args check
        kinds = {t: {"lora"} if choice.get(t, "none").startswith("lora") else set() for t in "ABC"}
    else:
        kinds = {t: space_kinds(t) for t in "ABC"}
    _init_checks("retrain", r.lora, kinds, problems)
    if r.preset is None and r.init == "supernet":
        if r.lora.init_lora_weights != "default":
            problems.append(f"retrain.lora.init_lora_weights: {r.lora.init_lora_weights} sets the factors' start, and retrain.init: "
                            f"supernet takes them from the supernet; use one (retrain.init: scratch, or init_lora_weights: default)")


def _init_checks(section: str, lora: LoraOptions, kinds: dict[str, set[str]], problems: list[str]) -> None:
    """An option that would act on no tensor of this run is refused in one line."""
    low_rank = [t for t in "ABC" if "lora" in kinds[t]]
    where = f"{section}.lora"
    if lora.init_lora_weights == "pissa" and "B" not in low_rank:
        problems.append(f"{where}.init_lora_weights: pissa starts B's low-rank factors from W0's singular vectors; this run has "
                        f"no low-rank B (PiSSA cannot apply to A or C, whose base is not W0)")
    if lora.init_lora_weights == "lora_ga" and not ({"A", "B"} & set(low_rank)):
        problems.append(f"{where}.init_lora_weights: lora_ga starts A's and B's low-rank factors from the first gradient; "
                        f"this run has no low-rank A or B")
    for key in ("loraplus_lr_ratio", "lora_pro"):
        if getattr(lora, key) not in (None, False) and not low_rank:
            problems.append(f"{where}.{key}: acts on low-rank choices; this run's A, B and C have none")

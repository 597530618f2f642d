"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512): every targeted Linear gets an SVD-shaped
update ``ΔW = s · P diag(λ) Q`` (P: out×r, λ: r, Q: r×in) whose ranks are pruned to a budget while
training, by zeroing the λ of the least important triplets (P[:, i], λ_i, Q[i]).

The layer (:class:`AdaLoraLinear`) is the method's ``apply``; the training-time part (the
orthogonality penalty, the importance averages, the cubic budget schedule and the masking) is
:class:`AdaLoraHooks`, which the trainer calls every step (methods/hooks.py). The math lives in
methods/lorafamily/adalora.py, tested against PEFT; this module wires it into the pipeline with
PEFT's names and defaults. A pruned triplet has λ_i = 0, so the merge ``W0 + s P diag(λ) Q``
returns the plain timm model whatever the ranks. docs/methods/adalora.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from supernet import SearchSpace, find_targets, set_submodule

from .base import Method, MethodError, freeze_all_but_head, trainable_outside_head
from .hooks import TrainingHooks
from .lorafamily.adalora import (adalora_scale, budget_masks, budget_schedule, element_score, orthogonality_penalty,
                                 triplet_scores, update_importance)


def _int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class AdaLoraSettings:
    """PEFT's ``AdaLoraConfig`` names and defaults (``total_step`` is the run's number of steps)."""

    init_r: int = 12  # every path's rank before pruning (retrain.rank)
    target_r: int = 8  # the average rank the budget falls to: the final budget is target_r × paths
    tinit: int = 0  # warm-up steps before any pruning
    tfinal: int = 0  # final steps on a fixed rank pattern
    deltaT: int = 1  # steps between two maskings while the budget falls
    beta1: float = 0.85  # smoothing of the sensitivity |w · ∂L/∂w|
    beta2: float = 0.85  # smoothing of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on P and Q
    lora_alpha: float = 8  # α; s = α / init_r (α ≤ 0: s = 1), fixed while ranks are pruned

    def __post_init__(self):
        if not _int(self.init_r, 1):
            raise MethodError(f"init_r: must be a positive integer, got {self.init_r!r}")
        if not _int(self.target_r, 1):
            raise MethodError(f"target_r: must be a positive integer, got {self.target_r!r}")
        if self.target_r > self.init_r:
            raise MethodError(f"target_r: must be at most init_r (retrain.rank, {self.init_r}), got {self.target_r}")
        for key in ("tinit", "tfinal"):
            if not _int(getattr(self, key), 0):
                raise MethodError(f"{key}: must be a non-negative integer (steps), got {getattr(self, key)!r}")
        if not _int(self.deltaT, 1):
            raise MethodError(f"deltaT: must be a positive integer (steps), got {self.deltaT!r}")
        for key in ("beta1", "beta2"):
            if not (_real(getattr(self, key)) and 0 < getattr(self, key) < 1):
                raise MethodError(f"{key}: must be a number in (0, 1), got {getattr(self, key)!r}")
        if not (_real(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise MethodError(f"orth_reg_weight: must be a finite number >= 0, got {self.orth_reg_weight!r}")
        if not (_real(self.lora_alpha) and self.lora_alpha >= 0):
            raise MethodError(f"lora_alpha: must be a finite number >= 0 (0: init_r, so s = 1), got {self.lora_alpha!r}")


class AdaLoraLinear(nn.Module):
    """``base(x) + s · P ((λ ⊙ Q) x)``: a frozen Linear with an AdaLoRA path.

    ``P`` (out, r) and ``Q`` (r, in) start as PEFT's ``lora_B`` and ``lora_A`` do, normal with std
    0.02; ``lam`` (PEFT's ``lora_E``, kept as a vector) starts at zero, so the layer starts as its
    base layer, and P, Q get gradients only once λ has moved (λ gets its gradient from the start)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        w = base.weight
        new = dict(device=w.device, dtype=w.dtype)
        self.base = base
        self.rank, self.scale = rank, float(scale)
        self.P = nn.Parameter(torch.empty(base.out_features, rank, **new))
        self.lam = nn.Parameter(torch.zeros(rank, **new))
        self.Q = nn.Parameter(torch.empty(rank, base.in_features, **new))
        if w.device.type != "meta":
            nn.init.normal_(self.P, std=0.02)
            nn.init.normal_(self.Q, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the r-wide path, never forming ΔW (out × in)
        return self.base(x) + self.scale * ((x @ self.Q.T) * self.lam) @ self.P.T

    def delta(self) -> torch.Tensor:
        """ΔW = s · P diag(λ) Q, (out, in)."""
        return self.scale * (self.P @ (self.lam[:, None] * self.Q))

    def effective_rank(self) -> int:
        """The triplets left: non-zero λ."""
        return int(torch.count_nonzero(self.lam.detach()))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with ΔW added, folded in float64 (masked triplets add nothing: λ_i = 0)."""
        w = self.base.weight
        dw = self.scale * (self.P.double() @ (self.lam.double()[:, None] * self.Q.double()))
        w.copy_((w.double() + dw).to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def adalora_layers(model: nn.Module) -> list[tuple[str, AdaLoraLinear]]:
    """The model's AdaLoRA layers by name, in module order (the order every rank sees)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoraLinear)]


def effective_ranks(model: nn.Module) -> dict[str, int]:
    """Each path's rank after pruning (its non-zero λ), by layer name."""
    return {n: m.effective_rank() for n, m in adalora_layers(model)}


def _targets(model: nn.Module, space) -> list[str]:
    """The Linear layers the run's space targets (``targets``/``exclude``; a space without them,
    as NOAH's, means every linear layer but the classifier)."""
    if not isinstance(space, SearchSpace):
        space = SearchSpace(targets=getattr(space, "targets", "all-linear"), exclude=list(getattr(space, "exclude", [])),
                            source=getattr(space, "source", "space"))
    names = find_targets(model, space)
    convs = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if convs:
        # PEFT's AdaLoRA (and the paper) adapt linear layers only; a kernel has no one SVD shape to prune
        more = f" (+{len(convs) - 3} more)" if len(convs) > 3 else ""
        raise MethodError(f"adalora adapts nn.Linear layers only; the space's targets include "
                          f"{', '.join(f'{n} ({type(model.get_submodule(n)).__name__})' for n in convs[:3])}{more}; "
                          f"use targets: all-linear or exclude them")
    return names


def _apply(model: nn.Module, settings: AdaLoraSettings, space) -> nn.Module:
    names = _targets(model, space)
    freeze_all_but_head(model)
    scale = adalora_scale(settings.lora_alpha, settings.init_r)
    for name in names:
        set_submodule(model, name, AdaLoraLinear(model.get_submodule(name), settings.init_r, scale))
    return model


def _merge(model: nn.Module) -> nn.Module:
    for name, layer in adalora_layers(model):
        set_submodule(model, name, layer.merged())
    return model


class AdaLoraHooks(TrainingHooks):
    """What AdaLoRA adds to each training step, as PEFT's ``AdaLoraModel`` and ``RankAllocator`` do
    with the trainer's 0-based step t and T = the run's total steps, t_f = T − tfinal:

    - every micro-batch's loss gets ``orth_reg_weight · R̄`` (the mean of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F);
    - after the optimizer step of t < t_f: the importance averages of every P, λ, Q entry take the
      step's gradients, then, on a masking step of the cubic schedule, the λ of every triplet outside
      the budget b(t) (ranked over all paths) is zeroed;
    - at t = t_f: the last masking, to target_r × paths; that pattern is kept and the averages dropped;
    - after t > t_f: the kept pattern is applied again (the optimizer would revive zeroed λ).

    Everything is a function of the parameters and the (rank-averaged) gradients, computed in the
    same order on every rank, so ranks stay equal. The state (averages, kept pattern) is
    checkpointed, so a resumed run continues exactly.
    """

    name = "adalora"

    def __init__(self, model: nn.Module, settings: AdaLoraSettings):
        self.settings = settings
        self.layers = adalora_layers(model)
        if not self.layers:
            raise MethodError("adalora: the model has no AdaLoRA layers; apply the method before building its hooks")
        self.init_budget = sum(layer.rank for _, layer in self.layers)
        self.target_budget = settings.target_r * len(self.layers)
        self.avg_ipt: dict[str, torch.Tensor] = {}  # "<layer>.P" etc. -> smoothed sensitivity
        self.avg_unc: dict[str, torch.Tensor] = {}  # -> smoothed uncertainty
        self.pattern: dict[str, torch.Tensor] | None = None  # the final phase's kept triplets, per layer
        self.last_budget: int | None = None  # the budget of the last masking (for logs and tests)

    # -- the schedule ---------------------------------------------------------------------------
    def check_schedule(self, total_steps: int) -> None:
        """Raise :class:`MethodError`, one line, where the run is too short for a pruning phase
        (PEFT's condition tinit < total_step − tfinal). after_step checks it at every step; a caller
        that knows the run's steps before training (the recipe) can call it first."""
        s = self.settings
        if s.tinit >= total_steps - s.tfinal:
            raise MethodError(f"adalora: tinit ({s.tinit}) + tfinal ({s.tfinal}) leave no pruning phase in the run's "
                              f"{total_steps} training steps; lower retrain.method_args.tinit/tfinal or train longer")

    def check(self, total_steps: int) -> None:
        self.check_schedule(total_steps)

    def budget(self, step: int, total_steps: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step`` before the final phase (lorafamily.budget_schedule)."""
        s = self.settings
        return budget_schedule(step, self.init_budget, self.target_budget, total_steps, s.tinit, s.tfinal, s.deltaT)

    # -- the loss -------------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        w = self.settings.orth_reg_weight
        if w == 0:
            return None
        # in the parameters' own precision: under autocast the Gram matrices of small factors would
        # round to bf16/fp16, and the penalty is cheap (r×r per path)
        with torch.autocast(device_type=self.layers[0][1].P.device.type, enabled=False):
            return w * orthogonality_penalty([(layer.P, layer.Q) for _, layer in self.layers])

    # -- after the optimizer step -----------------------------------------------------------------
    def _update_importance(self) -> None:
        b1, b2 = self.settings.beta1, self.settings.beta2
        for name, layer in self.layers:
            for part in ("P", "lam", "Q"):
                p = getattr(layer, part)
                key = f"{name}.{part}"
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                self.avg_ipt[key], self.avg_unc[key] = update_importance(p.detach(), grad, self.avg_ipt.get(key),
                                                                         self.avg_unc.get(key), b1, b2)

    def scores(self) -> dict[str, torch.Tensor]:
        """Each path's triplet scores from the current averages, by layer name."""
        out = {}
        for name, _ in self.layers:
            s = {part: element_score(self.avg_ipt[f"{name}.{part}"], self.avg_unc[f"{name}.{part}"])
                 for part in ("P", "lam", "Q")}
            out[name] = triplet_scores(s["P"], s["lam"], s["Q"])
        return out

    @torch.no_grad()
    def _mask(self, masks: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers:
            layer.lam.masked_fill_(~masks[name], 0)

    def _mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.layers]
        scores = self.scores()
        masks = dict(zip(names, budget_masks([scores[n] for n in names], budget)))
        self._mask(masks)
        self.last_budget = budget
        return masks

    def _finite_grads(self) -> bool:
        flags = [torch.isfinite(p.grad).all() for _, layer in self.layers for p in (layer.P, layer.lam, layer.Q)
                 if p.grad is not None]
        return not flags or bool(torch.stack(flags).all())  # one device sync

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.check_schedule(total_steps)
        if not self._finite_grads():
            # fp16's loss scale overflowed: the scaler skipped this optimizer step, and infinite
            # sensitivities would poison the averages for good; the step counts as not taken
            return
        final = total_steps - self.settings.tfinal
        if step < final:
            self._update_importance()
            budget, mask_now = self.budget(step, total_steps)
            if mask_now:
                self._mask_to_budget(budget)
        elif step == final:
            # the final pattern, at the target budget, from the averages as they stand (PEFT does not
            # update them at this step); they are not needed after it
            self.pattern = self._mask_to_budget(self.target_budget)
            self.avg_ipt, self.avg_unc = {}, {}
        else:
            if self.pattern is None:
                raise RuntimeError(f"adalora: step {step} is past the final masking (step {final}), which never ran")
            self._mask(self.pattern)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {"avg_ipt": cpu(self.avg_ipt), "avg_unc": cpu(self.avg_unc),
                "pattern": None if self.pattern is None else cpu(self.pattern),
                "last_budget": self.last_budget}

    def load_state_dict(self, state: dict) -> None:
        devices = {f"{n}.{part}": getattr(layer, part).device for n, layer in self.layers for part in ("P", "lam", "Q")}
        known = set(devices) | {n for n, _ in self.layers}
        saved = set(state["avg_ipt"]) | set(state["avg_unc"]) | set(state["pattern"] or {})
        if saved - known:
            raise MethodError(f"adalora: the checkpoint's importance state is for other layers "
                              f"({sorted(saved - known)[0]}, ...); start afresh with --overwrite")
        self.avg_ipt = {k: v.to(devices[k]) for k, v in state["avg_ipt"].items()}
        self.avg_unc = {k: v.to(devices[k]) for k, v in state["avg_unc"].items()}
        self.pattern = None if state["pattern"] is None else {k: v.to(devices[f"{k}.lam"]) for k, v in state["pattern"].items()}
        self.last_budget = state.get("last_budget")


METHOD = Method(name="adalora", summary="an SVD-shaped update s·P diag(λ) Q of every targeted Linear, ranks pruned to a budget",
                config=AdaLoraSettings, apply=_apply, count=trainable_outside_head, merge=_merge, size="init_r",
                hooks=lambda model, settings: [AdaLoraHooks(model, settings)], test_sizes=(12, 8))

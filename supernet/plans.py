"""Per-choice plans of a GLoRA layer: which slice of each shared parameter a choice uses, worked
out once per choice and layer shape, and the helpers that take those slices and give their
gradients the parameters' full shapes (docs/method.md §2, weight entanglement).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import torch

from .cast import _as, _eager_cache
from .space import Choice


class LoraScaling(NamedTuple):
    """LoRA's scale of a low-rank tensor, PEFT's names: ``s = lora_alpha / r`` (Hu et al. 2021), or
    ``lora_alpha / sqrt(r)`` with ``use_rslora`` (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732), ``r``
    the rank of the active choice (a lora4 slice of a rank-8 shared tensor uses r = 4). A layer
    without one (None) scales by 1. Only low-rank choices are scaled; vector, scalar and none are not."""

    lora_alpha: float
    use_rslora: bool = False

    def scale(self, r: int) -> float:
        return self.lora_alpha / math.sqrt(r) if self.use_rslora else self.lora_alpha / r

    def to_dict(self) -> dict:
        return {"lora_alpha": float(self.lora_alpha), "use_rslora": bool(self.use_rslora)}


def lora_factor(c: Choice, scaling: LoraScaling | None) -> float | None:
    """The scale of choice ``c`` under ``scaling``; None where it is 1 (nothing to multiply)."""
    if scaling is None or c.kind != "lora":
        return None
    s = scaling.scale(c.rank)
    return None if s == 1.0 else s


class _Plan(NamedTuple):
    """What one layer computes under one choice, worked out when the choice is set.

    A supernet step is made of many small operations, so on a GPU at moderate batch sizes, and on
    small models anywhere, it is bound by the host: Python and dispatch, not arithmetic. Working
    out which parameters a choice uses, which slice of each and what shape each gradient needs
    once per choice (plans are shared by layers of the same shape) keeps that work off every call.

    ``names`` are the shared parameters behind (Ad, Au, Bd, Bu, Cd, Cu, D, E), None where unused;
    ``index`` the leading slice of each that the choice uses, None where that is all of it (always
    so in an extracted sub-network); ``lead`` the shape of that slice and ``shapes`` the full one.
    """

    fn: type | None  # None: every tensor is none, a plain linear layer
    names: tuple[str | None, ...]
    index: tuple[tuple[slice, ...] | None, ...]
    lead: tuple[tuple[int, ...] | None, ...]
    shapes: tuple[tuple[int, ...] | None, ...]
    sliced: bool  # some parameter is used in part
    first: int  # a parameter that is used (for the adapters' dtype)
    # LoRA's scale s (LoraScaling) of the low-rank A, B, C: ((k, s), ...) for the down factors k
    # scaled by s != 1, None where there is none. The down slice is multiplied by s when taken, and
    # its gradient (of the scaled slice) by s on the way back; the up factor's needs nothing.
    scales: tuple[tuple[int, float], ...] | None = None


@functools.lru_cache(maxsize=4096)
def _tensor_plan(t: str, c: Choice, shape: tuple[int, ...] | None, up_shape: tuple[int, ...] | None, out_f: int, in_f: int,
                 own_vector: bool = False):
    """One tensor's share of a plan: the names, slices and slice shapes of its one (D, E) or two
    (A, B, C: down and up) parameters; ``own_vector``: a vector/scalar choice with its own parameter
    ``glora_Xv``. A supernet draws a new plan for most layers in its first few hundred steps;
    building plans from these parts keeps each miss to a few microseconds."""
    if t in ("D", "E"):
        leads = ({"vector": (out_f,), "scalar": (1,)}.get(c.kind),)
        shapes: tuple = (shape,)
    else:
        rows, cols = (in_f, 1) if t == "C" else (out_f, in_f)
        if c.kind == "lora":
            leads = ((rows, c.rank), (c.rank, cols))
        else:
            leads = ({"vector": (rows, 1), "scalar": (1, 1)}.get(c.kind), None)
        shapes = (shape, up_shape)
    base = "glora_" + t
    down = base + ("v" if own_vector else "d")  # a vector/scalar choice's own parameter (GLoraLayer.vector_params)
    names = tuple(None if n is None else name for n, name in zip(leads, (down, base + "u") if t in "ABC" else (base,)))
    index = tuple(None if n is None or n == s else tuple(slice(0, k) for k in n) for n, s in zip(leads, shapes))
    return names, index, leads


def _take(params: Sequence[torch.Tensor | None], plan: _Plan) -> list[torch.Tensor | None]:
    """The active slices of the shared parameters (None where unused)."""
    taken = params if not plan.sliced else [p if i is None or p is None else p[i] for p, i in zip(params, plan.index)]
    if plan.scales is None:  # the default: no scale, not one multiply more
        return taken
    taken = list(taken)
    for k, s in plan.scales:
        taken[k] = taken[k] * s
    return taken


def _scale_grads(grads: tuple, plan: _Plan, offset: int = 4) -> tuple:
    """The gradients an autograd function returns (parameter ``k`` at ``offset + k``), those of the
    scaled down factors multiplied by their scale: computed against the scaled slice, ``s·D``."""
    grads = list(grads)
    for k, s in plan.scales:
        if grads[offset + k] is not None:
            grads[offset + k] = grads[offset + k].mul_(s)
    return tuple(grads)


def _full(g: torch.Tensor, k: int, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """The gradient ``g`` of parameter ``k``'s active slice as a gradient of all of it (zero outside the slice), in ``dtype``."""
    index, shape = plan.index[k], plan.shapes[k]
    if index is None:
        return _as(g, dtype)
    if all(n == 1 or n == m for n, m in zip(g.shape, shape)):
        # A column or a scalar (vector, scalar choices): broadcast against a 0/1 mask, one kernel
        return torch.mul(g, _slice_mask(shape, tuple(g.shape), dtype, g.device))
    out = g.new_zeros(shape, dtype=dtype)
    out[index] = g  # the copy casts too
    return out


@_eager_cache(maxsize=1024)
def _slice_mask(shape: tuple[int, ...], lead: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 on the leading ``lead`` slice of a ``shape`` tensor, 0 elsewhere (read only)."""
    mask = torch.zeros(shape, dtype=dtype, device=device)
    mask[tuple(slice(0, n) for n in lead)] = 1
    return mask


def _mm_full(a: torch.Tensor, b: torch.Tensor, k: int, plan: _Plan) -> torch.Tensor:
    """``a @ b``, the gradient of parameter ``k``'s active slice, as the leading slice of a zero tensor of its full shape."""
    if plan.index[k] is None:
        return a @ b
    out = a.new_zeros(plan.shapes[k])
    torch.mm(a, b, out=out[plan.index[k]])
    return out


def _fit(v: torch.Tensor, k: int, plan: _Plan) -> torch.Tensor:
    """A per-row gradient, ``(rows,)`` or ``(rows, 1)``, shaped for parameter ``k``'s active slice: summed when that is a scalar."""
    lead = plan.lead[k]
    if v.shape == lead:
        return v
    return v.sum().reshape(lead) if math.prod(lead) == 1 else v.view(lead)



# The frozen initial factors of a data-aware init (PiSSA, LoRA-GA; docs/lora-family.md), in the
# order a layer passes them after its parameters: the offset form is ``s (D U − D⁰ U⁰)``.
OFFSETS = ("glora_Ad0", "glora_Au0", "glora_Bd0", "glora_Bu0", "glora_Cd0", "glora_Cu0")


def _split_offsets(params: Sequence[torch.Tensor | None], plan: _Plan):
    """``(the parameters, their 6 frozen initial factors taken as :func:`_take` takes the factors)``:
    sliced like the parameter they belong to and, for a scaled down factor, multiplied by the same
    ``s``, so ``s D⁰`` is the very computation ``s D`` is and their products cancel bit for bit.
    A layer without offsets passes only the parameters: ``(params, None)``. An offset whose
    parameter the choice leaves unused is None."""
    n = len(plan.names)
    if len(params) == n:
        return params, None
    # a vector or scalar choice with its own parameter (vector_params, a name ending in "v") has no offset
    offs = [None if o is None or plan.names[k] is None or plan.names[k].endswith("v") else o if plan.index[k] is None
            else o[plan.index[k]] for k, o in enumerate(params[n:])]
    if plan.scales is not None:
        for k, s in plan.scales:
            if k < 6 and offs[k] is not None:
                offs[k] = offs[k] * s
    return params[:n], offs

"""The GLoRA linear layer (docs/method.md §1 and §2).

``y = (W0 + W0 ⊙ A + B) x + (b0 + b0 ⊙ D + E + W0 C)``

One layer holds, for each support tensor, a single shared parameter set sized for the largest
choice it may take; every choice is a leading slice of it (weight entanglement). The active
choice is switched with :meth:`GLoraLinear.set_choice`.

The forward pass never builds a dense ``(out, in)`` matrix unless A is low-rank: a vector or
scalar A rescales the output of ``W0 x`` (``(W0 ⊙ a1ᵀ) x = a ⊙ W0 x``), B is applied to the
activations (``Bd (Bu x)``, or ``b · sum(x)`` for vector/scalar), and C, D, E only touch the
bias. Each layer is one autograd node with a hand-written backward: :class:`_ScaleShiftLinear`
when A is vector, scalar or none (a low-rank B is then added on the activations in the same node), and
:class:`_RebuiltWeightLinear` when A is low-rank, which needs the dense weight and its gradient
anyway, folds B into it and rebuilds it in the backward pass rather than holding it. The dense
form is kept in :meth:`support_tensors` and :meth:`merged_weight_bias` for merging and for
testing; the tests check outputs and gradients of every configuration against it.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .space import TENSORS, Choice, LayerChoice, SpaceError, parse_choice

NONE = Choice("none")


class SupportTensors(NamedTuple):
    """Dense support tensors of the active configuration: A, B broadcast to (out, in), C is (in, 1), D, E are (out,)."""

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    E: torch.Tensor


def choice_cost(tensor: str, choice: Choice, out_features: int, in_features: int, c_in: int | None = None) -> int:
    """Parameters a retrained sub-network holds for one tensor of one layer (docs/method.md §2).

    ``in_features`` is the columns of the weight A and B act on and ``c_in`` the rows of C
    (default ``in_features``): for a convolution ``in/groups·kh·kw`` and ``in`` (docs/convolutions.md).
    """
    if choice.kind == "none":
        return 0
    if tensor in ("A", "B"):
        return {"lora": choice.rank * (out_features + in_features), "vector": out_features, "scalar": 1}[choice.kind]
    if tensor == "C":
        c_in = in_features if c_in is None else c_in
        return {"lora": choice.rank * (c_in + 1), "vector": c_in}[choice.kind]
    return {"vector": out_features, "scalar": 1}[choice.kind]


def _eager_cache(maxsize: int):
    """``functools.lru_cache`` for small constant tensors, bypassed while ``torch.compile`` traces
    (``retrain.compile``): the compiler makes and folds the constants itself, and Dynamo warns
    about tracing through a cache."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        return call

    return wrap


def _bias_forward(weight, bias, C, D, E, dtype, pdt):
    """``b0 + b0 ⊙ D + E + W0 C`` in ``dtype``, or None when there is no bias at all.

    The terms are summed in ``pdt``, the adapters' dtype, and where ``dtype`` differs (autocast)
    the last operation writes ``dtype`` itself: the bias then costs no separate cast, a kernel
    fewer per layer and call on a GPU, where a step at moderate batch sizes is bound by launches.
    """
    if C is None and D is None and E is None:
        return None if bias is None else _as(bias, dtype)
    b0 = None if bias is None else _as(bias, pdt)
    wc = None
    if C is not None:  # C is in pdt: a lora C is composed by _mm, which autocast leaves alone
        w, c = _as(weight, pdt), C.view(-1)
        wc = _mv(w, c, b0)  # W0 C, with b0 folded in where there is one
    if D is not None:  # D implies a bias: a layer without one only allows D none
        r = b0 if wc is None else wc  # b0 + W0 C
        if E is not None:
            r = r + E if r is b0 else r.add_(E)
        return torch.addcmul(r, b0, D, out=_out(b0, dtype))  # + b0 ⊙ D
    if wc is not None:
        return _as(wc, dtype) if E is None else torch.add(wc, E, out=_out(wc, dtype))
    if b0 is None:
        return _as(E.expand(weight.shape[0]), dtype)
    return torch.add(b0, E, out=_out(b0, dtype))


def _out(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """An ``out=`` buffer like ``like`` in ``dtype``, or None where ``like`` has it already."""
    return None if like.dtype == dtype else torch.empty_like(like, dtype=dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without a dispatcher call when it is one already: the layer's small tensors
    are cast a dozen times per call, and on a host-bound step each call costs."""
    return t if t.dtype == dtype else t.to(dtype)


_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default  # the overload, resolved once


def _channel_sums(g: torch.Tensor, z: torch.Tensor, dtype: torch.dtype, with_sum: bool):
    """``Σ_n g ⊙ z`` and (if ``with_sum``) ``Σ_n g`` over the rows of two ``(N, out)`` tensors, in ``dtype``.

    Batch norm's backward with mean 0 and inverse std 1 computes exactly these two reductions
    (its weight and bias gradients) in one read of ``g`` and ``z``; ``(g * z).sum(0)`` writes and
    re-reads an ``(N, out)`` temporary instead, which on small models is most of what a vector
    A costs beyond the frozen layer.
    """
    zero, one = _unit_stats(g.shape[1], dtype, g.device)  # one is also the weight: the argument types autocast gives BatchNorm1d
    _, gz, gsum = _BN_BACKWARD(g, z, one, None, None, zero, one, True, 0.0, [False, True, with_sum])
    return gz, gsum


@_eager_cache(maxsize=256)
def _unit_stats(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A mean of 0 and an inverse std of 1 for :func:`_channel_sums`, made once per size: two fewer
    kernels per layer and step. The op only reads them."""
    zero = torch.zeros(n, dtype=dtype, device=device)
    return zero, torch.ones_like(zero)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` computes in: the autocast dtype where autocast is on for ``x``'s device
    (autocast leaves float64 alone)."""
    if x.dtype == torch.float64 or not torch._C._is_any_autocast_enabled():  # the common fp32 case, without asking for x.device
        return x.dtype
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# -- the active slices of the shared parameters ----------------------------------------------
# The autograd functions below take the whole shared parameters and slice them themselves.
# Slicing outside would add a SliceBackward node per tensor, whose backward allocates a zero
# tensor of the full size and copies the slice's gradient into it: two kernels per tensor on a
# GPU, for tensors too small to keep it busy, and a supernet step is mostly such small ops.

# The shared parameters of a layer, in the order the autograd functions take them.
PARAMS = ("glora_Ad", "glora_Au", "glora_Bd", "glora_Bu", "glora_Cd", "glora_Cu", "glora_D", "glora_E")


def _slices(c: Choice, down: torch.Tensor | None, up: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A, B or C of choice ``c``: ``(down_r, up_r)`` for lora, ``(column, None)`` for vector/scalar, else ``(None, None)``."""
    if c.kind == "lora":
        return down[:, : c.rank], up[: c.rank]
    if c.kind == "vector":
        return down[:, :1], None
    if c.kind == "scalar":
        return down[:1, :1], None
    return None, None


def _compose(down: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor :func:`_slices` describes: ``down_r @ up_r`` for lora, else the column (or None)."""
    return down if up is None else down @ up


def _mv(a: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ v`` (plus ``c``) in ``a``'s dtype, under autocast too, as :func:`_mm`.

    A GPU's autocast runs ``mv`` and ``addmv`` in its low-precision dtype (a CPU's leaves them
    alone); the bias ``W0 C`` would then come out in bf16, and adding an fp32 E to it would
    promote the whole bias, and the layer's output, back to fp32.
    """
    if not torch.is_autocast_enabled(a.device.type):
        return torch.mv(a, v) if c is None else torch.addmv(c, a, v)
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.mv(a, v, out=out) if c is None else torch.addmv(c, a, v, out=out)


def _mm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (plus ``c``) in ``a``'s dtype, under autocast too.

    Autocast does not touch the ``out=`` forms of the products, so the adapters' small products
    stay in their own dtype: exact to it, and without the casts of every operand (the frozen
    weight among them) that autocast would launch, which on a GPU cost more than the products.
    The ``out=`` forms do not record autograd: for use inside the autograd functions only.
    """
    if not torch.is_autocast_enabled(a.device.type):  # the plain forms: no buffer to make
        return a @ b if c is None else torch.addmm(c, a, b)
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return torch.mm(a, b, out=out) if c is None else torch.addmm(c, a, b, out=out)


def _vec(c: Choice, p: torch.Tensor | None) -> torch.Tensor | None:
    """D or E of choice ``c``: ``(out,)`` for vector, ``(1,)`` for scalar."""
    return p if c.kind == "vector" else p[:1] if c.kind == "scalar" else None


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


# Every plan made so far is kept: at most (choices in the space) x (distinct layer shapes) of
# them, a few thousand for a ViT in the largest space. Unbounded on purpose: an LRU cache smaller
# than that would evict plans a supernet keeps drawing.
@functools.cache
def _plan_for(choice: LayerChoice, shapes: tuple[tuple[int, ...] | None, ...], out_f: int, in_f: int) -> _Plan:
    parts = [_tensor_plan(t, choice[t], shapes[k], shapes[k + 1] if t in "ABC" else None, out_f, in_f)
             for t, k in zip(TENSORS, (0, 2, 4, 6, 7))]
    names = tuple(n for part in parts for n in part[0])
    index = tuple(i for part in parts for i in part[1])
    lead = tuple(n for part in parts for n in part[2])
    fn = None if all(n is None for n in names) else _RebuiltWeightLinear if choice.A.kind == "lora" else _ScaleShiftLinear
    first = next((k for k, n in enumerate(names) if n is not None), 0)
    return _Plan(fn, names, index, lead, shapes, any(i is not None for i in index), first)


@functools.lru_cache(maxsize=4096)
def _tensor_plan(t: str, c: Choice, shape: tuple[int, ...] | None, up_shape: tuple[int, ...] | None, out_f: int, in_f: int):
    """One tensor's share of a plan: the names, slices and slice shapes of its one (D, E) or two
    (A, B, C: down and up) parameters. A supernet draws a new plan for most layers in its first
    few hundred steps; building plans from these parts keeps each miss to a few microseconds."""
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
    names = tuple(None if n is None else name for n, name in zip(leads, (base + "d", base + "u") if t in "ABC" else (base,)))
    index = tuple(None if n is None or n == s else tuple(slice(0, k) for k in n) for n, s in zip(leads, shapes))
    return names, index, leads


def _take(params: Sequence[torch.Tensor | None], plan: _Plan) -> list[torch.Tensor | None]:
    """The active slices of the shared parameters (None where unused)."""
    if not plan.sliced:  # an extracted sub-network: every parameter is used whole
        return params
    return [p if i is None or p is None else p[i] for p, i in zip(params, plan.index)]


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


def _bias_backward(gb, weight, bias, Cd, Cu, needs, plan):
    """Full-size gradients of ``(Cd, Cu, D, E)`` from ``gb = Σ_n g`` (in the parameters' dtype); ``needs`` are theirs."""
    gCd = gCu = gD = gE = None
    if needs[0] or needs[1]:
        gC = _as(torch.mv(weight.t(), _as(gb, weight.dtype)), Cd.dtype).view(-1, 1)  # (in, 1)
        if Cu is None:
            gCd = _full(gC, 4, plan, Cd.dtype)
        else:
            gCd = _mm_full(gC, Cu.t(), 4, plan) if needs[0] else None
            gCu = _mm_full(Cd.t(), gC, 5, plan) if needs[1] else None
    if needs[2]:
        b0 = _as(bias, gb.dtype)
        gd = torch.dot(gb, b0) if plan.lead[6] == (1,) else gb * b0  # scalar D: one op, not a product and a sum
        gD = _full(gd if gd.shape == plan.lead[6] else gd.view(plan.lead[6]), 6, plan, gb.dtype)
    if needs[3]:
        gE = _full(_fit(gb, 7, plan), 7, plan, gb.dtype)
    return gCd, gCu, gD, gE


def _lora_grads(gW: torch.Tensor, down: torch.Tensor, up: torch.Tensor, needs: Sequence[bool], k: int, plan: _Plan):
    """Full-size gradients of the shared parameters ``k`` (down) and ``k + 1`` (up) from ``gW``, the gradient of their slices' product."""
    return (_mm_full(gW, up.t(), k, plan) if needs[0] else None), (_mm_full(down.t(), gW, k + 1, plan) if needs[1] else None)


class _ScaleShiftLinear(torch.autograd.Function):
    """The whole layer when A is vector, scalar or none: one autograd node, no dense weight.

    ``y = (x W0ᵀ) ⊙ s + (Σ_j x_j) t + b`` with ``s = 1 + A``, ``t = B`` and
    ``b = b0 + b0 ⊙ D + E + W0 C``. A and B constant along the input dimension make
    ``(W0 ⊙ A + B) x`` a row scaling of ``W0 x`` plus ``B · Σ_j x_j``, so neither a dense weight
    nor a weight gradient is needed: the step costs two ``(N, in) x (in, out)`` products, the
    forward one and the input gradient, as a frozen linear layer does. A low-rank B is added on
    the activations, ``(x Buᵀ) Bdᵀ``. The bias terms (C, D, E) are taken into the same node
    because on small models the dozen tiny autograd nodes they otherwise make per layer cost
    more than their arithmetic.

    The arguments after ``plan`` are the layer's whole shared parameters (None where inactive).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, *params):
        A, _, Bd, Bu, Cd, Cu, D, E = _take(params, plan)
        lora_b = Bu is not None
        dt = _compute_dtype(x)  # what F.linear computes in: the autocast dtype under autocast
        # The (out,) vectors are made in dt (the scale and the bias written so by their last op): on
        # a GPU an elementwise op over activations with mixed input dtypes falls back to a kernel
        # about 1.7x slower.
        # s = 1 + A and t = B are kept as (out, 1) columns, the shape the backward's s ⊙ W0 + t 1ᵀ
        # takes them in, and viewed as rows for the activations.
        scale_col = None if A is None else torch.add(A, 1, out=_out(A, dt))
        scale = None if A is None else scale_col.view(-1)
        shift = None if Bd is None or lora_b else Bd.view(-1)
        b = _bias_forward(weight, bias, Cd if Cu is None else _mm(Cd, Cu), D, E, dt, params[plan.first].dtype)
        if lora_b or shift is not None:
            # Cast once, here, and F.linear has nothing left to cast. B's term then reads the x the
            # product reads, as autocast's own (W0 + B 1ᵀ) x would, and Σ_j x_j comes out in dt
            # (no cast of it); a lora B keeps this x for Bu's gradient.
            x = _as(x, dt)
        if scale is None and shift is None:
            z = y = F.linear(x, weight, b)
        else:
            z = F.linear(x, weight)  # under autocast this runs (and returns) in dt
            if scale is None:
                y = z if b is None else z.add_(b)
            else:
                y = z * scale if b is None else torch.addcmul(b, z, scale)
        xsum = xb = None
        if shift is not None:
            # dtype=dt: a GPU's autocast would otherwise sum in fp32 (a CPU's does not), and the
            # update and B's gradient would then mix fp32 with dt
            xsum = x.sum(-1, keepdim=True, dtype=dt)
            if torch.compiler.is_compiling():
                # Out of place while compiled: torch 2.11's compiled graph returns zero for every
                # gradient of this node when the update is in place (2.14's does not).
                y = torch.addcmul(y, xsum, _as(shift, y.dtype))
            else:
                y.addcmul_(xsum, _as(shift, y.dtype))  # broadcast: 2-3x faster than the same rank-1 update as addmm_ (CPU)
        if lora_b:
            xb = F.linear(x, _as(Bu, y.dtype))  # (..., r)
            y.view(-1, y.shape[-1]).addmm_(xb.view(-1, xb.shape[-1]), _as(Bd, y.dtype).t())
        needs = ctx.needs_input_grad
        ctx.plan = plan
        ctx.x_shape = x.shape
        ctx.adt = None if A is None else A.dtype  # the adapters' dtype (scale is in dt)
        ctx.save_for_backward(
            weight, scale_col,
            z if needs[4] else None,  # z = x W0ᵀ, before scaling: the gradient of A is Σ_n g ⊙ z
            xsum if needs[6] else None,
            bias if needs[10] else None,
            Bd, Bu,
            x if needs[7] else None,
            xb if needs[6] else None,
            Cd, Cu,
        )
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        weight, scale, z, xsum, bias, Bd, Bu, x, xb, Cd, Cu = ctx.saved_tensors
        plan = ctx.plan
        needs = ctx.needs_input_grad
        g2 = g if g.dim() == 2 else g.view(-1, g.shape[-1]) if g.is_contiguous() else g.reshape(-1, g.shape[-1])
        lora_b = Bu is not None
        shift = None if lora_b else Bd  # (out, 1) columns, as scale
        gx = gAd = gBd = gBu = None
        gxb = g2 @ _as(Bd, g.dtype) if lora_b and (needs[0] or needs[7]) else None  # (N, r)
        if needs[0]:
            # d/dx of s ⊙ (W0 x) + t Σ_j x_j is the (out, in) matrix s ⊙ W0 + t 1ᵀ: one product
            # weight-sized, so written in g's dtype by the op itself rather than cast after it
            if scale is None and shift is None:
                w = _as(weight, g.dtype)
            else:
                out = _out(weight, g.dtype)  # None in fp32: the op makes its own result
                if shift is None:
                    w = torch.mul(weight, scale, out=out)
                elif scale is None:
                    w = torch.add(weight, shift, out=out)
                elif weight.is_cuda:
                    w = torch.addcmul(shift, weight, scale, out=out)  # one kernel: launches are what cost on a GPU
                else:
                    # Two passes on a CPU: its addcmul kernel is not vectorised when the added tensor
                    # is the broadcast column, and takes 3x the time of a multiply and an add.
                    w = torch.mul(weight, scale, out=out).add_(shift)
            gx2 = g2 @ w
            if lora_b:
                gx2.addmm_(gxb, _as(Bu, g.dtype))
            gx = gx2 if gx2.shape == ctx.x_shape else gx2.view(ctx.x_shape)
        with_bias = needs[8] or needs[9] or needs[10] or needs[11]
        gsum = gz = gt = None
        vector_b = needs[6] and not lora_b
        if torch.compiler.is_compiling():
            # Compiled, the column sums over g (A's Σ g ⊙ z, the bias's Σ g, a vector B's
            # Σ g Σ_j x_j) are written as plain reductions, which Inductor fuses into one read of
            # g; eager, batch norm's backward and a matrix-vector product are fewer, faster kernels.
            if needs[4]:
                gz = (g2 * z.view(g2.shape)).sum(0, dtype=ctx.adt)
            if with_bias:
                gsum = g2.sum(0, dtype=weight.dtype)
            if vector_b:
                gt = (g2 * xsum.view(-1, 1)).sum(0, dtype=Bd.dtype).view(-1, 1)
        else:
            if needs[4]:
                gz, gsum = _channel_sums(g2, z.view(g2.shape), ctx.adt, with_bias)  # in the parameters' dtype already
            elif with_bias:
                gsum = g2.sum(0, dtype=weight.dtype)
            if vector_b:
                gt = torch.mm(g2.t(), xsum.view(-1, 1))  # (out, 1)
        if needs[4]:
            gAd = _full(_fit(gz, 0, plan), 0, plan, ctx.adt)
        if needs[6]:
            if lora_b:
                gBd = _full(g2.t() @ xb.view(-1, xb.shape[-1]), 2, plan, Bd.dtype)
            else:
                gBd = _full(_fit(gt, 2, plan), 2, plan, Bd.dtype)
        if needs[7]:
            gBu = _full(gxb.t() @ x.reshape(-1, x.shape[-1]), 3, plan, Bu.dtype)
        gCd = gCu = gD = gE = None
        if with_bias:
            gCd, gCu, gD, gE = _bias_backward(gsum, weight, bias, Cd, Cu, needs[8:], plan)
        return gx, None, None, None, gAd, None, gBd, gBu, gCd, gCu, gD, gE


def _dense_weight(W0: torch.Tensor, Ad: torch.Tensor, Au: torch.Tensor, Bd: torch.Tensor | None, Bu: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``W0 + W0 ⊙ (Ad @ Au) + B`` in ``dtype``; B is ``Bd @ Bu`` (low-rank), ``Bd`` broadcast (vector/scalar) or absent.

    Computed in the parameters' dtype; the last op writes ``dtype`` (the autocast dtype) itself,
    so no separate cast of the ``(out, in)`` result is needed.
    """
    base = W0 if Bd is None else _mm(Bd, Bu, W0) if Bu is not None else W0 + Bd
    return torch.addcmul(base, W0, _mm(Ad, Au), out=_out(W0, dtype))


class _RebuiltWeightLinear(torch.autograd.Function):
    """The whole layer when A is low-rank: ``F.linear(x, _dense_weight(W0, Ad, Au, Bd, Bu), b)``.

    Plain autograd would hold the dense ``(out, in)`` weight (and the dense A) of every such
    layer from the forward to the backward pass; here only ``x`` and the small factors are kept
    and the weight is rebuilt in the backward pass (a rank-r product and a few elementwise
    passes over ``(out, in)``, cheap next to the products with the ``(N, in)`` activations).
    A low-rank A needs the dense weight and its gradient anyway, so B is folded into it: a
    low-rank B then costs ``Bd @ Bu`` on the weight instead of two products on the activations
    in the forward pass and four in the backward pass. C, D, E are handled as in
    :class:`_ScaleShiftLinear`, and the arguments are the same.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, *params):
        Ad, Au, Bd, Bu, Cd, Cu, D, E = _take(params, plan)
        dt = _compute_dtype(x)
        b = _bias_forward(weight, bias, Cd if Cu is None else _mm(Cd, Cu), D, E, dt, Ad.dtype)
        x = _as(x, dt)  # cast once: F.linear would cast it again under autocast, and x is kept for the backward
        y = F.linear(x, _dense_weight(weight, Ad, Au, Bd, Bu, dt), b)
        ctx.plan = plan
        ctx.save_for_backward(x, weight, bias if ctx.needs_input_grad[10] else None, Ad, Au, Bd, Bu, Cd, Cu)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, bias, Ad, Au, Bd, Bu, Cd, Cu = ctx.saved_tensors
        plan = ctx.plan
        needs = ctx.needs_input_grad
        g2 = g.view(-1, g.shape[-1]) if g.is_contiguous() else g.reshape(-1, g.shape[-1])
        gx = (g2 @ _dense_weight(weight, Ad, Au, Bd, Bu, g.dtype)).view(x.shape) if needs[0] else None
        gCd = gCu = gD = gE = None
        if needs[8] or needs[9] or needs[10] or needs[11]:
            gCd, gCu, gD, gE = _bias_backward(g2.sum(0, dtype=weight.dtype), weight, bias, Cd, Cu, needs[8:], plan)
        gAd = gAu = gBd = gBu = None
        if needs[4] or needs[5] or needs[6] or needs[7]:
            gW = _as(g2.t() @ x.view(-1, x.shape[-1]), Ad.dtype)  # the gradient of the dense weight
            if needs[4] or needs[5]:
                gAd, gAu = _lora_grads(gW * _as(weight, gW.dtype), Ad, Au, needs[4:6], 0, plan)
            if Bu is not None:
                gBd, gBu = _lora_grads(gW, Bd, Bu, needs[6:8], 2, plan)
            elif needs[6]:
                gBd = _full(gW.sum_to_size(Bd.shape), 2, plan, Bd.dtype)  # B broadcast over (out, in): a vector (out, 1) or a scalar (1, 1)
        return gx, None, None, None, gAd, gAu, gBd, gBu, gCd, gCu, gD, gE


class GLoraLayer(nn.Module):
    """What every GLoRA layer shares: the frozen base weight and bias, the allowed choices, the
    shared (weight-entangled) parameters sized for the largest choice, the active choice.

    A and B act on the weight viewed as a ``(rows, cols)`` matrix and C is ``(c_rows, 1)``: for a
    linear layer ``(out, in)`` and ``in``; for a convolution ``(out, in/groups·kh·kw)`` and ``in``
    (:class:`supernet.conv.GLoraConv2d`). Subclasses set those sizes before calling
    :meth:`_setup` and write ``forward`` and ``merged_weight_bias``.
    """

    rows: int
    cols: int
    c_rows: int

    def _setup(self, base: nn.Module, choices: Mapping[str, Sequence[Choice | str]]) -> None:
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # registered even when None: forward reads both from _parameters
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.choices: dict[str, tuple[Choice, ...]] = {}
        for t in TENSORS:
            parsed = tuple(parse_choice(c, t, f"choices.{t}") for c in choices[t])
            if not parsed:
                raise SpaceError(f"choices.{t}: empty list")
            if t == "D" and self.bias is None:
                # b0 = 0 makes every D choice a no-op, so the only honest choice is none.
                parsed = (NONE,)
            self.choices[t] = parsed
        self._allocate()
        self._param_shapes = tuple(None if (q := self._parameters[n]) is None else tuple(q.shape) for n in PARAMS)
        self.active = LayerChoice(**{t: self.choices[t][0] for t in TENSORS})

    # -- parameters -------------------------------------------------------------------------
    def _allocate(self) -> None:
        w = self.weight
        kw = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        out_f, in_f, c_in = self.rows, self.cols, self.c_rows
        for t in TENSORS:
            kinds = {c.kind for c in self.choices[t]}
            rank = max((c.rank for c in self.choices[t] if c.kind == "lora"), default=0)
            down = up = None
            if t in ("A", "B", "C"):
                rows = out_f if t != "C" else c_in
                if rank:
                    down = torch.zeros(rows, rank, **kw)
                    up = torch.empty(rank, in_f if t != "C" else 1, **kw)
                    nn.init.xavier_uniform_(up)
                elif "vector" in kinds:
                    down = torch.zeros(rows, 1, **kw)
                elif "scalar" in kinds:
                    down = torch.zeros(1, 1, **kw)
                self._register(f"glora_{t}d", down)
                self._register(f"glora_{t}u", up)
            else:
                vec = None
                if "vector" in kinds:
                    vec = torch.zeros(out_f, **kw)
                elif "scalar" in kinds:
                    vec = torch.zeros(1, **kw)
                self._register(f"glora_{t}", vec)

    def _register(self, name: str, value: torch.Tensor | None) -> None:
        self.register_parameter(name, nn.Parameter(value) if value is not None else None)

    def adapter_parameters(self):
        return [p for n, p in self.named_parameters(recurse=False) if n.startswith("glora_")]

    # -- configuration ----------------------------------------------------------------------
    def set_choice(self, choice: LayerChoice | Mapping[str, str], name: str = "layer") -> None:
        choice = LayerChoice.parse(choice, name)
        for t, c in choice.items():
            if c not in self.choices[t]:
                allowed = ", ".join(str(x) for x in self.choices[t])
                extra = " (this layer has no bias, so D can only be none)" if t == "D" and self.bias is None else ""
                raise SpaceError(f"{name}.{t}: {str(c)!r} is not allowed here; allowed: {allowed}{extra}")
        self.active = choice

    def choice_cost(self, tensor: str, choice: Choice) -> int:
        """Parameters ``choice`` of ``tensor`` costs on this layer (docs/method.md §2, with this layer's sizes)."""
        return choice_cost(tensor, choice, self.rows, self.cols, self.c_rows)

    def cost(self, choice: LayerChoice | None = None) -> int:
        choice = choice or self.active
        return sum(self.choice_cost(t, c) for t, c in choice.items())

    # -- the support tensors as slices of the shared parameters -----------------------------
    def _matrix(self, t: str, c: Choice) -> torch.Tensor | None:
        """A/B: (rows, cols) for lora, (rows, 1) vector, (1, 1) scalar; C: (c_rows, 1) lora or vector."""
        return _compose(*_slices(c, getattr(self, f"glora_{t}d"), getattr(self, f"glora_{t}u")))

    def _vector(self, t: str, c: Choice) -> torch.Tensor | None:
        """D/E: (out,) for vector, (1,) for scalar."""
        return _vec(c, getattr(self, f"glora_{t}"))

    @property
    def active(self) -> LayerChoice:
        """The active choice; setting it also sets the plan the forward pass follows."""
        return self._active

    @active.setter
    def active(self, choice: LayerChoice) -> None:
        self._activate(choice, self._plan_of(choice))

    def _plan_of(self, choice: LayerChoice) -> "_Plan | None":
        """The plan this layer follows under ``choice`` (None: the layer needs none)."""
        return None

    def _activate(self, choice: LayerChoice, plan: "_Plan | None") -> None:
        """Set ``choice`` with its :meth:`_plan_of` plan, for callers that keep plans (:class:`SubnetSampler`)."""
        # object.__setattr__: nn.Module's own is slower, and this runs for every layer on every supernet step
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_active", choice)

    def support_tensors(self) -> SupportTensors:
        """The dense support tensors of the active choice: A, B broadcast to (rows, cols), C (c_rows, 1), D, E (out,)."""
        c = self.active
        like = self.glora_like()
        out_f, c_in = self.rows, self.c_rows
        zeros = lambda *s: torch.zeros(*s, dtype=like.dtype, device=like.device)  # noqa: E731
        A = self._matrix("A", c.A)
        B = self._matrix("B", c.B)
        C = self._matrix("C", c.C)
        D = self._vector("D", c.D)
        E = self._vector("E", c.E)
        return SupportTensors(
            A=zeros(1, 1) if A is None else A,
            B=zeros(1, 1) if B is None else B,
            C=zeros(c_in, 1) if C is None else C,
            D=zeros(out_f) if D is None else D.expand(out_f),
            E=zeros(out_f) if E is None else E.expand(out_f),
        )

    def glora_like(self) -> torch.Tensor:
        params = self.adapter_parameters()
        return params[0] if params else self.weight

    def plain(self, bias: bool) -> nn.Module:
        """An empty plain module of the base layer's kind and shape (``bias``: with a bias), on the
        weight's device and dtype, for the merged weights."""
        raise NotImplementedError

    def merged_weight_bias(self, dtype=None, out=None):
        raise NotImplementedError


class GLoraLinear(GLoraLayer):
    """A frozen ``nn.Linear`` plus the GLoRA support tensors A-E.

    ``weight`` and ``bias`` are the base layer's own (frozen) parameters, so the state-dict keys
    of the base model are kept and only ``glora_*`` keys are added.
    """

    def __init__(self, base: "nn.Linear | GLoraLinear", choices: Mapping[str, Sequence[Choice | str]]):
        # ``base`` may itself be a GLoRA layer: extract_subnet re-wraps the same frozen weights.
        super().__init__()
        if not isinstance(base, (nn.Linear, GLoraLinear)):
            raise SpaceError(f"GLoRA can only wrap nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._setup(base, choices)

    @property
    def rows(self) -> int:
        return self.out_features

    @property
    def cols(self) -> int:
        return self.in_features

    @property
    def c_rows(self) -> int:
        return self.in_features

    def _plan_of(self, choice: LayerChoice) -> "_Plan":
        """The plan this layer follows under ``choice`` (already checked against its choices)."""
        return _plan_for(choice, self._param_shapes, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan, p = self._plan, self._parameters
        if plan.fn is None:
            return F.linear(x, p["weight"], p["bias"])
        return plan.fn.apply(x, p["weight"], p["bias"], plan, *[None if n is None else p[n] for n in plan.names])

    def plain(self, bias: bool) -> nn.Linear:
        w = self.weight
        return nn.Linear(self.in_features, self.out_features, bias=bias, device=w.device, dtype=w.dtype)

    # -- dense forms ------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight_bias(
        self, dtype: torch.dtype | None = None, out: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W = W0 + W0 ⊙ A + B`` and ``b = b0 + b0 ⊙ D + E + W0 C`` for the active choice.

        Computed in float32 (float64 if the layer is float64) regardless of the training
        precision; the caller casts back. ``b`` is None when the result has no bias at all.

        ``out=(weight, bias)`` writes the result into those tensors instead (a bias the result
        lacks is zeroed) and returns them: the search stage merges every candidate into one plain
        model this way, with no temporaries where ``out`` is in the compute dtype.
        """
        if dtype is None:
            dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        own = {self.weight.data_ptr()} | ({self.bias.data_ptr()} if self.bias is not None else set())
        if out is not None and any(t is not None and t.data_ptr() in own for t in out):
            raise ValueError("merged_weight_bias: out must not be the layer's own frozen weight or bias (they would be overwritten)")
        if out is not None and any(t is not None and t.dtype != dtype for t in out):
            W, b = self.merged_weight_bias(dtype)  # another dtype: compute, then cast while copying
            out[0].copy_(W)
            if out[1] is not None:
                out[1].copy_(b) if b is not None else out[1].zero_()
            return out
        c = self.active
        W0 = self.weight.to(dtype)
        # Only the active terms, each one pass over (out, in): this runs once per search candidate.
        A = self._matrix("A", c.A)
        W_out = None if out is None else out[0]
        if A is None:
            W = W0.clone() if W_out is None else W_out.copy_(W0)
        else:
            W = torch.addcmul(W0, W0, A.to(dtype), out=W_out)
        if c.B.kind == "lora":
            W.addmm_(self.glora_Bd[:, : c.B.rank].to(dtype), self.glora_Bu[: c.B.rank].to(dtype))
        elif c.B.kind != "none":
            W.add_(self._matrix("B", c.B).to(dtype))
        b_out = None if out is None else out[1]
        if self.bias is None and c.C.is_none and c.E.is_none:
            return W, None if b_out is None else b_out.zero_()
        # the same sum as _bias_forward, written into one buffer in place
        b = torch.empty(self.out_features, dtype=dtype, device=W0.device) if b_out is None else b_out
        D, E, C = self._vector("D", c.D), self._vector("E", c.E), self._matrix("C", c.C)
        if self.bias is None:
            b.zero_()
        elif D is None:
            b.copy_(self.bias)
        else:
            b0 = self.bias.to(dtype)
            torch.addcmul(b0, b0, D.to(dtype), out=b)
        if E is not None:
            b.add_(E.to(dtype))
        if C is not None:
            b.addmv_(W0, C.to(dtype).view(-1))
        return W, b

    def extra_repr(self) -> str:
        spaces = " ".join(f"{t}=[{','.join(map(str, self.choices[t]))}]" for t in TENSORS)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {spaces}, active: {self.active}"

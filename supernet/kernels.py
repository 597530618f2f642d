"""The GLoRA linear layer's autograd kernels (see :mod:`supernet.layer`): one node per layer, with
a hand-written backward.

:class:`_ScaleShiftLinear` computes the layer when A is vector, scalar or none (a low-rank B is
then added on the activations in the same node), :class:`_RebuiltWeightLinear` when A is
low-rank. :func:`_plan_for` picks one of them for a choice, with the choice's :class:`~supernet.plans._Plan`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from .cast import _as, _compute_dtype, _eager_cache, _out
from .plans import LoraScaling, _fit, _full, _mm_full, _Plan, _scale_grads, _split_offsets, _take, _tensor_plan, lora_factor
from .space import TENSORS, LayerChoice


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


def _less(t: torch.Tensor | None, t0: torch.Tensor | None) -> torch.Tensor | None:
    """A vector or scalar column less its frozen initial value (offset form), or itself without one."""
    return t if t0 is None or t is None else t - t0


def _lowrank(d: torch.Tensor, u: torch.Tensor, d0: torch.Tensor | None, u0: torch.Tensor | None) -> torch.Tensor:
    """``d @ u``, less ``d0 @ u0`` where the tensor has frozen initial factors (offset form).

    The difference of the two products is taken before it is added to anything: while the factors
    equal their copies the products are the same computation on the same values, so it is exactly
    zero and the layer exactly its base (``y + t − t`` would not be ``y`` in floating point).
    """
    return _mm(d, u) if d0 is None else torch.sub(_mm(d, u), _mm(d0, u0))


def _with_offsets(params, plan):
    """The active slices of the parameters (:func:`_take`) and of their frozen initial factors.

    Returns ``(Ad, Au, Bd, Bu, Cd, Cu, D, E)`` and the low-rank offsets ``(Ad0, Au0, Bd0, Bu0, Cd0,
    Cu0)`` (None for a layer without any). A vector or scalar A, B or C reads the first column of
    its down factor, which a data-aware init moved away from zero: it comes back already less its
    initial value, and its offset as None, so that every sub-network starts at W0.
    """
    params, offs = _split_offsets(params, plan)
    taken = _take(params, plan)
    if offs is None:
        return taken, None
    taken = list(taken)
    offs = list(offs)
    for k in (0, 2, 4):
        if taken[k + 1] is None:  # vector, scalar (or none): no up factor
            taken[k], offs[k] = _less(taken[k], offs[k]), None
    return taken, offs


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

    The arguments after ``plan`` are the layer's whole shared parameters (None where inactive),
    then, only for a layer with a data-aware init (PiSSA, LoRA-GA), its six frozen initial factors
    (:data:`~supernet.plans.OFFSETS`, None where absent): the offset form ``s (D U − D⁰ U⁰)``,
    each difference taken before it is added to anything (:func:`_lowrank`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, *params):
        if len(params) == len(plan.names):  # no offsets (LoRA's init): not one call more than before them
            A, _, Bd, Bu, Cd, Cu, D, E = _take(params, plan)
            Bd0 = Bu0 = Cd0 = Cu0 = None
        else:
            (A, _, Bd, Bu, Cd, Cu, D, E), (_, _, Bd0, Bu0, Cd0, Cu0) = _with_offsets(params, plan)
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
        b = _bias_forward(weight, bias, Cd if Cu is None else _lowrank(Cd, Cu, Cd0, Cu0), D, E, dt, params[plan.first].dtype)
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
            if Bu0 is None:
                y.view(-1, y.shape[-1]).addmm_(xb.view(-1, xb.shape[-1]), _as(Bd, y.dtype).t())
            else:  # offset form: (Bd Bu − Bd⁰ Bu⁰) x, the difference taken first (see _lowrank)
                xb0 = F.linear(x, _as(Bu0, y.dtype)).view(-1, xb.shape[-1])
                delta = torch.sub(xb.view(-1, xb.shape[-1]) @ _as(Bd, y.dtype).t(), xb0 @ _as(Bd0, y.dtype).t())
                y.view(-1, y.shape[-1]).add_(delta)
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
            Bd0 if needs[0] else None, Bu0 if needs[0] else None,  # the offset's share of the input gradient
        )
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        weight, scale, z, xsum, bias, Bd, Bu, x, xb, Cd, Cu, Bd0, Bu0 = ctx.saved_tensors
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
            if lora_b and Bu0 is not None:  # offset form: (Bd Bu − Bd⁰ Bu⁰)ᵀ g, the difference first
                gx2.add_(torch.sub(gxb @ _as(Bu, g.dtype), (g2 @ _as(Bd0, g.dtype)) @ _as(Bu0, g.dtype)))
            elif lora_b:
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
        grads = gx, None, None, None, gAd, None, gBd, gBu, gCd, gCu, gD, gE
        grads = grads if plan.scales is None else _scale_grads(grads, plan)
        # the frozen initial factors passed after the parameters (offset form) have no gradient
        return grads if len(needs) == len(grads) else grads + (None,) * (len(needs) - len(grads))


def _dense_weight(W0: torch.Tensor, Ad: torch.Tensor, Au: torch.Tensor, Bd: torch.Tensor | None, Bu: torch.Tensor | None, dtype: torch.dtype,
                  offs: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``W0 + W0 ⊙ (Ad @ Au) + B`` in ``dtype``; B is ``Bd @ Bu`` (low-rank), ``Bd`` broadcast (vector/scalar) or absent.

    Computed in the parameters' dtype; the last op writes ``dtype`` (the autocast dtype) itself,
    so no separate cast of the ``(out, in)`` result is needed. ``offs`` are the frozen initial
    factors ``(Ad0, Au0, Bd0, Bu0)`` of the offset form (None: none), subtracted by :func:`_lowrank`.
    """
    if offs is None:
        base = W0 if Bd is None else _mm(Bd, Bu, W0) if Bu is not None else W0 + Bd
        return torch.addcmul(base, W0, _mm(Ad, Au), out=_out(W0, dtype))
    Ad0, Au0, Bd0, Bu0 = offs
    base = W0 if Bd is None else W0 + _lowrank(Bd, Bu, Bd0, Bu0) if Bu is not None else W0 + Bd
    return torch.addcmul(base, W0, _lowrank(Ad, Au, Ad0, Au0), out=_out(W0, dtype))


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
        if len(params) == len(plan.names):  # no offsets (LoRA's init)
            Ad, Au, Bd, Bu, Cd, Cu, D, E = _take(params, plan)
            offs = None
        else:
            (Ad, Au, Bd, Bu, Cd, Cu, D, E), offs = _with_offsets(params, plan)
        dt = _compute_dtype(x)
        b = _bias_forward(weight, bias, Cd if Cu is None else _lowrank(Cd, Cu, *(offs[4:6] if offs else (None, None))), D, E, dt, Ad.dtype)
        x = _as(x, dt)  # cast once: F.linear would cast it again under autocast, and x is kept for the backward
        offs = None if offs is None else offs[:4]  # (Ad0, Au0, Bd0, Bu0): the dense weight's, again in the backward
        y = F.linear(x, _dense_weight(weight, Ad, Au, Bd, Bu, dt, offs), b)
        ctx.plan = plan
        ctx.save_for_backward(x, weight, bias if ctx.needs_input_grad[10] else None, Ad, Au, Bd, Bu, Cd, Cu, *(offs or ()))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, bias, Ad, Au, Bd, Bu, Cd, Cu, *offs = ctx.saved_tensors
        offs = offs or None
        plan = ctx.plan
        needs = ctx.needs_input_grad
        g2 = g.view(-1, g.shape[-1]) if g.is_contiguous() else g.reshape(-1, g.shape[-1])
        gx = (g2 @ _dense_weight(weight, Ad, Au, Bd, Bu, g.dtype, offs)).view(x.shape) if needs[0] else None
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
        grads = gx, None, None, None, gAd, gAu, gBd, gBu, gCd, gCu, gD, gE
        grads = grads if plan.scales is None else _scale_grads(grads, plan)
        # the frozen initial factors passed after the parameters (offset form) have no gradient
        return grads if len(needs) == len(grads) else grads + (None,) * (len(needs) - len(grads))


# The plan of a choice names the kernel above that computes it.
# Every plan made so far is kept: at most (choices in the space) x (distinct layer shapes) of
# them, a few thousand for a ViT in the largest space. Unbounded on purpose: an LRU cache smaller
# than that would evict plans a supernet keeps drawing.
# ``scaling`` (LoRA's scale, :class:`~supernet.plans.LoraScaling`) is part of the key: None, the default, makes the plans it always made.
@functools.cache
def _plan_for(choice: LayerChoice, shapes: tuple[tuple[int, ...] | None, ...], out_f: int, in_f: int,
              scaling: LoraScaling | None = None) -> _Plan:
    # shapes has 8 entries (PARAMS), or 11 for a layer with vector_params: its vector and scalar choices
    # of A, B, C then take their own parameter (VECTOR_PARAMS), named in the down factor's slot
    def own(t: str) -> bool:
        return len(shapes) > 8 and choice[t].kind in ("vector", "scalar") and shapes[8 + "ABC".index(t)] is not None

    parts = [_tensor_plan(t, choice[t], shapes[8 + "ABC".index(t)] if t in "ABC" and own(t) else shapes[k],
                          shapes[k + 1] if t in "ABC" else None, out_f, in_f, t in "ABC" and own(t))
             for t, k in zip(TENSORS, (0, 2, 4, 6, 7))]
    names = tuple(n for part in parts for n in part[0])
    index = tuple(i for part in parts for i in part[1])
    lead = tuple(n for part in parts for n in part[2])
    fn = None if all(n is None for n in names) else _RebuiltWeightLinear if choice.A.kind == "lora" else _ScaleShiftLinear
    first = next((k for k, n in enumerate(names) if n is not None), 0)
    scales = tuple((k, s) for t, k in zip("ABC", (0, 2, 4)) if (s := lora_factor(choice[t], scaling)) is not None) or None
    return _Plan(fn, names, index, lead, shapes, any(i is not None for i in index), first, scales)

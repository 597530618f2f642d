"""The GLoRA linear layer (SPEC section 1 and 2).

``y = (W0 + W0 ⊙ A + B) x + (b0 + b0 ⊙ D + E + W0 C)``

One layer holds, for each support tensor, a single shared parameter set sized for the largest
choice it may take; every choice is a leading slice of it (weight entanglement). The active
choice is switched with :meth:`GLoraLinear.set_choice`.

The forward pass never builds a dense ``(out, in)`` matrix unless A is low-rank: a vector or
scalar A rescales the output of ``W0 x`` (``(W0 ⊙ a1ᵀ) x = a ⊙ W0 x``), B is applied to the
activations (``Bd (Bu x)``, or ``b · sum(x)`` for vector/scalar), and C, D, E only touch the
bias. Each layer is one autograd node with a hand-written backward: :class:`_ScaleShiftLinear`
when A and B are vector, scalar or none (a low-rank B is added on the activations), and
:class:`_RebuiltWeightLinear` when A is low-rank, which needs the dense weight and its gradient
anyway, folds B into it and rebuilds it in the backward pass rather than holding it. The dense
form is kept in :meth:`support_tensors` and :meth:`merged_weight_bias` for merging and for
testing; the tests check outputs and gradients of every configuration against it.
"""

from __future__ import annotations

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


def choice_cost(tensor: str, choice: Choice, out_features: int, in_features: int) -> int:
    """Parameters a retrained sub-network holds for one tensor of one layer (SPEC section 2)."""
    if choice.kind == "none":
        return 0
    if tensor in ("A", "B"):
        return {"lora": choice.rank * (out_features + in_features), "vector": out_features, "scalar": 1}[choice.kind]
    if tensor == "C":
        return {"lora": choice.rank * (in_features + 1), "vector": in_features}[choice.kind]
    return {"vector": out_features, "scalar": 1}[choice.kind]


def _bias_forward(weight, bias, C, D, E):
    """``b0 + b0 ⊙ D + E + W0 C`` (None when there is no bias at all), computed in the parameters' dtype."""
    b = bias
    if D is not None:
        b = torch.addcmul(b, b, D)
    if E is not None:
        b = E.expand(weight.shape[0]) if b is None else b + E
    if C is not None:
        wc = (weight.to(C.dtype) @ C).view(-1)
        b = wc if b is None else b + wc
    return b


def _fit(v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-output gradient ``(out,)`` shaped for its tensor: summed when the tensor is a scalar."""
    return (v.sum() if shape.numel() == 1 else v).reshape(shape)


def _bias_backward(gb, weight, bias, shapes, needs):
    """Gradients of C, D, E from ``gb``, the gradient of the effective bias (``Σ_n g``)."""
    gC = (gb.to(weight.dtype) @ weight).reshape(shapes[0]) if needs[0] else None
    gD = _fit(gb * bias.to(gb.dtype), shapes[1]) if needs[1] else None
    gE = _fit(gb, shapes[2]) if needs[2] else None
    return gC, gD, gE


def _channel_sums(g: torch.Tensor, z: torch.Tensor, dtype: torch.dtype, with_sum: bool):
    """``Σ_n g ⊙ z`` and (if ``with_sum``) ``Σ_n g`` over the rows of two ``(N, out)`` tensors, in ``dtype``.

    Batch norm's backward with mean 0 and inverse std 1 computes exactly these two reductions
    (its weight and bias gradients) in one read of ``g`` and ``z``; ``(g * z).sum(0)`` writes and
    re-reads an ``(N, out)`` temporary instead, which on small models is most of what a vector
    A costs beyond the frozen layer.
    """
    zero = torch.zeros(g.shape[1], dtype=dtype, device=g.device)
    one = torch.ones_like(zero)  # also passed as the weight: the same argument types autocast gives BatchNorm1d
    _, gz, gsum = torch.ops.aten.native_batch_norm_backward(g, z, one, None, None, zero, one, True, 0.0, [False, True, with_sum])
    return gz, gsum


def _shape(t: torch.Tensor | None) -> torch.Size | None:
    return None if t is None else t.shape


class _ScaleShiftLinear(torch.autograd.Function):
    """The whole layer when A and B are vector, scalar or none: one autograd node, no dense weight.

    ``y = (x W0ᵀ) ⊙ s + (Σ_j x_j) t + b`` with ``s = 1 + A``, ``t = B`` and
    ``b = b0 + b0 ⊙ D + E + W0 C``. A and B constant along the input dimension make
    ``(W0 ⊙ A + B) x`` a row scaling of ``W0 x`` plus ``B · Σ_j x_j``, so neither a dense weight
    nor a weight gradient is needed: the step costs two ``(N, in) x (in, out)`` products, the
    forward one and the input gradient, as a frozen linear layer does. The bias terms (C, D, E)
    are taken into the same node because on small models the dozen tiny autograd nodes they
    otherwise make per layer cost more than their arithmetic. A, B are ``(out, 1)``/``(1, 1)``,
    C is ``(in, 1)``, D, E are ``(out,)``/``(1,)``; any may be None (D is when ``bias`` is).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, C, D, E):
        scale = None if A is None else 1 + A.reshape(-1)
        shift = None if B is None else B.reshape(-1)
        b = _bias_forward(weight, bias, C, D, E)
        if scale is None and shift is None:
            z = y = F.linear(x, weight, None if b is None else b.to(x.dtype))
        else:
            z = F.linear(x, weight)  # under autocast this runs (and returns) in the autocast dtype
            dt = z.dtype
            if scale is None:
                y = z if b is None else z.add_(b.to(dt))
            else:
                y = z * scale.to(dt) if b is None else torch.addcmul(b.to(dt), z, scale.to(dt))
        xsum = None
        if shift is not None:
            xsum = x.sum(-1, keepdim=True).to(y.dtype)
            y.addcmul_(xsum, shift.to(y.dtype))  # broadcast: 2-3x faster than the same rank-1 update as addmm_
        needs = ctx.needs_input_grad
        ctx.x_shape = x.shape
        ctx.shapes = [_shape(t) for t in (A, B, C, D, E)]
        ctx.save_for_backward(
            weight, scale, shift,
            z if needs[3] else None,  # z = x W0ᵀ, before scaling: the gradient of A is Σ_n g ⊙ z
            xsum if needs[4] else None,
            bias if needs[6] else None,
        )
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        weight, scale, shift, z, xsum, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = gA = gB = None
        if needs[0]:
            # d/dx of s ⊙ (W0 x) + t Σ_j x_j is the (out, in) matrix s ⊙ W0 + t 1ᵀ: one product
            if scale is None and shift is None:
                w = weight
            elif shift is None:
                w = weight * scale.unsqueeze(-1)
            elif scale is None:
                w = weight + shift.unsqueeze(-1)
            else:
                w = torch.addcmul(shift.unsqueeze(-1), weight, scale.unsqueeze(-1))
            gx = (g2 @ w.to(g.dtype)).view(ctx.x_shape)
        with_bias = any(needs[5:])
        gsum = None
        if needs[3]:
            gz, gsum = _channel_sums(g2, z.reshape(g2.shape), scale.dtype, with_bias)
            gA = _fit(gz, ctx.shapes[0])
        elif with_bias:
            gsum = g2.sum(0, dtype=weight.dtype)
        if needs[4]:
            gB = _fit((xsum.reshape(1, -1) @ g2).view(-1), ctx.shapes[1])
        gC = gD = gE = None
        if with_bias:
            gC, gD, gE = _bias_backward(gsum, weight, bias, ctx.shapes[2:], needs[5:])
        return gx, None, None, gA, gB, gC, gD, gE


def _dense_weight(W0: torch.Tensor, Ad: torch.Tensor, Au: torch.Tensor, Bd: torch.Tensor | None = None, Bu: torch.Tensor | None = None) -> torch.Tensor:
    """``W0 + W0 ⊙ (Ad @ Au) + B``; B is ``Bd @ Bu`` (low-rank), ``Bd`` broadcast (vector/scalar) or absent."""
    weight = torch.addcmul(W0, W0, Ad @ Au)
    if Bu is not None:
        return torch.addmm(weight, Bd, Bu)
    return weight if Bd is None else weight + Bd


def _dense_weight_backward(gW: torch.Tensor, W0: torch.Tensor, factors: Sequence[torch.Tensor], needs: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`_dense_weight`'s factors from ``gW``, the gradient of the dense weight.

    Written out rather than taken with a nested ``autograd.grad``: recording and replaying a
    small graph per layer per step costs more than the arithmetic when the step is short (on a
    GPU, or with few tokens).
    """
    Ad, Au, *B = factors
    grads: list[torch.Tensor | None] = [None] * len(factors)
    if needs[0] or needs[1]:
        gM = gW * W0.to(gW.dtype)  # the gradient of Ad @ Au
        grads[0] = gM @ Au.t() if needs[0] else None
        grads[1] = Ad.t() @ gM if needs[1] else None
    if len(B) == 2:
        grads[2] = gW @ B[1].t() if needs[2] else None
        grads[3] = B[0].t() @ gW if needs[3] else None
    elif len(B) == 1 and needs[2]:
        grads[2] = gW.sum_to_size(B[0].shape)  # B broadcast over (out, in): a vector (out, 1) or a scalar (1, 1)
    return tuple(grads)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` computes in: the autocast dtype where autocast is on for ``x``'s device."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _RebuiltWeightLinear(torch.autograd.Function):
    """The whole layer when A is low-rank: ``F.linear(x, _dense_weight(W0, *factors), b)``.

    Plain autograd would hold the dense ``(out, in)`` weight (and the dense A) of every such
    layer from the forward to the backward pass; here only ``x`` and the small factors are kept
    and the weight is rebuilt in the backward pass (a rank-r product and a few elementwise
    passes over ``(out, in)``, cheap next to the products with the ``(N, in)`` activations).
    The bias terms C, D, E are handled in the same node as in :class:`_ScaleShiftLinear`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, C, D, E, *factors):
        b = _bias_forward(weight, bias, C, D, E)
        dt = _compute_dtype(x)
        x = x.to(dt)  # cast once: F.linear would cast it again under autocast, and x is kept for the backward
        y = F.linear(x, _dense_weight(weight, *factors).to(dt), None if b is None else b.to(dt))
        ctx.shapes = [_shape(t) for t in (C, D, E)]
        ctx.save_for_backward(x, weight, bias if ctx.needs_input_grad[4] else None, *factors)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, bias, *factors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ _dense_weight(weight, *factors).to(g.dtype)).view(x.shape) if needs[0] else None
        gC = gD = gE = None
        if any(needs[3:6]):
            gC, gD, gE = _bias_backward(g2.sum(0, dtype=weight.dtype), weight, bias, ctx.shapes, needs[3:6])
        gfactors: tuple[torch.Tensor | None, ...] = (None,) * len(factors)
        if any(needs[6:]):
            gweight = (g2.t() @ x.reshape(-1, x.shape[-1])).to(factors[0].dtype)
            gfactors = _dense_weight_backward(gweight, weight, factors, needs[6:])
        return (gx, None, None, gC, gD, gE, *gfactors)


class GLoraLinear(nn.Module):
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
        self.weight = base.weight
        self.bias = base.bias
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
        self.active = LayerChoice(**{t: self.choices[t][0] for t in TENSORS})

    # -- parameters -------------------------------------------------------------------------
    def _allocate(self) -> None:
        w = self.weight
        kw = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        out_f, in_f = self.out_features, self.in_features
        for t in TENSORS:
            kinds = {c.kind for c in self.choices[t]}
            rank = max((c.rank for c in self.choices[t] if c.kind == "lora"), default=0)
            down = up = None
            if t in ("A", "B", "C"):
                rows = out_f if t != "C" else in_f
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

    def cost(self, choice: LayerChoice | None = None) -> int:
        choice = choice or self.active
        return sum(choice_cost(t, c, self.out_features, self.in_features) for t, c in choice.items())

    # -- the support tensors as slices of the shared parameters -----------------------------
    def _matrix(self, t: str, c: Choice) -> torch.Tensor | None:
        """A/B: (out,in) for lora, (out,1) vector, (1,1) scalar; C: (in,1) lora or vector."""
        down = getattr(self, f"glora_{t}d")
        if c.kind == "lora":
            return down[:, : c.rank] @ getattr(self, f"glora_{t}u")[: c.rank, :]
        if c.kind == "vector":
            return down if down.shape[1] == 1 else down[:, 0:1]
        if c.kind == "scalar":
            return down if down.numel() == 1 else down[0:1, 0:1]
        return None

    def _vector(self, t: str, c: Choice) -> torch.Tensor | None:
        """D/E: (out,) for vector, (1,) for scalar."""
        p = getattr(self, f"glora_{t}")
        if c.kind == "vector":
            return p
        if c.kind == "scalar":
            return p if p.numel() == 1 else p[0:1]
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.active
        C, D, E = self._matrix("C", c.C), self._vector("D", c.D), self._vector("E", c.E)
        if c.A.kind == "lora":
            return _RebuiltWeightLinear.apply(x, self.weight, self.bias, C, D, E, *self._dense_factors(c))
        A = self._matrix("A", c.A)
        B = None if c.B.kind == "lora" else self._matrix("B", c.B)
        if A is None and B is None and C is None and D is None and E is None:
            out = F.linear(x, self.weight, self.bias)
        else:
            out = _ScaleShiftLinear.apply(x, self.weight, self.bias, A, B, C, D, E)
        if c.B.kind == "lora":
            r = c.B.rank
            out = out + F.linear(F.linear(x, self.glora_Bu[:r]), self.glora_Bd[:, :r])
        return out

    def _dense_factors(self, c: LayerChoice) -> list[torch.Tensor]:
        """Arguments of :func:`_dense_weight` after ``W0`` for a low-rank A, the only case that needs the dense weight.

        Its gradient (one extra ``(out, in)`` matrix product per step) is paid for A anyway, so B
        is folded in too: a low-rank B costs ``Bd @ Bu`` on the weight instead of two products on
        the activations in the forward pass and four in the backward pass.
        """
        r = c.A.rank
        factors = [self.glora_Ad[:, :r], self.glora_Au[:r]]
        if c.B.kind == "lora":
            factors += [self.glora_Bd[:, : c.B.rank], self.glora_Bu[: c.B.rank]]
        elif c.B.kind != "none":
            factors.append(self._matrix("B", c.B))
        return factors

    # -- dense forms ------------------------------------------------------------------------
    def support_tensors(self) -> SupportTensors:
        c = self.active
        like = self.glora_like()
        out_f, in_f = self.out_features, self.in_features
        zeros = lambda *s: torch.zeros(*s, dtype=like.dtype, device=like.device)  # noqa: E731
        A = self._matrix("A", c.A)
        B = self._matrix("B", c.B)
        C = self._matrix("C", c.C)
        D = self._vector("D", c.D)
        E = self._vector("E", c.E)
        return SupportTensors(
            A=zeros(1, 1) if A is None else A,
            B=zeros(1, 1) if B is None else B,
            C=zeros(in_f, 1) if C is None else C,
            D=zeros(out_f) if D is None else D.expand(out_f),
            E=zeros(out_f) if E is None else E.expand(out_f),
        )

    def glora_like(self) -> torch.Tensor:
        params = self.adapter_parameters()
        return params[0] if params else self.weight

    @torch.no_grad()
    def merged_weight_bias(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W = W0 + W0 ⊙ A + B`` and ``b = b0 + b0 ⊙ D + E + W0 C`` for the active choice.

        Computed in float32 (float64 if the layer is float64) regardless of the training
        precision; the caller casts back. ``b`` is None when the result has no bias at all.
        """
        if dtype is None:
            dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        c = self.active
        W0 = self.weight.to(dtype)
        # Only the active terms, each one pass over (out, in): this runs once per search candidate.
        A = self._matrix("A", c.A)
        W = W0.clone() if A is None else torch.addcmul(W0, W0, A.to(dtype))
        if c.B.kind == "lora":
            W.addmm_(self.glora_Bd[:, : c.B.rank].to(dtype), self.glora_Bu[: c.B.rank].to(dtype))
        elif c.B.kind != "none":
            W.add_(self._matrix("B", c.B).to(dtype))
        if self.bias is None and c.C.is_none and c.E.is_none:
            return W, None
        terms = [self._matrix("C", c.C), self._vector("D", c.D), self._vector("E", c.E)]
        b = _bias_forward(W0, None if self.bias is None else self.bias.to(dtype), *(t if t is None else t.to(dtype) for t in terms))
        # a fresh, dense tensor: _bias_forward may hand back the frozen bias itself or an expanded E
        return W, b.clone(memory_format=torch.contiguous_format)

    def extra_repr(self) -> str:
        spaces = " ".join(f"{t}=[{','.join(map(str, self.choices[t]))}]" for t in TENSORS)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {spaces}, active: {self.active}"

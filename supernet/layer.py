"""The GLoRA linear layer (SPEC section 1 and 2).

``y = (W0 + W0 ⊙ A + B) x + (b0 + b0 ⊙ D + E + W0 C)``

One layer holds, for each support tensor, a single shared parameter set sized for the largest
choice it may take; every choice is a leading slice of it (weight entanglement). The active
choice is switched with :meth:`GLoraLinear.set_choice`.

The forward pass never builds a dense ``(out, in)`` matrix unless A is low-rank: a vector or
scalar A rescales the output of ``W0 x`` (``(W0 ⊙ a1ᵀ) x = a ⊙ W0 x``), B is applied to the
activations (``Bd (Bu x)``, or ``b · sum(x)`` for vector/scalar), and C, D, E only touch the
bias. A vector/scalar A or B goes through :class:`_ScaleShiftLinear`, which has a leaner
backward than the autograd composition. When A is low-rank the dense weight (and its gradient)
is needed anyway, and B is folded into it; :class:`_RebuiltWeightLinear` rebuilds that weight in
the backward pass rather than holding it. The dense form is kept in :meth:`support_tensors` and
:meth:`merged_weight_bias` for merging and for testing.
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


class _ScaleShiftLinear(torch.autograd.Function):
    """``y = (x W0ᵀ) ⊙ s + bias + (Σ_j x_j) t``: a vector/scalar A (``s = 1 + A``) and B (``t = B``).

    ``W0 ⊙ A`` with A constant along the input dimension is a row scaling, ``(W0 ⊙ a1ᵀ) x = a ⊙ W0 x``,
    and such a B adds ``b · Σ_j x_j``; so no dense weight and no weight gradient are needed. The
    same as composing ``F.linear``/``addcmul``/``sum`` under autograd, with a leaner backward: the
    input gradient is one matrix product with the row-scaled ``(out, in)`` weight (instead of scaling
    the ``(N, out)`` output gradient), seeded with the B term, and the gradients of s, bias and t
    are reductions of the output gradient. ``scale``/``bias``/``shift`` are ``(out,)`` or None
    (not both of ``scale`` and ``shift``); the frozen ``weight`` gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias, shift):
        z = F.linear(x, weight)  # under autocast this runs (and returns) in the autocast dtype
        dt = z.dtype
        if scale is None:
            y = z if bias is None else z.add_(bias.to(dt))
        else:
            y = z * scale.to(dt) if bias is None else torch.addcmul(bias.to(dt), z, scale.to(dt))
        xsum = None
        if shift is not None:
            xsum = x.sum(-1, keepdim=True).to(dt)
            y.view(-1, y.shape[-1]).addmm_(xsum.view(-1, 1), shift.to(dt).view(1, -1))
        ctx.x_shape = x.shape
        ctx.save_for_backward(z if scale is not None and ctx.needs_input_grad[2] else None, weight, scale, shift, xsum)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, weight, scale, shift, xsum = ctx.saved_tensors
        dt = g.dtype
        g2 = g.reshape(-1, g.shape[-1])
        gx = gscale = gbias = gshift = None
        if ctx.needs_input_grad[0]:
            w = weight.to(dt) if scale is None else weight.to(dt) * scale.to(dt).unsqueeze(-1)
            if shift is None:
                gx = g2 @ w
            else:
                gx = torch.addmm((g2 @ shift.to(dt).unsqueeze(-1)).expand(-1, w.shape[1]), g2, w)
            gx = gx.view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            gscale = (g2 * z.reshape(g2.shape)).sum(0)
        if ctx.needs_input_grad[3]:
            gbias = g2.sum(0)
        if ctx.needs_input_grad[4]:
            gshift = (xsum.reshape(1, -1) @ g2).view(-1)
        return gx, None, gscale, gbias, gshift


def _dense_weight(W0: torch.Tensor, Ad: torch.Tensor, Au: torch.Tensor, Bd: torch.Tensor | None = None, Bu: torch.Tensor | None = None) -> torch.Tensor:
    """``W0 + W0 ⊙ (Ad @ Au) + B``; B is ``Bd @ Bu`` (low-rank), ``Bd`` broadcast (vector/scalar) or absent."""
    weight = torch.addcmul(W0, W0, Ad @ Au)
    if Bu is not None:
        return torch.addmm(weight, Bd, Bu)
    return weight if Bd is None else weight + Bd


class _RebuiltWeightLinear(torch.autograd.Function):
    """``F.linear(x, build(*params), bias)`` that keeps only ``x`` and the small factors for backward.

    Plain autograd would hold the dense ``(out, in)`` weight (and the dense A) of every such
    layer from the forward to the backward pass; here the weight is rebuilt in the backward pass
    instead (a rank-r product and a few elementwise passes over ``(out, in)``, cheap next to the
    products with the ``(N, in)`` activations). Same operations, same results, less peak memory.
    """

    @staticmethod
    def forward(ctx, x, bias, build, *params):
        y = F.linear(x, build(*params), bias)  # under autocast this runs (and returns) in the autocast dtype
        ctx.build = build
        ctx.save_for_backward(x.to(y.dtype), *params)  # what F.linear itself would keep of x
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(n) for p, n in zip(params, needs[3:])]
            weight = ctx.build(*leaves)
        dt = g.dtype
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ weight.detach().to(dt)).view(x.shape) if needs[0] else None
        gbias = g2.sum(0) if needs[1] else None
        gparams: list[torch.Tensor | None] = [None] * len(params)
        wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
        if wanted:
            gweight = (g2.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
            for i, grad in zip(wanted, torch.autograd.grad(weight, [leaves[i] for i in wanted], gweight)):
                gparams[i] = grad
        return (gx, gbias, None, *gparams)


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
            return down[:, 0:1]
        if c.kind == "scalar":
            return down[0:1, 0:1]
        return None

    def _vector(self, t: str, c: Choice) -> torch.Tensor | None:
        """D/E: (out,) for vector, (1,) for scalar."""
        p = getattr(self, f"glora_{t}")
        if c.kind == "vector":
            return p
        if c.kind == "scalar":
            return p[0:1]
        return None

    def _effective_bias(self, c: LayerChoice) -> torch.Tensor | None:
        bias = self.bias
        D, E, C = self._vector("D", c.D), self._vector("E", c.E), self._matrix("C", c.C)
        if D is not None:
            bias = torch.addcmul(bias, bias, D)
        if E is not None:
            bias = E if bias is None else bias + E
        if C is not None:
            wc = (self.weight.to(C.dtype) @ C).squeeze(-1)
            bias = wc if bias is None else bias + wc
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.active
        bias = self._effective_bias(c)
        if c.A.kind == "lora":
            return _RebuiltWeightLinear.apply(x, bias, _dense_weight, *self._dense_factors(c))
        A = self._matrix("A", c.A)
        scale = None if A is None else 1 + A.reshape(-1).expand(self.out_features)
        if c.B.kind == "lora":
            out = F.linear(x, self.weight, bias) if scale is None else _ScaleShiftLinear.apply(x, self.weight, scale, bias, None)
            r = c.B.rank
            return out + F.linear(F.linear(x, self.glora_Bu[:r]), self.glora_Bd[:, :r])
        B = self._matrix("B", c.B)
        if scale is None and B is None:
            return F.linear(x, self.weight, bias)
        shift = None if B is None else B.reshape(-1).expand(self.out_features)
        return _ScaleShiftLinear.apply(x, self.weight, scale, bias, shift)

    def _dense_factors(self, c: LayerChoice) -> list[torch.Tensor]:
        """Arguments of :func:`_dense_weight` for a low-rank A, the only case that needs the dense weight.

        Its gradient (one extra ``(out, in)`` matrix product per step) is paid for A anyway, so B
        is folded in too: a low-rank B costs ``Bd @ Bu`` on the weight instead of two products on
        the activations in the forward pass and four in the backward pass.
        """
        r = c.A.rank
        factors = [self.weight, self.glora_Ad[:, :r], self.glora_Au[:r]]
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
        s = self.support_tensors()
        W0 = self.weight.to(dtype)
        W = W0 + W0 * s.A.to(dtype) + s.B.to(dtype)
        c = self.active
        if self.bias is None and c.C.is_none and c.E.is_none:
            return W, None
        b0 = self.bias.to(dtype) if self.bias is not None else torch.zeros(self.out_features, dtype=dtype, device=W0.device)
        b = b0 + b0 * s.D.to(dtype) + s.E.to(dtype) + (W0 @ s.C.to(dtype)).squeeze(-1)
        return W, b

    def extra_repr(self) -> str:
        spaces = " ".join(f"{t}=[{','.join(map(str, self.choices[t]))}]" for t in TENSORS)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {spaces}, active: {self.active}"

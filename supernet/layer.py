"""The GLoRA linear layer (docs/method.md §1 and §2).

``y = (W0 + W0 ⊙ A + B) x + (b0 + b0 ⊙ D + E + W0 C)``

One layer holds, for each support tensor, a single shared parameter set sized for the largest
choice it may take; every choice is a leading slice of it (weight entanglement). The active
choice is switched with :meth:`GLoraLinear.set_choice`.

The forward pass never builds a dense ``(out, in)`` matrix unless A is low-rank: a vector or
scalar A rescales the output of ``W0 x`` (``(W0 ⊙ a1ᵀ) x = a ⊙ W0 x``), B is applied to the
activations (``Bd (Bu x)``, or ``b · sum(x)`` for vector/scalar), and C, D, E only touch the
bias. Each layer is one autograd node with a hand-written backward (:mod:`supernet.kernels`): :class:`_ScaleShiftLinear`
when A is vector, scalar or none (a low-rank B is then added on the activations in the same node), and
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

from .layer_options import DoraMixin, LoraInitMixin
from .kernels import _plan_for
from .plans import LoraScaling, lora_factor
from .space import TENSORS, Choice, LayerChoice, SpaceError, parse_choice

NONE = Choice("none")

class SupportTensors(NamedTuple):
    """Dense support tensors of the active configuration: A, B broadcast to (out, in), C is (in, 1), D, E are (out,)."""

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    E: torch.Tensor


def check_lora_scaling(scaling: LoraScaling | None) -> LoraScaling | None:
    """``scaling`` as a :class:`LoraScaling` (a pair or mapping with PEFT's names also does), checked: lora_alpha > 0."""
    if scaling is None:
        return None
    if isinstance(scaling, Mapping):
        scaling = LoraScaling(**scaling)
    elif not isinstance(scaling, LoraScaling):
        scaling = LoraScaling(*scaling)
    alpha = scaling.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or alpha == float("inf"):
        raise SpaceError(f"lora_alpha: must be a finite number > 0, got {alpha!r}")
    if not isinstance(scaling.use_rslora, bool):
        raise SpaceError(f"use_rslora: must be true or false, got {scaling.use_rslora!r}")
    return LoraScaling(float(alpha), scaling.use_rslora)


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


# -- the active slices of the shared parameters ----------------------------------------------
# The autograd functions (supernet/kernels.py) take the whole shared parameters and slice them themselves.
# Slicing outside would add a SliceBackward node per tensor, whose backward allocates a zero
# tensor of the full size and copies the slice's gradient into it: two kernels per tensor on a
# GPU, for tensors too small to keep it busy, and a supernet step is mostly such small ops.

# The shared parameters of a layer, in the order the autograd functions take them.
PARAMS = ("glora_Ad", "glora_Au", "glora_Bd", "glora_Bu", "glora_Cd", "glora_Cu", "glora_D", "glora_E")
# A layer with vector_params: the own parameters of A's, B's and C's vector/scalar choices (a plan
# names one of them in the down slot of its tensor)
VECTOR_PARAMS = ("glora_Av", "glora_Bv", "glora_Cv")


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


def _vec(c: Choice, p: torch.Tensor | None) -> torch.Tensor | None:
    """D or E of choice ``c``: ``(out,)`` for vector, ``(1,)`` for scalar."""
    return p if c.kind == "vector" else p[:1] if c.kind == "scalar" else None


class GLoraLayer(DoraMixin, LoraInitMixin, nn.Module):
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
    lora_scaling: LoraScaling | None = None  # LoRA's scale of the low-rank A, B, C; None: 1 (set_lora_scaling)
    # Vector and scalar choices of a tensor that also has low-rank choices get their own parameter
    # glora_{A,B,C}v instead of the first column of the down factor glora_{A,B,C}d (LoRA+: the down
    # factors then hold only low-rank columns, which learn faster; the vectors keep the base rate)
    vector_params: bool = False

    def _setup(self, base: nn.Module, choices: Mapping[str, Sequence[Choice | str]],
               lora_scaling: LoraScaling | None = None, vector_params: bool = False) -> None:
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
        self.vector_params = bool(vector_params)
        self._allocate()
        names = PARAMS + VECTOR_PARAMS if self.vector_params else PARAMS
        self._param_shapes = tuple(None if (q := self._parameters.get(n)) is None else tuple(q.shape) for n in names)
        object.__setattr__(self, "lora_scaling", check_lora_scaling(lora_scaling))
        self.active = LayerChoice(**{t: self.choices[t][0] for t in TENSORS})

    def set_lora_scaling(self, scaling: LoraScaling | None) -> None:
        """Scale every low-rank A, B, C by LoRA's ``s`` from now on (None: by 1). Plans kept elsewhere
        (a :class:`SubnetSampler`'s) keep the old scale: build a new sampler after this."""
        object.__setattr__(self, "lora_scaling", check_lora_scaling(scaling))
        self.active = self.active  # the plan of the active choice, with the new scale

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
                    if self.vector_params and kinds & {"vector", "scalar"}:
                        self._register(f"glora_{t}v", torch.zeros(rows if "vector" in kinds else 1, 1, **kw))
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
        """Parameters the retrained layer holds under ``choice``: its :attr:`base_cost` plus each tensor's."""
        choice = choice or self.active
        return self.base_cost + sum(self.choice_cost(t, c) for t, c in choice.items())

    # -- the support tensors as slices of the shared parameters -----------------------------
    def lora_factor(self, c: Choice) -> float | None:
        """LoRA's scale of choice ``c`` on this layer; None where it is 1 (not lora, or no scaling)."""
        return lora_factor(c, self.lora_scaling)

    def _matrix(self, t: str, c: Choice) -> torch.Tensor | None:
        """A/B: (rows, cols) for lora (times LoRA's scale), (rows, 1) vector, (1, 1) scalar; C: (c_rows, 1) lora or vector."""
        down = self._down(t, c)
        m = _compose(*_slices(c, down, getattr(self, f"glora_{t}u")))
        if m is not None and t in self.lora_init and down is self._parameters[f"glora_{t}d"]:
            # offset form: less the same choice composed from the frozen initial factors, the
            # difference taken first, so exactly zero at the start (vector and scalar too, where
            # they read the down factor's first column rather than their own vector_params)
            m = m - _compose(*_slices(c, self._buffers[f"glora_{t}d0"], self._buffers[f"glora_{t}u0"]))
        s = self.lora_factor(c)
        return m if s is None else m * s

    def _down(self, t: str, c: Choice) -> torch.Tensor | None:
        """The parameter holding choice ``c`` of A, B or C: the down factor, or a vector or scalar
        choice's own parameter where the layer has one (``vector_params``)."""
        if self.vector_params and c.kind in ("vector", "scalar"):
            own = self._parameters.get(f"glora_{t}v")
            if own is not None:
                return own
        return self._parameters[f"glora_{t}d"]

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

    def _bias_term(self, W0: torch.Tensor, C, D, E, dtype: torch.dtype) -> torch.Tensor | None:
        """``b0 + b0 ⊙ D + E + W0 C`` (in ``dtype``) with plain autograd, or None when the layer has no bias at all."""
        b0 = self.bias
        if C is None and D is None and E is None:
            return b0
        b = torch.zeros(self.rows, dtype=dtype, device=W0.device) if b0 is None else b0.to(dtype)
        if D is not None:
            b = b + b0.to(dtype) * D
        if E is not None:
            b = b + E
        if C is not None:
            b = b + self._weight_times_c(W0.to(dtype), C.to(dtype))
        return b

    def _weight_times_c(self, W0: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """``W0 C``: ``(rows,)`` (a linear layer's; the convolution sums over its kernel)."""
        return torch.mv(W0, C.view(-1))

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

    def __init__(self, base: "nn.Linear | GLoraLinear", choices: Mapping[str, Sequence[Choice | str]],
                 lora_scaling: LoraScaling | None = None, vector_params: bool = False):
        # ``base`` may itself be a GLoRA layer: extract_subnet re-wraps the same frozen weights.
        super().__init__()
        if not isinstance(base, (nn.Linear, GLoraLinear)):
            raise SpaceError(f"GLoRA can only wrap nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._setup(base, choices, lora_scaling, vector_params)

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
        if self.lora_scaling is None:  # the default: the plans it always had
            return _plan_for(choice, self._param_shapes, self.out_features, self.in_features)
        return _plan_for(choice, self._param_shapes, self.out_features, self.in_features, self.lora_scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_dora:  # the dense form under plain autograd; the kernels below are for GLoRA without DoRA
            W, b = self._dora_weight_bias()
            return F.linear(x, W, b)
        plan, p = self._plan, self._parameters
        if plan.fn is None:
            return F.linear(x, p["weight"], p["bias"])
        if self._lora_offsets:  # PiSSA, LoRA-GA: the frozen initial factors follow the parameters
            return plan.fn.apply(x, p["weight"], p["bias"], plan, *[None if n is None else p[n] for n in plan.names],
                                 *self._offset_args())
        return plan.fn.apply(x, p["weight"], p["bias"], plan, *[None if n is None else p[n] for n in plan.names])

    def plain(self, bias: bool) -> nn.Linear:
        w = self.weight
        return nn.Linear(self.in_features, self.out_features, bias=bias, device=w.device, dtype=w.dtype)

    # -- dense forms ------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight_bias(
        self, dtype: torch.dtype | None = None, out: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W = W0 + W0 ⊙ A + B`` and ``b = b0 + b0 ⊙ D + E + W0 C`` for the active choice (with DoRA
        ``W = m ⊙ V / ‖V‖`` of that ``V``, the bias as it is).

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
        if c.B.kind == "lora" and "B" not in self.lora_init:
            s = self.lora_factor(c.B)
            W.addmm_(self.glora_Bd[:, : c.B.rank].to(dtype), self.glora_Bu[: c.B.rank].to(dtype), **({} if s is None else {"alpha": s}))
        elif c.B.kind != "none":
            W.add_(self._matrix("B", c.B).to(dtype))
        if self.use_dora:  # W' = m ⊙ V / ‖V‖; the bias is not rescaled
            self._dora_rescale_(W)
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
        scaling = "" if self.lora_scaling is None else f", {self.lora_scaling}"
        scaling += ", dora" if self.use_dora else ""
        scaling += "" if not self.lora_init else f", init={dict(self.lora_init)}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {spaces}, active: {self.active}{scaling}"

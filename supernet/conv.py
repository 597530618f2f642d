"""The GLoRA convolution (docs/convolutions.md): docs/method.md §1 on ``nn.Conv2d``.

A and B act on the weight viewed as the matrix ``(out, in/groups·kh·kw)``, C is ``(in, 1)``, D and E
are ``(out,)``::

    y = conv(x, W0 + W0 ⊙ A + B) + b0 + b0 ⊙ D + E + W0 C,    (W0 C)[o] = Σ_{i in o's group, kh, kw} W0[o, i, kh, kw] C[i]

Every term is linear in x, so the layer merges exactly into a plain convolution of the same
shape (:meth:`GLoraConv2d.merged_weight_bias`). The forward pass composes ``F.conv2d`` under plain
autograd and builds no dense weight unless it has to:

- A vector/scalar scales the output channels of the frozen convolution: ``conv(x, W0 ⊙ a 1ᵀ) = a ⊙ conv(x, W0)``;
- B vector/scalar adds ``b_o`` to every element of output channel o's kernel: ``b_o · Σ_{i, window} x``,
  the convolution of x with a ones kernel of one output channel per group (exact with any padding);
- B low-rank (``Bd Bu``) on an ungrouped convolution runs as a ``kh×kw`` convolution of x to r
  channels (weight ``Bu`` viewed ``(r, in, kh, kw)``) followed by a 1×1 convolution (``Bd``), as
  PEFT's LoRA does;
- A low-rank, or B low-rank on a grouped/depthwise convolution, builds the dense weight
  ``W0 + W0 ⊙ A + B`` (for a grouped convolution it is ``(out, in/groups, kh, kw)``, small) and runs one
  convolution: a low-rank B across groups cannot be two plain convolutions without multiplying
  the activations by r;
- C, D, E only touch the bias.

Padding modes other than zeros and timm's dynamic 'SAME' padding (``Conv2dSame``) are handled by
padding the input once, as those layers do, and convolving without padding.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cast import _eager_cache
from .layer import GLoraLayer
from .space import Choice, SpaceError


def _conv2d_same_type():
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # timm is a dependency, but the layer does not need it otherwise
        return None
    return Conv2dSame


def conv_problem(module: nn.Module) -> str | None:
    """Why GLoRA cannot adapt ``module`` (a one-line reason), or None when it can.

    An ``nn.Conv2d`` qualifies, and so do its subclasses that compute what it computes (their
    ``forward`` is nn.Conv2d's) and timm's ``Conv2dSame`` (dynamic 'SAME' padding). Subclasses with
    their own forward (timm's StdConv2d standardises its weight: not linear in it) would not merge.
    """
    if isinstance(module, GLoraConv2d):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"a {type(module).__name__}, not an nn.Conv2d"
    same = _conv2d_same_type()
    if type(module).forward is not nn.Conv2d.forward and not (same is not None and type(module) is same):
        return (f"a {type(module).__name__}, an nn.Conv2d subclass with its own forward (GLoRA adapts nn.Conv2d, its subclasses "
                f"that keep its forward, and timm's Conv2dSame; put it in exclude)")
    return None


@_eager_cache(maxsize=256)
def _ones_kernel(groups: int, in_per_group: int, kh: int, kw: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(groups, in/groups, kh, kw)`` of ones: the window sum of each group's input channels (read only)."""
    return torch.ones(groups, in_per_group, kh, kw, dtype=dtype, device=device)


class GLoraConv2d(GLoraLayer):
    """A frozen ``nn.Conv2d`` (any kernel, stride, padding, dilation, groups, padding mode) plus A-E.

    ``weight`` and ``bias`` are the base layer's own frozen parameters (state-dict keys kept).
    All choices of docs/method.md §2 are allowed, for grouped and depthwise convolutions too.
    """

    def __init__(self, base: nn.Conv2d, choices: Mapping[str, Sequence[Choice | str]], lora_scaling=None,
                 vector_params: bool = False):
        super().__init__()
        problem = conv_problem(base)
        if problem is not None:
            raise SpaceError(f"GLoRA cannot wrap this layer: it is {problem}")
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels
        self.kernel_size = tuple(base.kernel_size)
        self.stride = tuple(base.stride)
        self.padding = base.padding if isinstance(base.padding, str) else tuple(base.padding)
        self.dilation = tuple(base.dilation)
        self.groups = base.groups
        self.padding_mode = base.padding_mode
        self._reversed_padding_repeated_twice = list(base._reversed_padding_repeated_twice)
        same = _conv2d_same_type()
        self.same_pad = base.same_pad if isinstance(base, GLoraConv2d) else (same is not None and type(base) is same)
        self._setup(base, choices, lora_scaling, vector_params)

    # A and B act on the weight as (out, in/groups·kh·kw); C on the input channels (module docstring)
    @property
    def rows(self) -> int:
        return self.out_channels

    @property
    def cols(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @property
    def c_rows(self) -> int:
        return self.in_channels

    # -- forward ----------------------------------------------------------------------------
    def _pad(self, x: torch.Tensor):
        """``x`` padded as the base layer pads it where that is not F.conv2d's zero padding, and the
        padding F.conv2d is then to add."""
        if self.same_pad:
            from timm.layers.padding import pad_same

            return pad_same(x, self.kernel_size, self.stride, self.dilation), (0, 0)
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        return x, self.padding

    def _conv(self, x, weight, bias, padding, groups=None):
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups if groups is None else groups)

    def _weight_times_c(self, W0: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """``(W0 C)[o] = Σ_{i in o's group, kh, kw} W0[o, i, kh, kw] C[i]``: ``(out,)``."""
        g, out, per = self.groups, self.out_channels, self.in_channels // self.groups
        wsum = W0.sum((2, 3)).view(g, out // g, per)
        return torch.einsum("gop,gp->go", wsum, C.view(g, per)).reshape(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self._parameters, self.active
        W0 = p["weight"]
        x, padding = self._pad(x)
        if self.use_dora:  # the dense form, one convolution (GLoraLayer._dora_weight_bias)
            W, bias = self._dora_weight_bias()
            return self._conv(x, W.view_as(W0), bias, padding)
        A = self._matrix("A", c.A)
        C = self._matrix("C", c.C)
        D = self._vector("D", c.D)
        E = self._vector("E", c.E)
        bias = self._bias_term(W0, C, D, E, W0.dtype)  # the adapters are allocated in the weight's dtype
        lora_b = c.B.kind == "lora"
        if c.A.kind == "lora" or (lora_b and self.groups > 1):
            # the dense weight W0 + W0 ⊙ A + B, one convolution
            B = self._matrix("B", c.B)
            Wm = W0.reshape(self.rows, self.cols)  # a copy only for a non-contiguous (channels_last) weight
            if A is not None:
                Wm = torch.addcmul(Wm, Wm, A)
            if B is not None:
                Wm = Wm + B
            return self._conv(x, Wm.view_as(W0), bias, padding)
        if A is None:
            y = self._conv(x, W0, bias, padding)
        else:
            y = self._conv(x, W0, None, padding)
            scale = (1 + A).view(1, -1, 1, 1).to(y.dtype)
            y = y * scale if bias is None else torch.addcmul(bias.to(y.dtype).view(1, -1, 1, 1), y, scale)
        if lora_b:
            r = c.B.rank
            Bu, Bd = self.glora_Bu[:r], self.glora_Bd[:, :r]
            s = self.lora_factor(c.B)
            Bd = Bd if s is None else Bd * s  # LoRA's scale (LoraScaling)
            xb = self._conv(x, Bu.reshape(r, self.in_channels, *self.kernel_size), None, padding)
            if "B" not in self.lora_init:
                y = y + F.conv2d(xb, Bd.reshape(self.out_channels, r, 1, 1))
            else:  # offset form: the same two convolutions with the frozen initial factors, the difference first (exact zero at the start)
                Bu0, Bd0 = self.glora_Bu0[:r], self.glora_Bd0[:, :r]
                Bd0 = Bd0 if s is None else Bd0 * s
                xb0 = self._conv(x, Bu0.reshape(r, self.in_channels, *self.kernel_size), None, padding)
                y = y + (F.conv2d(xb, Bd.reshape(self.out_channels, r, 1, 1)) - F.conv2d(xb0, Bd0.reshape(self.out_channels, r, 1, 1)))
        elif c.B.kind != "none":
            g = self.groups
            ones = _ones_kernel(g, self.in_channels // g, *self.kernel_size, x.dtype, x.device)
            xs = self._conv(x, ones, None, padding, groups=g)  # (N, groups, H', W'): each group's window sums
            if g > 1 and g != self.out_channels:
                xs = xs.repeat_interleave(self.out_channels // g, dim=1)
            y = y + xs * self._matrix("B", c.B).view(1, -1, 1, 1).to(xs.dtype)
        return y

    # -- dense forms ------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight_bias(
        self, dtype: torch.dtype | None = None, out: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W = W0 + W0 ⊙ A + B`` (the weight's shape, ``(out, in/groups, kh, kw)``) and
        ``b = b0 + b0 ⊙ D + E + W0 C`` for the active choice (DoRA: ``W = m ⊙ V / ‖V‖``), as :meth:`GLoraLinear.merged_weight_bias`
        (float32 or float64, ``b`` None when there is no bias at all, ``out=`` written in place)."""
        if dtype is None:
            dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        own = {self.weight.data_ptr()} | ({self.bias.data_ptr()} if self.bias is not None else set())
        if out is not None and any(t is not None and t.data_ptr() in own for t in out):
            raise ValueError("merged_weight_bias: out must not be the layer's own frozen weight or bias (they would be overwritten)")
        c = self.active
        W0 = self.weight.to(dtype)
        Wm = W0.reshape(self.rows, self.cols)
        A, B = self._matrix("A", c.A), self._matrix("B", c.B)
        W = Wm.clone() if A is None else torch.addcmul(Wm, Wm, A.to(dtype))
        if B is not None:
            W.add_(B.to(dtype))
        if self.use_dora:  # W' = m ⊙ V / ‖V‖ over each output channel; the bias is not rescaled
            self._dora_rescale_(W)
        W = W.view_as(W0)
        b = self._bias_term(W0, self._matrix("C", c.C), self._vector("D", c.D), self._vector("E", c.E), dtype)
        b = None if b is None else b.to(dtype)
        if b is not None and b.data_ptr() in own:
            b = b.clone()
        if out is None:
            return W, b
        out[0].copy_(W)
        if out[1] is not None:
            out[1].copy_(b) if b is not None else out[1].zero_()
        return out

    def plain(self, bias: bool) -> nn.Conv2d:
        """An empty convolution of the base layer's kind (``nn.Conv2d``, or timm's ``Conv2dSame``)."""
        w = self.weight
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups, bias=bias,
                  device=w.device, dtype=w.dtype)
        if self.same_pad:
            return _conv2d_same_type()(self.in_channels, self.out_channels, self.kernel_size, **kw)
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, padding_mode=self.padding_mode, **kw)

    def extra_repr(self) -> str:
        spaces = " ".join(f"{t}=[{','.join(map(str, self.choices[t]))}]" for t in self.choices)
        geometry = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                    f"padding={'same (dynamic)' if self.same_pad else self.padding}, dilation={self.dilation}, groups={self.groups}")
        scaling = "" if self.lora_scaling is None else f", {self.lora_scaling}"
        scaling += ", dora" if self.use_dora else ""
        scaling += "" if not self.lora_init else f", init={dict(self.lora_init)}"
        return f"{geometry}, bias={self.bias is not None}, {spaces}, active: {self.active}{scaling}"

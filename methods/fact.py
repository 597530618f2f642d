"""FacT (Jie & Deng, AAAI 2023, arXiv 2212.03145): every weight increment of a ViT is one d×d
slice of a d×d×n tensor (n = 12 per block on ViT-B: q, k, v, the output projection and the four
d×d chunks of each of fc1 and fc2), factorised with factors shared by all blocks:

    fact_tt  (tensor train):  ΔW_i = s · U Σ_i Vᵀ                 U, V ∈ R^{d×f}, Σ_i ∈ R^{f×f}
    fact_tk  (Tucker):        ΔW_i = s · U (Σ_k P_ik C_k) Vᵀ      C ∈ R^{f×f×f}, P ∈ R^{n×f}

The factors live once, on ``model.fact`` (:class:`FactFactors`); each adapted Linear
(:class:`FactLinear`) reads them and adds x ΔWᵀ for its d×d blocks. U starts at zero, so the
adapted model is the base model at step 0. The merge adds each ΔW_i to its slice of the qkv,
proj, fc1 and fc2 weights and returns the plain timm model. docs/methods/fact.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from supernet import set_submodule

from .base import Method, MethodError, freeze_all_but_head, trainable_outside_head


@dataclass(frozen=True)
class FactSettings:
    rank: int = 8  # f, the size of the shared factors
    scale: float = 1.0  # s; the authors pick it per task from {0.01, 0.1, 1, 10, 100}
    dropout: float = 0.1  # on the f-wide code before U, as in the authors' code

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise MethodError(f"rank: must be a positive integer, got {self.rank!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale == 0:
            raise MethodError(f"scale: must be a finite non-zero number, got {self.scale!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise MethodError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class FactTKSettings(FactSettings):
    rank: int = 16  # the authors' Tucker ranks are 16 and 32 where their TT ranks are 8 and 16


class FactFactors(nn.Module):
    """The factors every adapted layer shares: U (zero at the start), V, and Σ_i for TT or the
    Tucker core C and the mode factor P for TK. ``sigma(a, b)`` gives Σ_a..Σ_{b-1}."""

    def __init__(self, kind: str, d: int, rank: int, n: int, scale: float, dropout: float,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        f = rank
        self.kind, self.d, self.rank, self.n, self.scale = kind, d, f, n, float(scale)
        new = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.zeros(d, f, **new))
        # V and Σ start as the authors' nn.Linear layers do (uniform ±1/sqrt(fan_in)); C and P as
        # their xavier-uniform tensors
        self.V = nn.Parameter(torch.empty(d, f, **new))
        nn.init.uniform_(self.V, -1 / math.sqrt(d), 1 / math.sqrt(d))
        if kind == "tt":
            self.sigmas = nn.Parameter(torch.empty(n, f, f, **new))
            nn.init.uniform_(self.sigmas, -1 / math.sqrt(f), 1 / math.sqrt(f))
        else:
            self.core = nn.Parameter(torch.empty(f, f, f, **new))  # core[k] = C_k
            self.P = nn.Parameter(torch.empty(n, f, **new))
            nn.init.uniform_(self.core, -math.sqrt(3) / f, math.sqrt(3) / f)
            bound = math.sqrt(6 / (n + f))
            nn.init.uniform_(self.P, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    def sigma(self, a: int, b: int) -> torch.Tensor:
        """Σ_i for i in [a, b), shape (b - a, f, f)."""
        if self.kind == "tt":
            return self.sigmas[a:b]
        return torch.einsum("ik,kab->iab", self.P[a:b], self.core)

    def delta(self, i: int) -> torch.Tensor:
        """ΔW_i = s · U Σ_i Vᵀ (d×d)."""
        return self.scale * self.U @ self.sigma(i, i + 1)[0] @ self.V.T

    def extra_repr(self) -> str:
        return f"kind={self.kind}, d={self.d}, rank={self.rank}, matrices={self.n}, scale={self.scale:g}"


class FactLinear(nn.Module):
    """A frozen Linear whose weight is a grid of ``rows`` × ``cols`` d×d blocks, block (r, c)
    incremented by ΔW_{first + r·cols + c}: qkv is 3×1, proj 1×1, fc1 m×1, fc2 1×m. The forward
    takes the low-rank path x → Vᵀ → Σ → dropout → U, never forming ΔW."""

    def __init__(self, linear: nn.Linear, factors: FactFactors, first: int, rows: int, cols: int):
        super().__init__()
        self.linear = linear
        # held by reference, not as a submodule: the factors are the model's once (model.fact)
        self.__dict__["factors"] = factors
        self.first, self.rows, self.cols = first, rows, cols

    def sigma(self) -> torch.Tensor:
        f = self.factors.rank
        return self.factors.sigma(self.first, self.first + self.rows * self.cols).reshape(self.rows, self.cols, f, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fa = self.factors
        h = x.reshape(*x.shape[:-1], self.cols, fa.d) @ fa.V  # (..., cols, f)
        z = fa.dropout(torch.einsum("...cg,rcfg->...rf", h, self.sigma()))  # (..., rows, f)
        delta = (z @ fa.U.T).reshape(*x.shape[:-1], self.rows * fa.d)
        return self.linear(x) + fa.scale * delta

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The Linear with every ΔW added to its block of the weight."""
        fa, w = self.factors, self.linear.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        U, V, S = fa.U.to(dt), fa.V.to(dt), self.sigma().to(dt)
        dw = fa.scale * torch.einsum("af,rcfg,bg->racb", U, S, V)  # (rows, d, cols, d)
        w.add_(dw.reshape(w.shape).to(w.dtype))
        return self.linear

    def extra_repr(self) -> str:
        return f"matrices={self.first}..{self.first + self.rows * self.cols - 1}, blocks={self.rows}x{self.cols}"


def _layers(model: nn.Module, name: str) -> tuple[int, int, list[tuple[str, int, int]]]:
    """d, the fc chunk count m, and (path, rows, cols) of every layer FacT adapts, in the authors'
    order per block (qkv, proj, fc1, fc2); raises MethodError, one line, where the model does not fit."""
    from timm.models.vision_transformer import VisionTransformer

    need = f"{name} needs a timm VisionTransformer whose blocks have Linear attn.qkv, attn.proj, mlp.fc1 and mlp.fc2"
    if not isinstance(model, VisionTransformer):
        raise MethodError(f"{need}; got {type(model).__name__}")
    d, m, layers = model.embed_dim, None, []
    for b, block in enumerate(model.blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        mods = {p: getattr(parent, a, None) for p, parent, a in (("attn.qkv", attn, "qkv"), ("attn.proj", attn, "proj"),
                                                                 ("mlp.fc1", mlp, "fc1"), ("mlp.fc2", mlp, "fc2"))}
        bad = [p for p, mod in mods.items() if type(mod) is not nn.Linear]
        if bad:
            got = ", ".join(f"{p} = {type(mods[p]).__name__}" for p in bad)
            raise MethodError(f"{need}; got block {b}: {got}")
        hidden = mods["mlp.fc1"].out_features
        shapes = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (hidden, d), "mlp.fc2": (d, hidden)}
        wrong = [f"{p} {tuple(mods[p].weight.shape)}" for p, s in shapes.items() if tuple(mods[p].weight.shape) != s]
        if wrong or hidden % d or (m is not None and hidden // d != m):
            raise MethodError(f"{need}, with q, k, v, proj d×d and an MLP width a multiple of d = {d} (the same in every "
                              f"block); got block {b}: {', '.join(wrong) or f'mlp.fc1 width {hidden}'}")
        m = hidden // d
        layers += [(f"blocks.{b}.attn.qkv", 3, 1), (f"blocks.{b}.attn.proj", 1, 1),
                   (f"blocks.{b}.mlp.fc1", m, 1), (f"blocks.{b}.mlp.fc2", 1, m)]
    if not layers:
        raise MethodError(f"{need}; got a model without blocks")
    return d, m, layers


def _make(kind: str, settings_type: type, summary: str) -> Method:
    name = f"fact_{kind}"

    def apply(model: nn.Module, settings: FactSettings, space) -> nn.Module:
        # FacT adapts every block by definition: the space's targets do not apply
        d, _, layers = _layers(model, name)
        n = sum(rows * cols for _, rows, cols in layers)
        w = model.get_submodule(layers[0][0]).weight
        freeze_all_but_head(model)
        factors = FactFactors(kind, d, settings.rank, n, settings.scale, settings.dropout, w.device, w.dtype)
        model.fact = factors
        first = 0
        for path, rows, cols in layers:
            set_submodule(model, path, FactLinear(model.get_submodule(path), factors, first, rows, cols))
            first += rows * cols
        return model

    def merge(model: nn.Module) -> nn.Module:
        for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, FactLinear)]:
            set_submodule(model, path, mod.merged())
        if isinstance(getattr(model, "fact", None), FactFactors):
            del model.fact
        return model

    return Method(name=name, summary=summary, config=settings_type, apply=apply, count=trainable_outside_head,
                  merge=merge, size="rank", test_sizes=(2, 4))


METHODS = (
    _make("tt", FactSettings, "FacT-TT: every block's weight increments s·U Σ_i Vᵀ with U, V shared by all blocks"),
    _make("tk", FactTKSettings, "FacT-TK: every block's weight increments s·U (Σ_k P_ik C_k) Vᵀ, one Tucker core shared"),
)

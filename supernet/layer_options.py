"""What the LoRA family adds to a GLoRA layer (docs/lora-family.md), as mixins of
:class:`supernet.layer.GLoraLayer`: DoRA's magnitude and normalised weight, and the frozen initial
factors of a data-aware init (PiSSA, LoRA-GA) in offset form. Neither is present on a default
layer, whose state dict, files and forward stay as they always were."""

from __future__ import annotations

import contextlib
from typing import Mapping

import torch
import torch.nn as nn

from .dora import dora_magnitude, dora_row_scale, dora_weight, row_norms
from .plans import OFFSETS
from .space import SpaceError

# The data-aware initialisations a low-rank A, B or C can record (docs/lora-family.md; the math is
# methods/lorafamily/init.py). Each keeps frozen copies of the initial factors, used in offset form.
LORA_INITS = ("pissa", "lora_ga")


def _full_precision(like: torch.Tensor):
    """A context without autocast on ``like``'s device (DoRA's norm in the adapters' dtype), or a no-op one."""
    device = like.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


class DoraMixin:
    """DoRA on a GLoRA layer: ``set_dora``, its per-layer cost, its dense weight."""

    # DoRA (set_dora): the weight is m ⊙ V / ‖V‖ with a trainable magnitude ``glora_m``, registered
    # only then, so a layer without DoRA has the state dict, files and forward it always had.
    use_dora: bool = False

    def set_dora(self, enabled: bool = True) -> None:
        """DoRA (Liu et al. 2024, arXiv 2402.09353; docs/lora-family.md "DoRA") on this layer from now
        on: the weight becomes ``m ⊙ V / ‖V‖`` with ``V = W0 + W0 ⊙ A + B`` of the active choice,
        row-wise norms detached in backward, and a new trainable magnitude ``glora_m: (rows,)``.

        ``m`` starts at the row norms of the *current* V, so the layer's function is unchanged:
        W0's norms on a fresh layer (the model starts at the base model exactly), the sub-network's
        own V on a retrained or extracted one. Enabling twice does nothing. Disabling a DoRA layer is
        refused: ``m`` is trained state and dropping it would change the function.
        """
        if not isinstance(enabled, bool):
            raise SpaceError(f"use_dora: must be true or false, got {enabled!r}")
        if enabled == self.use_dora:
            return
        if not enabled:
            raise SpaceError("use_dora: this layer uses DoRA already and its magnitude m is part of its function; "
                             "it cannot be turned off (build the layer again from the base model instead)")
        with torch.no_grad(), _full_precision(self.weight):
            # The same op on the same V as the forward's norm (dora_weight), so m / ‖V‖ is 1 exactly.
            m = dora_magnitude(self._direction())
        requires_grad = all(p.requires_grad for p in self.adapter_parameters())  # as the other adapters (True if none)
        self.glora_m = nn.Parameter(m, requires_grad=requires_grad)
        object.__setattr__(self, "use_dora", True)

    @property
    def base_cost(self) -> int:
        """Parameters the retrained layer holds whatever its choice: DoRA's magnitude (``rows``), else 0."""
        return self.rows if self.use_dora else 0

    # -- DoRA (set_dora) --------------------------------------------------------------------
    def _direction(self) -> torch.Tensor:
        """``V = W0 + W0 ⊙ A + B`` of the active choice as ``(rows, cols)``, with plain autograd (LoRA's
        scale included: :meth:`_matrix`). DoRA normalises it; the layer's fast kernels never build it."""
        c = self.active
        W0 = self.weight.reshape(self.rows, self.cols)
        A, B = self._matrix("A", c.A), self._matrix("B", c.B)
        V = W0 if A is None else torch.addcmul(W0, W0, A)
        return V if B is None else V + B

    def _dora_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The DoRA layer's dense weight ``m ⊙ V / ‖V‖`` ``(rows, cols)`` (norm detached) and its bias
        ``b0 + b0 ⊙ D + E + W0 C`` (not rescaled), with plain autograd.

        Built in the adapters' own dtype even under autocast, where the product of the factors and
        the norm would otherwise run in bf16/fp16; the layer's product then casts the result."""
        c = self.active
        with _full_precision(self.weight):
            W = dora_weight(self._direction(), self.glora_m)
            b = self._bias_term(self.weight, self._matrix("C", c.C), self._vector("D", c.D), self._vector("E", c.E),
                                self.weight.dtype)
        return W, b

    @torch.no_grad()
    def _dora_rescale_(self, W: torch.Tensor) -> torch.Tensor:
        """``W ← m ⊙ W / ‖W‖`` row-wise, in place, for the merged weight (``W`` is V, ``(rows, …)``)."""
        W.mul_(dora_row_scale(row_norms(W), self.glora_m.to(W.dtype)).view(-1, *([1] * (W.dim() - 1))))
        return W



class LoraInitMixin:
    """The frozen initial factors of PiSSA and LoRA-GA (offset form) on a GLoRA layer."""

    # The data-aware init of each tensor that has one ({"B": "pissa"}), set by set_lora_init; empty
    # (the default) for LoRA's own init. Never changed in place: set_lora_init replaces the dict
    # (a mappingproxy would be safer but cannot be deep-copied, and models are).
    lora_init: Mapping[str, str] = {}
    _lora_offsets = False  # some tensor has frozen initial factors: the forward passes them

    # -- data-aware initialisation, in offset form ------------------------------------------
    def set_lora_init(self, tensor: str, kind: str, down0: torch.Tensor, up0: torch.Tensor) -> None:
        """Start ``tensor`` (A, B or C) from the factors ``(down0, up0)`` of a data-aware init ``kind``
        (``"pissa"``, ``"lora_ga"``), in offset form: ``s (Xd Xu − Xd⁰ Xu⁰)``.

        ``down0``, ``up0`` have the shared factors' full shapes ``(rows, R)`` and ``(R, cols)`` and are
        copied into both the trainable factors and the frozen buffers ``glora_<t>d0``, ``glora_<t>u0``
        (persistent: saved with the adapters). Every sub-network then starts exactly at W0, W0 is not
        touched, and the factors get the gradients they would get without the offset, a constant.
        """
        down, up = self._lowrank_factors(tensor, kind)
        self._check_offset_shapes(tensor, down0, up0)
        with torch.no_grad():
            down.copy_(down0)
            up.copy_(up0)
        # copies of the parameters themselves: the same dtype, layout and values, so the two
        # products of the offset are one computation and cancel bit for bit
        self.set_lora_offsets(tensor, kind, down, up)

    def set_lora_offsets(self, tensor: str, kind: str, down0: torch.Tensor, up0: torch.Tensor) -> None:
        """Record ``kind`` for ``tensor`` and set its frozen initial factors to ``(down0, up0)`` without
        touching the trainable ones: for a sub-network extracted from, or a file written by, a layer
        that had them. The buffers take the factors' dtype, device and layout."""
        down, up = self._lowrank_factors(tensor, kind)
        self._check_offset_shapes(tensor, down0, up0)
        with torch.no_grad():
            self.register_buffer(f"glora_{tensor}d0", torch.empty_like(down).copy_(down0))
            self.register_buffer(f"glora_{tensor}u0", torch.empty_like(up).copy_(up0))
        object.__setattr__(self, "lora_init", {**self.lora_init, tensor: kind})
        object.__setattr__(self, "_lora_offsets", True)

    def clear_lora_init(self) -> None:
        """Forget every data-aware init: drop the frozen initial factors (the trainable ones stay as
        they are, so the function changes unless they equal their copies)."""
        for t in self.lora_init:
            for f in "du":
                self._buffers.pop(f"glora_{t}{f}0", None)
        object.__setattr__(self, "lora_init", {})
        object.__setattr__(self, "_lora_offsets", False)

    def _lowrank_factors(self, tensor: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if tensor not in ("A", "B", "C"):
            raise SpaceError(f"lora init: tensor must be A, B or C, got {tensor!r}")
        if kind not in LORA_INITS:
            raise SpaceError(f"lora init of {tensor}: kind must be one of {', '.join(LORA_INITS)}, got {kind!r}")
        down, up = getattr(self, f"glora_{tensor}d"), getattr(self, f"glora_{tensor}u")
        if up is None:
            raise SpaceError(f"lora init of {tensor}: no low-rank choice on this layer (choices: "
                             f"{', '.join(map(str, self.choices[tensor]))}); a data-aware init needs one")
        return down, up

    def _check_offset_shapes(self, tensor: str, down0: torch.Tensor, up0: torch.Tensor) -> None:
        for name, v in ((f"glora_{tensor}d", down0), (f"glora_{tensor}u", up0)):
            want = tuple(getattr(self, name).shape)
            if tuple(v.shape) != want:
                raise ValueError(f"lora init of {tensor}: {name} has shape {want}, got {tuple(v.shape)}")

    def _offset_args(self) -> list[torch.Tensor | None]:
        """The frozen initial factors in :data:`~supernet.plans.OFFSETS` order, None where absent."""
        b = self._buffers
        return [b.get(n) for n in OFFSETS]


"""Dtype helpers and an eager-only cache shared by the GLoRA layers' kernels, plans and convolution."""

from __future__ import annotations

import functools

import torch


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


def _out(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """An ``out=`` buffer like ``like`` in ``dtype``, or None where ``like`` has it already."""
    return None if like.dtype == dtype else torch.empty_like(like, dtype=dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without a dispatcher call when it is one already: the layer's small tensors
    are cast a dozen times per call, and on a host-bound step each call costs."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` computes in: the autocast dtype where autocast is on for ``x``'s device
    (autocast leaves float64 alone)."""
    if x.dtype == torch.float64 or not torch._C._is_any_autocast_enabled():  # the common fp32 case, without asking for x.device
        return x.dtype
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


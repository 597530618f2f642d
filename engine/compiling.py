"""``torch.compile`` for the stages that run a fixed architecture (``retrain.compile``, ``search.compile``)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


class CompileError(RuntimeError):
    """``torch.compile`` could not compile the model; the message names the config key that asked for it."""


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(module)`` when enabled: the wrapper shares the module's parameters, so
    checkpoints and exports keep using ``module`` itself (no ``_orig_mod.`` prefixes), and weights
    changed in place are picked up without recompiling."""
    return torch.compile(module) if enabled else module


@contextmanager
def compile_errors(key: str):
    """Turn a failed compile (it happens at the first call, and again on a new input shape) into one line naming ``key``."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CompileError(f"{key}: torch.compile failed ({reason}); set {key}: false to run without it") from e

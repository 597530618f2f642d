"""``torch.compile`` for the stages that offer it (``retrain.compile``, ``search.compile``): the
modes they accept, and one-line errors for a failed compile."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

# torch.compile's modes, as ``retrain.compile_mode`` and ``search.compile_mode`` take them (timm's
# --torchcompile-mode). "reduce-overhead" replays CUDA graphs: one launch for a whole step of a
# fixed sub-network, where a step at moderate batch sizes is bound by kernel launches; on a CPU
# it compiles as "default".
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """``torch.compile(model)`` in ``mode`` (one of :data:`COMPILE_MODES`); the wrapper shares the parameters."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=None if mode == "default" else mode)


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether a model compiled in ``mode`` replays CUDA graphs on ``device``: each training step
    must then be marked (``torch.compiler.cudagraph_mark_step_begin``), since a replay reuses the
    previous step's output memory."""
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


class CompileError(RuntimeError):
    """``torch.compile`` could not compile the model; the message names the config key that asked for it."""


@contextmanager
def compile_errors(key: str):
    """Turn a failed compile (it happens at the first call, and again on a new input shape) into one line naming ``key``."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CompileError(f"{key}: torch.compile failed ({reason}); set {key}: false to run without it") from e

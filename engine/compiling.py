"""One-line errors for a failed ``torch.compile`` in the stages that offer it (``retrain.compile``, ``search.compile``)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


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

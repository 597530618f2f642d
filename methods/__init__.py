"""Fine-tuning methods by name. A method is one module here defining ``METHOD`` (see
:class:`methods.base.Method`; a module holding several defines ``METHODS``, a tuple), listed once
below; ``retrain.py --set retrain.preset=<name>`` trains it, and docs/methods.md describes each.

    import methods
    m = methods.get("lora")
    m.apply(model, m.settings(size=4), load_space("configs/space/large.yaml"))
"""

from __future__ import annotations

from . import adalora, adapter, adaptformer, bitfit, fact, full, glora, linear, lora, noah, prompt, repadapter, ssf, vpt
from .base import Method, MethodError, NoSettings

REGISTRY: dict[str, Method] = {m.name: m for mod in (
    glora, lora, ssf, bitfit, prompt, linear, full,
    vpt, adapter, adaptformer, repadapter, fact, adalora, noah,
) for m in getattr(mod, "METHODS", None) or (mod.METHOD,)}

# The names retrain.preset takes: every method but the searched ones (GLoRA, NOAH), whose
# sub-network comes from the search (retrain.preset: null) or from retrain.subnet.
PRESETS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if not m.searched)


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; registered: {', '.join(REGISTRY)}") from None


__all__ = ["REGISTRY", "PRESETS", "Method", "MethodError", "NoSettings", "get"]

"""SSF (Lian et al. 2022): a learned scale and shift of every targeted layer's output; GLoRA's
A = vector (scale), D = vector (scale of the bias) and E = vector (shift)."""

from .base import NoSettings
from .glora_path import glora_preset

METHOD = glora_preset("ssf", "scale and shift of every targeted layer's output", NoSettings,
                      lambda s: dict(A="vector", B="none", C="none", D="vector", E="vector"))

"""BitFit (Ben Zaken et al. 2022) in GLoRA's form: a trainable offset of every targeted layer's
bias (E = vector), also on layers that have none."""

from .base import NoSettings
from .glora_path import glora_preset

METHOD = glora_preset("bitfit", "a trainable bias offset on every targeted layer", NoSettings,
                      lambda s: dict(A="none", B="none", C="none", D="none", E="vector"))

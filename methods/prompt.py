"""GLoRA's prompt term alone (C = vector): a learned input-side vector whose product with W0
shifts each targeted layer's output (docs/method.md §1)."""

from .base import NoSettings
from .glora_path import glora_preset

METHOD = glora_preset("prompt", "GLoRA's C term: W0·c added to every targeted layer's output", NoSettings,
                      lambda s: dict(A="none", B="none", C="vector", D="none", E="none"))

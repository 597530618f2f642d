"""The pure math of the LoRA family's options, as standalone functions on tensors: nothing here
touches a layer, an optimizer or a config, so a layer's forward/backward or an optimizer step can
call them directly.

Notation throughout: a low-rank path is ``ΔW = s · D U`` with the down factor ``D: (out, r)`` and the
up factor ``U: (r, in)``, this project's ``Xd``, ``Xu`` (docs/method.md §2) and LoRA's B and A.

- :mod:`.scaling`: rsLoRA's scale ``α/√r`` (:func:`lora_scale`) and LoRA+'s optimizer groups
  (:func:`loraplus_param_groups`).
- :mod:`.init`: PiSSA (:func:`pissa_factors`) and LoRA-GA (:func:`lora_ga_factors`) initial factors,
  used in offset form ``s (D U − D⁰ U⁰)`` (:func:`offset_delta`) so the model starts at W0.
- :mod:`.apply` (not imported here: it works on GLoRA layers, so it imports :mod:`supernet`): PiSSA and
  LoRA-GA on a model (:func:`~.apply.init_pissa`, :func:`~.apply.estimate_weight_grads`, :func:`~.apply.init_lora_ga`).
- :mod:`.lorapro`: LoRA-Pro's adjusted factor gradients (:func:`lora_pro_grads`).
- :mod:`.dora`: DoRA's magnitude/direction weight (:func:`dora_weight`).
- :mod:`.adalora`: AdaLoRA's update, orthogonality penalty, importance scores and budget schedule.
"""

from .adalora import (adalora_delta, adalora_scale, budget_masks, budget_schedule, element_score,
                      orthogonality_penalty, triplet_scores, update_importance)
from .dora import dora_magnitude, dora_row_scale, dora_weight, lowrank_row_norms, row_norms
from .init import frozen_copy, lora_ga_factors, lora_ga_indices, offset_delta, pissa_factors
from .lorapro import LoraProGrads, equivalent_gradient, lora_pro_grads, sylvester_psd
from .scaling import glora_zero_init_factor, lora_scale, loraplus_param_groups

__all__ = [
    "lora_scale", "loraplus_param_groups", "glora_zero_init_factor",
    "pissa_factors", "lora_ga_factors", "lora_ga_indices", "offset_delta", "frozen_copy",
    "lora_pro_grads", "LoraProGrads", "equivalent_gradient", "sylvester_psd",
    "dora_weight", "dora_magnitude", "dora_row_scale", "row_norms", "lowrank_row_norms",
    "adalora_scale", "adalora_delta", "orthogonality_penalty", "update_importance", "element_score",
    "triplet_scores", "budget_schedule", "budget_masks",
]

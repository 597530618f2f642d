"""DoRA: the adapted weight split into a learned magnitude per output row and a direction.

Liu, Wang, Yin, Molchanov, Wang, Cheng and Chen, 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation", arXiv 2402.09353: ``W' = m ⊙ V / ‖V‖`` with ``V = W0 + ΔW``, row-wise norms detached
in backward, ``m`` initialised to W0's row norms. The functions and their full description live in
:mod:`supernet.dora`: GLoRA's layers use them (``GLoraLayer.set_dora``), and ``supernet/`` may not
import ``methods/`` (tests/test_imports.py). This module keeps their public names here.
"""

from __future__ import annotations

from supernet.dora import dora_magnitude, dora_row_scale, dora_weight, lowrank_row_norms, row_norms

__all__ = ["dora_magnitude", "row_norms", "dora_row_scale", "dora_weight", "lowrank_row_norms"]

"""Evolutionary search over GLoRA sub-network configurations (model-agnostic ask/tell)."""

from .budget import Budget, BudgetError, ChoiceGrid
from .evolution import EvolutionSearch, EvolutionSettings

__all__ = ["Budget", "BudgetError", "ChoiceGrid", "EvolutionSearch", "EvolutionSettings"]

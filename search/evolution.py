"""Evolutionary search over GLoRA sub-network configurations (ask/tell interface).

The search only proposes configurations and receives scores: it knows nothing about
models or data. A typical loop::

    search = EvolutionSearch(choices, costs, EvolutionSettings(max_params=200_000))
    while not search.done:
        batch = search.ask()
        search.tell([evaluate(cfg) for cfg in batch])
    config, score, params = search.best

All randomness comes from one private ``torch.Generator`` so that every process with
the same seed proposes the same candidates, and ``state_dict`` captures everything
needed to resume a search bit-for-bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import torch

from .budget import Budget, BudgetError, Config, Key, ChoiceGrid

__all__ = ["EvolutionSettings", "EvolutionSearch", "BudgetError"]

# How many plain uniform draws to try before switching to the budget-guided sampler.
# Uniform draws follow the paper's distribution; the guided sampler guarantees progress.
UNIFORM_TRIES = 10
STATE_VERSION = 1

Candidate = tuple[Config, float, int]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EvolutionSettings:
    """Hyper-parameters of the search. Invalid values raise ValueError naming the field."""

    population: int = 50
    top_k: int = 10
    mutation_count: int = 25
    mutation_prob: float = 0.2
    crossover_count: int = 25
    generations: int = 20
    max_params: int | None = None  # inclusive upper budget
    min_params: int | None = None  # inclusive lower bound
    seed: int = 0
    max_tries: int = 1000  # attempts per needed candidate before giving up on that slot

    def __post_init__(self) -> None:
        for name in ("population", "top_k", "generations", "max_tries"):
            self._require_int(name, minimum=1)
        # 0 mutants / crossovers is legitimate (e.g. pure random search)
        for name in ("mutation_count", "crossover_count", "seed"):
            self._require_int(name, minimum=0)
        p = self.mutation_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"EvolutionSettings.mutation_prob must be a number in [0, 1], got {p!r}")
        self.mutation_prob = float(p)
        if self.top_k > self.population:
            raise ValueError(
                f"EvolutionSettings.top_k must be in [1, population={self.population}], got {self.top_k}"
            )
        for name in ("max_params", "min_params"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"EvolutionSettings.{name} must be None or an integer >= 0, got {value!r}")
        if self.min_params is not None and self.max_params is not None and self.min_params > self.max_params:
            raise ValueError(
                f"EvolutionSettings.min_params must be <= max_params ({self.max_params}), got {self.min_params}"
            )

    def _require_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < minimum:
            what = "a positive integer (>= 1)" if minimum == 1 else f"an integer >= {minimum}"
            raise ValueError(f"EvolutionSettings.{name} must be {what}, got {value!r}")


class EvolutionSearch:
    """Ask/tell evolutionary search with a parameter budget, dedup and exact resume."""

    def __init__(
        self,
        choices: Mapping[str, Mapping[str, Sequence[str]]],
        costs: Mapping[str, Mapping[str, Mapping[str, int]]],
        settings: EvolutionSettings | None = None,
    ) -> None:
        self.grid = ChoiceGrid(choices, costs)
        self._setup(settings if settings is not None else EvolutionSettings())

    def _setup(self, settings: EvolutionSettings) -> None:
        self.settings = settings
        self.budget = Budget(self.grid, settings.min_params, settings.max_params)  # may raise BudgetError
        self._gen = torch.Generator().manual_seed(settings.seed)
        self._generation = 0
        # history entries keep the index key; configs are decoded on demand
        self._history: list[tuple[int, Key, int, float]] = []  # (generation, key, params, score)
        self._seen: set[Key] = set()
        self._top: list[int] = []  # indices into _history, best first
        self._pending: list[Key] | None = None

    # ---- public read-only views ----------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._generation

    @property
    def done(self) -> bool:
        return self._generation >= self.settings.generations

    @property
    def top_k(self) -> list[Candidate]:
        return [self._entry(i) for i in self._top]

    @property
    def best(self) -> Candidate | None:
        """(config, score, params) of the best candidate so far, or None before the first tell."""
        return self._entry(self._top[0]) if self._top else None

    @property
    def history(self) -> list[dict[str, Any]]:
        return [
            {"generation": g, "config": self.grid.decode(k), "params": p, "score": s}
            for g, k, p, s in self._history
        ]

    def cost(self, config: Mapping[str, Mapping[str, str]]) -> int:
        """Parameter count of a configuration (sum of per-slot choice costs)."""
        return self.grid.cost(self.grid.encode(config))

    def _entry(self, index: int) -> Candidate:
        _, key, params, score = self._history[index]
        return self.grid.decode(key), score, params

    # ---- ask / tell ------------------------------------------------------------------------
    def ask(self) -> list[Config]:
        """Candidates of the current generation that still need a score.

        Calling ask() again before tell() returns the same batch (no RNG is consumed).
        """
        if self.done:
            return []
        if self._pending is None:
            self._pending = self._propose()
        return [self.grid.decode(k) for k in self._pending]

    def tell(self, scores: Sequence[float]) -> None:
        """Record scores for the batch of the last ask() (same order) and advance a generation."""
        if self._pending is None:
            raise RuntimeError("tell() called without a pending ask(); call ask() first")
        scores = list(scores)
        if len(scores) != len(self._pending):
            raise ValueError(f"tell() got {len(scores)} scores for {len(self._pending)} candidates")
        for key, score in zip(self._pending, scores):
            self._history.append((self._generation, key, self.grid.cost(key), float(score)))
            self._seen.add(key)
        self._update_top(len(self._history) - len(scores))
        self._pending = None
        self._generation += 1

    def run(
        self,
        evaluate: Callable[[list[Config]], Sequence[float]],
        callback: Callable[["EvolutionSearch"], None] | None = None,
    ) -> Candidate | None:
        """Loop ask/evaluate/tell until done; ``callback(self)`` after each generation."""
        while not self.done:
            batch = self.ask()
            self.tell(evaluate(batch) if batch else [])
            if callback is not None:
                callback(self)
        return self.best

    def _rank_key(self, index: int) -> tuple[float, int, int]:
        # score descending (NaN ranks last), then fewer parameters, then earlier insertion
        _, _, params, score = self._history[index]
        return (math.inf if math.isnan(score) else -score, params, index)

    def _update_top(self, first_new: int) -> None:
        pool = self._top + list(range(first_new, len(self._history)))
        self._top = sorted(pool, key=self._rank_key)[: self.settings.top_k]

    # ---- proposing candidates ----------------------------------------------------------
    def _propose(self) -> list[Key]:
        s = self.settings
        batch: list[Key] = []
        taken = set(self._seen)  # evaluated before, or already in this batch

        def fill(count: int, make: Callable[[], Key | None]) -> None:
            # Each needed candidate gets up to max_tries attempts; if one slot cannot be
            # filled the neighbourhood is (nearly) exhausted, so we stop this phase
            # instead of burning max_tries on every remaining slot.
            for _ in range(count):
                for _ in range(s.max_tries):
                    key = make()
                    if key is not None and key not in taken and self.budget.admits(self.grid.cost(key)):
                        taken.add(key)
                        batch.append(key)
                        break
                else:
                    return

        if self._generation > 0 and self._top:
            # counts are capped so a batch never exceeds `population`
            n_mut = min(s.mutation_count, s.population)
            fill(n_mut, self._mutant)
            if len(self._top) >= 2:
                fill(min(s.crossover_count, s.population - len(batch)), self._crossover)
        fill(s.population - len(batch), self._random_candidate)
        return batch

    def _parent(self) -> Key:
        i = int(torch.randint(len(self._top), (1,), generator=self._gen).item())
        return self._history[self._top[i]][1]

    def _mutant(self) -> Key:
        """Each slot of a random top-k parent is re-drawn uniformly with prob mutation_prob."""
        parent = self._parent()
        n = len(self.grid)
        flips = torch.rand(n, generator=self._gen, dtype=torch.float64).tolist()
        fresh = self.grid.sample_uniform(self._gen)
        p = self.settings.mutation_prob
        return tuple(f if u < p else k for k, f, u in zip(parent, fresh, flips))

    def _crossover(self) -> Key:
        """Each slot taken from one of two distinct top-k parents with prob 0.5."""
        a, b = torch.randperm(len(self._top), generator=self._gen)[:2].tolist()
        pa, pb = self._history[self._top[a]][1], self._history[self._top[b]][1]
        coin = torch.rand(len(self.grid), generator=self._gen, dtype=torch.float64).tolist()
        return tuple(x if u < 0.5 else y for x, y, u in zip(pa, pb, coin))

    def _random_candidate(self) -> Key | None:
        """Uniform draws first (paper's distribution); budget-guided sampler if they keep failing."""
        for _ in range(UNIFORM_TRIES):
            key = self.grid.sample_uniform(self._gen)
            if self.budget.admits(self.grid.cost(key)):
                return key
        return self.budget.sample(self._gen)

    # ---- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain python types + one uint8 tensor: loadable with torch.load(weights_only=True)."""
        return {
            "version": STATE_VERSION,
            "settings": asdict(self.settings),
            "choices": copy.deepcopy(self.grid.choices_plain),
            "costs": copy.deepcopy(self.grid.costs_plain),
            "generation": self._generation,
            "history": self.history,
            "top_k": list(self._top),
            "pending": None if self._pending is None else [self.grid.decode(k) for k in self._pending],
            "rng_state": self._gen.get_state().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any], generations: int | None = None) -> None:
        """Restore a search saved by state_dict(); settings are taken from the state, but for
        ``generations`` where given: a resumed search may run to another count (nothing before
        depends on it)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported search state version {state.get('version')!r}")
        if state["choices"] != self.grid.choices_plain or state["costs"] != self.grid.costs_plain:
            raise ValueError("search state was saved for a different search space (choices or costs differ)")
        known = {f.name for f in fields(EvolutionSettings)}
        saved = {k: v for k, v in state["settings"].items() if k in known}
        self._setup(EvolutionSettings(**{**saved, **({"generations": generations} if generations is not None else {})}))
        for h in state["history"]:
            key = self.grid.encode(h["config"])
            self._history.append((int(h["generation"]), key, int(h["params"]), float(h["score"])))
            self._seen.add(key)
        self._top = [int(i) for i in state["top_k"]]
        self._generation = int(state["generation"])
        pending = state.get("pending")
        self._pending = None if pending is None else [self.grid.encode(c) for c in pending]
        self._gen.set_state(torch.as_tensor(state["rng_state"], dtype=torch.uint8).clone())

"""The choice grid the search algorithm samples from, and parameter-budget sampling.

The search never looks at a model: its :class:`ChoiceGrid` is just, per layer and per support tensor
(A..E), an ordered list of choice strings and the parameter count each choice costs.
Because the count of a sub-network is additive over (layer, tensor) slots, budget
questions reduce to sums over slots:

* the smallest / largest possible count is the sum of per-slot minima / maxima;
* a partial assignment can still be completed inside ``[min_params, max_params]``
  iff the remaining slots can reach a sum in the leftover window.

Internally a candidate is a tuple of choice *indices*, one per slot (layers in the
insertion order of ``choices``, tensors in A..E order); that tuple is also the dedup key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from supernet.space import TENSORS

Config = dict[str, dict[str, str]]
Key = tuple[int, ...]

# In exact mode (see Budget) we hold one Python-int bitset of (slack + 1) bits per slot.
# Above this many bits in total we fall back to interval guidance so memory stays bounded.
EXACT_MODE_MAX_BITS = 1 << 28  # 32 MiB


class BudgetError(ValueError):
    """The parameter budget admits no configuration of the search space at all."""


@dataclass(frozen=True)
class Slot:
    """One (layer, tensor) position with its allowed choices and their parameter costs."""

    layer: str
    tensor: str
    options: tuple[str, ...]
    costs: tuple[int, ...]

    @property
    def min_cost(self) -> int:
        return min(self.costs)

    @property
    def max_cost(self) -> int:
        return max(self.costs)


def _tensor_order(names: Sequence[str]) -> list[str]:
    """A..E first in that order, then any other tensor names in their given order."""
    known = [t for t in TENSORS if t in names]
    return known + [t for t in names if t not in TENSORS]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ChoiceGrid:
    """Validated ``choices`` + ``costs`` flattened into an ordered list of slots: the encoded grid the
    evolution samples from (not the user-facing :class:`supernet.SearchSpace`, from which it is derived)."""

    def __init__(
        self,
        choices: Mapping[str, Mapping[str, Sequence[str]]],
        costs: Mapping[str, Mapping[str, Mapping[str, int]]],
    ) -> None:
        if not isinstance(choices, Mapping) or not choices:
            raise ValueError("choices must be a non-empty mapping {layer: {tensor: [choice, ...]}}")
        slots: list[Slot] = []
        for layer, per_tensor in choices.items():
            if not isinstance(per_tensor, Mapping) or not per_tensor:
                raise ValueError(f"choices[{layer!r}] must be a non-empty mapping {{tensor: [choice, ...]}}")
            for tensor in _tensor_order(list(per_tensor)):
                slots.append(self._make_slot(layer, tensor, per_tensor[tensor], costs))
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.layers: tuple[str, ...] = tuple(choices)
        self.tensors: dict[str, tuple[str, ...]] = {
            layer: tuple(_tensor_order(list(choices[layer]))) for layer in choices
        }
        self.sizes: tuple[int, ...] = tuple(len(s.options) for s in self.slots)
        self.min_total: int = sum(s.min_cost for s in self.slots)
        self.max_total: int = sum(s.max_cost for s in self.slots)
        # choice string -> index, per slot, for encoding configs quickly
        self._index = [{name: i for i, name in enumerate(s.options)} for s in self.slots]
        # plain-python copies, used to check that a saved state belongs to this space
        self.choices_plain = {l: {t: list(v) for t, v in choices[l].items()} for l in choices}
        self.costs_plain = {
            s.layer: {} for s in self.slots
        }
        for s in self.slots:
            self.costs_plain[s.layer][s.tensor] = dict(zip(s.options, s.costs))

    @staticmethod
    def _make_slot(layer: str, tensor: str, options: Sequence[str], costs: Mapping) -> Slot:
        where = f"choices[{layer!r}][{tensor!r}]"
        if isinstance(options, str) or not isinstance(options, Sequence) or len(options) == 0:
            raise ValueError(f"{where} must be a non-empty list of choice strings")
        if len(set(options)) != len(options):
            raise ValueError(f"{where} lists a choice twice: {list(options)}")
        try:
            table = costs[layer][tensor]
        except (KeyError, TypeError):
            raise ValueError(f"costs[{layer!r}][{tensor!r}] is missing") from None
        slot_costs = []
        for name in options:
            if name not in table:
                raise ValueError(f"costs[{layer!r}][{tensor!r}] has no entry for choice {name!r}")
            value = table[name]
            if not _is_int(value) or value < 0:
                raise ValueError(
                    f"costs[{layer!r}][{tensor!r}][{name!r}] must be a non-negative int, got {value!r}"
                )
            slot_costs.append(int(value))
        return Slot(layer, tensor, tuple(str(o) for o in options), tuple(slot_costs))

    def __len__(self) -> int:
        return len(self.slots)

    def encode(self, config: Mapping[str, Mapping[str, str]]) -> Key:
        """Config dict -> index tuple; raises ValueError for unknown layers/choices."""
        missing = [l for l in self.layers if l not in config]
        extra = [l for l in config if l not in self.tensors]
        if missing or extra:
            raise ValueError(f"config layers do not match the space (missing {missing[:3]}, unknown {extra[:3]})")
        key = []
        for slot, index in zip(self.slots, self._index):
            try:
                key.append(index[config[slot.layer][slot.tensor]])
            except KeyError:
                got = config[slot.layer].get(slot.tensor) if isinstance(config[slot.layer], Mapping) else None
                raise ValueError(
                    f"config[{slot.layer!r}][{slot.tensor!r}] = {got!r} is not one of {list(slot.options)}"
                ) from None
        return tuple(key)

    def decode(self, key: Key) -> Config:
        config: Config = {layer: {} for layer in self.layers}
        for slot, i in zip(self.slots, key):
            config[slot.layer][slot.tensor] = slot.options[i]
        return config

    def cost(self, key: Key) -> int:
        return sum(slot.costs[i] for slot, i in zip(self.slots, key))

    def sample_uniform(self, gen: torch.Generator) -> Key:
        """Each slot uniform over its list (the paper's distribution). One RNG call per candidate."""
        u = torch.rand(len(self.slots), generator=gen, dtype=torch.float64).tolist()
        return tuple(min(int(x * n), n - 1) for x, n in zip(u, self.sizes))


class Budget:
    """Inclusive bounds ``[min_params, max_params]`` on a grid, with a sampler that respects them.

    The constructor raises :class:`BudgetError` when no configuration fits.

    Sampling modes of :meth:`sample`:

    * interval guidance (one binding bound, or a very wide window): a choice is allowed
      if the remaining slots' min/max sums keep the target reachable. With one binding
      bound this is exact (completing with all-min or all-max choices always works).
    * exact guidance (both bounds binding): the window may fall between reachable sums
      (e.g. all costs multiples of 10 and the window [41, 49]), where interval reasoning
      dead-ends. We then keep bitsets of reachable suffix sums (offset by the suffix
      minimum and truncated to the slack ``max_params - min_total``), which never dead-ends.
    """

    def __init__(self, grid: ChoiceGrid, min_params: int | None, max_params: int | None) -> None:
        self.grid = grid
        self.min_params = min_params
        self.max_params = max_params
        lo_binding = min_params is not None and min_params > grid.min_total
        hi_binding = max_params is not None and max_params < grid.max_total
        self._check_interval()
        slack = (max_params - grid.min_total) if max_params is not None else 0
        self.exact = lo_binding and hi_binding and len(grid) * (slack + 1) <= EXACT_MODE_MAX_BITS
        if self.exact:
            self._check_exact(slack)

    # ---- feasibility -------------------------------------------------------------------
    def _describe(self) -> str:
        # plain integers (no thousands separators) so the numbers can be grepped / compared
        return (
            f"smallest possible count is {self.grid.min_total} and largest possible is "
            f"{self.grid.max_total}, but the budget asks for "
            f"min_params={self.min_params}, max_params={self.max_params}"
        )

    def _check_interval(self) -> None:
        if self.max_params is not None and self.max_params < self.grid.min_total:
            raise BudgetError(f"parameter budget is infeasible: {self._describe()}")
        if self.min_params is not None and self.min_params > self.grid.max_total:
            raise BudgetError(f"parameter budget is infeasible: {self._describe()}")

    def _check_exact(self, slack: int) -> None:
        reach = self._reachable(range(len(self.grid)), slack)[0]
        if not self._has_bit(reach, self.min_params - self.grid.min_total, slack):
            raise BudgetError(
                "parameter budget is infeasible: no combination of choices has a count inside "
                f"[min_params, max_params] although the window lies within the possible range; {self._describe()}"
            )

    def admits(self, total: int) -> bool:
        if self.max_params is not None and total > self.max_params:
            return False
        if self.min_params is not None and total < self.min_params:
            return False
        return True

    # ---- bitset helpers (exact mode) ---------------------------------------------------
    def _reachable(self, order: Sequence[int], slack: int) -> list[int]:
        """``R[i]``: bitset of (sum - suffix_min) reachable by slots ``order[i:]``, bits 0..slack."""
        mask = (1 << (slack + 1)) - 1
        out = [0] * (len(order) + 1)
        out[-1] = 1  # empty suffix: sum 0
        for pos in range(len(order) - 1, -1, -1):
            slot = self.grid.slots[order[pos]]
            nxt, acc = out[pos + 1], 0
            for c in set(slot.costs):
                shift = c - slot.min_cost
                if shift <= slack:
                    acc |= nxt << shift
            out[pos] = acc & mask
        return out

    @staticmethod
    def _has_bit(bits: int, lo: int, hi: int) -> bool:
        """Whether ``bits`` has any set bit in the inclusive range [lo, hi]."""
        lo = max(lo, 0)
        if lo > hi:
            return False
        return (bits >> lo) & ((1 << (hi - lo + 1)) - 1) != 0

    # ---- constrained sampling ----------------------------------------------------------
    def sample(self, gen: torch.Generator) -> Key | None:
        """Draw a configuration inside the budget, slot by slot in a random order.

        Each slot is uniform over the choices that keep the budget reachable, so the
        result is always within budget. Returns None only on a dead end, which can happen
        solely with two binding bounds outside exact mode (caller retries).
        """
        grid = self.grid
        n = len(grid)
        order = torch.randperm(n, generator=gen).tolist()
        draws = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
        lo = self.min_params if self.min_params is not None else -1
        hi = self.max_params if self.max_params is not None else grid.max_total
        # suffix min/max sums over the visiting order
        suf_min = [0] * (n + 1)
        suf_max = [0] * (n + 1)
        for pos in range(n - 1, -1, -1):
            slot = grid.slots[order[pos]]
            suf_min[pos] = suf_min[pos + 1] + slot.min_cost
            suf_max[pos] = suf_max[pos + 1] + slot.max_cost
        reach = self._reachable(order, hi - grid.min_total) if self.exact else None

        key = [0] * n
        total = 0
        for pos, slot_id in enumerate(order):
            slot = grid.slots[slot_id]
            allowed = []
            for i, c in enumerate(slot.costs):
                t = total + c
                if reach is not None:
                    base = t + suf_min[pos + 1]
                    ok = self._has_bit(reach[pos + 1], lo - base, hi - base)
                else:
                    ok = t + suf_min[pos + 1] <= hi and t + suf_max[pos + 1] >= lo
                if ok:
                    allowed.append(i)
            if not allowed:
                return None
            pick = allowed[min(int(draws[pos] * len(allowed)), len(allowed) - 1)]
            key[slot_id] = pick
            total += slot.costs[pick]
        return tuple(key)

"""Tests of the model-agnostic evolutionary search (search/), on synthetic spaces only."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from search import Budget, BudgetError, EvolutionSearch, EvolutionSettings, ChoiceGrid

ROOT = Path(__file__).resolve().parents[1]

SPACE_CHOICES = {
    "A": ["lora8", "lora4", "vector", "scalar", "none"],
    "B": ["lora8", "lora4", "vector", "scalar", "none"],
    "C": ["lora8", "lora4", "vector", "none"],
    "D": ["vector", "scalar", "none"],
    "E": ["vector", "scalar", "none"],
}


def choice_cost(name: str, d_in: int, d_out: int) -> int:
    if name.startswith("lora"):
        return int(name[4:]) * (d_in + d_out)
    return {"vector": d_out, "scalar": 1, "none": 0}[name]


def make_space(n_layers: int = 12, single_choice_layer: bool = True):
    """A ViT-like space: alternating (64->192) and (64->64) layers; one slot with a single choice."""
    choices, costs = {}, {}
    for i in range(n_layers):
        name = f"blocks.{i // 2}.{'qkv' if i % 2 == 0 else 'proj'}"
        d_in, d_out = (64, 192) if i % 2 == 0 else (64, 64)
        choices[name] = {t: list(v) for t, v in SPACE_CHOICES.items()}
        costs[name] = {t: {c: choice_cost(c, d_in, d_out) for c in v} for t, v in SPACE_CHOICES.items()}
    if single_choice_layer:
        first = next(iter(choices))
        choices[first]["E"] = ["scalar"]
    return choices, costs


def make_scorer(choices, seed: int = 123, noise: float = 0.05):
    """Hidden per-(layer, tensor, choice) utility + deterministic per-config noise.

    The noise depends only on the config (not call order), so resumed and uninterrupted
    runs see identical scores.
    """
    g = torch.Generator().manual_seed(seed)
    utility = {
        (layer, t, c): float(torch.rand((), generator=g))
        for layer, per_t in choices.items()
        for t, opts in per_t.items()
        for c in opts
    }

    def score(config) -> float:
        base = sum(utility[(layer, t, c)] for layer, per_t in config.items() for t, c in per_t.items())
        seed_c = zlib.crc32(json.dumps(config, sort_keys=True).encode())
        return base + noise * float(torch.rand((), generator=torch.Generator().manual_seed(seed_c)))

    return score


def evaluate_with(scorer):
    return lambda batch: [scorer(c) for c in batch]


def small_settings(**kw) -> EvolutionSettings:
    base = dict(population=20, top_k=5, mutation_count=8, crossover_count=8, generations=10, seed=0)
    base.update(kw)
    return EvolutionSettings(**base)


def run_search(choices, costs, settings, scorer=None) -> EvolutionSearch:
    search = EvolutionSearch(choices, costs, settings)
    search.run(evaluate_with(scorer or make_scorer(choices)))
    return search


# ---------------------------------------------------------------------------------------
def test_every_candidate_respects_max_and_min_budget():
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    lo = space.min_total + (space.max_total - space.min_total) // 5
    hi = space.min_total + (space.max_total - space.min_total) // 3
    search = run_search(choices, costs, small_settings(min_params=lo, max_params=hi))
    hist = search.history
    assert len(hist) == 10 * 20
    for h in hist:
        assert lo <= h["params"] <= hi
        assert search.cost(h["config"]) == h["params"]
    config, score, params = search.best
    assert lo <= params <= hi and search.cost(config) == params


def test_max_only_budget_is_respected_by_uniform_and_evolved_candidates():
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    hi = (space.min_total + space.max_total) // 2  # about half of uniform draws fail
    search = run_search(choices, costs, small_settings(max_params=hi))
    assert all(h["params"] <= hi for h in search.history)
    assert len(search.history) == 200


def test_no_config_is_evaluated_twice_even_when_space_is_exhausted():
    # one layer: 5*5*4*3*3 = 900 configurations, fewer than population * generations
    choices, costs = make_space(n_layers=1, single_choice_layer=False)
    settings = small_settings(population=60, top_k=10, mutation_count=20, crossover_count=20,
                              generations=20, max_tries=100)
    search = EvolutionSearch(choices, costs, settings)
    scorer = make_scorer(choices)
    batches = []
    while not search.done:
        batch = search.ask()
        batches.append(batch)
        search.tell([scorer(c) for c in batch])
    keys = [json.dumps(h["config"], sort_keys=True) for h in search.history]
    assert len(keys) == len(set(keys))
    assert 800 <= len(keys) <= 900  # it really explored (nearly) the whole space
    for batch in batches:
        assert len(batch) <= settings.population


def test_same_seed_is_deterministic_and_different_seed_differs():
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    hi = (space.min_total + space.max_total) // 3
    a = run_search(choices, costs, small_settings(max_params=hi, seed=7))
    b = run_search(choices, costs, small_settings(max_params=hi, seed=7))
    c = run_search(choices, costs, small_settings(max_params=hi, seed=8))
    assert a.history == b.history
    assert a.best == b.best
    assert a.history != c.history


def test_ask_is_identical_across_processes():
    """Two processes computing ask() independently propose the same list."""
    code = (
        "import json, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]\n"
        "from test_search_algo import make_space\n"
        "from search import EvolutionSearch, EvolutionSettings\n"
        "ch, co = make_space()\n"
        "s = EvolutionSearch(ch, co, EvolutionSettings(population=10, top_k=3, seed=5, max_params=20000))\n"
        "print(json.dumps(s.ask()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    choices, costs = make_space()
    here = EvolutionSearch(choices, costs, EvolutionSettings(population=10, top_k=3, seed=5, max_params=20000))
    assert json.loads(out.stdout) == here.ask()


@pytest.mark.parametrize("stop_after_ask", [False, True])
def test_resume_from_saved_state_equals_uninterrupted_run(tmp_path, stop_after_ask):
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    settings = small_settings(max_params=(space.min_total + space.max_total) // 3, seed=3)
    scorer = make_scorer(choices)
    full = run_search(choices, costs, settings, scorer)

    part = EvolutionSearch(choices, costs, settings)
    for _ in range(4):
        part.tell(evaluate_with(scorer)(part.ask()))
    if stop_after_ask:
        part.ask()  # checkpoint with a pending, not yet scored batch
    path = tmp_path / "search.pt"
    torch.save(part.state_dict(), path)
    del part

    state = torch.load(path, weights_only=True)
    resumed = EvolutionSearch(choices, costs, EvolutionSettings())  # settings come from the state
    resumed.load_state_dict(state)
    assert resumed.generation == 4
    resumed.run(evaluate_with(scorer))
    assert resumed.history == full.history
    assert resumed.best == full.best
    assert resumed.top_k == full.top_k


def test_load_state_rejects_a_different_space():
    choices, costs = make_space()
    search = EvolutionSearch(choices, costs, small_settings())
    other_choices, other_costs = make_space(n_layers=4)
    with pytest.raises(ValueError, match="different search space"):
        EvolutionSearch(other_choices, other_costs, small_settings()).load_state_dict(search.state_dict())


def test_infeasible_budget_raises_budget_error_with_smallest_count():
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    with pytest.raises(BudgetError) as err:
        EvolutionSearch(choices, costs, small_settings(max_params=space.min_total - 1))
    assert str(space.min_total) in str(err.value)
    assert str(space.min_total - 1) in str(err.value)
    with pytest.raises(BudgetError) as err:
        EvolutionSearch(choices, costs, small_settings(min_params=space.max_total + 1))
    assert str(space.max_total) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_window_between_reachable_sums_is_infeasible():
    # every cost is a multiple of 10, so no configuration lands in [41, 49]
    choices = {f"l{i}": {"A": ["big", "none"]} for i in range(6)}
    costs = {f"l{i}": {"A": {"big": 10, "none": 0}} for i in range(6)}
    with pytest.raises(BudgetError, match="no combination"):
        EvolutionSearch(choices, costs, small_settings(population=2, top_k=1, min_params=41, max_params=49))
    search = EvolutionSearch(choices, costs, small_settings(population=2, top_k=1, min_params=40, max_params=40))
    assert {search.cost(c) for c in search.ask()} == {40}


def test_very_tight_budget_completes_quickly():
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    hi = space.min_total + 130  # only a handful of cheap vectors/scalars fit
    start = time.perf_counter()
    search = run_search(choices, costs, small_settings(max_params=hi, generations=5))
    assert time.perf_counter() - start < 8
    assert len(search.history) == 5 * 20
    assert all(h["params"] <= hi for h in search.history)


def test_narrow_window_inside_the_range_completes_quickly():
    # both bounds binding and a 3-parameter window: naive rejection would essentially never hit it
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    mid = (space.min_total + space.max_total) // 2
    start = time.perf_counter()
    search = run_search(choices, costs, small_settings(min_params=mid, max_params=mid + 2, generations=4))
    assert time.perf_counter() - start < 8
    assert len(search.history) == 4 * 20
    assert all(mid <= h["params"] <= mid + 2 for h in search.history)


def test_guided_sampler_alone_always_lands_in_budget():
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    g = torch.Generator().manual_seed(0)
    for lo, hi in [(None, space.min_total + 5), (space.max_total - 500, None), (30000, 30100)]:
        budget = Budget(space, lo, hi)
        for _ in range(30):
            key = budget.sample(g)
            assert key is not None and budget.admits(space.cost(key))


def test_search_improves_over_first_generation():
    choices, costs = make_space()
    space = ChoiceGrid(choices, costs)
    settings = EvolutionSettings(population=30, top_k=10, mutation_count=15, crossover_count=15,
                                 generations=20, max_params=(space.min_total + space.max_total) // 2, seed=1)
    search = run_search(choices, costs, settings)
    first = max(h["score"] for h in search.history if h["generation"] == 0)
    assert search.best[1] > first + 1.0  # clearly better, not just noise
    # top-k is sorted by score descending
    scores = [s for _, s, _ in search.top_k]
    assert scores == sorted(scores, reverse=True) and len(scores) == 10


def test_top_k_ties_broken_by_lower_cost_then_insertion_order():
    choices = {"l0": {"A": ["x", "y", "z"]}}
    costs = {"l0": {"A": {"x": 5, "y": 1, "z": 1}}}
    search = EvolutionSearch(choices, costs, EvolutionSettings(population=3, top_k=3, generations=1))
    batch = search.ask()
    search.tell([1.0, 1.0, 1.0])
    expected = sorted(range(3), key=lambda i: (search.cost(batch[i]), i))
    assert [c for c, _, _ in search.top_k] == [batch[i] for i in expected]
    assert search.done and search.ask() == []


def test_ask_is_idempotent_and_tell_checks_lengths():
    choices, costs = make_space()
    search = EvolutionSearch(choices, costs, small_settings())
    with pytest.raises(RuntimeError):
        search.tell([])
    first = search.ask()
    assert search.ask() == first and len(first) == 20
    assert len({json.dumps(c, sort_keys=True) for c in first}) == 20
    with pytest.raises(ValueError, match="scores"):
        search.tell([0.0])
    search.tell([0.0] * 20)
    assert search.generation == 1


def test_nan_scores_rank_last():
    choices, costs = make_space(n_layers=2)
    search = EvolutionSearch(choices, costs, small_settings(population=4, top_k=2))
    search.ask()
    search.tell([math.nan, 0.5, math.nan, 0.1])
    assert [s for _, s, _ in search.top_k] == [0.5, 0.1]


@pytest.mark.parametrize(
    "field, value",
    [
        ("population", 0),
        ("top_k", 0),
        ("top_k", 51),
        ("mutation_count", -1),
        ("crossover_count", 2.5),
        ("mutation_prob", 1.5),
        ("mutation_prob", -0.1),
        ("generations", 0),
        ("max_tries", 0),
        ("max_params", -5),
        ("seed", -1),
    ],
)
def test_settings_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"EvolutionSettings\.{field} must"):
        EvolutionSettings(**{field: value})


def test_min_greater_than_max_is_rejected():
    with pytest.raises(ValueError, match=r"min_params must be <= max_params"):
        EvolutionSettings(min_params=10, max_params=5)

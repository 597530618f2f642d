"""Stage 2: evolutionary search over the trained supernet's sub-networks (search.py).

Each candidate is scored by merging its weights into one plain copy of the model; the search state
is saved after every generation, the best sub-network goes to ``search/result.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from search import BudgetError, EvolutionSearch, EvolutionSettings
from supernet import MergedCopy, atomic_write, atomic_write_text, head_params, set_subnet

from .. import distributed as dist
from ..checkpoint import CheckpointError, safe_torch_load
from ..compiling import compile_errors, compile_model, uses_cuda_graphs
from ..config import ConfigError, RunConfig
from ..data import build_splits
from ..rng import seed_everything
from ..rundir import fingerprint, guard_output_dir, remove_stale, write_config
from ..tracker import Tracker
from ..trainer import autocast_for
from .common import load_supernet, probe_input, warn_slow_precision
from .pareto import pareto_plot


class MergedScorer:
    """Scores candidates by merging their weights into one plain copy of the model (docs/method.md §1).

    The validation set is kept in memory, so a candidate costs one merge (a few small matrix
    products per layer) plus a plain forward pass over the validation images. A supernet that
    cannot merge (NOAH's, ``mergeable=False``) is scored with the candidate activated in it.
    """

    def __init__(self, model: nn.Module, loader, info: dist.DistInfo, precision: str = "fp32", compile: bool = False,
                 compile_mode: str = "default", activate=set_subnet, mergeable: bool = True):
        self.model, self.info, self.precision = model, info, precision
        self.activate, self.mergeable = activate, mergeable
        self.merged = MergedCopy(model) if mergeable else None
        self.plain = self.merged.plain if mergeable else None
        # Compiled once: each candidate is copied into the same tensors in place, which the
        # compiled graph reads without recompiling.
        self.compiled = compile_model(self.plain, compile_mode) if compile else None
        self.mark_steps = self.compiled is not None and uses_cuda_graphs(compile_mode, info.device)
        self.batches = [(x.to(info.device), y.to(info.device)) for x, y in loader]

    def load(self, config) -> None:
        """Merge ``config`` into the plain copy (:attr:`plain`, which :attr:`compiled` reads)."""
        self.merged.load(config)

    @torch.no_grad()
    def predictions(self, config, merged: bool = True) -> torch.Tensor:
        if merged and self.mergeable:
            self.load(config)
            if self.compiled is not None:
                with compile_errors("search.compile"):
                    return self.predict(self.compiled, self.mark_steps)
            net = self.plain
        else:
            self.activate(self.model, config)
            net = self.model.eval()
        return self.predict(net)

    @torch.no_grad()
    def predict(self, net: nn.Module, mark_steps: bool = False) -> torch.Tensor:
        """Top-1 predictions of ``net`` over the validation batches (the benchmark times a plain model with it too).

        ``mark_steps``: ``net`` replays CUDA graphs, and each batch's logits are done with (reduced
        to predictions) before the next batch, whose replay may reuse their memory.
        """
        preds = []
        for x, _ in self.batches:
            if mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast_for(self.precision, self.info.device):
                preds.append(net(x).argmax(dim=1))
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)

    def accuracy(self, config) -> float:
        preds = self.predictions(config)
        labels = torch.cat([y for _, y in self.batches])
        return 100.0 * int((preds == labels).sum()) / labels.numel() if labels.numel() else 0.0


def run_search(cfg: RunConfig, info: dist.DistInfo, source: str, overwrite: bool = False) -> str:
    out = Path(cfg.output_dir)
    sdir = out / "search"
    s = cfg.search
    guard_output_dir(sdir, cfg, "search", source, overwrite)
    seed_everything(s.seed)
    # read once: the scorer keeps the validation batches on the device for every candidate
    _, val_ds, num_classes = build_splits(cfg.data, "search", *probe_input(cfg), cache=())
    model = load_supernet(cfg, num_classes, info, source)
    settings = EvolutionSettings(population=s.population, top_k=s.top_k, mutation_count=s.mutation_count,
                                 mutation_prob=s.mutation_prob, crossover_count=s.crossover_count,
                                 generations=s.generations, max_params=s.max_params, min_params=s.min_params, seed=s.seed)
    sn = cfg.supernet
    choices = sn.choices(model)
    try:
        search = EvolutionSearch(choices, sn.costs(model), settings)
    except BudgetError as err:
        raise ConfigError(source, [f"search.max_params: {err}"]) from None
    state_path = sdir / "state.pt"
    if not overwrite and s.resume == "auto" and state_path.is_file():
        state = safe_torch_load(state_path, CheckpointError, "search state")
        if state.get("fingerprint") not in (fingerprint(cfg, "search"), fingerprint(cfg, "search", legacy=True)):
            raise ConfigError(source, [f"output_dir: {state_path} is from a search with another configuration; pass --overwrite"])
        search.load_state_dict(state["search"], generations=s.generations)
    if not dist.same_on_all_ranks(search.generation, info.device):  # ranks would ask for different candidates
        raise CheckpointError(f"{state_path}: the ranks do not resume the search from the same generation "
                              f"(rank {info.rank} is at {search.generation}); {dist.SHARED_FS_HINT}")
    write_config(sdir, cfg, info)
    if search.generation == 0:  # starting afresh (--overwrite, or no state to resume)
        remove_stale(sdir, ("result.yaml", "pareto.png"), info)  # else retrain.py could train that result
    tracker = Tracker(sdir, enabled=info.is_main)
    warn_slow_precision(s.precision, "search.precision", info, tracker)
    loader = torch.utils.data.DataLoader(val_ds, batch_size=s.eval_batch_size, num_workers=cfg.data.num_workers)
    scorer = MergedScorer(model, loader, info, s.precision, compile=s.compile, compile_mode=s.compile_mode,
                          activate=sn.activate, mergeable=sn.mergeable)
    from tqdm import tqdm

    bar = tqdm(total=settings.generations, initial=search.generation, desc="search", disable=not info.is_main, leave=False)
    tracker.print(f"search: {len(choices)} layers, budget {settings.min_params or 0:,}..{settings.max_params or 'inf'} adapter "
                  f"parameters (head excluded), {len(val_ds)} validation images, {info.world_size} process(es)")
    while not search.done:
        cands = search.ask()
        # Candidates are independent, so ranks split them round-robin and share the scores:
        # no per-batch communication, and each score is computed exactly as in one process.
        mine = {i: scorer.accuracy(c) for i, c in enumerate(cands) if i % info.world_size == info.rank}
        merged_scores: dict[int, float] = {}
        for part in dist.all_gather_object(mine):
            merged_scores.update(part)
        search.tell([merged_scores[i] for i in range(len(cands))])
        gen = search.generation
        gen_scores = [merged_scores[i] for i in range(len(cands))]
        best = search.best
        if info.is_main:
            state = {"search": search.state_dict(), "fingerprint": fingerprint(cfg, "search")}
            atomic_write(state_path, lambda tmp: torch.save(state, tmp))
            lines = "".join(json.dumps({"generation": h["generation"], "params": h["params"], "accuracy": h["score"],
                                        "subnet": h["config"]}) + "\n" for h in search.history)
            atomic_write_text(sdir / "history.jsonl", lines)
            tracker.log(gen, {"best_accuracy": best[1], "mean_accuracy": sum(gen_scores) / max(len(gen_scores), 1),
                              "evaluated": len(cands), "best_params": best[2]}, kind="search")
        bar.update(1)
        bar.set_postfix(best=f"{best[1]:.2f}", params=best[2], refresh=False)
    bar.close()
    config, acc, params = search.best
    result = {
        "accuracy": acc,
        "params": params,
        "params_note": "adapter parameters counted per SPEC section 2; the classifier head is excluded",
        "head_params": head_params(model),
        "split": "validation",
        "budget": {"max_params": settings.max_params, "min_params": settings.min_params},
        "evaluated": len(search.history),
        "subnet": config,
        "top_k": [{"accuracy": a, "params": p, "subnet": c} for c, a, p in search.top_k],
    }
    if info.is_main:
        atomic_write_text(sdir / "result.yaml", yaml.safe_dump(result, sort_keys=False, default_flow_style=None, width=200))
        pareto_plot(search.history, {"params": params, "score": acc}, settings, sdir / "pareto.png")
        tracker.print(f"best sub-network: {acc:.2f}% validation accuracy, {params:,} adapter parameters "
                      f"-> {sdir / 'result.yaml'}")
    tracker.close()
    dist.barrier()
    return "done"


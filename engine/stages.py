"""The three stages: supernet training, evolutionary search, retraining with merge and export.

Each ``run_*`` takes a validated :class:`RunConfig` and the distributed info, and returns
``"done"`` or the name of the signal that interrupted it (after a checkpoint was saved).
Directory layout under ``output_dir``::

    config.yaml  supernet.safetensors  supernet.yaml  checkpoints/last.pt  tb/  metrics.jsonl
    search/   config.yaml  state.pt  result.yaml  history.jsonl  pareto.png  tb/
    retrain/  config.yaml  checkpoints/last.pt  adapter.safetensors  subnet.yaml  merged.safetensors  metrics.json  tb/
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

from search import BudgetError, EvolutionSearch, EvolutionSettings
from supernet import (
    TENSORS,
    GLoraLayer,
    MergeError,
    SubnetSampler,
    adapter_metadata,
    added_biases,
    apply_glora,
    atomic_write,
    atomic_write_text,
    choice_costs,
    count_params,
    extract_subnet,
    get_subnet,
    glora_layers,
    head_params,
    layer_choices,
    load_adapter,
    load_space,
    load_subnet,
    merge_glora,
    sample_subnet,
    save_adapter,
    set_subnet,
    subnet_to_dict,
)

from . import distributed as D
from .checkpoint import CheckpointError, safe_torch_load
from .compiling import compile_errors, compile_model, uses_cuda_graphs
from .config import ConfigError, RunConfig
from .data import DataConfig, build_splits
from .models import build_model, input_size, set_grad_checkpointing
from .rng import seed_everything, step_generator
from .trainer import ShardSampler, Trainer, autocast_for, evaluate
from .tracker import Tracker

# Which config sections each stage depends on: a finished stage refuses to be re-run into the
# same folder with different values there (a typo must never overwrite a finished run).
STAGE_SECTIONS = {
    "train": ("model", "data", "space", "train"),
    "search": ("model", "data", "space", "train", "search"),
    "retrain": ("model", "data", "space", "retrain"),
}
_VOLATILE = {"resume", "device", "compile", "compile_mode", "stop_at_step", "fail_at_step", "cache",
             "micro_batch_size", "grad_checkpointing"}  # may change between a run and its resumption


# Keys added after runs existed, with the value that reproduces how such runs behaved: at that
# value a key is left out of fingerprints and comparisons, so those runs still resume.
_ADDED_KEYS = {("data", "normalize"): "imagenet"}


# May differ between a run and its resumption because nothing done so far depends on them: a search
# resumed with more generations goes on where it stopped. (Not train.epochs: the schedule depends on it.)
_EXTENDABLE = {("search", "generations")}


def _relevant(cfg_dict: dict, stage: str, legacy: bool = False) -> dict:
    out = {}
    for section in STAGE_SECTIONS[stage]:
        value = cfg_dict.get(section)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items()
                     if k not in _VOLATILE and not ((section, k) in _ADDED_KEYS and _ADDED_KEYS[section, k] == v)
                     and (legacy or (section, k) not in _EXTENDABLE)}
        out[section] = value
    return out


def fingerprint(cfg: RunConfig, stage: str, legacy: bool = False) -> str:
    """A digest of what a stage's result depends on. ``legacy``: as computed before _EXTENDABLE keys
    were left out, which the states of runs started then carry."""
    blob = json.dumps(_relevant(cfg.to_dict(), stage, legacy), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def guard_output_dir(stage_dir: Path, cfg: RunConfig, stage: str, source: str, overwrite: bool) -> None:
    """Refuse to run into a folder that holds a run of a different configuration."""
    previous = stage_dir / "config.yaml"
    section = {"train": cfg.train, "retrain": cfg.retrain, "search": cfg.search}[stage]
    explicit_resume = section.resume not in ("auto", "never")  # the user named the checkpoint to continue
    if overwrite or explicit_resume or not previous.is_file():
        return
    try:
        old = yaml.safe_load(previous.read_text()) or {}
    except yaml.YAMLError:
        old = {}
    diffs = config_differences(_relevant(old, stage), _relevant(cfg.to_dict(), stage))
    if diffs:
        raise ConfigError(source, [f"output_dir: {stage_dir} holds a {stage} run with a different configuration "
                                   f"({', '.join(diffs[:5])}); choose another output_dir or pass --overwrite"])


def config_differences(old: dict, new: dict) -> list[str]:
    """The keys (``section.key``, or a whole section) where two relevant configurations differ,
    compared as JSON would store them (a YAML round trip turns tuples into lists)."""
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    diffs = []
    for section in new:
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(section)
    return diffs


def _data_config(cfg: RunConfig) -> DataConfig:
    return DataConfig(**dataclasses.asdict(cfg.data))


def probe_input(cfg: RunConfig) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """The square input size (data.img_size, else the backbone's), and the mean/std images are
    normalised with (data.normalize)."""
    from .preflight import input_spec, meta_model

    size, mean, std = input_spec(meta_model(cfg.model, 0), cfg.data.normalize)
    return cfg.data.img_size or size, mean, std


def _write_config(stage_dir: Path, cfg: RunConfig, info: D.DistInfo) -> None:
    if info.is_main:
        atomic_write_text(stage_dir / "config.yaml", cfg.to_yaml())


def remove_stale(folder: Path, names: tuple[str, ...], info: D.DistInfo) -> None:
    """A stage starting afresh: the outputs an earlier run left in ``folder`` must not outlive it, or
    a run stopped now would leave them to the next stage (or to a reader) as this run's."""
    if info.is_main:
        for name in names:
            (folder / name).unlink(missing_ok=True)


def warn_slow_precision(precision: str, key: str, info: D.DistInfo, tracker: Tracker) -> None:
    """fp16 is a GPU format: most CPUs have no fp16 matrix units, and PyTorch's fallback there is
    two orders of magnitude slower than fp32 (2.0 s against 11 ms for a 1024² product on this
    machine's AVX-512 CPU, where bf16 takes 2.7 ms)."""
    if precision == "fp16" and info.device.type == "cpu":
        tracker.print(f"warning: {key}: fp16 on a CPU usually runs far slower than fp32 (no fp16 matrix units); bf16 or fp32 is the choice there")


def _stage_setup(cfg: RunConfig, stage: str, stage_dir: Path, source: str, overwrite: bool, seed: int):
    guard_output_dir(stage_dir, cfg, stage, source, overwrite)
    seed_everything(seed)


# --------------------------------------------------------------------------- stage 1
def reference_subnets(model: nn.Module, seed: int, n_random: int) -> dict[str, Any]:
    """The largest and smallest sub-networks plus ``n_random`` fixed random ones."""
    layers = dict(glora_layers(model))

    def extreme(pick):
        out = {}
        for name, layer in layers.items():
            out[name] = {t: str(pick(layer.choices[t], key=lambda c: layer.choice_cost(t, c)))
                         for t in TENSORS}
        return out

    refs = {"largest": extreme(max), "smallest": extreme(min)}
    for i in range(n_random):
        refs[f"random{i}"] = sample_subnet(model, step_generator(seed, i, stream=1), activate=False)
    return refs


def subnet_tag(config) -> int:
    """A short stable hash of a configuration, logged per step and compared across ranks."""
    text = json.dumps(subnet_to_dict(config), sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def run_train(cfg: RunConfig, info: D.DistInfo, source: str, overwrite: bool = False) -> str:
    out = Path(cfg.output_dir)
    t = cfg.train
    _stage_setup(cfg, "train", out, source, overwrite, t.seed)
    train_ds, val_ds, num_classes = build_splits(_data_config(cfg), "search", *probe_input(cfg))
    model = build_model(cfg.model, num_classes)
    apply_glora(model, cfg.space)
    if t.grad_checkpointing:
        set_grad_checkpointing(model, "train.grad_checkpointing")
    model.to(info.device)
    _write_config(out, cfg, info)
    tracker = Tracker(out, enabled=info.is_main)
    warn_slow_precision(t.precision, "train.precision", info, tracker)
    refs = reference_subnets(model, t.seed, t.reference_subnets)

    sampler = SubnetSampler(model)

    def before_step(step: int) -> int:
        config = sampler(step_generator(t.seed, step))
        return subnet_tag(config)

    trainer = Trainer(model, train_ds, val_ds, t, out, info, tracker, before_step=before_step,
                      fingerprint=fingerprint(cfg, "train"), num_workers=cfg.data.num_workers, desc="supernet")

    def on_eval(epoch: int, step: int) -> dict[str, float]:
        scores = {}
        for name, ref in refs.items():
            set_subnet(model, ref)
            scores[f"acc_{name}"] = evaluate(model, trainer.eval_loader, info, t.precision)["top1"]
        return scores

    trainer.on_eval = on_eval
    if trainer.resume("never" if overwrite else t.resume):
        tracker.print(f"resumed from {trainer.ckpt_path} at epoch {trainer.epoch}, step {trainer.step}")
    else:
        remove_stale(out, ("supernet.safetensors", "supernet.yaml"), info)  # else search.py could search it
    pc = count_params(model, refs["largest"])
    tracker.print(f"supernet: {len(refs['largest'])} GLoRA layers, {sum(p.numel() for p in trainer.params):,} trainable "
                  f"tensors' parameters (largest sub-network {pc.adapter:,} adapter + {pc.head:,} head), "
                  f"{len(train_ds)} train / {len(val_ds)} val images, {trainer.total_steps} steps")
    trainer.install_signal_handlers()
    status = trainer.fit()
    if status == "done" and info.is_main:
        save_adapter(model, out / "supernet.safetensors", out / "supernet.yaml",
                     metadata={"model": cfg.model.name, "num_classes": num_classes, "space": load_space(cfg.space).to_dict(),
                               "config": _relevant(cfg.to_dict(), "train")})
        tracker.print(f"supernet written to {out / 'supernet.safetensors'}")
    tracker.close()
    D.barrier()
    return status


# --------------------------------------------------------------------------- stage 2
def load_supernet(cfg: RunConfig, num_classes: int, info: D.DistInfo, source: str, same_training: bool = True,
                  path: str | None = None) -> nn.Module:
    """The trained supernet of ``cfg.output_dir`` (or the file ``path``). Refused when the run config
    no longer describes it: the search (``same_training``) needs the model, data, space and train
    sections it was trained with; retraining from its slices needs only its space (the model must fit
    its tensors)."""
    key = "retrain.supernet" if path else "output_dir"
    path = Path(path) if path else Path(cfg.output_dir) / "supernet.safetensors"
    if not path.is_file():
        hint = f" ({D.SHARED_FS_HINT})" if info.enabled else ""
        raise ConfigError(source, [f"{key}: {path}: no trained supernet; run train.py with this config first{hint}"])
    # The supernet comes from the file: a config changed since train.py (its space above all, whose
    # choices the file's layers would silently keep) would describe a supernet that was never trained.
    meta = adapter_metadata(path)
    if same_training and "config" in meta:
        diffs = config_differences(meta["config"], _relevant(cfg.to_dict(), "train"))
    else:  # retraining, or a file written before the metadata held the whole configuration
        diffs = ["space"] if "space" in meta and meta["space"] != load_space(cfg.space).to_dict() else []
    if diffs:
        raise ConfigError(source, [f"{key}: {path} was trained with another configuration ({', '.join(diffs[:5])}; "
                                   f"see its metadata in supernet.yaml): run train.py with this one, or set those keys back"])
    model = build_model(cfg.model, num_classes)
    load_adapter(model, path)
    return model.to(info.device).eval()


class MergedScorer:
    """Scores candidates by merging their weights into one plain copy of the model (docs/method.md §1).

    The validation set is kept in memory, so a candidate costs one merge (a few small matrix
    products per layer) plus a plain forward pass over the validation images.
    """

    def __init__(self, model: nn.Module, loader, info: D.DistInfo, precision: str = "fp32", compile: bool = False, compile_mode: str = "default"):
        self.model, self.info, self.precision = model, info, precision
        self.layers = dict(glora_layers(model))
        plain = copy.deepcopy(model)
        for name, layer in self.layers.items():
            parent, _, attr = name.rpartition(".")  # a plain nn.Linear or convolution of the layer's shape
            setattr(plain.get_submodule(parent) if parent else plain, attr, layer.plain(bias=True))
        self.plain = plain.eval().requires_grad_(False)
        # Compiled once: each candidate is copied into the same tensors in place, which the
        # compiled graph reads without recompiling.
        self.compiled = compile_model(self.plain, compile_mode) if compile else None
        self.mark_steps = self.compiled is not None and uses_cuda_graphs(compile_mode, info.device)
        self.targets = {n: self.plain.get_submodule(n) for n in self.layers}
        self.batches = [(x.to(info.device), y.to(info.device)) for x, y in loader]

    @torch.no_grad()
    def load(self, config) -> None:
        set_subnet(self.model, config)
        for name, layer in self.layers.items():
            target = self.targets[name]
            layer.merged_weight_bias(out=(target.weight, target.bias))

    @torch.no_grad()
    def predictions(self, config, merged: bool = True) -> torch.Tensor:
        if merged:
            self.load(config)
            if self.compiled is not None:
                with compile_errors("search.compile"):
                    return self.predict(self.compiled, self.mark_steps)
            net = self.plain
        else:
            set_subnet(self.model, config)
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


def _pareto_plot(history: list[dict], best: dict, settings: EvolutionSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [h["params"] for h in history]
    accs = [h["score"] for h in history]
    order = sorted(range(len(history)), key=lambda i: (params[i], -accs[i]))
    front, best_acc = [], -math.inf
    for i in order:
        if accs[i] > best_acc:
            front.append(i)
            best_acc = accs[i]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    sc = ax.scatter(params, accs, c=[h["generation"] for h in history], s=10, cmap="viridis", alpha=0.7, label="candidates")
    fig.colorbar(sc, ax=ax, label="generation")
    ax.plot([params[i] for i in front], [accs[i] for i in front], "r-o", ms=3, lw=1, label="Pareto front")
    ax.scatter([best["params"]], [best["score"]], marker="*", s=150, c="red", edgecolors="k", zorder=5, label="best")
    if settings.max_params is not None:
        ax.axvline(settings.max_params, color="k", ls="--", lw=1, label="max_params")
    if settings.min_params is not None:
        ax.axvline(settings.min_params, color="gray", ls=":", lw=1, label="min_params")
    ax.set_xlabel("adapter parameters (head excluded)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("GLoRA evolutionary search")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def run_search(cfg: RunConfig, info: D.DistInfo, source: str, overwrite: bool = False) -> str:
    out = Path(cfg.output_dir)
    sdir = out / "search"
    s = cfg.search
    _stage_setup(cfg, "search", sdir, source, overwrite, s.seed)
    # read once: the scorer keeps the validation batches on the device for every candidate
    _, val_ds, num_classes = build_splits(_data_config(cfg), "search", *probe_input(cfg), cache=())
    model = load_supernet(cfg, num_classes, info, source)
    settings = EvolutionSettings(population=s.population, top_k=s.top_k, mutation_count=s.mutation_count,
                                 mutation_prob=s.mutation_prob, crossover_count=s.crossover_count,
                                 generations=s.generations, max_params=s.max_params, min_params=s.min_params, seed=s.seed)
    choices = {n: {t: [str(c) for c in cs] for t, cs in per.items()} for n, per in layer_choices(model).items()}
    try:
        search = EvolutionSearch(choices, choice_costs(model), settings)
    except BudgetError as err:
        raise ConfigError(source, [f"search.max_params: {err}"]) from None
    state_path = sdir / "state.pt"
    if not overwrite and s.resume == "auto" and state_path.is_file():
        state = safe_torch_load(state_path, CheckpointError, "search state")
        if state.get("fingerprint") not in (fingerprint(cfg, "search"), fingerprint(cfg, "search", legacy=True)):
            raise ConfigError(source, [f"output_dir: {state_path} is from a search with another configuration; pass --overwrite"])
        search.load_state_dict(state["search"], generations=s.generations)
    if not D.same_on_all_ranks(search.generation, info.device):  # ranks would ask for different candidates
        raise CheckpointError(f"{state_path}: the ranks do not resume the search from the same generation "
                              f"(rank {info.rank} is at {search.generation}); {D.SHARED_FS_HINT}")
    _write_config(sdir, cfg, info)
    if search.generation == 0:  # starting afresh (--overwrite, or no state to resume)
        remove_stale(sdir, ("result.yaml", "pareto.png"), info)  # else retrain.py could train that result
    tracker = Tracker(sdir, enabled=info.is_main)
    warn_slow_precision(cfg.train.precision, "train.precision", info, tracker)
    loader = torch.utils.data.DataLoader(val_ds, batch_size=s.eval_batch_size, num_workers=cfg.data.num_workers)
    scorer = MergedScorer(model, loader, info, cfg.train.precision, compile=s.compile, compile_mode=s.compile_mode)
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
        for part in D.all_gather_object(mine):
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
        "head_params": count_params(model).head,
        "split": "validation",
        "budget": {"max_params": settings.max_params, "min_params": settings.min_params},
        "evaluated": len(search.history),
        "subnet": config,
        "top_k": [{"accuracy": a, "params": p, "subnet": c} for c, a, p in search.top_k],
    }
    if info.is_main:
        atomic_write_text(sdir / "result.yaml", yaml.safe_dump(result, sort_keys=False, default_flow_style=None, width=200))
        _pareto_plot(search.history, {"params": params, "score": acc}, settings, sdir / "pareto.png")
        tracker.print(f"best sub-network: {acc:.2f}% validation accuracy, {params:,} adapter parameters "
                      f"-> {sdir / 'result.yaml'}")
    tracker.close()
    D.barrier()
    return "done"


# --------------------------------------------------------------------------- stage 3
PRESETS = {
    "lora": lambda r: dict(A="none", B=f"lora{r}", C="none", D="none", E="none"),
    "ssf": lambda r: dict(A="vector", B="none", C="none", D="vector", E="vector"),
    "bitfit": lambda r: dict(A="none", B="none", C="none", D="none", E="vector"),
    "prompt": lambda r: dict(A="none", B="none", C="vector", D="none", E="none"),
}


def preset_space(cfg: RunConfig) -> dict:
    """A space whose lists hold one choice each: the preset, through the same GLoRA code path."""
    base = load_space(cfg.space).to_dict()
    choice = PRESETS[cfg.retrain.preset](cfg.retrain.rank)
    return {"targets": base["targets"], "exclude": base["exclude"], "choices": {t: [c] for t, c in choice.items()}}


def prepare_retrain_model(cfg: RunConfig, num_classes: int, info: D.DistInfo, source: str) -> tuple[nn.Module, str]:
    r = cfg.retrain
    if r.preset in ("linear", "full"):
        model = build_model(cfg.model, num_classes)
        from supernet import classifier_names as _classifier_names

        heads = _classifier_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(r.preset == "full" or any(name.startswith(h + ".") for h in heads))
        model.glora_modules_to_save = heads
        return model, r.preset
    if r.preset is not None:
        model = build_model(cfg.model, num_classes)
        apply_glora(model, preset_space(cfg))
        return model, r.preset
    subnet_path = Path(r.subnet) if r.subnet else Path(cfg.output_dir) / "search" / "result.yaml"
    if not subnet_path.is_file():
        hint = f" ({D.SHARED_FS_HINT})" if info.enabled else ""
        raise ConfigError(source, [f"retrain.subnet: {subnet_path} not found; run search.py first, or set retrain.subnet or retrain.preset{hint}"])
    load_subnet(subnet_path)  # a broken file stops here, before the supernet is loaded
    if r.init == "supernet":
        model = load_supernet(cfg, num_classes, info, source, same_training=False, path=r.supernet).train()
    else:
        model = build_model(cfg.model, num_classes)
        apply_glora(model, cfg.space)
    config = set_subnet(model, subnet_path)  # given the path, its errors name the file
    extract_subnet(model, config)
    return model, str(subnet_path)


def adapter_params(model: nn.Module, preset: str | None) -> int:
    if preset == "full":
        heads = getattr(model, "glora_modules_to_save", [])
        return sum(p.numel() for n, p in model.named_parameters() if not any(n.startswith(h + ".") for h in heads))
    if preset == "linear":
        return 0
    return count_params(model).adapter


def run_retrain(cfg: RunConfig, info: D.DistInfo, source: str, overwrite: bool = False) -> str:
    out = Path(cfg.output_dir)
    rdir = out / "retrain"
    r = cfg.retrain
    _stage_setup(cfg, "retrain", rdir, source, overwrite, r.seed)
    spec = probe_input(cfg)
    train_ds, test_ds, num_classes = build_splits(_data_config(cfg), "final", *spec, cache=("train",))
    _, val_ds, _ = build_splits(_data_config(cfg), "search", *spec, cache=())  # one batch, for the merge check
    model, origin = prepare_retrain_model(cfg, num_classes, info, source)
    if r.grad_checkpointing:
        set_grad_checkpointing(model, "retrain.grad_checkpointing")
    model.to(info.device)
    _write_config(rdir, cfg, info)
    tracker = Tracker(rdir, enabled=info.is_main)
    warn_slow_precision(r.precision, "retrain.precision", info, tracker)
    subnet = None
    if any(isinstance(m, GLoraLayer) for m in model.modules()):
        chosen = json.dumps(subnet_to_dict(get_subnet(model)), sort_keys=True)
        subnet = (hashlib.sha256(chosen.encode()).hexdigest()[:16], origin)
    trainer = Trainer(model, train_ds, None, r, rdir, info, tracker, fingerprint=fingerprint(cfg, "retrain"),
                      subnet=subnet, num_workers=cfg.data.num_workers, desc="retrain")
    if trainer.resume("never" if overwrite else r.resume):
        tracker.print(f"resumed from {trainer.ckpt_path} at epoch {trainer.epoch}, step {trainer.step}")
    else:
        remove_stale(rdir, ("merged.safetensors", "metrics.json", "adapter.safetensors", "subnet.yaml"), info)
    n_adapter = adapter_params(model, r.preset)
    n_head = head_params(model)
    tracker.print(f"retrain ({origin}): {n_adapter:,} adapter + {n_head:,} head parameters, "
                  f"{len(train_ds)} train / {len(test_ds)} test images, {trainer.total_steps} steps")
    trainer.install_signal_handlers()
    t0 = time.time()
    status = trainer.fit()
    if status != "done":
        tracker.close()
        return status
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=r.eval_batch_size,
                                              sampler=ShardSampler(len(test_ds), info), num_workers=cfg.data.num_workers)
    topk = (1, 5) if num_classes > 5 else (1,)
    test = evaluate(model, test_loader, info, r.precision, topk=topk)
    if info.is_main:
        export(model, cfg, rdir, val_ds, info, spec)
        merged_total, merged_added = _merged_file_summary(rdir / "merged.safetensors")
        metrics = {
            "test_top1": test["top1"],
            **({"test_top5": test["top5"]} if "top5" in test else {}),
            "test_images": test["n"],
            "adapter_params": n_adapter,
            "head_params": n_head,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "merged_model_params": merged_total,
            "merged_added_biases": merged_added,
            "method": r.preset or "glora",
            "subnet": origin,
            "subnet_from_search": r.preset is None and not r.subnet,  # this output_dir's search/result.yaml
            "epochs": r.epochs,
            "wall_time_s": round(time.time() - t0, 1),
        }
        atomic_write_text(rdir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        tracker.log(trainer.step, {"top1": test["top1"], **({"top5": test["top5"]} if "top5" in test else {})}, kind="test")
        tracker.print(f"test accuracy {test['top1']:.2f}% -> {rdir / 'metrics.json'}")
    tracker.close()
    D.barrier()
    return "done"


def _merged_file_summary(path: Path) -> tuple[int, list[str]]:
    """The merged model's parameter count, and the layers the merge gave a bias they lacked (see
    export), from the file's header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        total = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
        return total, json.loads((fh.metadata() or {}).get("added_biases", "[]"))


# Relative to the largest unmerged logit: fp32 round-off grows with the logits' scale (measured: a
# 4-block ViT with logits up to 12 differs from its own float64 evaluation by 2.6e-4), while a wrong
# merge is off by O(1) of that scale.
MERGE_TOLERANCE = 1e-4


def _within_roundoff(model: nn.Module, x: torch.Tensor, want: torch.Tensor, got: torch.Tensor, tol: float) -> bool:
    """Large adapters can make fp32 round-off itself exceed the tolerance; then ask the exact
    question: is the merged model as close to the float64 evaluation of the unmerged one as the fp32
    unmerged evaluation is (within 2x)? A wrong merge is off by far more than round-off."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
    err_unmerged = (want.double() - exact).abs().max().item()
    err_merged = (got.double() - exact).abs().max().item()
    return err_merged <= max(2 * err_unmerged, tol)


def export(model: nn.Module, cfg: RunConfig, rdir: Path, val_ds, info: D.DistInfo,
           spec: tuple[int, tuple[float, ...], tuple[float, ...]]) -> None:
    """adapter.safetensors + subnet.yaml, then merged.safetensors once merged == unmerged is verified."""
    model.eval()
    has_glora = any(isinstance(m, GLoraLayer) for m in model.modules())
    if has_glora:
        save_adapter(model, rdir / "adapter.safetensors", rdir / "subnet.yaml",
                     metadata={"model": cfg.model.name, "kwargs": cfg.model.kwargs})
    x = next(iter(torch.utils.data.DataLoader(val_ds, batch_size=min(32, len(val_ds)))))[0].to(info.device)
    gained = added_biases(model) if has_glora else []
    with torch.no_grad():
        want = model(x).float()
        merged = merge_glora(copy.deepcopy(model)) if has_glora else model
        got = merged(x).float()
    diff = (got - want).abs().max().item()
    tol = MERGE_TOLERANCE * max(1.0, want.abs().max().item())
    if not (diff <= tol or (math.isfinite(diff) and _within_roundoff(model, x, want, got, tol))):
        raise MergeError(f"merged and unmerged outputs differ by {diff:.3g} (> {tol:.3g} = {MERGE_TOLERANCE} x the largest "
                         f"logit, at least 1, and more than fp32 round-off) on a validation batch; "
                         f"{rdir / 'merged.safetensors'} was not written")
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    atomic_write(rdir / "merged.safetensors",
                 lambda tmp: save_file(state, tmp, metadata={"model": cfg.model.name, "kwargs": json.dumps(cfg.model.kwargs),
                                                             "input": json.dumps(dict(zip(("size", "mean", "std"), spec))),
                                                             "merge_max_abs_diff": f"{diff:.3g}",
                                                             "added_biases": json.dumps(gained)}))
    if gained and info.is_main:
        print(f"note: {len(gained)} layer(s) without a bias gained one in the merge (C or E chosen on them: "
              f"{', '.join(gained[:3])}{' ...' if len(gained) > 3 else ''}); {rdir / 'merged.safetensors'} loads into a "
              f"fresh model with supernet.load_merged(model, path), which adds them (evaluate.py does)", file=sys.stderr, flush=True)

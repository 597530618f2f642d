"""Run configuration: one YAML file for all three stages, validated before anything runs.

    output_dir: runs/demo
    model:   {name, pretrained, checkpoint, kwargs}
    data:    {kind, root, task, ...}
    space:   configs/space/large.yaml      # or the space inline
    train:   {epochs, batch_size, lr, ...}  # stage 1
    search:  {population, max_params, ...}  # stage 2
    retrain: {preset | subnet, init, epochs, lr, ...}  # stage 3

``--set key.path=value`` overrides are parsed as YAML and then typed like the field they
replace. Validation collects every problem (unknown keys with the closest valid name, wrong
types, out-of-range values: engine/schema.py; then the checks across keys and files here) and
raises one :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

import methods
from methods.noah import NoahSpace
from methods.supernets import GloraSupernet, NoahSupernet, parse_space, supernet_for
from supernet import SearchSpace, SpaceError

from .compiling import COMPILE_MODES
from .mnist import MNIST_IMAGES
from .pretrained import WEIGHT_SUFFIXES, PretrainedError, resolve_checkpoint
from .loraconfig import LoraOptions, lora_checks
from .schema import at_most, build, check, non_negative, parse_overrides, positive, probability, set_path

CompileMode = Literal[COMPILE_MODES]  # type: ignore[valid-type]  # the tuple's strings, as Literal's arguments
Preset = Literal[methods.PRESETS]  # type: ignore[valid-type]  # every registered method but GLoRA


class ConfigError(ValueError):
    """A run configuration is invalid; ``problems`` lists every one of them."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"
    pretrained: bool = False  # timm's own loading (hub tags such as vit_base_patch16_224.augreg_in21k)
    checkpoint: str | None = None  # local .npz (original ViT format), .safetensors, .pth/.pt state dict, or package:NAME
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (img_size, depth, ...)
    drop_path_rate: float = field(default=0.1, metadata=check(probability))
    # The task's new classifier: timm's own initialisation, or zero (as BiT does): the first steps then
    # train the head alone, since no gradient reaches the adapters through a zero head. On a frozen CNN
    # a random head's large initial logits drive the adapters of wide layers off at once (the demo).
    head_init: Literal["timm", "zero"] = "timm"


@dataclass
class DataConfig:
    """The data settings, the one schema the config file and engine.data.build_splits share."""

    kind: Literal["demo", "mnist", "vtab1k", "fewshot", "imagefolder"] = "demo"
    root: str | None = None  # dataset root (vtab1k, fewshot, imagefolder)
    task: str | None = None  # vtab1k task folder name
    dataset: str | None = None  # fewshot dataset folder name
    shots: int = field(default=16, metadata=check(positive))  # fewshot
    # the few-shot list seed; also the demo's generation seed and MNIST-5k's split seed (numpy's
    # generators take no negative seed)
    seed: int = field(default=0, metadata=check(non_negative))
    # null: inferred from the labels of all splits (max label + 1); if given, labels are checked against it
    num_classes: int | None = field(default=None, metadata=check(positive))
    num_workers: int = field(default=0, metadata=check(lambda v: non_negative(v) or (
        "must be at most 256 (one decoding process each)" if v > 256 else None)))
    # The square size images are resized to; null: the model's own (a ViT's img_size, else timm's
    # pretrained_cfg). A CNN takes any size; a ViT only its own (or with dynamic_img_size).
    img_size: int | None = field(default=None, metadata=check(positive))
    # imagenet: ImageNet mean/std, the VTAB-1k protocol of the GLoRA/NOAH papers, whatever the
    # backbone; model: the mean/std the backbone was pre-trained with (timm's pretrained_cfg).
    normalize: Literal["imagenet", "model"] = "imagenet"
    # Keep the splits a stage reads many times decoded in memory (uint8, after the resize): auto does
    # so for a split of at most 4 GiB. Same tensors either way; it only saves decoding every epoch.
    cache: Literal["auto", "always", "never"] = "auto"
    # The embedded tasks: demo (generated, 2-4 classes) and mnist (MNIST-5k, 10 classes); split sizes
    demo_classes: int = field(default=4, metadata=check(positive))
    demo_train: int = field(default=800, metadata=check(positive))
    demo_val: int = field(default=200, metadata=check(positive))
    demo_test: int = field(default=400, metadata=check(positive))


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are the paper's ViT-B/16 VTAB-1k recipe (docs/method.md §3)."""

    epochs: int = field(default=500, metadata=check(positive))
    batch_size: int = field(default=64, metadata=check(positive))
    eval_batch_size: int = field(default=128, metadata=check(positive))
    # The largest part of a batch run forward and backward at once (gradients accumulate over the
    # parts before the one optimizer step): saves activation memory, changes nothing else. None: all.
    micro_batch_size: int | None = field(default=None, metadata=check(positive))
    grad_checkpointing: bool = False  # timm's activation checkpointing: recompute blocks in backward
    lr: float = field(default=1e-4, metadata=check(positive))
    weight_decay: float = field(default=1e-4, metadata=check(non_negative))
    warmup_epochs: float = field(default=10, metadata=check(non_negative))
    warmup_lr: float = field(default=1e-7, metadata=check(non_negative))
    min_lr: float = field(default=1e-5, metadata=check(non_negative))
    grad_clip: float | None = field(default=None, metadata=check(positive))
    label_smoothing: float = field(default=0.0, metadata=check(probability))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    eval_every: int = field(default=10, metadata=check(positive))  # epochs
    reference_subnets: int = field(default=2, metadata=check(lambda v: non_negative(v) or (
        "must be at most 1,000 (each is scored at every evaluation)" if v > 1000 else None)))  # random ones, besides largest and smallest
    checkpoint_every: int = field(default=0, metadata=check(non_negative))  # steps; 0 = end of each epoch only
    log_every: int = field(default=10, metadata=check(positive))  # steps
    resume: str = "auto"  # auto | never | a checkpoint path
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the training step (retrain only: the supernet changes sub-network every step)
    compile_mode: CompileMode = "default"  # with compile: true; reduce-overhead replays CUDA graphs on a GPU
    # The LoRA family on the low-rank GLoRA tensors (and the lora preset in retrain): scale, start, DoRA, LoRA+, LoRA-Pro;
    # retrain's applies to the retrained model whatever its supernet was trained with (docs/lora-family.md)
    lora: LoraOptions = field(default_factory=LoraOptions)

    # Testing aids that left the schema for environment variables (engine/trainer.py). A null value,
    # as every config.yaml written before holds, still loads; any other is refused with this line.
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        key: f"a testing aid that moved to the {env} environment variable"
        for key, env in (("fail_at_step", "GLORA_TEST_FAIL_AT_STEP"), ("stop_at_step", "GLORA_TEST_STOP_AT_STEP"))}


@dataclass
class SearchConfig:
    population: int = field(default=50, metadata=check(at_most(1_000_000, "each candidate is one pass over the validation split")))
    top_k: int = field(default=10, metadata=check(positive))
    mutation_count: int = field(default=25, metadata=check(non_negative))
    mutation_prob: float = field(default=0.2, metadata=check(probability))
    crossover_count: int = field(default=25, metadata=check(non_negative))
    generations: int = field(default=20, metadata=check(positive))
    max_params: int | None = field(default=None, metadata=check(positive))  # adapter parameters, head excluded
    min_params: int | None = field(default=None, metadata=check(non_negative))
    seed: int = 0
    eval_batch_size: int = field(default=128, metadata=check(positive))
    # The autocast candidates are scored under (a search started before this key existed used train.precision)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"  # auto | cpu | cuda (a search started before this key existed used train.device)
    resume: str = "auto"  # auto | never
    compile: bool = False  # torch.compile the merged model that scores the candidates
    compile_mode: CompileMode = "default"  # with compile: true


@dataclass
class RetrainConfig(TrainConfig):
    subnet: str | None = None  # a sub-network YAML; default: <output_dir>/search/result.yaml
    supernet: str | None = None  # with init: supernet, its file; default: <output_dir>/supernet.safetensors
    # A registered method (docs/methods.md) to train instead of the searched GLoRA sub-network
    preset: Preset | None = None
    # The preset's size: the LoRA rank, an adapter's bottleneck width, a prompt's length, FacT's rank
    rank: int = field(default=8, metadata=check(positive))
    method_args: dict = field(default_factory=dict)  # the preset's other settings, by name (docs/methods.md)
    # supernet: retrain from the supernet's slices; scratch: afresh; inherit: no training, the sub-network
    # with the supernet's own weights (its head and batch-norm statistics too) tested and exported
    init: Literal["supernet", "scratch", "inherit"] = "supernet"


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    space: Any = "configs/space/large.yaml"  # a path or the space inline
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    def __post_init__(self) -> None:
        # Not a field: to_dict (config.yaml, fingerprints) and the reference keep `space` as given.
        self._parsed_space: tuple[Any, SearchSpace] | None = None  # (the `space` it was parsed from, the space)

    @property
    def search_space(self) -> SearchSpace | NoahSpace:
        """``space`` validated: a :class:`supernet.SearchSpace` (GLoRA's) or a NOAH space
        (``method: noah``), parsed once, by the checks that load_config and config_from_dict run,
        and again only where ``space`` was changed since."""
        if self._parsed_space is None or self._parsed_space[0] != self.space:
            self._parsed_space = (copy.deepcopy(self.space), parse_space(self.space))
        return self._parsed_space[1]

    @property
    def supernet(self) -> GloraSupernet | NoahSupernet:
        """What train.py, search.py and retrain.py ask of the space's supernet (methods/supernets.py)."""
        return supernet_for(self.search_space)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# The spaces this repository ships (configs/space/*.yaml), for configs run from another directory.
SHIPPED_SPACES = Path(__file__).resolve().parents[1] / "configs" / "space"


def resolve_space(space: str, config_dir: Path) -> str | None:
    """The file a ``space:`` string names, or None: the path as given (relative to the working
    directory, as every other path in a run config), else next to the config file, else one of the
    shipped spaces, by its path in this repository (``configs/space/large.yaml``) or by name
    (``large``). The string is kept as given whenever it works as given, so a run's configuration,
    and the fingerprint its checkpoints carry, does not change with where the file was found."""
    for path in (Path(space), config_dir / space, SHIPPED_SPACES.parents[1] / space, SHIPPED_SPACES / f"{space}.yaml"):
        if path.is_file():
            return space if path == Path(space) else str(path)
    return None


DEMO_MAX_IMAGES = 1_000_000  # per split: 3 GiB of generated pixels


def _semantic_checks(cfg: RunConfig, base_dir: Path, problems: list[str]) -> None:
    def exists(p: str | None, key: str, kind: str = "file") -> None:
        if p is None:
            return
        path = Path(p)
        ok = path.is_file() if kind == "file" else path.is_dir()
        if not ok:
            problems.append(f"{key}: {kind} not found: {p}")

    if not cfg.output_dir.strip():  # '' would write the run into the working directory
        problems.append("output_dir: must name a folder, got an empty string")
    if cfg.model.checkpoint:
        try:
            weights = resolve_checkpoint(cfg.model.checkpoint)
        except PretrainedError as err:
            problems.append(f"model.checkpoint: {err}")
        else:
            exists(str(weights), "model.checkpoint")
            if weights.suffix not in WEIGHT_SUFFIXES:
                problems.append(f"model.checkpoint: expected a .npz, .safetensors, .pth or .pt file, or package:NAME, "
                                f"got {cfg.model.checkpoint}")
    try:
        import timm

        if not timm.is_model(cfg.model.name.split(".")[0]):
            close = difflib.get_close_matches(cfg.model.name, timm.list_models(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"model.name: {cfg.model.name!r} is not a timm model{hint}")
    except ImportError:  # pragma: no cover
        pass
    for key, value in cfg.model.kwargs.items():
        # timm drops None-valued arguments without a word, so `--set model.kwargs={img_size:32}` (YAML
        # reads "img_size:32" as a key with no value) would build the default model silently.
        if not (isinstance(key, str) and key.isidentifier()):
            hint = " (in YAML flow style put a space after the colon: {img_size: 32})" if ":" in str(key) else ""
            problems.append(f"model.kwargs: {key!r} is not an argument name{hint}")
        elif value is None:
            problems.append(f"model.kwargs.{key}: no value (timm would ignore it); give one or remove the key")
    d = cfg.data
    if d.kind not in ("demo", "mnist"):
        if not d.root:
            problems.append(f"data.root: required for data.kind {d.kind}")
        else:
            exists(d.root, "data.root", "directory")
    sizes = {"demo_train": d.demo_train, "demo_val": d.demo_val, "demo_test": d.demo_test}
    if d.kind == "mnist" and sum(sizes.values()) > MNIST_IMAGES:
        largest = max(sizes, key=sizes.get)  # the one to lower, most likely
        problems.append(f"data.{largest}: train + val + test = {' + '.join(f'{v:,}' for v in sizes.values())} images, "
                        f"but MNIST-5k has {MNIST_IMAGES:,}")
    if d.kind == "vtab1k" and not d.task:
        problems.append("data.task: required for data.kind vtab1k")
    if d.kind == "fewshot" and not d.dataset:
        problems.append("data.dataset: required for data.kind fewshot")
    found = resolve_space(cfg.space, base_dir) if isinstance(cfg.space, str) else cfg.space  # inline: as it is
    if isinstance(cfg.space, str) and found is None:
        shipped = ", ".join(p.stem for p in sorted(SHIPPED_SPACES.glob("*.yaml")))
        problems.append(f"space: file not found: {cfg.space} (looked in the working directory, next to the config in "
                        f"{base_dir}, and among the shipped spaces{': ' + shipped if shipped else ''})")
    else:
        cfg.space = found
        try:
            cfg.search_space  # parsed and validated here, once: the stages use this object
        except (SpaceError, methods.MethodError) as err:
            problems.append(f"space: {err}")
    s = cfg.search
    if s.compile and not problems and isinstance(cfg.search_space, NoahSpace):
        problems.append("search.compile: a NOAH supernet is scored unmerged, its shapes changing with every candidate "
                        "(torch.compile would recompile for each); leave it false")
    if s.top_k > s.population:
        problems.append(f"search.top_k: must be <= search.population ({s.population}), got {s.top_k}")
    if s.max_params is not None and s.min_params is not None and s.min_params > s.max_params:
        problems.append(f"search.min_params: must be <= search.max_params ({s.max_params}), got {s.min_params}")
    for section in ("train", "retrain"):
        t = getattr(cfg, section)
        if t.resume not in ("auto", "never") and not Path(t.resume).is_file():
            problems.append(f"{section}.resume: expected auto, never or an existing checkpoint file, got {t.resume!r}")
    for section in ("train", "search", "retrain"):
        t = getattr(cfg, section)
        if t.device not in ("auto", "cpu", "cuda"):
            problems.append(f"{section}.device: expected one of auto, cpu, cuda, got {t.device!r}")
    lora_checks(cfg, problems)
    if cfg.train.compile:
        problems.append("train.compile: not supported for the supernet, whose sub-network changes every step "
                        "(torch.compile would recompile for each one); use retrain.compile")
    if s.resume not in ("auto", "never"):
        problems.append(f"search.resume: expected auto or never, got {s.resume!r}")
    if cfg.retrain.init == "inherit" and cfg.retrain.preset is not None:
        problems.append(f"retrain.init: inherit takes the searched sub-network's weights from the supernet; preset "
                        f"{cfg.retrain.preset} has none (use retrain.init: scratch)")
    if cfg.retrain.subnet is not None and cfg.retrain.preset is not None:
        problems.append("retrain.subnet: give either retrain.subnet or retrain.preset, not both")
    if cfg.retrain.preset is None and cfg.retrain.method_args:
        problems.append("retrain.method_args: settings of a retrain.preset, but none is set")
    elif cfg.retrain.preset is not None:
        method_settings(cfg.retrain, problems)
    exists(cfg.retrain.subnet, "retrain.subnet")
    exists(cfg.retrain.supernet, "retrain.supernet")
    if d.kind == "demo" and d.num_classes is not None and d.demo_classes > d.num_classes:
        problems.append(f"data.num_classes: must be >= data.demo_classes ({d.demo_classes}), got {d.num_classes}")
    for split in ("train", "val", "test"):  # generated in memory, 3 KiB an image (and a float copy per batch)
        n = getattr(d, f"demo_{split}")
        if d.kind == "demo" and n > DEMO_MAX_IMAGES:
            problems.append(f"data.demo_{split}: at most {DEMO_MAX_IMAGES:,} generated images, got {n:,}")
    # Building the model is the only full check of model.*: timm validates its arguments by failing.
    # Done unless the keys it depends on failed already (reported once, not again as a build failure).
    if not any(p.startswith(("model.", "space", "data.num_classes", "data.demo_classes")) for p in problems):
        from .preflight import check_model

        costs = check_model(cfg, problems)
        if costs is not None:
            _check_budget(cfg, *costs, problems)


def method_settings(r: RetrainConfig, problems: list[str] | None = None) -> tuple[methods.Method, Any]:
    """``retrain.preset``'s method and its settings (``retrain.rank`` fills its size, ``retrain.method_args``
    the rest). Problems are appended to ``problems``, or raised as one :class:`ConfigError`."""
    collect = [] if problems is None else problems
    method = methods.get(r.preset)
    valid = method.arg_names()
    args = {}
    for key, value in r.method_args.items():
        if key == method.size:
            collect.append(f"retrain.method_args.{key}: {method.name}'s size; set it with retrain.rank")
        elif key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = (f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}" if valid
                    else f"{method.name} takes none" + (" (its size is retrain.rank)" if method.size else ""))
            collect.append(f"retrain.method_args.{key}: unknown key; {hint}")
        else:
            args[key] = value
    if method.size is not None:
        args[method.size] = r.rank
    settings = None
    try:
        settings = build(method.config, args, "retrain.method_args", collect)
    except methods.MethodError as err:
        key, _, msg = str(err).partition(": ")
        collect.append(f"retrain.rank: {msg}" if key == method.size else f"retrain.method_args.{key}: {msg}")
    if problems is None and collect:
        raise ConfigError("retrain", collect)
    return method, settings


def _check_budget(cfg: "RunConfig", low: int, high: int, problems: list[str]) -> None:
    """Reject a budget no configuration can meet (``low``..``high``: the space's adapter parameter counts)."""
    s = cfg.search
    if s.max_params is not None and s.max_params < low:
        problems.append(f"search.max_params: {s.max_params:,} is below the smallest configuration of this space "
                        f"({low:,} adapter parameters)")
    if s.min_params is not None and s.min_params > high:
        problems.append(f"search.min_params: {s.min_params:,} is above the largest configuration of this space "
                        f"({high:,} adapter parameters)")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raises :class:`ConfigError` listing every problem."""
    source = str(path) if path is not None else "<defaults>"
    problems: list[str] = []
    data: Any = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(source, ["is a directory, expected a YAML config file"])
        if not p.is_file():
            raise ConfigError(source, ["config file not found"])
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            mark, ctx = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            opened = f" ({err.context} at line {ctx.line + 1})" if ctx is not None and getattr(err, "context", None) else ""
            raise ConfigError(source, [f"not valid YAML{where}: {getattr(err, 'problem', None) or 'syntax error'}{opened}"]) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(source, [f"cannot read ({type(err).__name__})"]) from None
        if data is None:
            raise ConfigError(source, ["empty file, expected a mapping with output_dir, model, data, space, train, search, retrain"])
        if not isinstance(data, dict):
            raise ConfigError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    for key, value in parse_overrides(overrides, problems):
        set_path(data, key, value, problems)
    return _validated(data, Path(path).parent if path else Path("."), source, problems)


def config_from_dict(data: dict, source: str = "<dict>") -> RunConfig:
    """A run config from its content (paths relative to the working directory), validated as load_config does."""
    return _validated(data, Path("."), source, [])


def _validated(data: Any, base_dir: Path, source: str, problems: list[str]) -> RunConfig:
    cfg = build(RunConfig, data, "", problems)
    if not problems:
        _semantic_checks(cfg, base_dir, problems)  # parses the space, once (RunConfig.search_space)
    if problems:
        raise ConfigError(source, problems)
    return cfg

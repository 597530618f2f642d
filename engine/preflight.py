"""The model a run config describes, built on the meta device while the config is validated.

timm checks its arguments only by failing (a TypeError for an unknown key, a ValueError for a
negative size, an assertion for heads that do not divide the width, a shape error at the first
forward for others), so the only honest check of ``model.*`` is to build the model: on the meta
device that costs shapes only (about 0.15 s for a ViT-B/16 with one forward pass). Every stage
then builds from the same arguments (:func:`model_kwargs`), so a config that validates builds.
Whatever fails is one problem line naming the key that caused it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # engine.config imports this module lazily; the types only, to avoid a cycle
    from supernet import SearchSpace

    from .config import ModelConfig, RunConfig

# A meta build of any real backbone takes well under a second and a few MB; only an absurd size
# (depth: 10**8) takes more, and then without end: timm unbinds a tensor of `depth` drop-path rates
# into that many tensor objects in one C++ call, 20 GiB that no alarm interrupts. So the build runs
# under both a time and an address-space limit. Module-level so tests can shorten them.
BUILD_SECONDS = 30.0
BUILD_BYTES = 2 << 30


class _TooSlow(BaseException):
    """Raised inside timm by the alarm; a BaseException so that no ``except Exception`` in timm eats it."""


@contextmanager
def _time_limit(seconds: float):
    # SIGALRM exists on POSIX and fires in the main thread only; elsewhere the build is unlimited.
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _memory_limit(extra: int):
    """Lower the soft address-space limit to what the process maps now plus ``extra`` (Linux), so that
    a runaway allocation raises MemoryError/RuntimeError instead of waking the OOM killer."""
    try:
        import resource

        with open("/proc/self/statm") as fh:
            mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = mapped + extra
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft != resource.RLIM_INFINITY and soft <= limit:
            soft = None  # already as tight: leave it
        else:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):  # not Linux, or not allowed: unlimited
        soft = None
    try:
        yield
    finally:
        if soft is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def _guarded():
    with _time_limit(BUILD_SECONDS), _memory_limit(BUILD_BYTES):
        yield


def model_kwargs(cfg: "ModelConfig") -> dict:
    """The keyword arguments every stage gives ``timm.create_model`` besides the name and classes."""
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("drop_path_rate", cfg.drop_path_rate)
    return kwargs


def meta_model(cfg: "ModelConfig", num_classes: int):
    """The backbone with the stages' arguments, on the meta device (no memory, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **model_kwargs(cfg))


def input_spec(model, normalize: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """The square input size images are resized to, and the mean/std they are normalised with."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from .models import input_size

    pretrained = getattr(model, "pretrained_cfg", None) or {}
    if normalize == "model":
        mean, std = pretrained.get("mean", IMAGENET_DEFAULT_MEAN), pretrained.get("std", IMAGENET_DEFAULT_STD)
    else:
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return input_size(model), tuple(mean), tuple(std)


def _build_and_probe(cfg: "ModelConfig", num_classes: int, size: int | None = None):
    """The meta model after one image of ``size`` (default: the model's own input size) went through
    it: some arguments (num_heads: -4) pass the constructor and fail only there."""
    import torch

    from .models import input_size

    model = meta_model(cfg, num_classes).eval()
    size = size or input_size(model)
    with torch.no_grad():  # not under torch.device("meta"): its mode intercepts every op, 3x slower
        out = model(torch.empty(1, 3, size, size, device="meta"))
    if tuple(out.shape) != (1, num_classes):  # the loss needs one score per class
        raise ValueError(f"one {size}x{size} image gives an output of shape {tuple(out.shape)}, expected (1, {num_classes})")
    return model


def _reason(err: BaseException) -> str:
    if isinstance(err, MemoryError) or "bad_alloc" in str(err) or "can't allocate memory" in str(err):
        return f"building its shapes alone took over {BUILD_BYTES / 2**30:g} GiB of memory"
    text = " ".join(str(err).split("Exception raised from")[0].split()) or "no message"  # not torch's C++ frames
    return f"{type(err).__name__}: {text[:240]}"


def _builds(cfg: "ModelConfig", num_classes: int) -> bool:
    try:
        with _guarded():
            _build_and_probe(cfg, num_classes)
        return True
    except (Exception, _TooSlow):
        return False


def _blame(cfg: "ModelConfig", num_classes: int, err: BaseException) -> str:
    """One problem line naming the key whose value made the build fail: the kwargs whose removal
    alone lets it build, else the name (or drop_path_rate) if it fails without any kwargs."""
    name, reason = cfg.name, _reason(err)
    if isinstance(err, _TooSlow):  # retrying would time out again: name the largest size given
        sizes = {k: v for k, v in cfg.kwargs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if sizes:
            key = max(sizes, key=lambda k: abs(sizes[k]))
            return (f"model.kwargs.{key}: building {name} (shapes only) did not finish within {BUILD_SECONDS:g} s; "
                    f"{key}: {sizes[key]!r} is likely too large")
        return f"model.name: building {name!r} (shapes only) did not finish within {BUILD_SECONDS:g} s"
    bare = dataclasses.replace(cfg, kwargs={})
    if not _builds(bare, num_classes):
        if _builds(dataclasses.replace(bare, drop_path_rate=0.0), num_classes):
            return f"model.drop_path_rate: {name} rejects {cfg.drop_path_rate!r} ({reason})"
        return f"model.name: {name!r} cannot be built ({reason})"
    kwargs = cfg.kwargs
    culprits = [k for k in kwargs
                if _builds(dataclasses.replace(cfg, kwargs={o: v for o, v in kwargs.items() if o != k}), num_classes)]
    if len(culprits) == 1:
        k = culprits[0]
        return f"model.kwargs.{k}: {name} rejects {k}: {kwargs[k]!r} ({reason})"
    given = ", ".join(f"{k}: {kwargs[k]!r}" for k in (culprits or kwargs))
    return f"model.kwargs: {name} cannot be built with {given} ({reason})"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _too_big(model, key: str, what: str) -> str | None:
    """The stages build the model in host memory first: more float32 weights than the machine has
    memory would end in the allocator's error or the kernel's OOM killer, hours into nothing."""
    ram, n = _memory_bytes(), _params(model)
    if ram is None or 4 * n <= ram:
        return None
    return (f"{key}: {what} has {n:,} parameters ({4 * n / 2**30:,.1f} GiB in float32), more than this "
            f"machine's {ram / 2**30:,.1f} GiB of memory")


def _checkpoint_problem(model, path: str) -> str | None:
    """A .safetensors checkpoint's names and shapes against the model's (header only, no tensors read);
    the other formats are read whole when the stage loads them and are checked there."""
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    import torch
    from safetensors import safe_open

    from supernet import state_dict_mismatch

    from .models import _head_prefixes

    try:
        with safe_open(path, "pt") as f:
            state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a broken header
        return f"model.checkpoint: {path}: not a readable .safetensors file ({_reason(err)})"
    heads = _head_prefixes(model)
    own = {k: v for k, v in model.state_dict().items() if not any(k.startswith(p) for p in heads)}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in heads)}
    problems = state_dict_mismatch(own, state)
    return f"model.checkpoint: {path}: does not fit {type(model).__name__}: {problems}" if problems else None


class _Unkeyed:
    """An argument :func:`_check`'s cache passes through without keying on it (the key holds its content)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Unkeyed)


@functools.lru_cache(maxsize=32)
def _check(key: str, parsed: _Unkeyed) -> tuple[tuple[str, ...], int | None, int | None]:
    """(problems, smallest and largest adapter parameter counts of the space) for one JSON-encoded
    set of inputs: a sweep validates the same model for every combination, the tests hundreds of times.
    ``parsed``: the space the key describes, as the run config parsed it."""
    from methods import MethodError
    from methods.supernets import supernet_for
    from supernet import SpaceError

    from .config import ModelConfig

    k = json.loads(key)
    cfg, num_classes = ModelConfig(**k["model"]), k["num_classes"]
    try:
        with _guarded():
            model = _build_and_probe(cfg, num_classes)
    except (Exception, _TooSlow) as err:
        return (_blame(cfg, num_classes, err),), None, None
    problems = []
    if k["img_size"]:  # the model builds; does it take the size the data is resized to?
        try:
            with _guarded():
                _build_and_probe(cfg, num_classes, k["img_size"])
        except (Exception, _TooSlow) as err:
            return (f"data.img_size: {cfg.name} does not take {k['img_size']}x{k['img_size']} images ({_reason(err)}); "
                    "leave it null for the model's own size",), None, None
    pc = model.pretrained_cfg if isinstance(getattr(model, "pretrained_cfg", None), dict) else {}
    if cfg.pretrained and not any(pc.get(s) for s in ("hf_hub_id", "url", "file", "state_dict")):
        problems.append(f"model.pretrained: timm has no pretrained weights for {cfg.name}; set it to false "
                        "(and model.checkpoint to a local file)")
    if cfg.checkpoint:
        from .pretrained import PretrainedError, resolve_checkpoint

        try:  # package:NAME is resolved (and its problems reported) by the config check
            problems.append(_checkpoint_problem(model, str(resolve_checkpoint(cfg.checkpoint))))
        except PretrainedError:
            pass
    key_for_size = ("data.num_classes" if k["num_classes_given"] and _params(model.get_classifier()) * 2 > _params(model)
                    else "model.kwargs" if cfg.kwargs else "model.name")
    too_big = _too_big(model, key_for_size, f"{cfg.name} with {num_classes} classes")
    if too_big:  # the adapters would only add to it
        return tuple(p for p in (*problems, too_big) if p), None, None
    sn = supernet_for(parsed.value)
    try:
        sn.apply(model)
    except (Exception, _TooSlow) as err:  # SpaceError names the space file and the pattern already
        text = str(err) if isinstance(err, (SpaceError, MethodError)) else f"cannot be applied to {cfg.name} ({_reason(err)})"
        culprit = _space_culprit(cfg, num_classes, parsed.value)
        problems.append(f"model.kwargs.{culprit}: with {culprit}: {cfg.kwargs[culprit]!r} the space does not fit the model: {text}"
                        if culprit else f"space: {text}")
        return tuple(p for p in problems if p), None, None
    problems.append(_too_big(model, "space", "the supernet (backbone and its largest adapters)"))
    if k["subnet"]:
        try:
            # init: supernet takes its layers (and the choices they allow) from the supernet file,
            # which the stage compares with this space; there the file's own syntax is checked only.
            sn.activate(model, k["subnet"][0]) if k["scratch"] else sn.check_file(k["subnet"][0])
        except Exception as err:
            problems.append(f"retrain.subnet: {err}" if isinstance(err, (SpaceError, MethodError)) else f"retrain.subnet: {_reason(err)}")
    if k["preset"]:
        problems.append(_check_preset(cfg, num_classes, k["preset"], parsed.value))
    costs = sn.costs(model)
    low = sum(min(per.values()) for layer in costs.values() for per in layer.values())
    high = sum(max(per.values()) for layer in costs.values() for per in layer.values())
    return tuple(p for p in problems if p), low, high


def _space_culprit(cfg: "ModelConfig", num_classes: int, space: "SearchSpace") -> str | None:
    """The one model.kwargs key without which the space applies (depth: 0 leaves no layer to adapt)."""
    from methods.supernets import supernet_for

    for key in cfg.kwargs:
        try:
            with _guarded():
                model = meta_model(dataclasses.replace(cfg, kwargs={k: v for k, v in cfg.kwargs.items() if k != key}), num_classes)
                supernet_for(space).apply(model)
            return key
        except (Exception, _TooSlow):
            continue
    return None


def _check_preset(cfg: "ModelConfig", num_classes: int, preset: dict, space: "SearchSpace") -> str | None:
    """retrain.preset's method (at retrain.rank, with retrain.method_args) applied to a fresh model."""
    from .config import RetrainConfig, method_settings

    method, settings = method_settings(RetrainConfig(**preset))
    key = "retrain.method_args" if preset["method_args"] and method.size is None else "retrain.rank"
    try:
        with _guarded():
            model = meta_model(cfg, num_classes)
            method.apply(model, settings, space)
    except (Exception, _TooSlow) as err:
        return f"{key}: {method.name} cannot be applied to {cfg.name} ({_reason(err)})"
    return _too_big(model, key, f"the model with {method.name}'s parameters")


def check_model(cfg: "RunConfig", problems: list[str]) -> tuple[int, int] | None:
    """Append the problems of building ``cfg``'s model, applying its space (and retrain's sub-network
    or preset) on the meta device; returns the space's smallest and largest adapter parameter counts
    (for the budget check), or None where the build failed."""
    d = cfg.data
    # demo_classes outside 2..4 is the demo data's to refuse (one line, when the stage builds it)
    num_classes = d.num_classes or (min(max(d.demo_classes, 2), 4) if d.kind == "demo" else 10 if d.kind == "mnist" else 2)
    retrain_ok = not any(p.startswith("retrain.") for p in problems)  # else reported already
    subnet = cfg.retrain.subnet if retrain_ok else None
    preset = None
    if retrain_ok and cfg.retrain.preset is not None:
        preset = {"preset": cfg.retrain.preset, "rank": cfg.retrain.rank, "method_args": cfg.retrain.method_args}
    key = json.dumps({
        "model": dataclasses.asdict(cfg.model), "num_classes": num_classes, "num_classes_given": d.num_classes is not None,
        "img_size": d.img_size,
        "space": [cfg.space, cfg.search_space.to_dict()], "preset": preset, "seconds": BUILD_SECONDS,
        "scratch": cfg.retrain.init == "scratch",
        # a sub-network file is part of the key with its modification time: edited, it is checked again
        "subnet": [subnet, os.stat(subnet).st_mtime_ns] if subnet and os.path.isfile(subnet) else None,
    }, sort_keys=True, default=str)
    found, low, high = _check(key, _Unkeyed(cfg.search_space))
    problems.extend(found)
    return None if low is None else (low, high)

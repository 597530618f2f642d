"""A generated corpus of broken run configs: every leaf of every shipped config, mutated in each of
the ways a user gets a value wrong, fed to every entry point (train.py, search.py, retrain.py,
evaluate.py, python -m engine.sweep) in-process.

Each mutation either validates (then the model it describes must really build and run one batch,
checked on the CPU for the demo config, whose backbone is small), or makes every entry point exit
with status 2 and one line that names the mutated key, without a traceback and without creating
output_dir or anything in the working directory."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from engine import evaluate as evaluate_cli
from engine import sweep
from engine.cli import main as stage_main
from engine.config import ConfigError, load_config

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
UNKNOWN = "zz_unknown_key"


def _wrong_type(value):
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, (int, float)):
        return "not-a-number"
    return 12345


MUTATIONS = {
    "wrong_type": _wrong_type,
    "negative": lambda v: -7,
    "zero": lambda v: 0,
    "huge": lambda v: 10**12,
    "empty": lambda v: "",
    "null": lambda v: None,
    "list": lambda v: [v, v],
}


def _leaves(node: dict, prefix: tuple = ()):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(data: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _shipped(path: Path, root: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    if data["data"]["kind"] != "demo":  # dataset roots do not exist here: an empty folder passes validation
        data["data"]["root"] = str(root)
    return data


def corpus(path: Path, root: Path):
    """(key named in the error, description, mutated config) for every mutation of ``path``."""
    base = _shipped(path, root)
    for leaf, value in _leaves(base):
        seen = set()
        for name, make in MUTATIONS.items():
            new = make(value)
            if repr(new) in seen or (type(new) is type(value) and new == value):
                continue
            seen.add(repr(new))
            data = yaml.safe_load(yaml.safe_dump(base))
            _set(data, leaf, new)
            yield ".".join(leaf), f"{'.'.join(leaf)}={new!r} ({name})", data
        data = yaml.safe_load(yaml.safe_dump(base))
        _set(data, leaf[:-1] + (UNKNOWN,), 1)
        yield ".".join(leaf[:-1] + (UNKNOWN,)), f"{UNKNOWN} next to {'.'.join(leaf)}", data
    for section, value in base.items():  # whole sections replaced by a scalar, a list, nothing
        if isinstance(value, dict):
            for new in (None, [1, 2], 3):
                data = yaml.safe_load(yaml.safe_dump(base))
                data[section] = new
                yield section, f"{section}={new!r}", data


def _entry_points(cfg: Path, out: Path):
    """Every CLI that loads a run config, as (name, call) with the config's problems exiting 2."""
    yield "train", lambda: stage_main("train", ["--config", str(cfg)])
    yield "search", lambda: stage_main("search", ["--config", str(cfg)])
    yield "retrain", lambda: stage_main("retrain", ["--config", str(cfg)])
    yield "evaluate", lambda: evaluate_cli.main(argv=["--config", str(cfg), "--checkpoint", str(out / "m.safetensors"), "--split", "test"])
    yield "sweep", lambda: sweep.main(["--config", str(cfg), "--grid", "train.seed=0,1"])


def _run(call) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        code = call()
    return code, err.getvalue()


def _forward_on_cpu(cfg, seen: set) -> None:
    """The model a validated demo config describes, built for real and run on one batch (once per
    distinct model, space, size and class count: most edits change none of them)."""
    from engine.models import build_model
    from engine.recipes.common import probe_input
    size = probe_input(cfg)[0]
    num_classes = cfg.data.num_classes or min(cfg.data.demo_classes, 4)  # more: the demo data refuses it, in the stage
    key = yaml.safe_dump([dataclasses.asdict(cfg.model), cfg.search_space.to_dict(), size, num_classes])
    if key in seen:
        return
    seen.add(key)
    model = build_model(cfg.model, num_classes)
    cfg.supernet.apply(model)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, size, size)).shape == (2, num_classes)


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.stem)
def test_every_single_edit_of_a_shipped_config(shipped, tmp_path, monkeypatch):
    root, cwd = tmp_path / "dataset", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may be written relative to the working directory either
    out = tmp_path / "out"
    accepted, rejected, failures, built = [], [], [], set()
    for key, what, data in corpus(shipped, root):
        if data.get("output_dir") == "runs/" + shipped.stem:  # the shipped one; kept when output_dir is the mutated key
            data["output_dir"] = str(out)
        cfg_path = tmp_path / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(data))
        try:
            cfg = load_config(cfg_path)
        except ConfigError:
            cfg = None
        if cfg is not None:
            accepted.append(what)
            if shipped.stem == "demo":
                _forward_on_cpu(cfg, built)
            continue
        rejected.append(what)
        for name, call in _entry_points(cfg_path, out):
            code, err = _run(call)
            lines = [line for line in err.splitlines() if line.strip()]
            ok = (code == 2 and len(lines) == 1 and "Traceback" not in err and key in lines[0]
                  and f"{cfg_path}: " in lines[0] and not out.exists() and not any(cwd.iterdir()))
            if not ok:
                failures.append(f"{what} [{name}] exit {code}: {err.strip()[:300]}")
    assert not failures, f"{len(failures)} of {len(rejected)} rejected mutations misbehave:\n" + "\n".join(failures[:20])
    # The corpus must exercise both outcomes, or it tests nothing (e.g. every mutation rejected early).
    assert len(rejected) >= 100 and len(accepted) >= 5, (len(rejected), accepted)

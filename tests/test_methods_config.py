"""Every registered method's settings, mutated the ways a user gets a value wrong (retrain.rank and
each retrain.method_args key), on the ViT demo config: each edit either loads (and the method then
builds on the real model and runs a batch) or retrain.py exits 2 with one line naming the key,
without a traceback and without writing anything."""

import contextlib
import io

import pytest
import torch

import methods
from conftest import ROOT
from engine.cli import main as stage_main
from engine.config import ConfigError, load_config, method_settings

BAD = {"wrong_type": "not-a-number", "negative": -7, "zero": 0, "huge": 10**12, "empty": "", "null": None, "list": [1, 2]}


def _edits(name: str):
    m = methods.get(name)
    for what, value in BAD.items():
        yield "retrain.rank", f"retrain.rank={value!r} ({what})", [f"retrain.rank={value!r}" if value is not None else "retrain.rank=null"]
    for arg in m.arg_names():
        for what, value in BAD.items():
            rendered = "null" if value is None else repr(value)
            yield (f"retrain.method_args.{arg}", f"{arg}={rendered} ({what})", [f"retrain.method_args={{{arg}: {rendered}}}"])


@pytest.mark.parametrize("name", methods.PRESETS)
def test_every_bad_setting_is_one_line_or_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg_path = ROOT / "configs" / "demo_vit.yaml"
    out = tmp_path / "out"
    base = [f"retrain.preset={name}", f"output_dir={out}"]
    failures, rejected, accepted = [], 0, 0
    for key, what, edit in _edits(name):
        try:
            cfg = load_config(cfg_path, base + edit)
        except ConfigError:
            cfg = None
        if cfg is not None:
            accepted += 1
            if not methods.get(name).size and key == "retrain.rank":
                continue  # a method without a size ignores retrain.rank
            from engine.models import build_model

            method, settings = method_settings(cfg.retrain)
            model = build_model(cfg.model, 4)
            method.apply(model, settings, cfg.search_space)
            with torch.no_grad():
                assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4), what
            continue
        rejected += 1
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            code = stage_main("retrain", ["--config", str(cfg_path), *[a for e in base + edit for a in ("--set", e)]])
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        if not (code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue() and key in lines[0] and not out.exists()):
            failures.append(f"{what}: exit {code}: {err.getvalue().strip()[:300]}")
    assert not failures, "\n".join(failures)
    assert rejected >= 5, rejected

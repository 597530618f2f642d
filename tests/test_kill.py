"""Kills and signals at random moments (subprocesses): resuming always ends where an uninterrupted run ends."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from engine.trainer import FAIL_AT_STEP_ENV
from runcfg import write_config

pytestmark = pytest.mark.slow
PAUSE_ENV = "GLORA_TEST_PAUSE_IN_CHECKPOINT_WRITE"


def _run(script, cfg, *extra, env=None, timeout=300):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--config", str(cfg), *extra], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_at_random_moments(script, cfg, ckpt_dir, rng, kills=5):
    """Start the stage, SIGKILL it after a random delay; one kill lands inside a checkpoint write."""
    for i in range(kills):
        inside_write = i == 2
        env = {**os.environ, PAUSE_ENV: "2.0" if inside_write else "0"}
        proc = subprocess.Popen([sys.executable, str(ROOT / script), "--config", str(cfg)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if inside_write:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                if ckpt_dir.is_dir() and any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir()):
                    break
                time.sleep(0.05)
            time.sleep(0.2)
        else:
            time.sleep(rng.uniform(3.0, 9.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def _tensors(path):
    return load_file(path)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill9_train_search_retrain(tmp_path):
    rng = random.Random(0)
    sections = dict(train={"epochs": 4, "checkpoint_every": 1}, search={"generations": 4},
                    retrain={"epochs": 3, "checkpoint_every": 1})
    ref_cfg = write_config(tmp_path / "ref.yaml", tmp_path / "ref", **sections)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", **sections)
    for script in ("train.py", "search.py", "retrain.py"):
        _run(script, ref_cfg)
    ref, run = tmp_path / "ref", tmp_path / "run"

    _kill_at_random_moments("train.py", cfg, run / "checkpoints", rng)
    _run("train.py", cfg)
    assert _equal(_tensors(ref / "supernet.safetensors"), _tensors(run / "supernet.safetensors"))

    _kill_at_random_moments("search.py", cfg, run / "search", rng)
    _run("search.py", cfg)
    assert (ref / "search" / "result.yaml").read_text() == (run / "search" / "result.yaml").read_text()
    assert (ref / "search" / "history.jsonl").read_text() == (run / "search" / "history.jsonl").read_text()

    _kill_at_random_moments("retrain.py", cfg, run / "retrain" / "checkpoints", rng)
    _run("retrain.py", cfg)
    assert _equal(_tensors(ref / "retrain" / "adapter.safetensors"), _tensors(run / "retrain" / "adapter.safetensors"))
    assert _equal(_tensors(ref / "retrain" / "merged.safetensors"), _tensors(run / "retrain" / "merged.safetensors"))
    a, b = (json.loads((d / "retrain" / "metrics.json").read_text()) for d in (ref, run))
    assert a["test_top1"] == b["test_top1"]


def _torchrun(args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_sigterm_to_torchrun_saves_and_resumes(tmp_path):
    sections = dict(data={"demo_train": 96}, train={"epochs": 6})
    ref_cfg = write_config(tmp_path / "ref.yaml", tmp_path / "ref", **sections)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", **sections)
    ref = _torchrun([str(ROOT / "train.py"), "--config", str(ref_cfg)])
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    proc = _torchrun([str(ROOT / "train.py"), "--config", str(cfg)])
    jsonl = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (jsonl.exists() and '"step": 4,' in jsonl.read_text()):
        time.sleep(0.1)
    signalled_at = max(json.loads(l)["step"] for l in jsonl.read_text().splitlines())
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGTERM)  # what a cluster scheduler does: the whole process group
    proc.wait(timeout=60)
    assert time.time() - t0 < 30
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] >= signalled_at
    done = _torchrun([str(ROOT / "train.py"), "--config", str(cfg)])
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]
    assert _equal(_tensors(tmp_path / "ref" / "supernet.safetensors"), _tensors(tmp_path / "run" / "supernet.safetensors"))


def test_nan_on_two_ranks_stops_both_naming_the_step(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run")
    proc = _torchrun([str(ROOT / "train.py"), "--config", str(cfg)], env={FAIL_AT_STEP_ENV: "3"})
    code = proc.wait(timeout=300)
    err = proc.stderr.read()
    assert code != 0 and err.count("non-finite loss at step 3") >= 2  # every rank says it
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_worker_exception_ends_the_job(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run")
    proc = _torchrun([str(ROOT / "tests" / "dist_worker.py"), "crash", str(cfg), str(tmp_path)])
    t0 = time.time()
    code = proc.wait(timeout=300)
    err = proc.stderr.read()
    assert code != 0 and time.time() - t0 < 120
    assert "injected failure on rank 1" in err

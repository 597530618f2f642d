"""A tiny run configuration (2-block ViT at 32 px, small demo data) that the pipeline tests share."""

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "output_dir": None,
    "model": {"name": "vit_tiny_patch16_224", "pretrained": False, "drop_path_rate": 0.1,
              "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}},
    "data": {"kind": "demo", "demo_classes": 4, "demo_train": 48, "demo_val": 24, "demo_test": 24},
    "space": str(ROOT / "configs" / "space" / "large.yaml"),
    "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "lr": 1e-2, "warmup_epochs": 0.5,
              "eval_every": 1, "log_every": 1, "reference_subnets": 1},
    "search": {"population": 6, "top_k": 3, "mutation_count": 2, "crossover_count": 2, "generations": 3},
    "retrain": {"epochs": 1, "batch_size": 16, "eval_batch_size": 32, "lr": 1e-2, "warmup_epochs": 0, "log_every": 1},
}


def tiny_config(out_dir, **sections) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["output_dir"] = str(out_dir)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


@contextlib.contextmanager
def trainer_hooks(stop_at_step: int | None = None, fail_at_step: int | None = None):
    """The trainer's test hooks (environment variables, engine/trainer.py) for the runs made inside:
    stop as if SIGTERM arrived at ``stop_at_step``, a NaN loss at ``fail_at_step``."""
    from engine.trainer import FAIL_AT_STEP_ENV, STOP_AT_STEP_ENV

    values = {STOP_AT_STEP_ENV: stop_at_step, FAIL_AT_STEP_ENV: fail_at_step}
    saved = {k: os.environ.pop(k, None) for k in values}
    os.environ.update({k: str(v) for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def write_config(path, out_dir, **sections) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(tiny_config(out_dir, **sections)))
    return path


def run_cli(script: str, cfg, *extra: str) -> subprocess.CompletedProcess:
    """Run a stage script (``train.py``, ...) on ``cfg`` as a user would; it must exit 0 without a traceback."""
    proc = subprocess.run([sys.executable, str(ROOT / script), "--config", str(cfg), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def torchrun_retrain(configs: list[str], dump: Path, nproc: int = 2) -> list[str]:
    """retrain.py's recipe for each config in turn under torchrun (one process group: tests/dist_worker.py);
    returns rank 0's statuses. The workers run one thread each."""
    dump = Path(dump)
    dump.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           str(ROOT / "tests" / "dist_worker.py"), "retrain", ",".join(configs), str(dump)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((dump / "rank0.json").read_text())["status"]

"""The mini-VTAB driver: every task x method x seed through the project's own pipeline stages
(engine.recipes' run_train / run_search / run_retrain, in-process), results written incrementally.

Protocol (the same for every method): AdamW, cosine schedule with 1 warm-up epoch, weight decay
1e-4, batch 64, ``epochs`` epochs, no augmentation, fp32, CPU. The learning rate is chosen per
task and method from a 3-value grid by training on train800 and scoring on val200 (the
``<task>_lrsel`` view; seed 0). When the best value sits on an edge of the grid, the grid is
extended by one x3 step in that direction (at most twice), so no cell is limited by the grid's
range. The chosen value is then used to train on train800val200 with
each seed and test once on test. GLoRA: the supernet is trained on train800 (lr = the middle of
the base grid, seed 0), the evolutionary search scores on val200 under a budget equal to the matching
LoRA's adapter parameter count, and the chosen sub-network is retrained (init from the supernet)
with the same lr grid / seeds as every other method. Budgets: large <= lora8, middle <= lora4,
small <= lora4. Few-shot / DG reuse the lr chosen on the natural ``digits`` task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .track import Track, spec_lora, vit_track

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
METHODS = {
    "linear": {"preset": "linear"}, "bitfit": {"preset": "bitfit"}, "ssf": {"preset": "ssf"},
    "lora4": {"preset": "lora", "rank": 4}, "lora8": {"preset": "lora", "rank": 8}, "full": {"preset": "full"},
    "glora_small": {"space": "small", "budget": "lora4"},
    "glora_middle": {"space": "middle", "budget": "lora4"},
    "glora_large": {"space": "large", "budget": "lora8"},
}
# The first full run picked the top of {1e-3, 3e-3, 1e-2} in every cell, so the base grid moved up
# (the track's default_grid; full fine-tuning keeps its own, track.lr_grids).
VIT = vit_track(METHODS, name="minivtab")

MODES = {
    "quick": {"tasks": ["digits", "orientation"], "methods": ["linear", "lora4", "glora_middle"], "seeds": [0],
              "epochs": 8, "lr_grid_size": 2, "search": {"population": 10, "top_k": 4, "mutation_count": 5,
                                                           "crossover_count": 5, "generations": 3},
              "lr_extend": 1, "fewshot": None, "dg": False},
    "full": {"tasks": None, "methods": list(METHODS), "seeds": [0, 1, 2], "epochs": 20, "lr_grid_size": 3, "lr_extend": 2,
             "search": {"population": 20, "top_k": 5, "mutation_count": 10, "crossover_count": 10, "generations": 8},
             "fewshot": {"methods": ["linear", "bitfit", "lora8", "glora_large"], "shots": [1, 2, 4, 8, 16],
                         "seeds": [0, 1, 2], "epochs": 40},
             "dg": True},
    # the driver's own end-to-end test (tests/test_minivtab.py): every code path, minimal work
    "smoke": {"tasks": ["digits"], "methods": ["lora4", "glora_large"], "seeds": [0], "epochs": 1, "lr_grid_size": 1,
              "lr_extend": 1, "search": {"population": 4, "top_k": 2, "mutation_count": 2, "crossover_count": 2, "generations": 1},
              "fewshot": {"methods": ["lora8", "glora_large"], "shots": [16], "seeds": [0], "epochs": 1}, "dg": True},
}


# Bumped whenever the driver changes how a cell is run (results.json and run folders then restart).
PROTOCOL = 2


def grid_for(method: str, size: int, track: Track = VIT) -> list[float]:
    return track.grid(method, size)


def track_settings(track: Track) -> dict:
    """What of a track changes every run's result: its backbone and data settings, not its method
    list (a method added to a track does not restart the others) nor its checkpoint callable."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(track).items() if k not in ("methods", "checkpoint")},
                                 sort_keys=True, default=str))


def _stage(fn, *args) -> None:
    """Run one pipeline stage in-process. The trainer installs SIGINT/SIGTERM handlers that turn a
    signal into a clean stop at the next step; they are restored afterwards, so a worker between
    stages dies of the signal as it should, and a stopped stage ends the worker (a rerun resumes it
    from its checkpoint) instead of being taken for a finished one."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = fn(*args)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if status != "done":
        raise SystemExit(f"stopped by {status}; rerun to resume")


def _stage_cost(folder: Path, key: str, cpu_s: float | None = None) -> float:
    """CPU seconds of a finished stage, kept in its own folder (``cpu.json``) so that a rerun that
    finds the stage done still counts what it cost (0 for a stage that predates the file)."""
    path = folder / "cpu.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    if cpu_s is not None:
        rec[key] = round(cpu_s, 1)
        tmp = path.with_name(f"cpu.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(path)
    return rec.get(key, 0.0)


class Results:
    """results.json, rewritten atomically after every finished cell; finished cells are skipped on
    rerun. Several worker processes share the file: every write re-reads it under an exclusive lock
    and changes only its own key, so no worker overwrites another's results."""

    def __init__(self, path: Path, meta: dict | None = None):
        self.path = path
        self.lock = path.with_name(path.name + ".lock")
        with self._locked():
            self.data = self._read()
            if meta is not None:
                old = self.data.get("meta", {})
                grids = old.get("lr_grid", {})
                changed = {m for m in grids.keys() & meta.get("lr_grid", {}).keys() if grids[m] != meta["lr_grid"][m]}
                # a new method joins the results; a changed grid of an existing one restarts them
                if changed or any(old.get(k) != meta.get(k) for k in ("mode", "settings", "backbone", "protocol", "track_settings")):
                    self.data = {"runs": {}, "lr_selection": {}}
                self.data["meta"] = {**self.data.get("meta", {}), **meta}
                self._write()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"runs": {}, "lr_selection": {}}

    def _write(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        with open(self.lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def refresh(self) -> None:
        with self._locked():
            self.data = self._read()

    def get(self, section, key):
        return self.data.setdefault(section, {}).get(key)

    def put(self, section, key, value):
        with self._locked():
            self.data = self._read()
            self.data.setdefault(section, {})[key] = value
            self._write()


class Runner:
    """Runs one track's cells in one mode. ``modes`` maps a mode name to its settings (this module's
    MODES for the replica; benchmarks/compare has its own); a mode's ``methods`` None means every
    method of the track."""

    track: Track = VIT  # class defaults: a bare Runner (the bookkeeping tests) is the replica's

    @property
    def methods(self) -> dict[str, dict]:
        return self.track.methods

    def __init__(self, mode: str, ckpt: Path, data_root: Path, results: Results, log=print, runs_root: Path | None = None,
                 track: Track = VIT, modes: dict | None = None):
        self.track, self.modes = track, modes or MODES
        self.mode, self.m = mode, self.modes[mode]
        self.ckpt, self.root, self.results, self.log = str(ckpt), data_root, results, log
        # run folders are keyed by everything that changes a run's result, so a changed protocol
        # never silently reuses an older run's metrics.json (the replica's key is unchanged, so its
        # cached runs stay valid; any other track adds its name and settings)
        parts = [self.m, {m: self.grid(m) for m in self.methods}, PROTOCOL, str(ckpt)]
        if track is not VIT:
            # the backbone and data settings, not the method list (a method added to a track does not
            # restart the others' runs) nor the checkpoint callable (its repr is a memory address)
            parts = [self.m, PROTOCOL, str(ckpt), track_settings(track)]
        key = json.dumps(parts, sort_keys=True, default=str)
        self.runs = (runs_root or HERE / "cache" / "runs") / f"{mode}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        self.budgets = {f"lora{r}": track.lora_count(r) for r in (2, 4, 8)}

    def supernet_lr(self, method: str) -> float:
        """The track's supernet lr, else the middle of the method's full grid."""
        return self.track.supernet_lr or self.grid(method.split("@")[0], 3)[1]

    def grid(self, method: str, size: int | None = None) -> list[float]:
        return self.track.grid(method, self.m["lr_grid_size"] if size is None else size)

    def method_names(self) -> list[str]:
        return list(self.m["methods"] or self.methods)

    def base(self, out: Path, data: dict, space: str = "large", model: dict | None = None) -> dict:
        return {"output_dir": str(out), "model": self.track.model_config(self.ckpt, model),
                "data": self.track.data_config(data), "space": self.track.space(space)}

    def _sched(self, epochs, lr, seed, warmup=1):
        return {"epochs": epochs, "batch_size": 64, "lr": lr, "weight_decay": 1e-4, "warmup_epochs": warmup,
                "min_lr": lr / 100, "seed": seed, "device": "cpu", "log_every": 50}

    # ------------------------------------------------------------------ one pipeline run
    def supernet(self, method: str, out: Path, data: dict, epochs: int, lr: float, search: dict | None = None) -> dict:
        from engine import distributed as dist
        from engine.config import config_from_dict
        from engine.recipes.search import run_search
        from engine.recipes.train import run_train

        spec = self.spec(method)
        d = self.base(out, data, spec["space"], spec.get("model"))
        d["train"] = {**self._sched(epochs, lr, 0), "eval_every": epochs, "reference_subnets": 0}
        lora = spec_lora(spec)
        if lora["train"]:
            # the retrain section must agree with the supernet's options (e.g. DoRA's magnitudes)
            # even for train.py and search.py: the config check reads the whole file
            d["train"]["lora"], d["retrain"] = lora["train"], {"lora": lora["retrain"]}
        d["search"] = {**(search or self.m["search"]), "max_params": self.budgets[spec["budget"]], "seed": 0}
        # CPU seconds of this process (1 thread per worker): what the stage cost, whatever else the machine ran
        t0, c0 = time.time(), time.process_time()
        if not (out / "supernet.safetensors").is_file():
            _stage(run_train, config_from_dict(d), dist.DistInfo(), "minivtab")
            _stage_cost(out, "supernet", time.process_time() - c0)
        t1, c1 = time.time(), time.process_time()
        if not (out / "search" / "result.yaml").is_file():
            _stage(run_search, config_from_dict(d), dist.DistInfo(), "minivtab")
            _stage_cost(out, "search", time.process_time() - c1)
        return {"supernet_s": round(t1 - t0, 1), "search_s": round(time.time() - t1, 1),
                "supernet_cpu_s": _stage_cost(out, "supernet"), "search_cpu_s": _stage_cost(out, "search")}

    def retrain(self, method: str, out: Path, data: dict, epochs: int, lr: float, seed: int,
                supernet_dir: Path | None = None, warmup: float = 1) -> dict:
        from engine import distributed as dist
        from engine.config import config_from_dict
        from engine.recipes.retrain import run_retrain

        spec = self.spec(method)
        metrics_path = out / "retrain" / "metrics.json"
        t0, c0 = time.time(), time.process_time()
        if not metrics_path.is_file():
            d = self.base(out, data, spec.get("space", self.track.preset_space), spec.get("model"))
            r = self._sched(epochs, lr, seed, warmup)
            lora = spec_lora(spec)["retrain"]
            if lora:
                r["lora"] = lora
            if "preset" in spec:
                r.update(preset=spec["preset"], rank=spec.get("rank", 8))
                if spec.get("method_args"):
                    r["method_args"] = dict(spec["method_args"])
            else:
                out.mkdir(parents=True, exist_ok=True)
                for f in ("supernet.safetensors", "supernet.yaml"):
                    shutil.copyfile(supernet_dir / f, out / f)
                r.update(subnet=str(supernet_dir / "search" / "result.yaml"), init="inherit" if spec.get("inherit") else "supernet")
            d["retrain"] = r
            _stage(run_retrain, config_from_dict(d), dist.DistInfo(), "minivtab")
            _stage_cost(out, "retrain", time.process_time() - c0)
        m = json.loads(metrics_path.read_text())
        return {"test_top1": m["test_top1"], "adapter_params": m["adapter_params"], "head_params": m["head_params"],
                "trainable_params": m["trainable_params"], "wall_s": round(time.time() - t0, 1),
                "cpu_s": _stage_cost(out, "retrain"), "lr": lr, "seed": seed}

    # ------------------------------------------------------------------ protocol
    def spec(self, method: str) -> dict:
        """A method's spec; ``<name>@<option>`` is GLoRA ``<name>`` with one LoRA-family option, a
        candidate of its ``select_lora`` (``@none``: the spec's ``base`` method, reusing its runs)."""
        if "@" not in method:
            return self.methods[method]
        from bench.lorafamily import OPTIONS

        name, opt = method.split("@", 1)
        spec = {k: v for k, v in self.methods[name].items() if k != "select_lora"}
        return {**spec, "lora": dict(OPTIONS[opt]) if opt != "none" else {}}

    def candidates(self, method: str) -> list[str]:
        """The method names whose validation scores decide a ``select_lora`` method's option."""
        spec = self.spec(method)
        return [spec.get("base", f"{method}@none") if o == "none" else f"{method}@{o}" for o in ["none", *spec["select_lora"]]]

    def choose_lr(self, task: str, method: str, sup_dir: Path | None) -> float:
        key = f"{task}/{method}"
        done = self.results.get("lr_selection", key)
        if done:
            return done["chosen"]
        epochs = self.m["epochs"]
        scores, walls, cpus = {}, {}, {}

        # a select_lora candidate's score is one point of its grid (its CPU seconds counted there)
        scored = self.results.get("option_scores", key)
        if scored:
            lr0 = f"{scored['lr']:g}"
            scores[lr0], walls[lr0], cpus[lr0] = scored["val_top1"], scored["wall_s"], 0.0

        def score(lr: float) -> None:
            if f"{lr:g}" in scores:
                return
            res = self.retrain(method, self.runs / "vtab" / task / method / f"lrsel_{lr:g}",
                               {"kind": "vtab1k", "root": str(self.root / "vtab"), "task": f"{task}_lrsel"}, epochs, lr, 0, sup_dir)
            scores[f"{lr:g}"], walls[f"{lr:g}"], cpus[f"{lr:g}"] = res["test_top1"], res["wall_s"], res.get("cpu_s", 0.0)
            self.log(f"[lr] {task:12s} {method:13s} lr {lr:g}: val200 {res['test_top1']:.2f}% ({res['wall_s']}s)")

        grid = self.grid(method.split("@")[0])
        for lr in grid:
            score(lr)
        best = lambda: float(max(scores, key=lambda k: (scores[k], -float(k))))  # noqa: E731 - ties go to the smaller lr
        for _ in range(self.m.get("lr_extend", 0)):
            lrs = sorted(float(k) for k in scores)
            if best() == lrs[-1]:
                score(float(f"{lrs[-1] * 3:.2g}"))
            elif best() == lrs[0]:
                score(float(f"{lrs[0] / 3:.2g}"))
            else:
                break
        self.results.put("lr_selection", key, {"val_top1": scores, "wall_s": walls, "cpu_s": cpus, "chosen": best()})
        return best()

    def lrsel_data(self, task: str) -> dict:
        return {"kind": "vtab1k", "root": str(self.root / "vtab"), "task": f"{task}_lrsel"}

    def supernet_for(self, task: str, method: str) -> tuple[Path | None, dict]:
        """A GLoRA method's supernet folder on ``task`` (trained on train800 and searched on val200
        where not done) and its costs; (None, {}) for a preset. An ``inherit`` method reuses its
        ``base``'s supernet and search; ``supernet_x`` trains the supernet that many times longer."""
        spec = self.spec(method)
        if "space" not in spec:
            return None, {}
        owner = spec["base"] if spec.get("inherit") else method
        sup_dir = self.runs / "vtab" / task / owner / "supernet"
        key = f"vtab/{task}/{owner}/supernet"
        data = {"kind": "vtab1k", "root": str(self.root / "vtab"), "task": task}
        cost = self.results.get("runs", key)
        if not cost or not (sup_dir / "search" / "result.yaml").is_file():
            cost = self.supernet(owner, sup_dir, data, round(self.m["epochs"] * self.spec(owner).get("supernet_x", 1)),
                                 self.supernet_lr(owner))
        self.results.put("runs", key, cost)
        return sup_dir, cost

    def option_score(self, task: str, cand: str, lr: float) -> float:
        """val200 top-1 of a ``select_lora`` candidate: its own supernet and search, then one
        retrain on train800 at ``lr`` (the base GLoRA's chosen lr), seed 0. Reused as that lr's
        point of the candidate's grid if it is chosen."""
        key = f"{task}/{cand}"
        done = self.results.get("option_scores", key)
        if done:
            return done["val_top1"]
        sup_dir, _ = self.supernet_for(task, cand)
        res = self.retrain(cand, self.runs / "vtab" / task / cand / f"lrsel_{lr:g}", self.lrsel_data(task),
                           self.m["epochs"], lr, 0, sup_dir)
        self.results.put("option_scores", key, {"lr": lr, "val_top1": res["test_top1"], "wall_s": res["wall_s"], "cpu_s": res["cpu_s"]})
        self.log(f"[option] {task:12s} {cand:24s} lr {lr:g}: val200 {res['test_top1']:.2f}%")
        return res["test_top1"]

    def screen(self, task: str, method: str) -> dict | None:
        """A ``select_lora`` method with ``screen: <preset>`` (``lora8``) keeps an option as a
        candidate only where that preset with the option (``lora8_<option>``) beat the plain preset
        on ``task``'s val200 (each at its best lr). It costs no run: those presets' lr selections are
        cells of the track anyway (done here first if not yet). None without ``screen``."""
        spec = self.spec(method)
        ref = spec.get("screen")
        if not ref:
            return None
        val = {}
        for name in [ref, *(f"{ref}_{o}" for o in spec["select_lora"])]:
            if name in self.methods:
                self.prepared_method(task, name)
                val[name] = max(self.results.get("lr_selection", f"{task}/{name}")["val_top1"].values())
        return {"preset": ref, "val_top1": val, "kept": [o for o in spec["select_lora"] if val.get(f"{ref}_{o}", -1.0) > val[ref]]}

    def prepared_method(self, task: str, method: str) -> tuple[str, float | None, Path | None, dict]:
        """(the method name to retrain, its lr, its supernet folder, the supernet's costs) on
        ``task``: trains and searches a GLoRA supernet and selects the lr on val200 where not done.
        A ``select_lora`` method first scores each option's own supernet at its base's chosen lr
        (one train800 -> val200 run each) and keeps the best; an ``inherit`` method has no lr."""
        spec = self.methods.get(method, {})
        if spec.get("select_lora"):
            sel_key = f"{task}/{method}"
            done = self.results.get("option_selection", sel_key)
            if not done:
                cands = self.candidates(method)
                screen = self.screen(task, method)
                if screen is not None:
                    cands = cands[:1] + [c for c in cands[1:] if c.split("@")[1] in screen["kept"]]
                _, lr0, _, _ = self.prepared_method(task, cands[0])
                val = {cands[0]: self.results.get("lr_selection", f"{task}/{cands[0]}")["val_top1"][f"{lr0:g}"]}
                for cand in cands[1:]:
                    val[cand] = self.option_score(task, cand, lr0)
                # ties go to the earlier candidate (plain GLoRA first): an option must earn its place
                done = {"lr": lr0, "val_top1": val, "chosen": max(val, key=lambda c: (val[c], -list(val).index(c)))}
                if screen is not None:
                    done["screen"] = screen
                self.results.put("option_selection", sel_key, done)
                self.log(f"[option] {task:12s} {method}: {done['chosen']} ({val})")
            return self.prepared_method(task, done["chosen"])
        # workers share supernets and lr selections (a select_lora or inherit method uses its base's):
        # whoever gets there first does the work while the other waits, never both in one folder
        owner = self.spec(method)["base"] if self.spec(method).get("inherit") else method
        with self._exclusive(f"{task}-{owner}"):
            sup_dir, sup_cost = self.supernet_for(task, method)
            if self.spec(method).get("inherit"):
                return method, None, sup_dir, sup_cost
            return method, self.choose_lr(task, method, sup_dir), sup_dir, sup_cost

    @contextlib.contextmanager
    def _exclusive(self, name: str):
        import fcntl

        (self.runs / "locks").mkdir(parents=True, exist_ok=True)
        with open(self.runs / "locks" / f"{name}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                self.results.refresh()  # what the worker that held the lock wrote meanwhile
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def pipeline_cost(self, task: str, method: str) -> dict:
        """CPU seconds of a (task, method) cell's whole pipeline: every candidate's supernet, search,
        option score and lr-selection runs, and the seeds' final runs (an inherited sub-network: its
        base's supernet and search, and its one test)."""
        spec = self.methods.get(method, {})
        sel = self.results.get("option_selection", f"{task}/{method}") if spec.get("select_lora") else None
        # the candidates that were scored (a screen may have dropped some)
        names = list(sel["val_top1"]) if sel else self.candidates(method) if spec.get("select_lora") else [method]
        runs = self.results.data.get("runs", {})
        owners = [spec["base"]] if spec.get("inherit") else names
        sup = sum(runs.get(f"vtab/{task}/{n}/supernet", {}).get(k, 0.0) for n in owners for k in ("supernet_cpu_s", "search_cpu_s"))
        lrsel = sum(sum((self.results.get("lr_selection", f"{task}/{n}") or {}).get("cpu_s", {}).values()) for n in names)
        lrsel += sum((self.results.get("option_scores", f"{task}/{n}") or {}).get("cpu_s", 0.0) for n in names)
        final = [runs[f"vtab/{task}/{method}/{s}"].get("cpu_s", 0.0) for s in self.m["seeds"] if f"vtab/{task}/{method}/{s}" in runs]
        return {"supernet_search_cpu_s": round(sup, 1), "lrsel_cpu_s": round(lrsel, 1), "final_cpu_s": round(sum(final), 1),
                "cpu_s": round(sup + lrsel + sum(final), 1), "seeds": len(final)}

    def vtab_cell(self, task: str, method: str) -> None:
        data = {"kind": "vtab1k", "root": str(self.root / "vtab"), "task": task}
        # an inherited sub-network is not trained, so its seeds would be the same run: one test
        seeds = self.m["seeds"][:1] if self.spec(method).get("inherit") else self.m["seeds"]
        if self.results.get("cost", f"vtab/{task}/{method}") and all(self.results.get("runs", f"vtab/{task}/{method}/{s}") for s in seeds):
            return  # finished: it needs nothing from its run folders, which a fresh checkout lacks
        name, lr, sup_dir, sup_cost = self.prepared_method(task, method)
        if lr is None:  # its weights were trained at the supernet's lr (the config needs some lr)
            lr = self.supernet_lr(self.spec(method)["base"])
        for seed in seeds:
            key = f"vtab/{task}/{method}/{seed}"
            if self.results.get("runs", key):
                continue
            # a select_lora method that kept plain GLoRA shares its base's seed folders: one worker at a
            # time, and the base's finished run is that run (its folder may be gone: a fresh checkout)
            with self._exclusive(f"{task}-{name}-seed{seed}"):
                same = self.results.get("runs", f"vtab/{task}/{name}/{seed}") if name != method else None
                res = (dict(same) if same else
                       self.retrain(name, self.runs / "vtab" / task / name / f"seed_{seed}", data, self.m["epochs"], lr, seed, sup_dir))
            res.update(track="vtab", task=task, method=method, **sup_cost)
            if self.spec(name).get("inherit"):
                res["init"] = "inherit"  # not trained: its lr is the supernet's
            if name != method:
                res["chosen"] = name
            self.results.put("runs", key, res)
            self.log(f"[vtab] {task:12s} {method:13s} seed {seed}: test {res['test_top1']:.2f}% "
                     f"{res['adapter_params']:,} adapter params ({res['wall_s']}s)")
        self.results.put("cost", f"vtab/{task}/{method}", self.pipeline_cost(task, method))

    def fewshot_cell(self, method: str, shots: int, seed: int) -> None:
        fs, ds = self.m["fewshot"], self.track.fewshot_dataset
        key = f"fewshot/{ds}/{method}/{shots}/{seed}"
        if self.results.get("runs", key):
            return
        data = {"kind": "fewshot", "root": str(self.root / "fewshot"), "dataset": ds, "shots": shots, "seed": seed}
        # the lr (and a select_lora method's option) chosen on the vtab task of the same images
        name, lr, _, _ = self.prepared_method(ds, method)
        base = self.runs / "fewshot" / f"{method}" / f"shot{shots}_seed{seed}"
        sup_dir, sup_cost = None, {}
        if "space" in self.spec(name):
            sup_dir = base / "supernet"
            sup_cost = self.supernet(name, sup_dir, data, fs["epochs"], self.supernet_lr(name), fs.get("search"))
        res = self.retrain(name, base / "final", data, fs["epochs"], lr, seed, sup_dir, warmup=5)
        res.update(track="fewshot", task=ds, method=method, shots=shots, **sup_cost)
        if name != method:
            res["chosen"] = name
        if self.m["dg"] and shots == 16:
            res["dg"] = {dom: self.evaluate_merged(base / "final", f"{ds}_{dom}", shots, seed) for dom in self.track.dg_domains}
        self.results.put("runs", key, res)
        self.log(f"[fewshot] {method:13s} {shots:2d}-shot seed {seed}: test {res['test_top1']:.2f}%"
                 + (f" DG {res['dg']}" if "dg" in res else ""))

    def evaluate_merged(self, run_dir: Path, dataset: str, shots: int, seed: int) -> float:
        import torch

        from engine import distributed as dist
        from engine.config import config_from_dict
        from engine.data import build_splits
        from engine.models import build_model, load_state_file
        from engine.recipes.common import probe_input
        from engine.trainer import evaluate

        d = self.base(run_dir, {"kind": "fewshot", "root": str(self.root / "fewshot"), "dataset": dataset, "shots": shots, "seed": seed})
        d["model"]["checkpoint"] = None
        cfg = config_from_dict(d)
        _, ds, n = build_splits(cfg.data, "final", *probe_input(cfg))
        model = build_model(cfg.model, n)
        model.load_state_dict(load_state_file(run_dir / "retrain" / "merged.safetensors"), strict=True)
        return evaluate(model, torch.utils.data.DataLoader(ds, batch_size=256), dist.DistInfo())["top1"]

    # ------------------------------------------------------------------ work list
    def cells(self, phase: str) -> list[tuple]:
        """The phase's cells, the costliest first so that parallel workers finish together.
        Few-shot cells reuse the lr chosen on the vtab task of their dataset, so they form a later
        phase."""
        def cost(m: str) -> int:
            spec = self.methods[m]
            glora = 3 * (1 + len(spec.get("select_lora", []))) if "space" in spec else 0
            return glora or {"full": 2}.get(m, 1)

        if phase == "vtab":
            # a method with ``tasks`` (an ablation) runs on those tasks only
            cells = [(t, m) for t in (self.m["tasks"] or self.track.tasks) for m in self.method_names()
                     if t in self.methods[m].get("tasks", [t])]
            # a method built on another's runs (``base``) comes after every independent cell, so its
            # base is done (or under way) when a worker reaches it
            return sorted(cells, key=lambda c: ("base" in self.methods[c[1]], -cost(c[1])))
        fs = self.m["fewshot"]
        if not fs:
            return []
        cells = [(m, k, s) for m in fs["methods"] for k in fs["shots"] for s in fs["seeds"]]
        return sorted(cells, key=lambda c: (-cost(c[0]), -c[1]))

    def run_cell(self, phase: str, cell: tuple) -> None:
        (self.vtab_cell if phase == "vtab" else self.fewshot_cell)(*cell)

    def run(self, phase: str, claims: Path | None = None) -> None:
        """Run every cell of ``phase``; with ``claims`` (a folder shared by the workers), a worker
        runs only the cells it claims first (an exclusive file create), so N workers split the
        list dynamically."""
        for cell in self.cells(phase):
            if claims is not None:
                try:
                    os.close(os.open(claims / "-".join(map(str, cell)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
            self.run_cell(phase, cell)


def run_workers(argv: list[str], workers: int, claims: Path, phase: str, module: str = "benchmarks.minivtab",
                on_tick=None, tick_s: float = 60.0) -> None:
    """Launch ``workers`` copies of ``module`` for one phase and wait (calling ``on_tick`` every
    ``tick_s`` seconds meanwhile); any failure fails the run."""
    if claims.exists():
        shutil.rmtree(claims)  # claims of an interrupted run: its finished cells are skipped via results.json
    claims.mkdir(parents=True)
    cmd = [sys.executable, "-m", module, *argv, "--phase", phase, "--claims", str(claims)]
    procs = [subprocess.Popen(cmd, cwd=REPO) for _ in range(workers)]
    try:
        while any(p.poll() is None for p in procs):
            try:
                procs[0].wait(timeout=tick_s) if procs[0].poll() is None else time.sleep(min(tick_s, 5))
            except subprocess.TimeoutExpired:
                pass
            if on_tick is not None:
                on_tick()
        codes = [p.returncode for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    if any(codes):
        raise SystemExit(f"{module}: a {phase} worker failed (exit codes {codes}); rerun to resume")


def main(argv=None) -> int:
    import argparse
    import platform

    import torch

    from . import fmnist
    from .prepare import prepare_cached
    from .pretrain import pretrain

    p = argparse.ArgumentParser(prog="python -m benchmarks.minivtab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 tasks, 3 methods, 1 seed, 8 epochs, small search (< 15 min)")
    p.add_argument("--results", default=None, help="default benchmarks/minivtab/results[-quick].json")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel single-threaded worker processes (default: min(2, CPUs))")
    p.add_argument("--phase", choices=["vtab", "fewshot"], help=argparse.SUPPRESS)  # set for worker processes
    p.add_argument("--claims", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    results_path = Path(args.results) if args.results else HERE / ("results-quick.json" if args.quick else "results.json")
    from .report import write_report

    if args.report_only:
        write_report(results_path)
        return 0
    torch.set_num_threads(1)  # measured: on 2 shared cores 1 thread trains ~10x faster than 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    try:
        ckpt = pretrain()
        root = prepare_cached(HERE / "data")
    except fmnist.FashionMNISTMissing as err:
        print(err, file=sys.stderr)
        return 2
    meta = {"mode": mode, "settings": {k: v for k, v in MODES[mode].items()}, "backbone": str(ckpt.name),
            "backbone_info": json.loads(ckpt.with_suffix(".json").read_text()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per worker",
            "protocol": PROTOCOL,
            "lr_grid": {m: grid_for(m, MODES[mode]["lr_grid_size"]) for m in METHODS}}
    if args.phase:  # a worker: the parent has written the metadata already
        Runner(mode, ckpt, root, Results(results_path)).run(args.phase, Path(args.claims))
        return 0
    meta["workers"] = args.workers
    results = Results(results_path, meta)
    runner = Runner(mode, ckpt, root, results)
    results.put("meta", "budgets", runner.budgets)
    for phase in ("vtab", "fewshot"):
        if args.workers > 1:
            run_workers((["--quick"] if args.quick else []) + ["--results", str(results_path)], args.workers,
                        runner.runs / "claims", phase)
        else:
            runner.run(phase)
    results = Results(results_path)
    results.put("meta", "total_wall_s_last_invocation", round(time.time() - t0, 1))
    results.put("meta", "finished", True)
    write_report(results_path)
    print(f"done in {time.time() - t0:.0f}s -> {results_path}")
    return 0

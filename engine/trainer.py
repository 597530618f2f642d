"""The training loop shared by stage 1 (supernet: a sampled sub-network per step) and stage 3.

Lifecycle: ``Trainer(...)`` builds the optimiser, scheduler and loaders; ``resume()`` restores
a checkpoint; ``fit()`` trains, checkpoints atomically, evaluates and logs; a SIGTERM/Ctrl-C
sets ``stop_requested`` and the loop saves and returns at the next step boundary.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from methods.hooks import TrainingHooks, merged_param_groups

from . import distributed as dist
from .checkpoint import load_checkpoint, save_checkpoint
from .compiling import compile_errors, compile_model, uses_cuda_graphs
from .config import TrainConfig
from .optim import adamw
from .rng import get_rng_state, set_rng_state
from .tracker import Tracker


class TrainError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint from another run)."""


# Test hooks, read when a Trainer is made (as GLORA_TEST_PAUSE_IN_CHECKPOINT_WRITE in checkpoint.py):
FAIL_AT_STEP_ENV = "GLORA_TEST_FAIL_AT_STEP"  # inject a NaN loss at this step
STOP_AT_STEP_ENV = "GLORA_TEST_STOP_AT_STEP"  # behave as if SIGTERM arrived at this step


def _env_step(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value else None


class ResumableSampler(Sampler):
    """DistributedSampler order (a pure function of seed and epoch) that can skip a prefix.

    Skipping the batches already trained lets a run resumed mid-epoch see exactly the data an
    uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, info: dist.DistInfo, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self.inner)[self.skip :])

    def __len__(self) -> int:
        return len(self.inner) - self.skip


class ShardSampler(Sampler):
    """Every index exactly once across ranks (no padding, so evaluation counts are exact)."""

    def __init__(self, n: int, info: dist.DistInfo):
        self.indices = list(range(info.rank, n, info.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, but batch norms whose parameters are all frozen stay in eval mode.

    A frozen backbone keeps its normalisation statistics as well as its weights: in train mode a
    CNN's batch norms would normalise with each small batch's statistics and overwrite their
    running ones, which the adapter files and the merge do not carry (only the backbone's own
    statistics are in the merged model), so the model tested would not be the model trained.
    Frozen statistics also fine-tune better: a linear probe of EfficientNet-Lite0 on MNIST reaches
    84% where batch statistics reach 58%.
    """
    model.train(mode)
    if mode:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, info: dist.DistInfo, precision: str = "fp32", topk=(1,),
             classes: Sequence[int] | None = None) -> dict[str, float]:
    """Top-k accuracy over the loader's shard, summed over ranks. ``classes``: only these outputs
    compete (the ImageNet-A/-R protocol for a test set holding some of the model's classes);
    the labels are output indices among them."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(topk) + 1, dtype=torch.float64)
    if classes is not None:
        chosen = torch.as_tensor(list(classes), dtype=torch.long, device=info.device)
        position = torch.full((int(chosen.max()) + 1,), -1, dtype=torch.long, device=info.device)
        position[chosen] = torch.arange(len(chosen), device=info.device)
    for x, y in loader:
        x, y = x.to(info.device, non_blocking=True), y.to(info.device)
        with autocast_for(precision, info.device):
            logits = model(x)
        if classes is not None:
            logits, y = logits.index_select(1, chosen), position[y]
        k = min(max(topk), logits.shape[1])
        pred = logits.float().topk(k, dim=1).indices
        hit = pred == y[:, None]
        for i, kk in enumerate(topk):
            counts[i] += hit[:, :kk].any(dim=1).sum().item()
        counts[-1] += y.numel()
    counts = dist.all_reduce_sum(counts.to(info.device)).cpu()
    train_mode(model, was_training)
    total = max(counts[-1].item(), 1.0)
    return {f"top{k}": 100.0 * counts[i].item() / total for i, k in enumerate(topk)} | {"n": int(counts[-1].item())}


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_ds: Dataset,
        eval_ds: Dataset | None,
        cfg: TrainConfig,
        out_dir: Path,
        info: dist.DistInfo,
        tracker: Tracker,
        before_step: Callable[[int], None] | None = None,
        on_eval: Callable[[int, int], dict[str, float]] | None = None,
        fingerprint: str = "",
        subnet: tuple[str, str] | None = None,
        num_workers: int = 0,
        desc: str = "train",
        hooks: Sequence[TrainingHooks] = (),
    ):
        self.model, self.cfg, self.info, self.tracker = model, cfg, info, tracker
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / "checkpoints" / "last.pt"
        self.before_step, self.on_eval = before_step, on_eval
        self.fingerprint, self.desc = fingerprint, desc
        self.hooks = list(hooks)  # what training options and methods add to each step (methods/hooks.py)
        self.fail_at_step, self.stop_at_step = _env_step(FAIL_AT_STEP_ENV), _env_step(STOP_AT_STEP_ENV)  # test hooks
        # (digest of the fixed sub-network being trained, where it came from): a checkpoint of another
        # sub-network must not be resumed into this one (retrain after the search was rerun)
        self.subnet = subnet
        # torch.compile's wrapper shares the parameters; checkpoints, names and evaluation keep
        # using the module itself, whose parameter names carry no "_orig_mod." prefix.
        self.compiled = compile_model(model, cfg.compile_mode) if cfg.compile else None
        self.mark_steps = self.compiled is not None and uses_cuda_graphs(cfg.compile_mode, info.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.sampler = ResumableSampler(train_ds, info, cfg.seed)
        # The loader gets its own generator: creating an iterator would otherwise draw from the
        # global RNG at every epoch start, and a resumed run would then drift from the original.
        self.loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=info.device.type == "cuda", drop_last=False,
                                 generator=torch.Generator().manual_seed(cfg.seed))
        self.eval_loader = None
        if eval_ds is not None:
            self.eval_loader = DataLoader(eval_ds, batch_size=cfg.eval_batch_size, sampler=ShardSampler(len(eval_ds), info),
                                          num_workers=num_workers)
        self.steps_per_epoch = math.ceil(len(self.sampler.inner) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        for h in self.hooks:
            try:
                h.check(self.total_steps)
            except ValueError as err:  # MethodError included: one line, before anything is trained
                raise TrainError(str(err)) from None
        groups = merged_param_groups(self.hooks, list(zip(self.param_names, self.params)), cfg.lr, cfg.weight_decay)
        self.optimizer = adamw(self.params if groups is None else groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=self.total_steps,
            lr_min=cfg.min_lr,
            warmup_t=int(round(cfg.warmup_epochs * self.steps_per_epoch)),
            warmup_lr_init=cfg.warmup_lr,
            t_in_epochs=False,
        )
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.stop_requested: str | None = None
        self.last_tag = 0

    # -- signals -----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.stop_requested is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self.stop_requested = signal.Signals(signum).name

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- checkpoints -------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        own = dict(self.model.named_parameters())
        return {n: own[n].detach().cpu().clone() for n in self.param_names}

    def frozen_adapter_buffers(self) -> dict[str, torch.Tensor]:
        """The adapters' own buffers (``glora_*``: the frozen initial factors of PiSSA and LoRA-GA),
        which a data-dependent initialisation sets once and a resumed run must get back."""
        return {n: b for n, b in self.model.named_buffers() if n.rsplit(".", 1)[-1].startswith("glora_")}

    def save(self) -> None:
        if not self.info.is_main:
            return
        self.tracker.flush()
        jsonl = self.tracker.log_dir / "metrics.jsonl"
        state = {
            "model": self.trainable_state(),
            "buffers": {n: b.detach().cpu().clone() for n, b in self.frozen_adapter_buffers().items()},
            "hooks": {h.name: h.state_dict() for h in self.hooks},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": get_rng_state(),
            "fingerprint": self.fingerprint,
            "subnet_digest": self.subnet[0] if self.subnet else "",
            "metrics_offset": jsonl.stat().st_size if jsonl.exists() else 0,
            "world_size": self.info.world_size,
        }
        save_checkpoint(state, self.ckpt_path)

    def resume(self, mode: str) -> bool:
        """Restore ``last.pt`` (``auto``) or a given checkpoint; returns whether one was loaded."""
        path = self.ckpt_path if mode == "auto" else Path(mode)
        if mode == "never" or (mode == "auto" and not path.is_file()):
            self._check_ranks_agree(path, None)
            # A fresh start: lines a killed earlier attempt logged belong to steps that will be
            # run again.
            jsonl = self.tracker.log_dir / "metrics.jsonl"
            if self.info.is_main and jsonl.exists():
                jsonl.unlink()
            return False
        state = load_checkpoint(path)
        self._check_ranks_agree(path, state["step"])
        if self.subnet and state.get("subnet_digest") not in (None, "", self.subnet[0]):
            raise TrainError(f"{path}: written while retraining another sub-network than {self.subnet[1]} holds now "
                             f"(it changed since, e.g. the search was run again); retrain it afresh with --overwrite, "
                             f"or use another output_dir")
        if self.fingerprint and state.get("fingerprint") not in ("", self.fingerprint):
            raise TrainError(f"{path}: checkpoint is from a run with another configuration; use a new output_dir or --overwrite")
        saved_world = state.get("world_size", self.info.world_size)  # older checkpoints do not say
        if saved_world != self.info.world_size:
            # Each rank's data shard and the steps per epoch (so the learning-rate schedule, and
            # which sub-network trains on which batch) depend on the number of processes: resuming
            # with another number would continue a different run than the one that was stopped.
            raise TrainError(f"{path}: written by a run of {saved_world} process(es), resumed with {self.info.world_size}; "
                             f"resume with {saved_world} (torchrun --nproc_per_node/--nnodes), or start afresh with --overwrite")
        missing = [n for n in self.param_names if n not in state["model"]]
        if missing:
            raise TrainError(f"{path}: checkpoint lacks trainable tensors {', '.join(missing[:3])}")
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.param_names:
                if own[n].shape != state["model"][n].shape:
                    raise TrainError(f"{path}: {n} has shape {tuple(state['model'][n].shape)}, model {tuple(own[n].shape)}")
                own[n].copy_(state["model"][n])
            buffers = self.frozen_adapter_buffers()
            saved = state.get("buffers", {})
            lacking = [n for n in buffers if n not in saved]
            if lacking:
                raise TrainError(f"{path}: checkpoint lacks the adapters' frozen tensors {', '.join(lacking[:3])}")
            for n, b in buffers.items():
                if b.shape != saved[n].shape:
                    raise TrainError(f"{path}: {n} has shape {tuple(saved[n].shape)}, model {tuple(b.shape)}")
                b.copy_(saved[n])
        for h in self.hooks:
            if h.name not in state.get("hooks", {}):
                raise TrainError(f"{path}: checkpoint lacks the state of {h.name}; start afresh with --overwrite")
            h.load_state_dict(state["hooks"][h.name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        set_rng_state(state["rng"])
        jsonl = self.tracker.log_dir / "metrics.jsonl"
        if self.info.is_main and jsonl.exists() and jsonl.stat().st_size > state.get("metrics_offset", 0):
            # Lines written after this checkpoint belong to steps that will be run again.
            with jsonl.open("r+b") as fh:
                fh.truncate(state.get("metrics_offset", 0))
        return True

    def _check_ranks_agree(self, path: Path, step: int | None) -> None:
        """Every rank must resume from the same step (or all start afresh): called once by each."""
        if not dist.same_on_all_ranks(-1 if step is None else step, self.info.device):
            mine = "found none" if step is None else f"found step {step}"
            raise TrainError(f"{path}: the ranks do not resume from the same checkpoint (rank {self.info.rank} {mine}); {dist.SHARED_FS_HINT}")

    # -- the loop ----------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        """Whether any rank was signalled; checked before a step touches any random state, so the
        checkpoint written on stopping resumes exactly where an uninterrupted run would be."""
        if self.stop_at_step is not None and self.step == self.stop_at_step:
            self.stop_requested = "SIGTERM"
        if not self.info.enabled:
            return self.stop_requested is not None
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.info.device)
        return dist.all_reduce_sum(flag).item() > 0

    def _sync_flags(self, loss: torch.Tensor, tag: int) -> tuple[float, bool]:
        """One all-reduce per step: mean loss, any non-finite loss, and a check that every rank
        trains the same sub-network (the sums of tag and tag² equal world·tag and world·tag²
        only when all tags agree)."""
        value = loss.detach().double()
        bad = 0.0 if torch.isfinite(value) else 1.0
        h = float(tag % (1 << 20))
        flags = torch.tensor([torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0).item(), bad, h, h * h],
                             dtype=torch.float64, device=value.device)
        flags = dist.all_reduce_sum(flags).cpu()
        w = self.info.world_size
        if flags[2].item() != w * h or flags[3].item() != w * h * h:
            raise TrainError(f"ranks sampled different sub-networks at step {self.step} (rank {self.info.rank})")
        return flags[0].item() / w, flags[1].item() > 0

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model(x)
        if self.mark_steps:  # CUDA graphs: the last step's outputs are done with, their memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with compile_errors(f"{self.desc}.compile"):
            return self.compiled(x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimisation step; returns the loss averaged over ranks."""
        cfg = self.cfg
        tag = 0
        if self.before_step is not None:
            tag = self.before_step(self.step) or 0
        self.scheduler.step_update(self.step)
        # Parts of at most micro_batch_size images, each loss weighted by its share of the batch:
        # the summed gradients are the whole batch's, only its activations never coexist.
        total = None
        for xs, ys in zip(x.split(cfg.micro_batch_size or len(x)), y.split(cfg.micro_batch_size or len(y))):
            with autocast_for(cfg.precision, self.info.device):
                logits = self._forward(xs)
                loss = self.criterion(logits.float(), ys)
                for h in self.hooks:
                    extra = h.extra_loss(self.model)
                    if extra is not None:
                        loss = loss + extra
            if len(ys) != len(y):
                loss = loss * (len(ys) / len(y))
            if self.fail_at_step is not None and self.step == self.fail_at_step:
                loss = loss * float("nan")
            self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        mean_loss, bad = self._sync_flags(total, tag)
        self.last_tag = tag
        if bad:  # before the optimizer step: the parameters are still those of the last good step
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainError(f"non-finite loss at step {self.step} (epoch {self.epoch}); "
                             f"nothing was written after the last good checkpoint")
        dist.average_gradients(self.params, self.info.world_size)
        if cfg.grad_clip or self.hooks:
            self.scaler.unscale_(self.optimizer)  # the hooks see the true gradients
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], cfg.grad_clip)
        for h in self.hooks:
            h.after_backward(self.model, self.step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for h in self.hooks:
            h.after_step(self.model, self.step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss

    def fit(self) -> str:
        """Train to the last epoch; returns ``"done"`` or the name of the signal that stopped it."""
        cfg, info = self.cfg, self.info
        train_mode(self.model)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, disable=not info.is_main,
                   dynamic_ncols=True, mininterval=1.0, leave=False)
        t0, seen = time.perf_counter(), 0
        try:
            while self.epoch < cfg.epochs:
                self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * cfg.batch_size)
                for x, y in self.loader:
                    if self._should_stop():
                        self.save()
                        return self.stop_requested or "SIGTERM"
                    x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
                    loss = self.train_step(x, y)
                    self.step += 1
                    self.batch_in_epoch += 1
                    seen += x.shape[0] * info.world_size
                    bar.update(1)
                    bar.set_postfix(epoch=self.epoch, loss=f"{loss:.4f}", refresh=False)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        dt = time.perf_counter() - t0
                        self.tracker.log(self.step, {"loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                                     "epoch": self.epoch, "images_per_sec": seen / max(dt, 1e-9),
                                                     **({"subnet_tag": self.last_tag} if self.before_step else {})})
                        t0, seen = time.perf_counter(), 0
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.on_eval is not None and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
                    metrics = self.on_eval(self.epoch, self.step)
                    self.tracker.log(self.step, metrics, kind="eval")
                    if info.is_main:
                        bar.write(f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
                self.save()
        finally:
            bar.close()
        return "done"

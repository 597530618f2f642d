"""torch.distributed set-up from torchrun's environment; every helper is a no-op in one process."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class DeviceError(ValueError):
    """The configured device is not there (a user error: the CLIs print it as one line)."""


def setup(device: str = "auto", key: str = "device") -> DistInfo:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU) and pick the device;
    ``key`` is the config key ``device`` came from, for the error when it is not there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{key}: cuda was asked for but torch sees no CUDA device (set it to cpu or auto)")
    index = local
    if use_cuda and local >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        if n != 1:
            raise DeviceError(f"{key}: this process has LOCAL_RANK {local} but {n} CUDA devices are visible; "
                              f"start at most {n} processes per node (torchrun --nproc_per_node)")
        index = 0  # a launcher that gives each process its own GPU (CUDA_VISIBLE_DEVICES) leaves one visible
    dev = torch.device("cuda", index) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


_held = False


@contextlib.contextmanager
def held_process_group():
    """Keep the process group across several stages run in one process (engine.sweep): torch's
    gloo and nccl groups cannot be joined again once destroyed, so cleanup() leaves it until the
    block ends."""
    global _held
    _held = True
    try:
        yield
    finally:
        _held = False
        cleanup()


def cleanup() -> None:
    if not _held and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# Where several nodes run one job, each reads output_dir through its own mount; a node that sees
# another (or no) copy of a checkpoint would resume a different run than its peers.
SHARED_FS_HINT = "under torchrun on several nodes, output_dir must be on a filesystem every node shares"


def same_on_all_ranks(value: int, device: torch.device) -> bool:
    """Whether every rank passed the same integer: one all-reduce of (v, v²), equal for all ranks
    exactly when (Σv)² = world · Σv². True in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    t = torch.tensor([float(value), float(value) ** 2], dtype=torch.float64, device=device)
    t = all_reduce_sum(t).cpu()
    return t[0].item() ** 2 == dist.get_world_size() * t[1].item()


def all_gather_object(obj):
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of the parameters this step used, in one flat all-reduce.

    Every rank trains the same sampled sub-network, so the set of parameters with a gradient
    is the same on all ranks; parameters outside it are skipped (DDP would need
    find_unused_parameters for that, and a changing graph every step).
    """
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n

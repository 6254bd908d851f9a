"""Single-process or torchrun (DistributedDataParallel) execution, with no code change.

Under `torchrun --nproc-per-node N` the env vars WORLD_SIZE/RANK/LOCAL_RANK are set and we
join a process group (nccl on CUDA, gloo on CPU); otherwise everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SlimError


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CTX: DistContext | None = None


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SlimError("--torch-device cuda was asked for but torch sees no CUDA device")
        return torch.device("cuda", local_rank if name == "cuda" else int(name.split(":")[1]))
    if name != "cpu":
        raise SlimError(f"--torch-device must be auto, cpu or cuda[:N], not '{name}'")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group if there is one; idempotent."""
    global _CTX
    if _CTX is not None:
        return _CTX
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    _CTX = DistContext(rank, world, local_rank, dev)
    return _CTX


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()



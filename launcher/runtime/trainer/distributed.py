"""The worker's view of the distributed environment: its rank, device and the few collectives
the trainer makes itself (everything else goes through DeepSpeed)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    on_gpu: bool


def init_distributed() -> WorkerContext:
    """Join the process group described by the environment (gloo on CPU, NCCL on GPU)."""
    import deepspeed

    on_gpu = torch.cuda.is_available()
    # Always: DeepSpeed's comm layer wraps an existing process group (Ray Train makes one) but
    # reports world size 1 unless initialised itself.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return WorkerContext(dist.get_rank(), dist.get_world_size(), local_rank, device, on_gpu)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over every rank, in float64 so that token counts stay exact."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def peak_memory(ctx: WorkerContext) -> int:
    """Peak bytes on this rank's device (CUDA allocator) or of this process (RSS), max over ranks."""
    if ctx.on_gpu:
        mine = torch.cuda.max_memory_allocated(ctx.device)
    else:
        import resource

        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = torch.tensor([float(mine)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())

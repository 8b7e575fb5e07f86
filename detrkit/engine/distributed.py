"""torchrun / DistributedDataParallel helpers (gloo on CPU, nccl on CUDA).

Everything here degrades to a single process when torchrun's environment variables are absent, so
the training loop has one code path.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str) -> bool:
    """Join the process group torchrun describes (if any). Returns True when running distributed."""
    if env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    log.info("rank %d/%d joined the %s process group", rank(), world_size(), backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_max(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise maximum over ranks (flags: any rank asking to stop/skip makes all of them do it)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's module (in place)."""
    if is_distributed():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The DistributedDataParallel runner of `model`. Trainable BN on GPUs gets batch statistics over the
    global batch (SyncBatchNorm keeps BatchNorm2d's parameters and buffers, so checkpoints are unchanged;
    `model` is converted in place). It has no CPU kernel; on gloo each process normalises by its own batch
    and DDP broadcasts rank 0's running statistics."""
    if model.cfg.backbone_norm == "batch" and device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

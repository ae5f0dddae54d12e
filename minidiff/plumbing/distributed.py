"""Several processes under torchrun: this process's rank and device, the process group, barriers.

References: torchrun's WORLD_SIZE / RANK / LOCAL_RANK environment; torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minidiff.plumbing.device import check_available, resolve_device


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_context(device: str | None = None, *, join: bool = True) -> DistContext:
    """Pick the device; under torchrun and `join`, join the process group (scripts: once all data is read)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device, local_rank)
    check_available(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if join and world > 1 and not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU at once (no guess, no extra context)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return DistContext(rank, world, local_rank, device)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def finish_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

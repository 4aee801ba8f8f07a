"""Scale-out for QAT: process group, deterministic sharding, global-batch bookkeeping.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`setup` starts the process group — NCCL
when the job runs on CUDA, gloo on CPU — unless the caller already did. Every process sees the same global
batch sequence as a single-process run of the same ``batch_size``:

* the epoch order is ``torch.utils.data.DistributedSampler`` (``shuffle=True, seed, drop_last=True``,
  ``set_epoch(epoch)``): one ``randperm`` per epoch, process ``r`` takes positions ``r, r + W, …``;
* process ``r``'s ``i``-th local batch of ``B / W`` images is then exactly global batch ``i`` of the
  single-process run, positions ``r, r + W, …`` inside it (so augmentation is drawn for the whole global
  batch from a per-step generator and each process takes its positions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ..errors import InputError, UsageError

__all__ = ["DistContext", "setup", "teardown", "ShardPlan", "shard_plan", "epoch_indices", "all_sum"]


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    started_here: bool  # this module started the process group (and ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise UsageError("device='cuda' but no CUDA device is available; use device='cpu' or 'auto'")
    if pref in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun (or the caller) set up; a plain process is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistContext(rank, world, local, _device(device, local), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, 0, _device(device, 0), False)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank, world, local, dev, True)


def teardown(ctx: DistContext) -> None:
    if ctx.started_here and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ShardPlan:
    global_batch: int
    local_batch: int
    steps_per_epoch: int
    world_size: int


def shard_plan(num_images: int, global_batch: int, world_size: int) -> ShardPlan:
    """Check that ``world_size`` processes can share batches of ``global_batch`` from ``num_images``."""
    if world_size > num_images:
        raise UsageError(f"{world_size} processes but only {num_images} training images: "
                         f"use at most {num_images} processes")
    if world_size > global_batch:
        raise UsageError(f"{world_size} processes cannot share a global batch of {global_batch} "
                         f"(each needs at least one image): use at most {global_batch} processes "
                         f"or batch_size ≥ {world_size}")
    if global_batch % world_size:
        raise UsageError(f"batch_size {global_batch} does not divide by the {world_size} processes; "
                         f"use a multiple of {world_size}")
    steps = num_images // global_batch
    if steps < 1:
        raise InputError(f"{num_images} training images cannot fill one batch of {global_batch}; "
                         "lower batch_size or use more data")
    return ShardPlan(global_batch, global_batch // world_size, steps, world_size)


class _Range(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def epoch_indices(num_images: int, plan: ShardPlan, rank: int, epoch: int, seed: int) -> torch.Tensor:
    """This process's image indices for ``epoch``, ``plan.steps_per_epoch × plan.local_batch`` of them."""
    sampler = DistributedSampler(_Range(num_images), num_replicas=plan.world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.int64)
    return idx[: plan.steps_per_epoch * plan.local_batch]


def all_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over processes (in place; a no-op for one process)."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

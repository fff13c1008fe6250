"""Data-parallel training on PyTorch's own collectives (launched with torchrun).

`torchrun --nproc_per_node N -m saelab train ...` starts N processes; each reads a disjoint
part of the data (every N-th cache shard, or every N-th document on the fly), all hold the same
SAE, wrapped in torch's DistributedDataParallel (its gradients are averaged in buckets,
overlapping the backward; gloo on CPU, NCCL on GPU), so every rank takes the same optimiser step.
`World` carries the other collectives: latent statistics, loss denominators over the global
batch, checkpoint gathering. Only rank 0 writes dictionaries, checkpoints, reports and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank r of `size` (size 1: a plain single process)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor, mean: bool = False) -> torch.Tensor:
        """Sum (or average) `t` over all ranks in place; a no-op in a single process."""
        if self.size > 1:
            dist.all_reduce(t)
            if mean:
                t /= self.size
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite `t` with rank 0's value."""
        if self.size > 1:
            dist.broadcast(t, src=0)
        return t

    def gather_object(self, obj: object) -> list:
        """[rank 0's obj, rank 1's, ...] on every rank."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the job's process group (torch warns at exit about one left open)."""
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device: str = "cpu") -> World:
    """Join the torchrun job if there is one (WORLD_SIZE > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(dist.get_rank(), dist.get_world_size())

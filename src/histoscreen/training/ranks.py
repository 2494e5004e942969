"""Ranks of a torchrun job: who joins which process group, who takes which share of a batch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from histoscreen.runtime.device import pick_device


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job: rank `rank` of `world` (1 without torchrun).

    Every rank trains on its share of each global batch; rank 0 alone validates and writes
    checkpoints, metrics.jsonl and the model."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def join_torchrun(requested_device: str) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on CUDA), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), pick_device(requested_device)
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def share_of(count: int, ranks: Ranks) -> slice:
    """This rank's contiguous part of a batch of `count` (the whole batch when alone)."""
    base, extra = divmod(count, ranks.world)
    start = ranks.rank * base + min(ranks.rank, extra)
    return slice(start, start + base + (ranks.rank < extra))


def gather_rng_states(ranks: Ranks) -> list[torch.Tensor]:
    """Every rank's torch generator state (dropout draws differ between ranks), for rank 0 to save."""
    state = torch.get_rng_state()
    if ranks.world == 1:
        return [state]
    gathered: list = [None] * ranks.world
    torch.distributed.all_gather_object(gathered, state)
    return gathered

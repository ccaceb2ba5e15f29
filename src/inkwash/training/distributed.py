"""Multi-process training on PyTorch's own engine: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK,
and we join the process group (gloo on CPU, NCCL on GPU). A single process is a world of one, and
every helper here is a no-op for it, so the trainer has one code path."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is the local rank's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but PyTorch sees no GPU")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU of its own (PyTorch sees {torch.cuda.device_count()}); "
                "start at most one process per GPU, or use --device cpu"
            )
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")


def init_world(device: str = "auto") -> World:
    """Join the torchrun process group if launched by torchrun; otherwise a world of one."""
    if not launched_by_torchrun():
        return World(device=resolve_device(device))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if target.type == "cuda" and local_size > torch.cuda.device_count():
        # NCCL needs one GPU per process ("Duplicate GPU detected"); sharing one would also be slower.
        # Every rank sees the same counts, so all of them stop here instead of hanging in a collective.
        raise ValueError(
            f"torchrun started {local_size} processes on this machine but PyTorch sees "
            f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node {torch.cuda.device_count()} or fewer, "
            "or --device cpu to train on the CPU (gloo)"
        )
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=size)
    return World(rank=rank, size=size, local_rank=local_rank, device=target)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        if world.device.type == "cuda":
            dist.barrier(device_ids=[world.device.index])
        else:
            dist.barrier()


def gather_bytes(world: World, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a fixed-size uint8 tensor (e.g. an RNG state), in rank order."""
    if not world.distributed:
        return [tensor]
    local = tensor.to(world.device)
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return [part.cpu() for part in parts]

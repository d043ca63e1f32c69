"""torchrun environment, process groups, rank-0 logging and per-sample seeds."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and device of this process (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> tuple[int, int, int] | None:
    """Return (rank, world size, local rank) when launched by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world_size, local_rank


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """Pick the compute device: CUDA (this rank's GPU) when asked for or available, else CPU."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from fae_cli.errors import FaeError

            raise FaeError("run.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Set up the process group under torchrun (nccl on CUDA, gloo on CPU); no-op otherwise."""
    found = torchrun_env()
    if found is None:
        return DistEnv(device=pick_device(device_preference))
    rank, world_size, local_rank = found
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    quiet_other_ranks(env)
    return env


@contextlib.contextmanager
def distributed_session(device_preference: str = "auto") -> Iterator[DistEnv]:
    """Yield this process's DistEnv for one stage, tearing down only a process group it set up.

    A stage called inside `fae run` finds the group already set up and leaves it for the next
    stage; a stage run on its own sets it up and destroys it when it returns or raises.
    """
    existed = dist.is_available() and dist.is_initialized()
    env = init_distributed(device_preference)
    try:
        yield env
    finally:
        if not existed:
            cleanup()


def current_env() -> DistEnv:
    """Describe the already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        found = torchrun_env()
        local_rank = found[2] if found else dist.get_rank()
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    return DistEnv()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _MainRankOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return record.levelno >= logging.ERROR


def quiet_other_ranks(env: DistEnv) -> None:
    """Let only rank 0 log below ERROR, so a job's log reads like a single process's."""
    if env.is_main:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_MainRankOnly())


def sample_seed(seed: int, index: int) -> int:
    """Return a 63-bit seed derived from (seed, index) alone, independent of rank and batch."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Return a torch.Generator seeded for sample `index` of a run with seed `seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(sample_seed(seed, index))
    return generator


def shard_indices(count: int, rank: int, world_size: int) -> range:
    """Return this rank's contiguous share of `range(count)`: every index exactly once, no padding."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return range(start, stop)

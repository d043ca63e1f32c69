"""Deterministic data order: shuffled epochs from (seed, epoch), split over ranks and micro-batches."""

from __future__ import annotations

import torch

from fae_cli.training.distributed import sample_seed, shard_indices


class DataOrder:
    """Global batches of dataset indices, epoch after epoch, with a resumable position.

    Epoch e is `randperm(size)` from a generator seeded by (seed, e); its last partial batch is
    dropped, as DataLoader's `drop_last` does. The position (epoch, offset) is all a checkpoint
    needs to continue the same sequence, on any number of ranks.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0) -> None:
        if size < batch_size:
            raise ValueError(f"dataset of {size} samples is smaller than one batch of {batch_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.offset = offset
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
            self._perm = torch.randperm(self.size, generator=generator)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> torch.Tensor:
        """Return the next global batch (LongTensor of `batch_size` indices) and advance."""
        if self.offset + self.batch_size > self.size:
            self.epoch += 1
            self.offset = 0
        batch = self.permutation(self.epoch)[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def copy(self) -> DataOrder:
        return DataOrder(self.size, self.batch_size, self.seed, self.epoch, self.offset)


def micro_batches(batch: torch.Tensor, rank: int, world_size: int, grad_accum: int) -> list[torch.Tensor]:
    """Split a global batch into this rank's contiguous share, then into `grad_accum` micro-batches.

    Sizes differ by at most one when the batch does not divide evenly. The trainer weights each
    micro-batch by its size, so the gradient is still the mean over the global batch.
    """
    own = shard_indices(len(batch), rank, world_size)
    share = batch[own.start : own.stop]
    parts = []
    for micro in range(grad_accum):
        span = shard_indices(len(share), micro, grad_accum)
        parts.append(share[span.start : span.stop])
    return parts

"""Which samples each batch of each epoch holds, on each rank: a function of (seed, epoch) only.

Every input pipeline takes its batches from a ``BatchPlan``, so that an epoch can be restarted at any
batch and see exactly what an uninterrupted run would have seen, and so that the ranks of a
distributed run together see exactly what one process would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from several non-negative integers (seed, epoch, batch)."""
    gen = torch.Generator()
    gen.manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1, np.uint64)[0] >> 1))
    return gen


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one training epoch: a function of (seed, epoch) only."""
    return torch.randperm(num_samples, generator=generator(seed, epoch))


class BatchPlan:
    """The batches of a split.

    Training: the epoch's permutation (a function of seed and epoch) cut into global batches of
    ``batch_size * world_size``, the last partial one dropped; rank r takes the r-th slice of each, so
    the ranks together see exactly what a single process would. Evaluation: the data in order, every
    image once; rank r takes every world_size-th image of each global batch (counts are summed).
    """

    def __init__(self, num_samples: int, batch_size: int, train: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.train, self.seed = num_samples, batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.global_batch
        return -(-self.num_samples // self.global_batch)

    def global_batches(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(batch number, sample indices of the whole global batch) of batches ``start`` to ``stop`` (excluded;
        None: the end)."""
        order = epoch_order(self.num_samples, self.seed, epoch) if self.train else torch.arange(self.num_samples)
        for i in range(start, len(self) if stop is None else min(stop, len(self))):
            yield i, order[i * self.global_batch : (i + 1) * self.global_batch]

    def rank_part(self) -> slice:
        """This rank's share of a global batch (positions in it)."""
        if self.train:
            return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return slice(self.rank, None, self.world_size)

    def close(self) -> None:
        """Release what the batches hold beyond memory (worker processes); nothing here."""

    def rank_batches(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[list[int]]:
        """This rank's sample indices of batches ``start`` to ``stop``."""
        part = self.rank_part()
        for _, idx in self.global_batches(epoch, start, stop):
            yield idx[part].tolist()

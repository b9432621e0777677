"""The training order of a map-style dataset, and where a resumed epoch picks it up.

``EpochOrder`` draws one permutation of ``0 .. size-1`` per epoch from a
generator seeded by ``(seed, epoch)`` (the epoch comes from ``set_epoch``,
which Lightning calls before every epoch) and deals it out over the run's
processes as ``DistributedSampler`` does: process r of W takes positions r,
r + W, ... (the order padded to a multiple of W with its first images).
Being a ``DistributedSampler``, Lightning uses it as it is instead of
wrapping it in one of its own, so the order of an epoch is the same for any
number of processes and for every resume of the run.

A run resumed in the middle of an epoch (``dforge train --resume``) restarts
the epoch's loader, and Lightning ends the epoch after the batches it still
owes. ``resume(epoch, done)`` says that the first ``done`` images of that
epoch's order were trained on already: the order of that epoch is rotated so
that they come last, where the epoch's end cuts them off. With n batches of
B done per process on W' processes, done = n W' B is exactly the positions
those batches covered, so the remaining batches are the epoch's unseen
images, however many processes the resumed run has (``epoch_position.py``
counts n for them). Other epochs are not changed.

    ========  ===============================================================
    order     randperm(size, generator seeded by SeedSequence([seed, epoch]))
    resumed   order[done % size:] + order[:done % size] in the resumed epoch
    process   (order + order[:pad])[rank::world], pad to a multiple of world
    ========  ===============================================================
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class EpochOrder(DistributedSampler):
    """A permutation per epoch seeded by ``(seed, epoch)``, rotated past the images a resumed epoch has done,
    dealt out to process ``rank`` of ``world``."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        super().__init__(range(size), num_replicas=world, rank=rank, shuffle=False, seed=seed, drop_last=False)
        self.resumed: Optional[Tuple[int, int]] = None  # (epoch, images of its order already trained on)

    def resume(self, epoch: int, done: int) -> None:
        """The first ``done`` images of ``epoch``'s order were trained on before the checkpoint."""
        self.resumed = (epoch, done)

    def order(self, epoch: int) -> list[int]:
        """``epoch``'s permutation of the whole dataset, rotated if it is the resumed epoch."""
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        size = len(self.dataset)
        order = torch.randperm(size, generator=generator).tolist()
        if self.resumed is not None and self.resumed[0] == epoch and size:
            done = self.resumed[1] % size
            order = order[done:] + order[:done]
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        while order and len(order) < self.total_size:  # pad as DistributedSampler does
            order += order[:self.total_size - len(order)]
        return iter(order[self.rank:self.total_size:self.num_replicas])

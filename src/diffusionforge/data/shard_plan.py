"""Which sample of a set of shards each (rank, worker) reads in an epoch, and where an epoch stands.

Pure bookkeeping over sample counts (numpy, no files): ``shards.ShardStream``
reads what this plans, and its position in the Lightning checkpoint is a
list of ranges of this plan's epoch order.

Notation:

| symbol | meaning                                                                  |
|--------|--------------------------------------------------------------------------|
| N      | samples in the split; sample ids 0..N-1 in the order of the index        |
| t      | stream index: the t-th sample of the shards read one after the other in  |
|        | the epoch's shard order                                                  |
| p      | epoch position: the order the epoch delivers samples in                  |
| K      | ``SHUFFLE_BLOCK``: samples permuted together                             |
| R, W, B| ranks (world size), DataLoader workers per rank, batch size              |

Epoch ``e`` with seed ``s`` (``EpochOrder``): the shards are permuted with a
generator seeded by (s, e); each shard's samples are cut into blocks of K
consecutive samples and each block is permuted. Position p holds stream
index ``sigma[p]`` (in the same block), which is sample id ``ids[p]``. A
worker thus reads its shards front to back and holds at most one block of
raw samples in memory. ``dforge shard`` writes the samples in a random
order, so blocks are random draws already; the block shuffle changes the
batches from epoch to epoch.

Split (``worker_positions``): the positions still to deliver this epoch
(every p whose id is in the split's ``[lo, hi)``, less the consumed ranges),
in order, are cut into R contiguous runs, one per rank; each run into
batches of B; the batches into W contiguous runs, one per worker. With
``drop_last`` (training) every rank gets the same number of whole batches
(DDP steps together) and the last ``< R * B`` samples wait for another
epoch; without it every sample is planned exactly once. Each (rank, worker)
reads a disjoint set of samples from a contiguous run of the epoch's shards:
with more shards than R * W, neighbours share at most the shard at their
boundary (one reads its start, the other the rest); with fewer, the slots
split shards by samples.

Position: a DataLoader with W workers hands out their batches in turn
(worker 0, 1, ..., W-1, 0, ...; a worker that has run out is passed over).
So k batches taken by a rank are the first ``taken_per_worker(counts, k)``
batches of each worker, one contiguous run of positions each: the position
after k batches on every rank is the consumed ranges plus R * W runs
(``consumed_after``). Resuming with other R, W or B re-plans the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SHUFFLE_BLOCK = 256  # K: samples permuted together (raw bytes a worker holds at once)
Ranges = list[list[int]]  # sorted, disjoint [start, stop) ranges of epoch positions


@dataclass(frozen=True)
class EpochOrder:
    """The order of one epoch: ``sigma[p]`` stream index and ``ids[p]`` sample id of position p."""

    shard_order: np.ndarray  # (S,) shard indices in the order they are read
    starts: np.ndarray  # (S + 1,) stream index of each shard's first sample, in reading order
    sigma: np.ndarray  # (N,) stream index of position p
    ids: np.ndarray  # (N,) sample id of position p


def epoch_order(counts: Sequence[int], seed: int, epoch: int, shuffle: bool = True,
                block: int = SHUFFLE_BLOCK) -> EpochOrder:
    """The shard order and block permutation of epoch ``epoch`` (the same on every rank and worker)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    rng = np.random.default_rng([seed, epoch])
    shard_order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
    starts = np.concatenate([[0], np.cumsum(counts[shard_order])])
    first_id = np.concatenate([[0], np.cumsum(counts)])[:-1]  # id of each shard's first sample
    stream_ids = (np.repeat(first_id[shard_order] - starts[:-1], counts[shard_order])
                  + np.arange(total))  # (N,) id of stream index t
    if shuffle:
        shard_of = np.repeat(np.arange(len(counts)), counts[shard_order])  # reading index j of stream index t
        block_of = (np.arange(total) - starts[shard_of]) // block  # block within its shard
        sigma = np.lexsort((rng.random(total), block_of, shard_of))  # sorted by (shard, block, random key)
    else:
        sigma = np.arange(total)
    return EpochOrder(shard_order, starts, sigma, stream_ids[sigma])


def open_positions(order: EpochOrder, lo: int, hi: int, consumed: Ranges) -> np.ndarray:
    """Positions, ascending, whose sample id is in [lo, hi) and that no consumed range holds."""
    keep = (order.ids >= lo) & (order.ids < hi)
    for start, stop in consumed:
        keep[start:stop] = False
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class Split:
    """How an epoch's open positions are dealt out: R ranks, W workers each, batches of B."""

    world_size: int = 1
    num_workers: int = 1  # DataLoader workers (1 when it loads in the main process)
    batch_size: int = 1
    drop_last: bool = True  # equal whole batches on every rank (training)

    def rank_positions(self, open_: np.ndarray, rank: int) -> np.ndarray:
        """The contiguous run of ``open_`` that ``rank`` delivers."""
        count = len(open_)
        if self.drop_last:
            per_rank = count // self.world_size
            per_rank -= per_rank % self.batch_size
            return open_[rank * per_rank:(rank + 1) * per_rank]
        return open_[rank * count // self.world_size:(rank + 1) * count // self.world_size]

    def worker_batches(self, length: int) -> list[tuple[int, int]]:
        """(first batch, end batch) of each worker over a rank's ``length`` positions."""
        batches = -(-length // self.batch_size)
        workers = self.num_workers
        return [(w * batches // workers, (w + 1) * batches // workers) for w in range(workers)]

    def worker_positions(self, open_: np.ndarray, rank: int, worker: int) -> np.ndarray:
        """The positions (rank, worker) delivers, in order."""
        mine = self.rank_positions(open_, rank)
        first, end = self.worker_batches(len(mine))[worker]
        return mine[first * self.batch_size:end * self.batch_size]

    def consumed_after(self, open_: np.ndarray, taken: int) -> Ranges:
        """The ranges of positions delivered once every rank has taken ``taken`` batches."""
        runs = []
        for rank in range(self.world_size):
            mine = self.rank_positions(open_, rank)
            spans = self.worker_batches(len(mine))
            counts = [end - first for first, end in spans]
            for (first, _), done in zip(spans, taken_per_worker(counts, taken)):
                run = mine[first * self.batch_size:(first + done) * self.batch_size]
                if len(run):  # positions between run's ends that are not in it were closed already
                    runs.append([int(run[0]), int(run[-1]) + 1])
        return runs


def taken_per_worker(counts: Sequence[int], taken: int) -> list[int]:
    """Batches taken from each worker after ``taken`` in all, dealt in turn to workers with batches left."""
    done = [0] * len(counts)
    remaining = min(taken, sum(counts))
    while remaining:
        for worker, count in enumerate(counts):
            if remaining and done[worker] < count:
                done[worker] += 1
                remaining -= 1
    return done


def merge_ranges(*lists: Ranges) -> Ranges:
    """The union of range lists as sorted, disjoint, non-touching [start, stop) ranges."""
    merged: Ranges = []
    for start, stop in sorted((int(a), int(b)) for ranges in lists for a, b in ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged

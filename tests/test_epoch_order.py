"""EpochOrder: one permutation per (seed, epoch), dealt out as DistributedSampler deals, rotated on a resume.

The end-to-end check (a run resumed with 1 or 2 processes trains the interrupted epoch's unseen images) is
``tests/test_scaling.py::test_resume_with_another_number_of_processes``.
"""

import pytest
from torch.utils.data import DistributedSampler

from diffusionforge.data.epoch_order import EpochOrder


def epoch_of(sampler: EpochOrder, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_epoch_is_a_permutation_of_its_seed_and_epoch():
    a, b = EpochOrder(50, seed=3), EpochOrder(50, seed=3)
    assert sorted(epoch_of(a, 0)) == list(range(50))
    assert epoch_of(a, 0) == epoch_of(b, 0) == epoch_of(a, 0)  # the same for every process and every resume
    assert epoch_of(a, 1) != epoch_of(a, 0)
    assert epoch_of(EpochOrder(50, seed=4), 0) != epoch_of(a, 0)
    assert len(a) == 50


@pytest.mark.parametrize("size, world", [(50, 2), (50, 3), (7, 4), (2, 3)])
def test_processes_deal_the_epoch_as_distributed_sampler_does(size, world):
    order = EpochOrder(size, seed=0).order(5)
    for rank in range(world):
        ours = EpochOrder(size, seed=0, rank=rank, world=world)
        theirs = DistributedSampler(order, num_replicas=world, rank=rank, shuffle=False)
        assert epoch_of(ours, 5) == [order[i] for i in theirs] and len(ours) == len(theirs)
    dealt = {i for rank in range(world) for i in epoch_of(EpochOrder(size, 0, rank, world), 5)}
    assert dealt == set(range(size))


def test_a_resumed_epoch_puts_the_done_images_last_and_leaves_other_epochs():
    full = EpochOrder(48, seed=1).order(2)
    resumed = EpochOrder(48, seed=1)
    resumed.resume(epoch=2, done=20)
    assert resumed.order(2) == full[20:] + full[:20]
    assert resumed.order(3) == EpochOrder(48, seed=1).order(3)
    resumed.resume(epoch=2, done=48 + 4)  # a count past the end wraps round
    assert resumed.order(2) == full[4:] + full[:4]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3), (3, 3)])
def test_the_batches_still_owed_are_the_unseen_images(before, after):
    """n batches of B per process done on `before` processes; the resume on `after` owes the rest of the epoch
    (Lightning's count, rescaled by epoch_position.py) and trains on images not seen before, and on all of them
    but the last incomplete batch."""
    size, batch, n = 96, 4, 3

    def batches(world, done=None) -> list[list[list[int]]]:
        """Each process's batches of epoch 0 (a resumed one's when ``done`` is given)."""
        orders = []
        for rank in range(world):
            sampler = EpochOrder(size, seed=0, rank=rank, world=world)
            if done is not None:
                sampler.resume(0, done)
            orders.append(epoch_of(sampler, 0))
        return [[order[k * batch:(k + 1) * batch] for k in range(len(order) // batch)] for order in orders]

    seen = {i for process in batches(before) for b in process[:n] for i in b}
    resumed_at = n * before // after
    rest = batches(after, done=resumed_at * after * batch)
    owed = len(rest[0]) - resumed_at
    later = [i for process in rest for b in process[:owed] for i in b]
    assert len(later) == len(set(later)) == owed * after * batch
    assert len(seen & set(later)) == n * before * batch - resumed_at * after * batch  # only an unsplittable batch
    assert size - len(seen | set(later)) < after * batch  # everything but the epoch's tail

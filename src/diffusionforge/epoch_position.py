"""A resumed run's position in its epoch, with the same or another number of processes.

A checkpoint is one consolidated file whatever wrote it (one process, DDP,
or FSDP gathering its shards on rank 0): the weights, the EMA and AdamW's
state keyed by parameter index, so any world size loads it. What depends on
the world size is the data position. Lightning's fit loop keeps it as
batches *per process* done in the current epoch (``batch_progress.current``)
and, for a map-style dataset, restarts the epoch's sampler and lets the
epoch end after the batches it still owes. With W processes of B images
each, a count of n batches is ``n * W * B`` images of the epoch.

``EpochPosition`` records W in the checkpoint (``checkpoint["world_size"]``)
and, when a run resumes with W' processes, rescales the epoch's batch counts
to ``floor(n * W / W')`` so the epoch still ends after one pass over the data
(2 -> 1: 4 of 8 batches per process become 8 of 16; 1 -> 2: 5 of 16 become
2 of 8, the odd batch's images counted as not yet seen). Step, epoch, EMA,
optimiser and learning-rate schedule carry over unchanged.

Lightning does not fast-forward a map-style sampler: it restarts the epoch's
loader. So every resume, with W' = W too, tells the datamodule how many
images of the epoch's order are done (``ImageDataModule.resume_epoch``:
``n' * W' * B`` with n' the rescaled count), and its ``EpochOrder`` (the
same permutation for any W, seeded by seed and epoch) moves them to the end:
the batches still owed are the epoch's unseen images. A shard stream
(``data.name=shards``) keeps its own position in the datamodule's state and
is left alone here.
"""

from __future__ import annotations

from typing import Optional

import lightning as L

WORLD_SIZE_KEY = "world_size"  # in the Lightning checkpoint: the number of processes that wrote it
BATCH_PROGRESS = "epoch_loop.batch_progress"  # the fit loop's batch counters in checkpoint["loops"]["fit_loop"]


def batch_progress(checkpoint: dict) -> Optional[dict]:
    """The fit loop's batch counters in a Lightning checkpoint (None in one without loops)."""
    return checkpoint.get("loops", {}).get("fit_loop", {}).get(BATCH_PROGRESS)


def rescale_epoch_position(checkpoint: dict, saved_world: int, world: int) -> None:
    """Batches done in the current epoch, counted for ``world`` processes instead of ``saved_world`` (in place).

    All ``current`` counters move by the same amount, so their differences (a
    batch started but not completed when the checkpoint was written) stay as
    Lightning left them; the run's ``total`` counters are unchanged.
    """
    progress = batch_progress(checkpoint)
    if not progress or saved_world == world:
        return
    current = progress["current"]
    done = current["processed"]
    shift = max(done * saved_world // world - done, -min(current.values()))
    for counter in current:
        current[counter] += shift


def images_done(checkpoint: dict, world: int, batch_size: int) -> int:
    """Images of the current epoch's order that ``world`` processes of ``batch_size`` have trained on, by the
    checkpoint's (rescaled) batch count."""
    progress = batch_progress(checkpoint)
    return progress["current"]["processed"] * world * batch_size if progress else 0


class EpochPosition(L.Callback):
    """Writes the world size into each checkpoint; on a resume, rescales the epoch position of one written with
    another and tells the datamodule where in the epoch's order training goes on."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[WORLD_SIZE_KEY] = trainer.world_size

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "shards", None) is not None:
            return  # a shard stream keeps its own position
        saved = checkpoint.get(WORLD_SIZE_KEY)
        if saved is not None:  # an older checkpoint has no record: the same world size
            rescale_epoch_position(checkpoint, int(saved), trainer.world_size)
        if hasattr(datamodule, "resume_epoch"):
            done = images_done(checkpoint, trainer.world_size, datamodule.config.batch_size)
            datamodule.resume_epoch(int(checkpoint.get("epoch", 0)), done)

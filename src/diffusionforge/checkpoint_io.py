"""Lightning checkpoints written atomically, keeping the previous one.

``AtomicCheckpointIO.save_checkpoint(checkpoint, path)``:

    1. refuse a model state holding NaN or inf (the last good file stays);
    2. torch.save to ``.last.ckpt.tmp`` beside the target, flushed to disk;
    3. hard-link the current ``last.ckpt`` as ``last-prev.ckpt`` (``checkpoints.keep_previous``);
    4. rename the temporary file onto ``last.ckpt``.

A process killed at any point leaves a complete ``last.ckpt`` (old or new).
ModelCheckpoint(save_last=True, save_top_k=0) saves ``last.ckpt`` in place
each time (the path is unchanged, so it removes nothing); Lightning's
``remove_checkpoint`` is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .checkpoints import keep_previous
from .errors import TrainingError
from .utils.atomic import atomic_path
from .weights import first_nonfinite


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)  # raises TypeError
        path = Path(path)
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise TrainingError(f"{path}: not overwritten: the model's tensor '{bad}' holds non-finite "
                                "values (NaN or inf); the previous checkpoint is kept")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            keep_previous(path)
        sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """fsync a directory so a rename in it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

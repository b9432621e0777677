"""Lightning checkpoint files of a run: the kept previous one, and what `--resume` may load.

A run keeps two checkpoints: ``checkpoints/last.ckpt`` and, from the save
before it, ``checkpoints/last-prev.ckpt`` (see ``checkpoint_io``). Before a
resume touches anything, ``resume_checkpoint`` reads the checkpoint the way
Lightning will (``weights_only=True``, tensors memory-mapped, so nothing is
copied) and turns every problem into one line:

    payload   objects that are not plain tensors      -> refused, never executed
    corrupt   truncated / not a zip / bad pickle      -> last-prev.ckpt if it reads, else refused
    foreign   not a Lightning checkpoint              -> refused
"""

from __future__ import annotations

import os
import pickle
import pickletools
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .errors import CheckpointError
from .utils.atomic import temporary_name
from .weights import check_state_fits

PREVIOUS_SUFFIX = "-prev"  # last.ckpt -> last-prev.ckpt
WEIGHTS_ONLY_FAILURE = "Weights only load failed"  # how torch.load(weights_only=True) refuses a file
IMPORT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def previous_name(path: Path) -> Path:
    """checkpoints/last.ckpt -> checkpoints/last-prev.ckpt."""
    return path.with_name(f"{path.stem}{PREVIOUS_SUFFIX}{path.suffix}")


def keep_previous(path: Path) -> None:
    """Make the complete checkpoint now at ``path`` also ``previous_name(path)``, atomically.

    A hard link (no copy) to a temporary name renamed over the old previous
    checkpoint; ``path`` itself stays in place, so a complete checkpoint
    exists at every instant. A file at ``path`` that is not a complete zip
    archive (a truncated checkpoint a resume fell back from) is not kept.
    """
    if not path.is_file() or not zipfile.is_zipfile(path):
        return
    previous = previous_name(path)
    tmp = temporary_name(previous)
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


class Unreadable(Exception):
    """A checkpoint file that cannot be read (truncated, corrupt); its reason in one line."""


class ResumePoint(NamedTuple):
    path: Path  # the checkpoint to pass to trainer.fit(ckpt_path=...)
    checkpoint: dict[str, Any]  # its contents, tensors memory-mapped (shapes for a fit check)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True) without copying tensors; Unreadable or CheckpointError."""
    try:
        mmap = zipfile.is_zipfile(path)  # torch.save's format; memory-map its tensors
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if WEIGHTS_ONLY_FAILURE in str(err) and ("GLOBAL" in str(err) or imports_objects(path)):
            raise CheckpointError(f"{path}: the checkpoint holds objects that are not plain tensors "
                                  "and will not be loaded (nothing in it was executed)") from None
        raise Unreadable("not a PyTorch checkpoint" if WEIGHTS_ONLY_FAILURE in str(err)
                         else _first_line(err)) from None
    except Exception as err:  # OSError, the zip reader's RuntimeError, EOFError, ...: any bad bytes
        raise Unreadable(_first_line(err)) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint of a dforge run (no state_dict)")
    return checkpoint


def imports_objects(path: Path) -> bool:
    """Whether path is a complete pickle stream that imports or builds objects.

    ``pickletools.genops`` only decodes opcodes, it never executes them. Tells
    a pickle carrying a payload (protocol 4 and 5 ones, which the weights-only
    loader rejects by their framing before it sees the import) from garbage.
    """
    try:
        with open(path, "rb") as f:
            return any(op.name in IMPORT_OPCODES for op, _, _ in pickletools.genops(f))
    except Exception:  # not a pickle stream: truncated or garbage
        return False


def resume_checkpoint(last: Path) -> ResumePoint:
    """``last`` if it reads, else its kept previous checkpoint (with a notice on stderr)."""
    try:
        return ResumePoint(last, read_checkpoint(last))
    except Unreadable as err:
        reason = f"{last}: checkpoint is truncated or corrupt ({err})"
    previous = previous_name(last)
    if not previous.is_file():
        raise CheckpointError(f"{reason}; no previous checkpoint ({previous.name}) to fall back to")
    try:
        checkpoint = read_checkpoint(previous)
    except Unreadable as err:
        raise CheckpointError(f"{reason}; the previous checkpoint {previous.name} "
                              f"is unreadable too ({err})") from None
    print(f"dforge: {reason}; resuming from {previous.name} (step {checkpoint.get('global_step', '?')})",
          file=sys.stderr)
    return ResumePoint(previous, checkpoint)


def check_resume_fits(model, point: ResumePoint) -> None:
    """One line instead of Lightning's traceback when the checkpoint is of another architecture."""
    if getattr(model, "strict_loading", True):
        check_state_fits(model, point.checkpoint["state_dict"], point.path)


def _first_line(err: BaseException) -> str:
    """The first sentence of an exception's message (torch's zip errors run on for lines)."""
    text = str(err).strip()
    text = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    if isinstance(err, EOFError) or not text:
        return "unexpected end of file"
    return text if isinstance(err, (OSError, RuntimeError)) else f"{type(err).__name__} {text}"

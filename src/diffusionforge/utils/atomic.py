"""Atomic file writes: write to a temporary name beside the target, then rename.

``os.replace`` within one directory is atomic on POSIX, so a process killed
at any moment leaves either the previous complete file or the new complete
file under the target name, never a partial one. A failed write removes its
temporary file; a killed one leaves ``.<name>.tmp``, which the next write of
the same file overwrites.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import CheckpointError


def temporary_name(path: Path) -> Path:
    """The hidden temporary name a write of ``path`` goes through."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_folder_atomically(dst: Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(folder)`` on a temporary folder beside ``dst``, then rename it to ``dst`` (replacing it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700
        _replace_folder(tmp, dst)
    except OSError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"--out {dst}: cannot write: {reason}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return dst


def _replace_folder(new: Path, dst: Path) -> None:
    """Rename ``new`` to ``dst``; a non-empty ``dst`` is moved aside first and deleted after."""
    old = None
    if dst.is_dir() and any(dst.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except OSError:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old)

"""Atomic file writes: write to a temporary name beside the target, then rename.

``os.replace`` within one directory is atomic on POSIX, so a process killed
at any moment leaves either the previous complete file or the new complete
file under the target name, never a partial one. A failed write removes its
temporary file; a killed one leaves ``.<name>.tmp``, which the next write of
the same file overwrites.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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

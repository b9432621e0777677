"""Output paths are checked before any compute is spent.

A command that writes a file (``sample --out grid.png``, ``evaluate --out
metrics.json``, ...) calls ``check_output_file`` first; one that writes a
folder (``convert --out DST``) calls ``check_output_parent``. The parent
folder may be missing (the writer creates it, as ``save_png`` does), but its
nearest existing ancestor must be a folder this process can write in.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

PNG = (".png",)
JSON = (".json",)


def check_output_parent(path: str | Path, option: str = "--out") -> Path:
    """``path`` itself, after checking that its parent is, or can be made in, a writable folder."""
    path = Path(path)
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        missing = f"cannot create {path.parent}: " if existing != path.parent else ""
        raise ConfigError(f"{option} {path}: {missing}folder {existing} is not writable")
    return path


def check_output_file(path: str | Path, suffixes: tuple[str, ...], option: str = "--out") -> Path:
    """``path``, after checking that a file with one of ``suffixes`` (e.g. ``PNG``) can be written there."""
    path = check_output_parent(path, option)
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path}: must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    return path


def check_output_folder(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a DST that is a file, non-empty (without --overwrite), SRC itself or a folder holding SRC."""
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"--out {dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConfigError(f"--out {dst}: exists and is not empty (pass --overwrite to replace it)")
    src_abs, dst_abs = src.resolve(), dst.resolve()
    if dst_abs == src_abs or dst_abs in src_abs.parents:
        raise ConfigError(f"--out {dst}: would replace SRC {src}; choose another folder")

"""One writer per run directory: ``RUN_DIR/.lock`` held by the process that trains it.

``dforge train`` (fresh or ``--resume``) creates the lock with
``O_CREAT | O_EXCL`` (atomic: of two processes exactly one succeeds), holds it
through fit and the final export, and removes it on every way out (an error,
Ctrl-C). The file records who holds it::

    {"pid": 4242, "host": "gpu-node-3", "started": "2026-11-30 17:15:22"}

A second trainer is refused with the holder's pid and host. A lock whose
pid no longer runs on this host (the holder was killed) is stale: it is taken
over with a notice. A lock from another host cannot be checked and is
refused. DDP worker processes (``$DFORGE_RUN_DIR`` set by the launching
process, which holds the lock) and the processes of rank > 0 that an external
launcher (torchrun, SLURM, ``NODE_RANK``; ``runs.launched_rank``) starts neither take nor check it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .errors import CheckpointError
from .runs import first_process

LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` for the duration of the block (no-op in DDP workers)."""
    if not first_process():
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    acquire(path)
    try:
        yield
    finally:
        release(path)


def acquire(path: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a second try after taking over a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            take_over_if_stale(path)
            continue
        except OSError as err:  # a read-only run directory, say
            raise CheckpointError(f"{path.parent}: cannot create the lock file {path.name} "
                                  f"({err.strerror or err})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
        return
    raise CheckpointError(f"{path.parent}: could not take the lock {path.name} (another process took it)")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    owner = read_owner(path)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def read_owner(path: Path) -> Optional[dict]:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def take_over_if_stale(path: Path) -> None:
    """Remove a lock whose holder is dead; raise CheckpointError for a live (or unknown) one."""
    run_dir = path.parent
    owner = read_owner(path)
    if owner is None:
        if not path.exists():  # released between our open and our read
            return
        raise CheckpointError(f"{run_dir}: unreadable lock file {path.name}; if no dforge process "
                              f"is training this run, delete {path}")
    pid, host, started = owner.get("pid"), owner.get("host"), owner.get("started", "?")
    if host != socket.gethostname():
        raise CheckpointError(f"{run_dir} is locked by pid {pid} on host {host} (since {started}); "
                              f"if no dforge process there is training it, delete {path}")
    if isinstance(pid, int) and pid_alive(pid):
        raise CheckpointError(f"{run_dir} is being trained by pid {pid} on host {host} "
                              f"(since {started}); wait for it to finish or stop it")
    print(f"dforge: taking over the stale lock of {run_dir} (pid {pid} on host {host} "
          f"is no longer running)", file=sys.stderr)
    if read_owner(path) == owner:  # not taken over by someone else meanwhile
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True

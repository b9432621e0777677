"""The runs' models, each loaded once and kept, and used by one request at a time.

Gradio's queue runs several events at once (``app.CONCURRENCY`` workers), so
requests to different runs proceed side by side while requests to the same
run wait for its lock: a model is never walked by two samplers at once (the
EMA swap, the text encoder's cache and the autocast state are per model).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.schema import ExperimentConfig
from ..errors import CheckpointError, ConfigError
from ..runs import open_run


@dataclass
class LoadedRun:
    """A run's model in eval mode (EMA weights) and the lock a request holds while using it."""

    run_dir: Path
    config: ExperimentConfig
    model: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelCache:
    """Run name (a path under RUNS_DIR) -> its loaded model; loads on first use, never twice."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(os.path.abspath(runs_dir))
        self._loaded: dict[str, LoadedRun] = {}
        self._loading: dict[str, threading.Lock] = {}  # one per run: a second request waits for the first load
        self._guard = threading.Lock()

    def locate(self, name: str, command: str) -> tuple[Path, ExperimentConfig]:
        """The directory and config of run ``name`` for `dforge COMMAND`'s tab, checked before any model is
        built; a one-line error for a name outside RUNS_DIR, a broken run or a run of another task."""
        from ..tasks import command_task

        run_dir, config = open_run(self.run_path(name))
        command_task(config, command, run_dir)
        return run_dir, config

    def run_path(self, name: str) -> Path:
        """RUNS_DIR/name; a one-line error for an empty name or one that leads outside RUNS_DIR."""
        if not name:
            raise ConfigError("choose a run")
        run_dir = Path(os.path.abspath(self.runs_dir / name))  # ".." folded; a linked run stays inside
        if run_dir != self.runs_dir and self.runs_dir not in run_dir.parents:
            raise CheckpointError(f"{name}: not a run under {self.runs_dir}")
        return run_dir

    def get(self, name: str, command: str) -> LoadedRun:
        """The loaded model of run ``name`` (``locate``'s checks first)."""
        from ..tasks import task_of

        run_dir, config = self.locate(name, command)
        with self._guard:
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:
            if name not in self._loaded:
                self._loaded[name] = LoadedRun(run_dir, config, task_of(config).load(run_dir, config))
        return self._loaded[name]

    def __contains__(self, name: str) -> bool:
        return name in self._loaded

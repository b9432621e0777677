"""The runs under RUNS_DIR as the Runs tab lists them: task, preset, steps, time, metrics, curves, grids.

A run is read from its files (``runs.py``'s layout), never by building its
model, so the list appears at once and a run whose weights are missing or
broken is still listed (its error is shown when it is used). Its task, and so
the tabs that take it, come from the task registry (``tasks.task_of``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, DForgeError, one_line
from ..runs import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, open_run

STEP_GRID = re.compile(r"step_(\d+)\.png")  # samples/step_0000200.png: the validation grid at step 200
MAX_DEPTH = 3                              # run directories are found this many folders below RUNS_DIR


@dataclass
class RunEntry:
    """One run directory under RUNS_DIR, as read from its files."""

    name: str                      # path relative to RUNS_DIR ("." for RUNS_DIR itself)
    run_dir: Path
    task: str = "?"                # the task's registry name; "?" when the config cannot be read
    preset: str = "?"              # config ``name``: the preset (or YAML) it was trained from
    commands: frozenset = frozenset()  # generation commands that take it (sample / translate / story)
    summary: Optional[dict] = None  # train_summary.json
    metrics: Optional[dict] = None  # metrics.json (after `dforge evaluate`)
    error: Optional[str] = None    # why the config could not be read

    @property
    def steps(self) -> Optional[int]:
        return None if self.summary is None else self.summary.get("global_step")

    @property
    def time(self) -> str:
        """Wall time of the last fit as h:mm:ss ("" when the run has not finished a fit)."""
        seconds = None if self.summary is None else self.summary.get("wall_time_s")
        if seconds is None:
            return ""
        minutes, secs = divmod(int(round(seconds)), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"

    def row(self) -> list:
        """The Runs table's row: run, task, preset, steps, time, metrics."""
        shown = self.error or ", ".join(f"{k} {v:.4g}" for k, v in metric_numbers(self.metrics).items())
        return [self.name, self.task, self.preset, self.steps, self.time, shown]


ROW_HEADERS = ["run", "task", "preset", "steps", "time", "metrics"]


def metric_numbers(record: Optional[dict]) -> dict[str, float]:
    """The numbers of a metrics.json's ``metrics`` section, nested keys joined by "/" (bridge runs score
    several methods)."""
    found: dict[str, float] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[key] = float(value)

    walk((record or {}).get("metrics", {}), "")
    return found


def read_json(path: Path) -> Optional[dict]:
    """A JSON file of the run, None when it is absent or unreadable (the list must not fail on it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_entry(runs_dir: Path, run_dir: Path) -> RunEntry:
    from ..tasks import task_of

    name = run_dir.relative_to(runs_dir).as_posix()
    entry = RunEntry(name, run_dir, summary=read_json(run_dir / SUMMARY_FILE),
                     metrics=read_json(run_dir / METRICS_FILE))
    try:
        _, config = open_run(run_dir)
        task = task_of(config)
    except DForgeError as err:
        entry.error = one_line(err)
        return entry
    entry.task, entry.preset, entry.commands = task.name, config.name, task.commands
    return entry


def find_runs(runs_dir: Path) -> list[RunEntry]:
    """Every run directory (a folder with config.yaml) at most MAX_DEPTH folders below ``runs_dir``,
    by name; folders inside a run are not searched."""
    runs_dir = Path(os.path.abspath(runs_dir))  # linked runs keep their names under it
    if not runs_dir.is_dir():
        raise CheckpointError(f"{runs_dir}: runs directory not found")
    found, todo = [], [(runs_dir, 0)]
    while todo:
        folder, depth = todo.pop()
        if (folder / CONFIG_FILE).is_file():
            found.append(read_entry(runs_dir, folder))
            continue
        if depth < MAX_DEPTH:
            todo += [(child, depth + 1) for child in folder.iterdir()
                     if child.is_dir() and not child.name.startswith(".")]
    return sorted(found, key=lambda entry: entry.name)


def step_grids(run_dir: Path) -> list[tuple[Path, str]]:
    """(PNG, caption) of the validation grids ``samples/step_*.png`` by step, then ``samples/final.png``."""
    samples = Path(run_dir) / "samples"
    grids = sorted((int(m.group(1)), p) for p in samples.glob("step_*.png") if (m := STEP_GRID.fullmatch(p.name)))
    shown = [(path, f"step {step}") for step, path in grids]
    if (samples / "final.png").is_file():
        shown.append((samples / "final.png", "final"))
    return shown


def loss_curve(run_dir: Path):
    """The run's loss figure (a PIL image, as `dforge plot` draws it); None before anything is logged."""
    from ..plotting import draw_loss_plot, read_loss_curves

    try:
        return draw_loss_plot(read_loss_curves(run_dir), title=Path(run_dir).name)
    except DForgeError:
        return None

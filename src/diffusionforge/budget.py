"""The whole-command time budget of `dforge train` (``trainer.time_budget``).

``trainer.max_time`` bounds Lightning's fit; a person waiting for
`dforge train` waits for the whole command: start-up, data, the fit with its
validation grids and checkpoints, the exported weights and the final grid.
With ``trainer.time_budget = B`` the fit gets

    max_time = B - (start-up so far) - (estimated final grid) - FINISH_MARGIN_S

where the final grid's cost is measured on this machine (one timed sampler
step of the grid batch times the grid's steps), so a slow CPU reserves more
than a fast one. ``optim.schedule: budget`` then spreads warm-up, decay and
the EMA over whatever time that leaves.
"""

from __future__ import annotations

import time
from typing import Optional

from .config.trainer_values import MAX_TIME_FORMAT
from .errors import ConfigError

FINISH_MARGIN_S = 8.0       # exporting weights, the summary, the loss plot, interpreter exit
UNKNOWN_GRID_SHARE = 0.1    # budget share reserved when a model cannot estimate its final grid
MIN_FIT_S = 5.0             # less than this left for the fit is an error, not a run


def parse_duration(text: str, key: str) -> float:
    """'DD:HH:MM:SS' -> seconds (``key`` names the config field in the error)."""
    if not MAX_TIME_FORMAT.match(str(text).strip()):
        raise ConfigError(f"{key}: expected DD:HH:MM:SS, got {text!r}")
    days, hours, minutes, seconds = (int(part) for part in str(text).strip().split(":"))
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def format_duration(seconds: float) -> str:
    """seconds -> 'DD:HH:MM:SS' (whole seconds, rounded down), Lightning's max_time format."""
    s = max(0, int(seconds))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def fit_time_limit(time_budget: Optional[str], max_time: Optional[str], model,
                   started: float) -> tuple[Optional[str], dict]:
    """The fit's ``max_time`` under the command's budget, and how it was split (for the summary).

    ``started`` is ``time.monotonic()`` when the command started.
    """
    if time_budget is None:
        return max_time, {}
    budget = parse_duration(time_budget, "trainer.time_budget")
    estimate = getattr(model, "estimate_grid_seconds", None)
    grid = estimate() if estimate is not None else None
    reserve = (grid if grid is not None else UNKNOWN_GRID_SHARE * budget) + FINISH_MARGIN_S
    startup = time.monotonic() - started
    fit = budget - startup - reserve
    if max_time is not None:
        fit = min(fit, parse_duration(max_time, "trainer.max_time"))
    if fit < MIN_FIT_S:
        raise ConfigError(f"trainer.time_budget={time_budget} leaves no time to train: start-up took "
                          f"{startup:.0f} s and the final grid and export need about {reserve:.0f} s")
    split = {"time_budget_s": budget, "startup_s": round(startup, 1),
             "final_grid_estimate_s": None if grid is None else round(grid, 1), "fit_limit_s": int(fit)}
    return format_duration(fit), split

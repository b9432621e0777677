"""The loss curve of a run: ``loss.png``, drawn with Pillow from the CSV logs.

Every fit writes ``logs/version_N/metrics.csv`` (a resume adds a version);
the curve concatenates them by global step, a later version replacing the
steps it repeats (a resume restarts from its checkpoint's step). Drawn
against the step: the raw train loss (light), its centred moving average
(bold) and the validation loss (points). The main loss is
``train/loss`` (diffusion, bridge and story runs) or ``train/rec_loss``
(autoencoder runs), with its ``val/`` counterpart. NaN and infinite values
are left out; y is logarithmic when the loss spans a factor of
``LOG_Y_RATIO`` or more.

Only the standard library and Pillow are imported: `dforge plot` starts at once.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from .errors import CheckpointError, DForgeError
from .utils.atomic import atomic_path

PLOT_FILE = "loss.png"
LOSS_KEYS = ("loss", "rec_loss")  # train/<key>: GenerativeModel, bridge and story runs; then autoencoder runs
SIZE = (800, 480)                 # (W, H) of the image in pixels
MARGIN = (70, 40, 24, 44)         # left, top, right, bottom: room for the title and tick labels
SMOOTH_FRACTION = 0.02            # half-width of the moving average, as a fraction of the train points
PAD_FRACTION = 0.03               # room between the extreme losses and the frame, as a fraction of y
LOG_Y_RATIO = 3.0                 # log-scale y when max / min of the (positive) losses is at least this
FONT_SIZE = 13                    # pixels, of Pillow's default font
BACKGROUND, GRID, INK = (255, 255, 255), (228, 228, 228), (40, 40, 40)
RAW, SMOOTH, VAL = (166, 196, 232), (20, 70, 150), (222, 110, 20)  # train raw, train smoothed, validation

Points = list[tuple[int, float]]  # (global step, value), steps ascending


class LossCurves(NamedTuple):
    key: str       # the curves are train/<key> and val/<key>
    train: Points  # finite values only
    val: Points


class Axis(NamedTuple):
    ticks: list[float]  # tick values in data units; the axis runs from the first to the last
    log: bool           # logarithmic axis (all ticks > 0)

    def unit(self, value: float) -> float:
        """Position of value along the axis, 0 at the first tick and 1 at the last."""
        f = math.log10 if self.log else float
        lo, hi = f(self.ticks[0]), f(self.ticks[-1])
        return (f(value) - lo) / (hi - lo)


# ----------------------------------------------------------------- reading
def metrics_files(run_dir: Path) -> list[Path]:
    """``logs/version_N/metrics.csv`` in the order of N (the order of the fits)."""
    found = [p for p in (run_dir / "logs").glob("version_*/metrics.csv")
             if p.parent.name.removeprefix("version_").isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name.removeprefix("version_")))


def _number(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if _number(row.get("step")) is not None]


def column(rows: Sequence[dict[str, str]], key: str) -> Points:
    """The finite values of one metric with their steps (NaN and inf dropped)."""
    points = [(int(float(row["step"])), _number(row.get(key))) for row in rows]
    return sorted((s, v) for s, v in points if v is not None and math.isfinite(v))


def splice(earlier: Points, later: Points, first_step: int) -> Points:
    """A resumed fit repeats the steps from its checkpoint on: its points replace those."""
    return [p for p in earlier if p[0] < first_step] + later


def read_loss_curves(run_dir: Path) -> LossCurves:
    """The main train and validation loss of a run, across all its fits."""
    runs = [rows for rows in map(read_rows, metrics_files(run_dir)) if rows]
    if not runs:
        raise CheckpointError(f"{run_dir}: no logs to plot (logs/version_N/metrics.csv missing or empty)")
    header = {key for rows in runs for key in rows[0]}
    key = next((k for k in LOSS_KEYS if f"train/{k}" in header), None)
    if key is None:
        raise CheckpointError(f"{run_dir}: the logs hold no train/loss or train/rec_loss column")
    train: Points = []
    val: Points = []
    for rows in runs:
        first = min(int(float(row["step"])) for row in rows)
        train = splice(train, column(rows, f"train/{key}"), first)
        val = splice(val, column(rows, f"val/{key}"), first)
    if not train and not val:
        raise CheckpointError(f"{run_dir}: no finite train/{key} or val/{key} value logged yet")
    return LossCurves(key, train, val)


# ----------------------------------------------------------------- scales
def moving_average(values: Sequence[float], half: int) -> list[float]:
    """Centred mean of values[i-h .. i+h], h = min(half, i, n-1-i): no lag, and a linear
    trend is kept exactly (the window shrinks symmetrically at the ends)."""
    n = len(values)
    out = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        out.append(sum(values[i - h:i + h + 1]) / (2 * h + 1))
    return out


def smooth(values: Sequence[float], log: bool) -> list[float]:
    """The bold curve: a moving average, of log10(loss) on a log axis (spikes weigh less)."""
    half = max(1, round(SMOOTH_FRACTION * len(values)))
    if not log:
        return moving_average(values, half)
    return [10.0 ** v for v in moving_average([math.log10(v) for v in values], half)]


def linear_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round values 1, 2 or 5 x 10^k apart, from at or below lo to at or above hi."""
    raw = (hi - lo) / count or abs(hi) / count or 1.0
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, max(last, first + 1) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 values of each decade (powers of ten only over > 3 decades) enclosing [lo, hi]."""
    mantissas = (1, 2, 5) if hi / lo <= 1e3 else (1,)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    values = [float(f"{m}e{e}") for e in decades for m in mantissas]
    below = max((v for v in values if v <= lo), default=values[0])
    above = min((v for v in values if v >= hi), default=values[-1])
    return [v for v in values if below <= v <= above]


def value_axis(values: Sequence[float]) -> Axis:
    """Log when the loss spans LOG_Y_RATIO or more; the extremes kept PAD_FRACTION off the frame."""
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo >= LOG_Y_RATIO:
        pad = (hi / lo) ** PAD_FRACTION
        return Axis(log_ticks(lo / pad, hi * pad), log=True)
    pad = PAD_FRACTION * (hi - lo) or 0.1 * abs(hi) or 1.0  # a flat curve sits mid-height
    return Axis(linear_ticks(lo - pad, hi + pad), log=False)


# ----------------------------------------------------------------- drawing
def default_font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def plot_box() -> tuple[int, int, int, int]:
    left, top, right, bottom = MARGIN
    return left, top, SIZE[0] - right, SIZE[1] - bottom


def to_pixels(points: Points, x: Axis, y: Axis) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = plot_box()
    return [(x0 + x.unit(s) * (x1 - x0), y1 - y.unit(v) * (y1 - y0)) for s, v in points]


def draw_axes(draw: ImageDraw.ImageDraw, x: Axis, y: Axis, font, x_label: str = "step") -> None:
    """Grid lines, the frame and tick labels; ``x_label`` at the bottom right."""
    x0, y0, x1, y1 = plot_box()
    for tick in x.ticks:
        px = to_pixels([(tick, y.ticks[0])], x, y)[0][0]
        draw.line([(px, y0), (px, y1)], fill=GRID)
        draw.text((px, y1 + 6), f"{tick:g}", fill=INK, font=font, anchor="mt")
    for tick in y.ticks:
        py = to_pixels([(x.ticks[0], tick)], x, y)[0][1]
        draw.line([(x0, py), (x1, py)], fill=GRID)
        draw.text((x0 - 6, py), f"{tick:g}", fill=INK, font=font, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    draw.text((x1, SIZE[1] - 4), x_label, fill=INK, font=font, anchor="rd")


def draw_series(draw: ImageDraw.ImageDraw, pixels, colour, width: int, dots: bool) -> None:
    if len(pixels) > 1:
        draw.line(pixels, fill=colour, width=width, joint="curve")
    if dots or len(pixels) == 1:
        r = width + 1
        for px, py in pixels:
            draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)


def draw_legend(draw: ImageDraw.ImageDraw, entries: list[tuple[str, tuple]], font) -> None:
    """Swatch and label per entry, in a framed box at the top right of the plot."""
    _, y0, x1, _ = plot_box()
    width = max(draw.textlength(label, font=font) for label, _ in entries) + 40
    left, top = x1 - width - 8, y0 + 8
    draw.rectangle([left, top, x1 - 8, top + 8 + 18 * len(entries)], fill=BACKGROUND, outline=GRID)
    for i, (label, colour) in enumerate(entries):
        cy = top + 13 + 18 * i
        draw.line([(left + 6, cy), (left + 26, cy)], fill=colour, width=3)
        draw.text((left + 32, cy), label, fill=INK, font=font, anchor="lm")


def draw_loss_plot(curves: LossCurves, title: str) -> Image.Image:
    """The figure: raw and smoothed train loss and validation loss against the global step."""
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw, font = ImageDraw.Draw(image), default_font()
    points = curves.train + curves.val
    x = Axis(linear_ticks(0, max(s for s, _ in points)), log=False)
    y = value_axis([v for _, v in points])
    draw_axes(draw, x, y, font)
    smoothed = [(s, v) for (s, _), v in zip(curves.train, smooth([v for _, v in curves.train], y.log))]
    draw_series(draw, to_pixels(curves.train, x, y), RAW, 1, dots=False)
    draw_series(draw, to_pixels(smoothed, x, y), SMOOTH, 3, dots=False)
    draw_series(draw, to_pixels(curves.val, x, y), VAL, 2, dots=True)
    train = [(f"train/{curves.key}", RAW), (f"train/{curves.key} (smoothed)", SMOOTH)]
    legend = train if curves.train else []
    legend += [(f"val/{curves.key}", VAL)] if curves.val else []
    draw_legend(draw, legend, font)
    scale = "log scale" if y.log else "linear scale"
    draw.text((SIZE[0] // 2, 12), f"{title}: {curves.key} ({scale})", fill=INK,
              font=default_font(FONT_SIZE + 3), anchor="mt")
    return image


SERIES_COLOURS = ((20, 70, 150), (222, 110, 20), (40, 150, 60), (190, 40, 40), (120, 70, 170), (110, 110, 110))


def draw_line_plot(series: dict[str, list[tuple[float, float]]], title: str, x_label: str,
                   log_x: bool = False) -> Image.Image:
    """One line with dots per named series of (x, y) points, e.g. FID against NFE per sampler."""
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw, font = ImageDraw.Draw(image), default_font()
    xs = [px for points in series.values() for px, _ in points]
    x = Axis(log_ticks(min(xs), max(xs)), log=True) if log_x else Axis(linear_ticks(min(xs), max(xs)), log=False)
    y = value_axis([v for points in series.values() for _, v in points])
    draw_axes(draw, x, y, font, x_label)
    colours = [SERIES_COLOURS[i % len(SERIES_COLOURS)] for i in range(len(series))]
    for points, colour in zip(series.values(), colours):
        draw_series(draw, to_pixels(sorted(points), x, y), colour, 2, dots=True)
    draw_legend(draw, list(zip(series, colours)), font)
    draw.text((SIZE[0] // 2, 12), title, fill=INK, font=default_font(FONT_SIZE + 3), anchor="mt")
    return image


def write_loss_plot(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Draw the run's loss curve into ``out`` (default ``RUN_DIR/loss.png``), atomically."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    if not out.parent.is_dir():
        raise DForgeError(f"{out}: cannot write there (directory {out.parent} does not exist)")
    image = draw_loss_plot(read_loss_curves(run_dir), title=run_dir.resolve().name)
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    return out


def plot_after_fit(run_dir: Path) -> Optional[Path]:
    """``loss.png`` at the end of a fit; None (and no error) when nothing was logged yet."""
    try:
        return write_loss_plot(run_dir)
    except DForgeError:
        return None

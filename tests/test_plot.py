"""loss.png: the loss curve from a run's CSV logs, `dforge plot`, and trainer.logger=tensorboard."""

import csv
import importlib.util
import math
import sys

import numpy as np
import pytest
from PIL import Image

from diffusionforge.cli.main import main
from diffusionforge.errors import CheckpointError
from diffusionforge.plotting import (SIZE, SMOOTH, VAL, linear_ticks, log_ticks, moving_average, plot_box,
                                     read_loss_curves, smooth, write_loss_plot)
from diffusionforge.training import TENSORBOARD_MISSING


def write_metrics(run_dir, version, train=(), val=(), key="loss"):
    """A metrics.csv laid out like Lightning's CSVLogger: one row per log call, empty cells elsewhere."""
    path = run_dir / "logs" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    rows = [{"step": s, "lr-AdamW": 1e-3} for s, _ in train]  # the LR monitor's own rows
    rows += [{"epoch": 0, "step": s, f"train/{key}": v} for s, v in train]
    rows += [{"epoch": 0, "step": s, f"val/{key}": v} for s, v in val]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "lr-AdamW", "step", f"train/{key}", f"val/{key}"])
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["step"]))


def decaying(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(s, float(np.exp(-s / 300) * (1 + 0.3 * rng.standard_normal()) ** 2 + 0.02)) for s in steps]


def curve_pixels(path, colour, tolerance=40):
    """Pixels of `colour` inside the plot frame (the legend's swatch excluded by the caller's margin)."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    x0, y0, x1, y1 = plot_box()
    inside = image[y0 + 1:y1, x0 + 1:x1]
    return int((np.abs(inside - np.array(colour)).sum(-1) < tolerance).sum())


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, fragment):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dforge: error:"), err
    assert fragment in err, err


# ----------------------------------------------------------------- the curves
def test_resumed_versions_concatenate_by_step_and_nan_is_dropped(tmp_path):
    write_metrics(tmp_path, 0, train=[(s, 1.0) for s in range(9, 100, 10)], val=[(49, 0.9), (99, 0.8)])
    resumed = [(s, 0.5) for s in range(79, 160, 10)]
    resumed[2] = (99, math.nan)
    write_metrics(tmp_path, 1, train=resumed, val=[(99, 0.4), (149, float("inf"))])
    curves = read_loss_curves(tmp_path)
    assert curves.key == "loss"
    # version 1 restarted at step 79: its points replace version 0's from there on
    kept = [(s, 1.0) for s in range(9, 79, 10)]
    assert curves.train == kept + [(s, 0.5) for s in range(79, 160, 10) if s != 99]
    assert curves.val == [(49, 0.9), (99, 0.4)]


def test_versions_are_read_in_numeric_order(tmp_path):
    for version in range(11):
        write_metrics(tmp_path, version, train=[(100 * version + 1, float(version + 1))])
    assert [v for _, v in read_loss_curves(tmp_path).train] == [float(v + 1) for v in range(11)]


def test_autoencoder_runs_plot_the_reconstruction_loss(tmp_path):
    write_metrics(tmp_path, 0, train=decaying(range(1, 60, 2)), val=[(29, 0.3)], key="rec_loss")
    curves = read_loss_curves(tmp_path)
    assert curves.key == "rec_loss" and len(curves.train) == 30 and curves.val == [(29, 0.3)]


@pytest.mark.parametrize("case", ["no logs", "no loss column", "only NaN"])
def test_nothing_to_plot_is_a_one_line_error(tmp_path, case):
    if case == "no loss column":
        write_metrics(tmp_path, 0, train=[(4, 1.0)], key="psnr")
    elif case == "only NaN":
        write_metrics(tmp_path, 0, train=[(4, math.nan), (9, math.nan)])
    with pytest.raises(CheckpointError) as err:
        read_loss_curves(tmp_path)
    assert "\n" not in str(err.value)


def test_smoothing_keeps_a_linear_trend_and_averages_noise():
    line = [0.5 * i + 3 for i in range(20)]
    assert moving_average(line, half=4) == pytest.approx(line)  # centred: no lag
    assert moving_average([1.0, 3.0, 1.0, 3.0, 1.0], half=1) == pytest.approx([1.0, 5 / 3, 7 / 3, 5 / 3, 1.0])
    assert smooth([0.1, 10.0, 0.1], log=True) == pytest.approx([0.1, 10 ** (-1 / 3), 0.1])  # geometric mean


def test_ticks_enclose_the_range():
    assert linear_ticks(0, 19) == [0, 5, 10, 15, 20]
    assert log_ticks(0.03, 0.98) == [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    assert log_ticks(1e-5, 10.0) == [1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]  # > 3 decades: powers of ten
    for lo, hi in [(0.21, 0.64), (0.5, 0.5), (-0.2, 0.3), (1200.0, 1201.0)]:
        ticks = linear_ticks(lo, hi)
        assert len(ticks) >= 2 and ticks[0] <= lo and ticks[-1] >= hi


# ----------------------------------------------------------------- the image
@pytest.mark.parametrize("case", ["resumed", "no validation", "one point", "flat"])
def test_the_image_has_its_size_and_curves(tmp_path, case):
    if case == "resumed":
        write_metrics(tmp_path, 0, train=decaying(range(49, 1500, 50)), val=[(999, 0.05)])
        write_metrics(tmp_path, 1, train=decaying(range(1249, 3000, 50), seed=1),
                      val=[(1999, 0.03), (2999, 0.025)])
    elif case == "no validation":
        write_metrics(tmp_path, 0, train=decaying(range(4, 400, 5)))
    elif case == "one point":
        write_metrics(tmp_path, 0, train=[(4, 0.97)])
    else:
        write_metrics(tmp_path, 0, train=[(s, 0.5) for s in range(4, 100, 5)], val=[(49, 0.5)])
    out = write_loss_plot(tmp_path)
    assert out == tmp_path / "loss.png" and not list(tmp_path.glob(".*.tmp"))
    assert Image.open(out).size == SIZE
    assert curve_pixels(out, SMOOTH) > (20 if case != "one point" else 5)  # the bold train curve is drawn
    assert (curve_pixels(out, VAL) > 5) == (case in ("resumed", "flat"))


# ----------------------------------------------------------------- the command
def test_train_writes_loss_png_and_plot_redraws_it(tiny_run, tmp_path, capsys):
    assert Image.open(tiny_run / "loss.png").size == SIZE  # written at the end of the fit
    code, out, err = run_cli(capsys, "plot", tiny_run, "--out", tmp_path / "curve.png")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "curve.png")
    assert curve_pixels(tmp_path / "curve.png", SMOOTH) > 20 and curve_pixels(tmp_path / "curve.png", VAL) > 5


def test_plot_writes_into_the_run_dir_by_default(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("name: synthetic\n")
    write_metrics(tmp_path, 0, train=decaying(range(4, 100, 5)))
    code, out, err = run_cli(capsys, "plot", tmp_path)
    assert code == 0, err
    assert (tmp_path / "loss.png").is_file()


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "plot", tmp_path)[::2], "not a run directory")
    assert_one_line_error(*run_cli(capsys, "plot", tmp_path / "missing")[::2], "not found")
    (tmp_path / "config.yaml").write_text("name: synthetic\n")
    assert_one_line_error(*run_cli(capsys, "plot", tmp_path)[::2], "no logs")
    write_metrics(tmp_path, 0, train=[(4, 1.0)])
    assert_one_line_error(*run_cli(capsys, "plot", tmp_path, "--out", tmp_path / "no" / "x.png")[::2],
                          "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "logs"]


# ----------------------------------------------------------------- tensorboard
def test_tensorboard_logger_without_the_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` sees when absent
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "tiny", "trainer.logger=tensorboard", f"run_dir={run_dir}",
                           "--no-progress")
    assert_one_line_error(code, err, TENSORBOARD_MISSING)
    assert not run_dir.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_logger_writes_event_files_beside_the_csv(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "tiny", "trainer.logger=tensorboard", "trainer.max_steps=10",
                           f"run_dir={run_dir}", "--no-progress")
    assert code == 0, err
    assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()
    assert list((run_dir / "logs" / "version_0" / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "loss.png").is_file()

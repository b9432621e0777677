"""Faults: divergence stops cleanly, one writer per run, atomic writes, resume falls back."""

import csv
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffusionforge.checkpoint_io import AtomicCheckpointIO
from diffusionforge.checkpoints import previous_name, resume_checkpoint
from diffusionforge.cli.main import main
from diffusionforge.errors import CheckpointError, TrainingError
from diffusionforge.models.generative import GenerativeModel
from diffusionforge.run_lock import LOCK_FILE, run_lock
from diffusionforge.runs import RUN_DIR_ENV
from diffusionforge.utils.images import save_grid
from diffusionforge.weights import save_weights

QUICK = ["trainer.val_every_n_steps=1000", "--no-progress"]  # no validation grids mid-run


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(run_dir) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def finite_checkpoint(path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for name, value in checkpoint["state_dict"].items():
        assert torch.isfinite(value).all(), name
    return checkpoint


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the session's tiny run (20 steps; checkpoints at 10 and 20)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


# ----------------------------------------------------------------- divergence
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "nan"
    code, err = run_cli(capsys, "train", "tiny", "optim.lr=1e4", "trainer.max_steps=40",
                        "trainer.checkpoint_every_n_steps=1", f"run_dir={run_dir}", *QUICK)
    line = error_line(err)
    assert code == TrainingError.exit_status == 3, err
    step = int(re.search(r"diverged at step (\d+): (train/loss|the gradient norm) is (nan|-?inf)",
                         line).group(1))
    checkpoint = finite_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert 0 < checkpoint["global_step"] <= step
    assert f"checkpoints/last.ckpt (step {checkpoint['global_step']}) is kept" in line
    for name in ["model.safetensors", "model_raw.safetensors", LOCK_FILE]:
        assert not (run_dir / name).exists(), name


def poison_steps(monkeypatch, batches: set[int]) -> None:
    """Make the loss NaN at these training batch indices."""
    original = GenerativeModel.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if batch_idx in batches else loss

    monkeypatch.setattr(GenerativeModel, "training_step", training_step)


def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, capsys, monkeypatch):
    poison_steps(monkeypatch, {2, 5})
    run_dir = tmp_path / "skip"
    code, err = run_cli(capsys, "train", "tiny", "trainer.max_steps=8", "trainer.max_nonfinite_steps=2",
                        "trainer.log_every_n_steps=1", f"run_dir={run_dir}", *QUICK)
    assert code == 0, err
    rows = list(csv.DictReader((run_dir / "logs/version_0/metrics.csv").open()))
    counts = [float(r["train/nonfinite_skipped"]) for r in rows if r.get("train/nonfinite_skipped")]
    assert counts[0] == 0 and counts[-1] == 2, counts
    assert json.loads((run_dir / "train_summary.json").read_text())["global_step"] == 8
    assert (run_dir / "model.safetensors").is_file()


def test_one_nonfinite_step_too_many_stops_the_run(tmp_path, capsys, monkeypatch):
    poison_steps(monkeypatch, {1, 3})
    code, err = run_cli(capsys, "train", "tiny", "trainer.max_steps=6", "trainer.max_nonfinite_steps=1",
                        f"run_dir={tmp_path / 'stop'}", *QUICK)
    assert code == 3, err
    assert "diverged at step 3: train/loss is nan after skipping 1 non-finite step" in error_line(err)


def test_nonfinite_weights_are_never_written(tmp_path):
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.bias[1] = float("inf")
    with pytest.raises(CheckpointError, match=r"tensor 'bias' holds non-finite"):
        save_weights(net, tmp_path / "model.safetensors")
    ckpt = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, ckpt)
    with pytest.raises(TrainingError, match=r"tensor 'w' holds non-finite"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, ckpt)
    assert torch.load(ckpt, weights_only=True)["state_dict"]["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------- lock
def write_lock(run_dir, pid: int) -> None:
    record = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (run_dir / LOCK_FILE).write_text(json.dumps(record))


def test_second_trainer_is_refused_while_the_lock_is_held(run_copy, capsys):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(run_copy, holder.pid)
        before = snapshot(run_copy)
        code, err = run_cli(capsys, "train", "--resume", run_copy, "trainer.max_steps=30", "--no-progress")
        line = error_line(err)
        assert code == 2
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line
        assert snapshot(run_copy) == before  # the holder's lock included
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(run_copy, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(run_copy, dead.pid)
    code, err = run_cli(capsys, "train", "--resume", run_copy, "--no-progress")  # 20 of 20 steps done
    assert code == 0, err
    assert f"taking over the stale lock of {run_copy} (pid {dead.pid}" in err
    assert not (run_copy / LOCK_FILE).exists()


@pytest.mark.parametrize("variable, value", [(RUN_DIR_ENV, "RUN"), ("RANK", "1"), ("SLURM_PROCID", "3")])
def test_ddp_workers_neither_take_nor_check_the_lock(tmp_path, monkeypatch, variable, value):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path, holder.pid)
        monkeypatch.setenv(variable, value)
        with run_lock(tmp_path):
            pass
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


# -------------------------------------------------------------- atomic writes
KILLED_SAVE = textwrap.dedent("""
    import os, sys, torch
    from diffusionforge.checkpoint_io import AtomicCheckpointIO

    def killed_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\\x03\\x04 the first bytes of a zip archive")
        f.flush()
        os._exit(1)  # SIGKILL-like: no cleanup, no finally

    torch.save = killed_mid_write
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4)}}, sys.argv[1])
""")


def test_kill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.full((4,), 1.0)}, "global_step": 1}, ckpt)
    io.save_checkpoint({"state_dict": {"w": torch.full((4,), 2.0)}, "global_step": 2}, ckpt)
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(ckpt)])
    assert killed.returncode == 1
    assert torch.load(ckpt, weights_only=True)["state_dict"]["w"].tolist() == [2.0] * 4
    assert torch.load(previous_name(ckpt), weights_only=True)["global_step"] == 1
    io.save_checkpoint({"state_dict": {"w": torch.full((4,), 3.0)}, "global_step": 3}, ckpt)
    assert torch.load(previous_name(ckpt), weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last-prev.ckpt", "last.ckpt"]


def test_atomic_writers_leave_no_temporary_files(tmp_path, monkeypatch):
    save_weights(nn.Linear(2, 3), tmp_path / "model.safetensors")
    save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "model.safetensors"]

    def fails_half_way(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fails_half_way)
    with pytest.raises(OSError):
        save_grid(torch.ones(4, 1, 8, 8), tmp_path / "grid.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "model.safetensors"]
    assert np.asarray(Image.open(tmp_path / "grid.png")).max() == 128  # the previous (grey) grid


# --------------------------------------------------------------------- resume
def test_resume_falls_back_to_the_previous_checkpoint(run_copy, capsys):
    last = run_copy / "checkpoints" / "last.ckpt"
    assert torch.load(previous_name(last), weights_only=True)["global_step"] == 10
    last.write_bytes(last.read_bytes()[:1000])  # truncated by a crash of the disk, say
    code, err = run_cli(capsys, "train", "--resume", run_copy, "--no-progress")
    assert code == 0, err
    assert re.search(r"checkpoints/last.ckpt: checkpoint is truncated or corrupt \(.+\); "
                     r"resuming from last-prev.ckpt \(step 10\)", err), err
    summary = json.loads((run_copy / "train_summary.json").read_text())
    assert (summary["resumed_from_step"], summary["global_step"]) == (10, 20)
    assert finite_checkpoint(last)["global_step"] == 20
    assert torch.load(previous_name(last), weights_only=True)["global_step"] == 10  # not the corrupt one


def test_corrupt_checkpoint_without_a_previous_one_is_refused(run_copy, capsys):
    last = run_copy / "checkpoints" / "last.ckpt"
    previous_name(last).unlink()
    last.write_bytes(b"")
    before = snapshot(run_copy)
    code, err = run_cli(capsys, "train", "--resume", run_copy, "--no-progress")
    line = error_line(err)
    assert code == 2
    assert f"{last}: checkpoint is truncated or corrupt" in line
    assert "no previous checkpoint (last-prev.ckpt)" in line
    assert snapshot(run_copy) == before


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("dump", [torch.save, pickle.dump], ids=["torch.save", "pickle.dump"])
def test_payload_checkpoint_is_refused_and_never_executed(tmp_path, dump):
    last, marker = tmp_path / "last.ckpt", tmp_path / "executed"
    with open(last, "wb") as f:
        dump({"state_dict": {}, "payload": Payload(marker)}, f)
    torch.save({"state_dict": {}, "global_step": 1}, previous_name(last))  # no fallback from a payload
    with pytest.raises(CheckpointError, match="holds objects that are not plain tensors and will not be loaded"):
        resume_checkpoint(last)
    assert not marker.exists()

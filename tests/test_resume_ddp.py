"""Scaling and robustness: SIGKILL + --resume, and two-process DDP on CPU (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

CLI = [sys.executable, "-m", "diffusionforge.cli.main"]


def cli_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DFORGE_RUN_DIR", None)
    return env


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def wait_for_checkpoint(path: Path, min_step: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        if path.is_file():
            try:
                if checkpoint_step(path) >= min_step:
                    return
            except Exception:  # being replaced right now; look again
                pass
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint at step >= {min_step}")


def test_sigkill_then_resume_continues_from_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "tiny", f"run_dir={run_dir}", "trainer.max_steps=400",
            "trainer.checkpoint_every_n_steps=10", "trainer.val_every_n_steps=1000",
            "--no-progress"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(CLI + args, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(ckpt, 20, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    killed_at = checkpoint_step(ckpt)
    assert killed_at >= 20 and killed_at < 400
    target = killed_at + 20
    resumed = subprocess.run(CLI + ["train", "--resume", str(run_dir),
                                    f"trainer.max_steps={target}", "--no-progress"],
                             env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at
    assert summary["global_step"] == target
    assert f"max_steps: {target}" in (run_dir / "config.yaml").read_text()
    before, after = (run_dir / "logs" / v / "metrics.csv" for v in ("version_0", "version_1"))
    assert before.is_file() and after.is_file()  # the resume kept the killed run's logs
    assert (run_dir / "model.safetensors").is_file()


def test_ddp_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "ddp"
    result = subprocess.run(
        CLI + ["train", "tiny", f"run_dir={run_dir}", "trainer.max_steps=6",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
               "trainer.val_every_n_steps=3", "--no-progress"],
        env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["global_step"] == 6
    assert (run_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # workers reused the run dir

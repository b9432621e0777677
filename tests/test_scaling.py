"""Beyond one process: two nodes of one process each, FSDP against DDP, resume with another world size.

Every test starts real ``dforge train`` processes on CPU (gloo) with the tiny
preset and a few steps; ``test_resume_ddp.py`` has the single-node DDP and
kill-and-resume tests whose helpers these reuse.
"""

import csv
import json
import socket
import subprocess

import pytest
import torch

from test_resume_ddp import CLI, cli_env

TWO_NODES = ["trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp", "trainer.accelerator=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(node_rank: int, port: int) -> dict:
    """What a cluster launcher sets for one process of a 2-node, 1-process-per-node run (Lightning's environment)."""
    return dict(cli_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node_rank),
                WORLD_SIZE="2")


def test_two_nodes_train_one_run_together(tmp_path):
    run_dir = tmp_path / "run"
    args = CLI + ["train", "tiny", f"run_dir={run_dir}", "trainer.max_steps=4", "trainer.val_every_n_steps=2",
                  "trainer.checkpoint_every_n_steps=2", *TWO_NODES, "--no-progress"]
    port = free_port()
    nodes = [subprocess.Popen(args, env=node_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (1, 0)]  # rank 1 first: it must not wait for rank 0's files
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert "run dir:" in outputs[1] and "run dir:" not in outputs[0]  # rank 0 exports and reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (run_dir / ".lock").exists()
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_launched_run_without_run_dir_is_one_line(tmp_path):
    result = subprocess.run(CLI + ["train", "tiny", *TWO_NODES], env=node_env(1, free_port()), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("dforge: error: run_dir: a run launched as several")
    assert not (tmp_path / "runs").exists()


TINY_DIT = ["model.backbone=dit", "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2",
            "model.dit.patch_size=4"]


def train_two_processes(run_dir, strategy: str, *overrides: str, steps: int = 3) -> dict:
    """`dforge train tiny` on two CPU processes for ``steps`` steps; its final checkpoint."""
    result = subprocess.run(
        CLI + ["train", "tiny", f"run_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
               "trainer.devices=2", f"trainer.strategy={strategy}", "trainer.log_every_n_steps=1",
               f"trainer.checkpoint_every_n_steps={steps}", "trainer.val_every_n_steps=2", *overrides,
               "--no-progress"],
        env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def logged_losses(run_dir) -> list[float]:
    rows = csv.DictReader(open(run_dir / "logs" / "version_0" / "metrics.csv"))
    return [float(row["train/loss"]) for row in rows if row.get("train/loss")]


@pytest.mark.parametrize("model, fsdp_only", [([], []), (TINY_DIT, ["trainer.activation_checkpointing=true"])],
                         ids=["unet", "dit-activation-checkpointing"])
def test_fsdp_trains_as_ddp_does(tmp_path, model, fsdp_only):
    """Same seed, same data: FSDP's losses, weights, EMA and AdamW state are DDP's (to float rounding)."""
    ddp = train_two_processes(tmp_path / "ddp", "ddp", *model)
    fsdp = train_two_processes(tmp_path / "fsdp", "fsdp", *model, *fsdp_only)
    assert logged_losses(tmp_path / "fsdp") == pytest.approx(logged_losses(tmp_path / "ddp"), rel=1e-5)
    assert len(logged_losses(tmp_path / "ddp")) == 3
    assert fsdp["global_step"] == ddp["global_step"] == 3
    assert fsdp["state_dict"].keys() == ddp["state_dict"].keys()  # one consolidated file, the same keys
    for key, value in ddp["state_dict"].items():
        torch.testing.assert_close(fsdp["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    adam_ddp, adam_fsdp = (c["optimizer_states"][0]["state"] for c in (ddp, fsdp))
    assert adam_fsdp.keys() == adam_ddp.keys()  # keyed by parameter index, as DDP's: resumable either way
    for index, state in adam_ddp.items():
        torch.testing.assert_close(adam_fsdp[index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4, atol=1e-10)
    summary = json.loads((tmp_path / "fsdp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert (tmp_path / "fsdp" / "model.safetensors").is_file()

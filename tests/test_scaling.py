"""Beyond one process: two nodes of one process each, FSDP against DDP, resume with another world size.

Every test starts real ``dforge train`` processes on CPU (gloo) with the tiny
preset and a few steps; ``test_resume_ddp.py`` has the single-node DDP and
kill-and-resume tests whose helpers these reuse.
"""

import json
import socket
import subprocess

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

"""Beyond one process: two nodes of one process each, FSDP against DDP, resume with another world size.

Every test starts real ``dforge train`` processes on CPU (gloo) with the tiny
preset and a few steps; ``test_resume_ddp.py`` has the single-node DDP and
kill-and-resume tests whose helpers these reuse.
"""

import copy
import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionforge.cli.main import main
from diffusionforge.sharding import blocks, checkpoint_blocks
from test_cli import assert_one_line_error
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


def slurm_env(node_rank: int, port: int) -> dict:
    """What `srun` sets for task ``node_rank`` of `sbatch --nodes=2 --ntasks-per-node=1` (Lightning's SLURMEnvironment;
    MASTER_ADDR / MASTER_PORT instead of a node list and a job-id port, on one machine)."""
    return dict(cli_env(), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_JOB_NAME="dforge",
                SLURM_JOB_ID="4242", SLURM_PROCID=str(node_rank), SLURM_LOCALID="0", SLURM_NODEID=str(node_rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def node_command(launcher: str, node_rank: int, port: int, args: list[str]) -> tuple[list[str], dict]:
    """One node's command and environment: Lightning's own (NODE_RANK, as SLURM-less clusters set it), srun's
    or torchrun."""
    if launcher in ("env", "slurm"):
        return CLI + args, (node_env if launcher == "env" else slurm_env)(node_rank, port)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}", "--no-python"]
    return torchrun + CLI + args, cli_env()


@pytest.mark.parametrize("launcher", ["env", "slurm", "torchrun"])
def test_two_nodes_train_one_run_together(tmp_path, launcher):
    run_dir = tmp_path / "run"
    args = ["train", "tiny", f"run_dir={run_dir}", "trainer.max_steps=4", "trainer.val_every_n_steps=2",
            "trainer.checkpoint_every_n_steps=2", *TWO_NODES, "--no-progress"]
    port = free_port()
    nodes = []
    for rank in (1, 0):  # rank 1 first: it must not wait for rank 0's files
        command, env = node_command(launcher, rank, port, args)
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert "run dir:" in outputs[1] and "run dir:" not in outputs[0]  # rank 0 exports and reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (run_dir / ".lock").exists()
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_slurm_job_of_other_tasks_per_node_is_one_line(tmp_path):
    env = dict(slurm_env(0, free_port()), SLURM_NTASKS_PER_NODE="3")  # sbatch --ntasks-per-node=3, devices=1
    result = subprocess.run(CLI + ["train", "tiny", f"run_dir={tmp_path / 'run'}", *TWO_NODES], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("dforge: error: trainer: You set `devices=1` in "
                                                             "Lightning, but the number of tasks per node")


def test_a_launched_run_without_run_dir_is_one_line(tmp_path):
    result = subprocess.run(CLI + ["train", "tiny", *TWO_NODES], env=node_env(1, free_port()), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("dforge: error: run_dir: a run launched as several")
    assert not (tmp_path / "runs").exists()


RUNS = ("ddp", "fsdp")
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
    grids = [np.asarray(Image.open(tmp_path / run / "samples" / "step_0000002.png"), dtype=int) for run in RUNS]
    assert np.abs(grids[0] - grids[1]).max() <= 1  # the validation grid at step 2: all FSDP ranks sampled the EMA
    summary = json.loads((tmp_path / "fsdp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["activation_checkpointed_blocks"] == (2 if fsdp_only else 0)  # the tiny DiT's 2 blocks
    assert (tmp_path / "fsdp" / "model.safetensors").is_file()


PROBE = r"""
import hashlib, os, sys
import lightning as L
import torch
from diffusionforge import training
from diffusionforge.cli.main import main


def whole(value):
    return value.full_tensor() if hasattr(value, "full_tensor") else value  # an FSDP shard: every rank gathers


class Probe(L.Callback):
    '''What the resumed fit starts from (after Lightning restored the checkpoint), saved by rank 0.'''

    def on_train_start(self, trainer, module):
        ema = {k: whole(v) for k, v in module.state_dict().items() if k.startswith("ema.")}
        adam = {i: {k: whole(v) for k, v in s.items()}
                for i, s in trainer.optimizers[0].state_dict()["state"].items()}
        epoch_loop = trainer.fit_loop.epoch_loop
        if trainer.is_global_zero:
            torch.save({"step": trainer.global_step, "epoch": trainer.current_epoch, "ema": ema, "adam": adam,
                        "batches_in_epoch": epoch_loop.batch_progress.current.ready,
                        "batches_per_epoch": trainer.num_training_batches}, os.environ["PROBE_OUT"])


class Seen(L.Callback):
    '''Each process appends (epoch, sha1 of each image) of its training batches to RECORD_OUT.<rank>; rank 0 writes
    the hashes of the whole training split to RECORD_OUT.all.'''

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero:
            dataset = trainer.datamodule.train_set
            with open(os.environ["RECORD_OUT"] + ".all", "w") as out:
                out.writelines(digest(dataset[i]["image"]) + "\n" for i in range(len(dataset)))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with open(f"{os.environ['RECORD_OUT']}.{trainer.global_rank}", "a") as out:
            out.writelines(f"{trainer.current_epoch} {digest(image)}\n" for image in batch["image"])


def digest(image):
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


make_trainer = training.make_trainer


def probed_trainer(*args, **kwargs):
    trainer = make_trainer(*args, **kwargs)
    trainer.callbacks.append(Probe())
    trainer.callbacks.append(Seen())
    return trainer


training.make_trainer = probed_trainer
sys.exit(main(sys.argv[1:]))
"""


def processes(count: int, strategy: str) -> list[str]:
    return ["trainer.accelerator=cpu", f"trainer.devices={count}", f"trainer.strategy={strategy}"]


def seen_in_epoch(record: Path, epoch: int = 0) -> list[str]:
    """The image hashes every process of a probed run trained on in ``epoch``."""
    return [line.split()[1] for path in sorted(record.parent.glob(record.name + ".[0-9]"))
            for line in path.read_text().splitlines() if int(line.split()[0]) == epoch]


@pytest.mark.parametrize("strategy, before, after", [("ddp", 2, 1), ("fsdp", 1, 2), ("auto", 1, 1)],
                         ids=["ddp-2-to-1", "fsdp-1-to-2", "same-1"])
def test_resume_with_another_number_of_processes(tmp_path, strategy, before, after):
    """The resumed fit starts at the saved step with the saved EMA and AdamW state, at the same place in the
    epoch counted in images (8 batches per process and epoch on 2 processes, 16 on 1), and goes on with the
    epoch's unseen images: over the interrupted epoch every training image is seen, once, but for the odd
    batch a 1 -> 2 resume cannot split (256 images, batches of 16)."""
    run_dir, probe = tmp_path / "run", tmp_path / "probe.py"
    probe.write_text(PROBE)
    first_record, second_record = tmp_path / "first" / "seen", tmp_path / "second" / "seen"
    first_record.parent.mkdir()
    second_record.parent.mkdir()
    first = subprocess.run([sys.executable, str(probe), "train", "tiny", f"run_dir={run_dir}", "trainer.max_steps=5",
                            "trainer.checkpoint_every_n_steps=5", "trainer.val_every_n_steps=100",
                            *processes(before, strategy), "--no-progress"],
                           env=dict(cli_env(), PROBE_OUT=str(tmp_path / "first.pt"), RECORD_OUT=str(first_record)),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5 and saved["world_size"] == before
    resumed_at = 5 * before // after  # batches per process of the epoch done, counted for `after` processes
    end_of_epoch = 5 + 16 // after - resumed_at
    resumed = subprocess.run([sys.executable, str(probe), "train", "--resume", str(run_dir),
                              f"trainer.max_steps={end_of_epoch}",
                              *processes(after, strategy if after > 1 else "auto"), "--no-progress"],
                             env=dict(cli_env(), PROBE_OUT=str(tmp_path / "start.pt"), RECORD_OUT=str(second_record)),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    start = torch.load(tmp_path / "start.pt", weights_only=True)
    assert start["step"] == 5 and start["epoch"] == saved["epoch"] == 0
    assert start["batches_per_epoch"] == 16 // after
    assert start["batches_in_epoch"] == resumed_at  # the same images, whole batches
    ema = {k: v for k, v in saved["state_dict"].items() if k.startswith("ema.")}
    assert start["ema"].keys() == ema.keys()
    for key, value in ema.items():
        torch.testing.assert_close(start["ema"][key], value, rtol=0, atol=0, msg=key)
    adam = saved["optimizer_states"][0]["state"]
    assert start["adam"].keys() == adam.keys()
    for index, state in adam.items():
        for name, value in state.items():
            torch.testing.assert_close(start["adam"][index][name], value, rtol=0, atol=0)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert (summary["resumed_from_step"], summary["global_step"], summary["world_size"]) == (5, end_of_epoch, after)
    # the data position: the two fits together trained on the whole split in epoch 0
    before_seen, after_seen = seen_in_epoch(first_record), seen_in_epoch(second_record)
    assert len(before_seen) == 5 * before * 16 and len(after_seen) == (16 // after - resumed_at) * after * 16
    everything = (tmp_path / "first" / "seen.all").read_text().split()
    assert len(everything) == len(set(everything)) == 256
    assert set(before_seen) | set(after_seen) == set(everything)
    assert len(before_seen) + len(after_seen) - 256 == 5 * before * 16 - resumed_at * after * 16


def test_activation_checkpointing_recomputes_each_block_with_the_same_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from test_unet import _build, _randomise

    plain = _randomise(_build()).train()
    wrapped = copy.deepcopy(plain)
    levels = len(plain.input_blocks) + 1 + len(plain.output_blocks)  # each input and output block, the middle one
    assert checkpoint_blocks(wrapped) == len(blocks(plain)) == levels
    assert sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules()) == levels
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # checkpoints and weights load either way
    calls = {"plain": 0, "wrapped": 0}
    blocks(plain)[1].register_forward_pre_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    inner = blocks(wrapped)[1]  # inside its CheckpointWrapper
    inner.register_forward_pre_hook(lambda *_: calls.__setitem__("wrapped", calls["wrapped"] + 1))
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 70])
    kept = {}
    for name, model in (("plain", plain), ("wrapped", wrapped)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda a: sizes.append(a.numel()) or a, lambda a: a):
            loss = model(x, t).square().mean()
        kept[name] = sum(sizes)
        loss.backward()
    assert calls == {"plain": 1, "wrapped": 2}  # the block ran again in backward (pre-hooks: recompute stops early)
    assert kept["wrapped"] < kept["plain"] / 4  # what backward keeps from the forward: the blocks' inputs only
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.mark.parametrize("args, fragment", [
    (["fashion-vae", "trainer.strategy=fsdp"], "trainer.strategy=fsdp: AutoencoderModule"),
    (["tiny", "trainer.strategy=fsdp_cpu_offload"], "trainer.strategy: 'fsdp_cpu_offload' (Lightning's FSDP1)"),
])
def test_what_cannot_be_sharded_is_one_line(tmp_path, capsys, args, fragment):
    code = main(["train", *args, f"run_dir={tmp_path / 'run'}", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("saved_world, world, current, expected", [
    (2, 1, {"ready": 5, "completed": 4, "started": 5, "processed": 5}, [10, 9, 10, 10]),  # mid-step save kept
    (1, 2, {"ready": 5, "completed": 4, "started": 5, "processed": 5}, [2, 1, 2, 2]),  # the odd batch: not seen
    (1, 2, {"ready": 1, "completed": 0, "started": 1, "processed": 1}, [1, 0, 1, 1]),  # never below zero
    (2, 2, {"ready": 3, "completed": 3, "started": 3, "processed": 3}, [3, 3, 3, 3]),  # same world: untouched
])
def test_epoch_position_counts_the_same_images(saved_world, world, current, expected):
    from diffusionforge.epoch_position import BATCH_PROGRESS, rescale_epoch_position

    total = dict(current)
    checkpoint = {"loops": {"fit_loop": {BATCH_PROGRESS: {"current": dict(current), "total": total}}}}
    rescale_epoch_position(checkpoint, saved_world, world)
    progress = checkpoint["loops"]["fit_loop"][BATCH_PROGRESS]
    assert list(progress["current"].values()) == expected
    assert progress["total"] == current  # the run's batch count (steps, validation timing) is not the epoch's

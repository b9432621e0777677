"""Step time of fashion-ldm-text with and without a latent cache, and what the cache costs once.

Three ways of feeding the same model (the preset's UNet, its fashion-vae first
stage, all-MiniLM-L6-v2 captions) the same batch size of training batches,
fp32, one process:

===================  ===================================================================
``images``           the preset as it trains: each step VAE-encodes its images; the text
                     encoder runs only for captions it has not seen (its per-caption LRU,
                     ``model.conditioning.text.cache_size``; class-name captions repeat)
``images, no LRU``   ``cache_size=0``: the text encoder runs on every caption of every
                     step, as it does for a folder whose every image has its own caption
``cache``            ``data.cache=DIR``: stored posterior sampled, stored caption embeddings
===================  ===================================================================

A step is: fetch the next batch from the run's DataLoader, diffusion loss,
backward, AdamW. ``--rounds`` x ``--steps`` steps are timed after
``--warmup``, one step of each variant in turn, so that a machine whose load
changes slows all variants alike; the median step is reported, in wall time
and in the process's CPU time (less sensitive to other jobs on a shared
machine). The first stage is ``--vae`` (a fashion-vae run) or, without it, a
fashion-vae run trained for a few steps here (the preset's architecture: the
encoder's cost does not depend on its weights). The cache is made with
`dforge cache` of the preset (its whole training split), timed.

    python benchmarks/latent_cache.py [--vae runs/fashion-vae] [--steps 10] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusionforge.caching import cache
from diffusionforge.cli.main import main as dforge
from diffusionforge.config import load_config
from diffusionforge.data.datamodule import ImageDataModule
from diffusionforge.machine import describe_machine, machine_line
from diffusionforge.tasks import task_of

PRESET = "fashion-ldm-text"
QUICK_VAE = ["trainer.max_steps=4", "trainer.max_time=null", "data.limit_train=256", "trainer.val_every_n_steps=4",
             "trainer.limit_val_batches=1", "trainer.precision=32-true", "optim.warmup_steps=1"]


class Variant:
    """A model and the training batches of one way of feeding it."""

    def __init__(self, overrides: list[str], state: dict | None):
        config = load_config(PRESET, overrides)
        self.datamodule = ImageDataModule(config.data, seed=config.seed)
        self.datamodule.setup("fit")
        config, self.model = task_of(config).build(config, self.datamodule)
        if state is not None:
            self.model.load_state_dict(state)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-4)
        self.batches = iter(self.datamodule.train_dataloader())
        self.times: list[float] = []  # wall seconds per timed step
        self.cpu_times: list[float] = []  # CPU seconds of this process per timed step (all its threads)

    def step(self, timed: bool) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        batch = next(self.batches)
        loss = self.model.diffusion_loss(batch).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if timed:
            self.times.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu)


def first_stage(vae: str | None, work: Path) -> str:
    if vae is not None:
        return vae
    run_dir = work / "fashion-vae"
    assert dforge(["train", "fashion-vae", *QUICK_VAE, f"run_dir={run_dir}", "--no-progress"]) == 0
    return str(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default=None, help="a fashion-vae run (default: train a 4-step one here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/latent_cache.json")
    args = parser.parse_args()
    machine = describe_machine()
    print(machine_line(machine, "32-true", "fp32 benchmark", None))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = [f"model.latent.run_dir={first_stage(args.vae, work)}", "trainer.precision=32-true"]
        started = time.perf_counter()
        summary = cache(PRESET, work / "cache", base, progress=False)
        cache_wall = time.perf_counter() - started
        print(f"cache: {summary.count} images, {summary.captions} distinct captions: {summary.seconds:.1f} s "
              f"encoding, {cache_wall:.1f} s with building the model and writing")
        torch.manual_seed(0)
        variants = {"images": Variant(base, None)}
        state = variants["images"].model.state_dict()
        variants["images, no LRU"] = Variant([*base, "model.conditioning.text.cache_size=0"], state)
        variants["cache"] = Variant([*base, f"data.cache={work / 'cache'}"], state)
        for variant in variants.values():
            for _ in range(args.warmup):
                variant.step(timed=False)
        for _ in range(args.rounds * args.steps):  # one step of each in turn: load changes hit all alike
            for variant in variants.values():
                variant.step(timed=True)
    batch = variants["images"].datamodule.config.batch_size
    rows = {name: {"median_step_s": statistics.median(v.times), "mean_step_s": statistics.mean(v.times),
                   "median_cpu_step_s": statistics.median(v.cpu_times), "steps": len(v.times),
                   "img_per_s": batch / statistics.median(v.times)}
            for name, v in variants.items()}
    for name, row in rows.items():
        speedup = rows["images"]["median_step_s"] / row["median_step_s"]
        cpu_speedup = rows["images"]["median_cpu_step_s"] / row["median_cpu_step_s"]
        print(f"{name:16s} median step {row['median_step_s'] * 1000:7.1f} ms wall (x{speedup:.2f} of images), "
              f"{row['median_cpu_step_s'] * 1000:7.1f} ms CPU (x{cpu_speedup:.2f}); {row['img_per_s']:6.1f} img/s; "
              f"{row['steps']} steps, batch {batch}")
    result = {"preset": PRESET, "batch_size": batch, "precision": "fp32", "machine": machine.as_dict(),
              "cache": {"images": summary.count, "captions": summary.captions, "encoding_s": summary.seconds,
                        "wall_s": cache_wall},
              "variants": rows, "command": "python benchmarks/latent_cache.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

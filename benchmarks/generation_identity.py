"""Generation from existing runs is bit-identical across a code change.

A refactor that claims "behaviour unchanged" must leave what a user already
has working exactly as before: runs trained by the old code load, and the same
seed and sampler give the same tensors, to the bit. This script checks that
for one run of each family, in three steps:

1. ``train DIR``: trains small runs of every family with the code on the
   Python path (run it with the *old* checkout first on ``PYTHONPATH``):
   a fashion-vae autoencoder, then the pixel default (fashion-ddpm),
   fashion-ldm, fashion-dit, fashion-lbm-sr, fashion-lbm-inpaint and
   fashion-arldm on its latents; a few dozen steps each (the point is the
   code path, not quality).
2. ``record DIR``: generates from every run (fixed seeds; DDIM and DDPM for
   the Gaussian runs, guidance on; 1 and 2 Euler steps for the bridges; a
   3-frame story) and stores the float tensors in ``DIR/reference.safetensors``,
   plus the PNGs the CLI writes for the same requests.
3. ``check DIR``: the same with the code now on the path, compared with
   ``torch.equal`` (tensors) and pixel by pixel (CLI PNGs); prints one row per
   output and exits 1 on any difference.

    PYTHONPATH=/tmp/before/src python benchmarks/generation_identity.py train /tmp/identity
    PYTHONPATH=/tmp/before/src python benchmarks/generation_identity.py record /tmp/identity
    python benchmarks/generation_identity.py check /tmp/identity

(``git worktree add /tmp/before <old commit>`` gives the old checkout.) Runs
single-threaded so that the float results do not depend on thread scheduling.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

FAMILIES = {  # run name -> (preset, overrides); the latent runs use DIR/vae
    "vae": ("fashion-vae", ["trainer.max_steps=40", "trainer.max_time=null", "optim.warmup_steps=5",
                            "trainer.val_every_n_steps=1000", "autoencoder.loss.disc_start=10"]),
    "pixel": ("fashion-ddpm", ["trainer.max_steps=30", "trainer.time_budget=null", "optim.schedule=steps",
                               "optim.warmup_steps=5", "trainer.val_every_n_steps=1000"]),
    "ldm": ("fashion-ldm", ["trainer.max_steps=30", "optim.warmup_steps=5", "trainer.val_every_n_steps=1000"]),
    "dit": ("fashion-dit", ["trainer.max_steps=30", "optim.warmup_steps=5", "trainer.val_every_n_steps=1000"]),
    "lbm-sr": ("fashion-lbm-sr", ["trainer.max_steps=30", "optim.warmup_steps=5",
                                  "trainer.val_every_n_steps=1000"]),
    "lbm-inpaint": ("fashion-lbm-inpaint", ["trainer.max_steps=30", "optim.warmup_steps=5",
                                            "trainer.val_every_n_steps=1000"]),
    "arldm": ("fashion-arldm", ["trainer.max_steps=20", "optim.warmup_steps=5",
                                "trainer.val_every_n_steps=1000"]),
}
GAUSSIAN = ("pixel", "ldm", "dit")
BRIDGES = ("lbm-sr", "lbm-inpaint")
CAPTIONS = ["a sneaker at the top left", "it moves to the right", "it gets smaller"]


def dforge(*args: str) -> None:
    """The CLI of the code on the path, in a subprocess (its own seeds and threads)."""
    subprocess.check_call([sys.executable, "-m", "diffusionforge.cli.main", *args], stdout=subprocess.DEVNULL)


def train(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (preset, overrides) in FAMILIES.items():
        if (root / name / "train_summary.json").is_file():
            continue
        latent = [f"model.latent.run_dir={root / 'vae'}"] if name not in ("vae", "pixel") else []
        dforge("train", preset, f"run_dir={root / name}", *overrides, *latent, "--no-progress")


def load_model(run_dir: Path):
    """The run's model with its EMA weights, through whichever loader this version of the code has."""
    for module, function in (("diffusionforge.tasks", "load_run_model"), ("diffusionforge.runs", "load_run_model")):
        try:
            loader = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError):
            continue
        return loader(run_dir)[0]
    raise SystemExit("no run loader found in diffusionforge.tasks or diffusionforge.runs")


def sample_request(**fields):
    from diffusionforge.models.generative import SampleRequest

    return SampleRequest(**fields)


def test_source(run_dir: Path, count: int) -> dict:
    """The first ``count`` test pairs of a bridge run, degraded as in training (seeded)."""
    from diffusionforge.config.loader import load_config

    config = load_config(str(run_dir / "config.yaml"))
    module = importlib.import_module("diffusionforge.data.datamodule")
    datamodule = module.ImageDataModule(config.data, seed=config.seed)
    datamodule.setup("test")
    items = [datamodule.test_set[i] for i in range(count)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0] if torch.is_tensor(items[0][key])}


@torch.no_grad()
def generate(root: Path) -> dict[str, torch.Tensor]:
    """Every output of every run, by name."""
    torch.set_num_threads(1)
    out = {}
    for name in GAUSSIAN:
        model = load_model(root / name)
        labels = torch.arange(6) % 10
        batch = model.label_batch(labels)
        for sampler, steps in (("ddim", 10), ("ddpm", 8)):
            request = sample_request(sampler=sampler, steps=steps, guidance=2.0, spacing="trailing")
            out[f"{name}/{sampler}"] = model.sample(batch, 6, request, generator=torch.Generator().manual_seed(0))
    for name in BRIDGES:
        model = load_model(root / name)
        batch = test_source(root / name, 4)
        for steps in (1, 2):
            out[f"{name}/euler{steps}"] = model.translate(dict(batch), steps=steps,
                                                          generator=torch.Generator().manual_seed(0))
    model = load_model(root / "arldm")
    request = sample_request(sampler="ddim", steps=10, guidance=2.0)
    out["arldm/story"] = model.generate([CAPTIONS] * 2, request, generator=torch.Generator().manual_seed(0))
    return out


def cli_outputs(root: Path, into: Path) -> dict[str, Path]:
    """The PNGs of `dforge sample` / `story` for the same kind of requests."""
    into.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in GAUSSIAN:
        path = into / f"{name}.png"
        dforge("sample", str(root / name), "--num", "10", "--steps", "10", "--seed", "1", "--out", str(path))
        paths[f"{name}/cli"] = path
    path = into / "arldm.png"
    dforge("story", str(root / "arldm"), "--captions", *CAPTIONS, "--steps", "10", "--out", str(path))
    paths["arldm/cli"] = path
    return paths


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["train", "record", "check"])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    from safetensors.torch import load_file, save_file

    root = args.dir.resolve()
    if args.mode == "train":
        train(root)
        return 0
    tensors = generate(root)
    if args.mode == "record":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "reference.safetensors"))
        cli_outputs(root, root / "reference-png")
        print(f"recorded {len(tensors)} tensors and the CLI PNGs in {root}")
        return 0
    reference = load_file(str(root / "reference.safetensors"))
    rows, failed = [], 0
    for key, ref in reference.items():
        now = tensors.get(key)
        same = now is not None and now.shape == ref.shape and torch.equal(now, ref)
        diff = "-" if now is None or now.shape != ref.shape else f"{(now - ref).abs().max().item():.3g}"
        rows.append((key, tuple(ref.shape), "identical" if same else "DIFFERENT", diff))
        failed += not same
    for key, path in cli_outputs(root, root / "check-png").items():
        ref_path = root / "reference-png" / path.name
        same = np.array_equal(pixels(path), pixels(ref_path))
        rows.append((key, pixels(path).shape, "identical" if same else "DIFFERENT", "png"))
        failed += not same
    for key, shape, verdict, diff in rows:
        print(f"{key:22s} {str(shape):22s} {verdict:10s} max|diff| {diff}")
    print(f"{len(rows) - failed}/{len(rows)} outputs bit-identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

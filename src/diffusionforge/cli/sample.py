"""`dforge sample RUN_DIR`: draw a grid of samples from a trained run."""

from __future__ import annotations

import argparse
import math
import sys

import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..models.generative import SampleRequest
from ..runs import load_run_model, open_run
from ..utils.images import save_grid
from ..utils.outputs import PNG, check_output_file

EXAMPLE = """example:
  dforge sample runs/fashion-ddpm-20261123-101500 --num 64 --sampler ddim --steps 50 \\
      --guidance 2 --seed 0 --class 7 --out sneakers.png"""


def add_sampling_arguments(p: argparse.ArgumentParser, num: int, batch_size: int,
                           steps_help: str = "sampling steps (default 50)", steps_nargs=None) -> None:
    """RUN_DIR and the options shared by `sample` and `evaluate` (read by request_from_args)."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `dforge train`")
    p.add_argument("--num", type=int, default=num, help=f"number of images (default {num})")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="(default ddim)")
    p.add_argument("--steps", type=int, default=None if steps_nargs else 50, nargs=steps_nargs, help=steps_help)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic (default 0)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's sample.guidance)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per forward batch (default {batch_size})")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="network arithmetic while sampling; bf16 autocast is about 2x faster "
                        "where native (default fp32)")


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained run", epilog=EXAMPLE,
                       description="Sample a PNG grid from a run's exported EMA weights.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(p, num=64, batch_size=256)
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class to sample (default: classes in turn)")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.set_defaults(handler=run)


def class_labels(num: int, num_classes: int | None, class_label: int | None) -> torch.Tensor | None:
    if num_classes is None:
        if class_label is not None:
            raise ConfigError("--class given but the model is not class-conditional")
        return None
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ConfigError(f"--class must be in 0..{num_classes - 1}, got {class_label}")
    if class_label is not None:
        return torch.full((num,), class_label, dtype=torch.long)
    return torch.arange(num) % num_classes


def request_from_args(args: argparse.Namespace, config) -> SampleRequest:
    """The sampling request of --sampler/--steps/--eta/--guidance/--raw, defaults from the run."""
    if args.steps > config.model.process.num_timesteps:
        raise ConfigError(f"--steps {args.steps} exceeds the process's "
                          f"{config.model.process.num_timesteps} timesteps")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise ConfigError(f"--eta: must be a number >= 0, got {args.eta}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ConfigError(f"--guidance: must be a finite number, got {args.guidance}")
    return SampleRequest(
        sampler=args.sampler, steps=args.steps, eta=args.eta, spacing=config.sample.spacing,
        guidance=config.sample.guidance if args.guidance is None else args.guidance,
        guidance_channels=config.sample.guidance_channels,
        clip_denoised=config.sample.clip_denoised, use_ema=not args.raw, precision=args.precision)


def run(args: argparse.Namespace) -> int:
    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        raise ConfigError("--num, --steps and --batch-size must be >= 1")
    out = check_output_file(args.out, PNG)
    config = open_run(args.run_dir)[1]  # every input is checked before the model is built
    if config.task == "bridge":
        raise ConfigError(f"{args.run_dir} is an image-to-image bridge run: use `dforge translate`")
    if config.task == "story":
        raise ConfigError(f"{args.run_dir} is a story run: use `dforge story RUN_DIR --captions ...`")
    request = request_from_args(args, config)
    model, config = load_run_model(args.run_dir, use_ema=not args.raw)
    labels = class_labels(args.num, model.num_classes, args.class_label)
    generator = torch.Generator().manual_seed(args.seed)
    chunks = []
    for start in tqdm(range(0, args.num, args.batch_size), desc="sampling", file=sys.stderr):
        n = min(args.batch_size, args.num - start)
        batch = {} if labels is None else model.label_batch(labels[start:start + n])
        chunks.append(model.sample(batch, n, request, generator=generator))
    images = torch.cat(chunks)
    nrow = model.num_classes if labels is not None and args.class_label is None else None
    save_grid(images, out, nrow=nrow)
    print(f"wrote {len(images)} samples to {out}", file=sys.stderr)
    return 0

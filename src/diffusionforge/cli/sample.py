"""`dforge sample RUN_DIR`: draw a grid of samples from a trained run."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..utils.outputs import PNG, check_output_file

EXAMPLE = """example:
  dforge sample runs/fashion-flow-20261123-101500 --num 64 --sampler flow_euler --steps 50 \\
      --guidance 2 --seed 0 --class 7 --out sneakers.png
  dforge sample runs/fashion-flow-20261123-101500 --sampler dpmpp_2m --schedule karras --steps 10
  dforge sample runs/fashion-flow-20261123-101500 --class Sneaker --num 8
  dforge sample runs/fashion-ldm-text-20261123-101500 --prompt "a photo of a bag" \
      --negative-prompt "a photo of a sneaker" --guidance 3
  dforge sample runs/fashion-flow-20261123-101500 --init-image shoe.png --strength 0.6   (SDEdit)
  dforge sample runs/fashion-flow-20261123-101500 --init-image shoe.png --mask holes.png (white = repaint)"""


def add_sampling_arguments(p: argparse.ArgumentParser, num: int, batch_size: int,
                           steps_help: str = "sampling steps (default 50)", steps_nargs=None) -> None:
    """RUN_DIR and the options shared by `sample`, `story` and `evaluate` (read by request_of)."""
    from ..samplers.names import SAMPLER_NAMES, SCHEDULE_NAMES  # torch-free

    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `dforge train`")
    p.add_argument("--num", type=int, default=num, help=f"number of images (default {num})")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, metavar="SAMPLER",
                   help=f"one of {', '.join(SAMPLER_NAMES)} (default: the run's sample.sampler, usually ddim); "
                        "ddpm/ddim/pndm/plms/unipc walk DDPM runs, flow_euler flow runs, the others any run")
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default=None,
                   help="sigma schedule of euler/heun/dpmpp_*: discrete (the run's timesteps, sample.spacing), "
                        "karras (rho 7) or exponential (default: the run's sample.schedule, usually discrete)")
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


def request_of(args: argparse.Namespace, config):
    """The sampling request of --sampler/--schedule/--steps/--eta/--guidance/--raw/--precision for the run."""
    from ..tasks.diffusion import sample_request

    return sample_request(config, args.sampler, args.steps, args.eta, args.guidance, use_ema=not args.raw,
                          precision=args.precision, schedule=args.schedule)


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained run", epilog=EXAMPLE,
                       description="Sample a PNG grid from a run's exported EMA weights.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(p, num=64, batch_size=256)
    p.add_argument("--class", dest="class_label", default=None, metavar="CLASS",
                   help="class to sample: a label or a class name of the run (default: classes in turn)")
    p.add_argument("--prompt", default=None, help="caption of every sample (text-conditioned runs)")
    p.add_argument("--negative-prompt", default=None,
                   help="caption of the unconditional branch of guidance instead of the empty one")
    p.add_argument("--init-image", default=None, metavar="PNG",
                   help="start from this image (the run's size and channels): SDEdit, or inpainting with --mask")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img: how far the image is noised, 0..1 (steps taken = int(steps * strength); "
                        "default 0.8, with --mask 1.0)")
    p.add_argument("--mask", default=None, metavar="PNG",
                   help="inpainting: white = repaint, black = keep the --init-image's pixels")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        raise ConfigError("--num, --steps and --batch-size must be >= 1")
    out = check_output_file(args.out, PNG)
    from ..runs import open_run
    from ..tasks import command_task
    from ..tasks.diffusion import load_image_inputs, resolve_class, sample_images
    from ..utils.images import save_grid

    run_dir, config = open_run(args.run_dir)  # every input is checked before the model is built
    task = command_task(config, "sample", run_dir)
    request = request_of(args, config)
    class_label = resolve_class(config, args.class_label, run_dir)
    init_image, mask = load_image_inputs(config, args.init_image, args.mask, args.strength)
    model = task.load(run_dir, config, use_ema=not args.raw)
    images, nrow = sample_images(model, args.num, request, class_label, args.seed, args.batch_size,
                                 prompt=args.prompt, negative_prompt=args.negative_prompt,
                                 init_image=init_image, strength=args.strength, mask=mask)
    save_grid(images, out, nrow=nrow)
    print(f"wrote {len(images)} samples to {out}", file=sys.stderr)
    return 0

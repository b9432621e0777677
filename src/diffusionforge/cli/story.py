"""`dforge story RUN_DIR --captions "..." "..." [--first-frame F.png] --out story.png`.

Autoregressive story generation with a story run (task=story, e.g. `dforge
train fashion-arldm`): frame j is sampled from its caption and the captions
and frames before it, the generated frames included, with classifier-free
guidance and the chosen sampler. The output is one strip of frames per
story, left to right; ``--num`` stories from the same captions (different
noise) are stacked as rows.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..errors import ConfigError, DataError
from ..runs import load_run_model, open_run
from ..utils.images import load_image, save_grid
from ..utils.outputs import PNG, check_output_file
from .sample import add_sampling_arguments, request_from_args

EXAMPLE = """examples:
  dforge story runs/fashion-arldm --captions "a sneaker at the top left" "it moves to the right" \\
      "it gets smaller" "it turns around" --out story.png
  dforge story runs/fashion-arldm-cont --first-frame frame0.png \\
      --captions "a bag in the center" "it moves to the top" "the same bag, now larger" --out story.png"""


def add_parser(sub) -> None:
    p = sub.add_parser("story", help="generate a story frame by frame with a story (AR-LDM) run",
                       epilog=EXAMPLE, description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(p, num=1, batch_size=16)
    p.add_argument("--captions", nargs="+", required=True, metavar="CAPTION",
                   help="one caption per frame (at most the run's data.story.frames)")
    p.add_argument("--first-frame", default=None, metavar="FRAME.png",
                   help="the given first frame (continuation; required by continuation runs)")
    p.add_argument("--out", default="story.png", help="output PNG: one row of frames per story (default story.png)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        raise ConfigError("--num, --steps and --batch-size must be >= 1")
    out = check_output_file(args.out, PNG)
    config = open_run(args.run_dir)[1]  # every input is checked before the model is built
    if config.task != "story":
        raise ConfigError(f"{args.run_dir} is a task={config.task} run; `dforge story` needs a story run "
                          "(task=story, e.g. `dforge train fashion-arldm`)")
    frames = config.data.story.frames
    captions = [c.strip() for c in args.captions]
    if len(captions) > frames:
        raise ConfigError(f"--captions: {len(captions)} captions, but this run tells stories of at most "
                          f"{frames} frames")
    if any(not c for c in captions):
        raise ConfigError("--captions: a caption is empty")
    first = None
    if args.first_frame is not None:
        size = config.data.image_size
        first = load_image(args.first_frame, config.data.channels)
        if tuple(first.shape[-2:]) != (size, size):
            raise DataError(f"{args.first_frame}: is {first.shape[-1]}x{first.shape[-2]}; this run's frames "
                            f"are {size}x{size}")
    elif config.story.task == "continuation":
        raise ConfigError("--first-frame: this run continues stories (story.task=continuation); give frame 0")
    if first is not None and len(captions) < 2:
        raise ConfigError("--captions: with --first-frame give its caption and at least one more")
    request = request_from_args(args, config)
    model, config = load_run_model(args.run_dir, use_ema=not args.raw)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for start in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - start)
        given = None if first is None else first.expand(n, -1, -1, -1)
        rows.append(model.generate([captions] * n, request, first_frames=given, generator=generator))
    stories = torch.cat(rows)  # (num, n, C, H, W)
    save_grid(stories.flatten(0, 1), out, nrow=len(captions))
    print(f"wrote {args.num} stor{'ies' if args.num > 1 else 'y'} of {len(captions)} frames to {out}",
          file=sys.stderr)
    return 0

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

from ..errors import ConfigError
from ..utils.outputs import PNG, check_output_file
from .sample import add_sampling_arguments, request_of

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
    from ..runs import open_run
    from ..tasks import command_task
    from ..tasks.story import generate_stories, story_inputs
    from ..utils.images import save_grid

    run_dir, config = open_run(args.run_dir)  # every input is checked before the model is built
    task = command_task(config, "story", run_dir)
    captions, first = story_inputs(config, args.captions, args.first_frame)
    request = request_of(args, config)
    model = task.load(run_dir, config, use_ema=not args.raw)
    stories = generate_stories(model, captions, request, args.num, first, args.seed, args.batch_size)
    save_grid(stories.flatten(0, 1), out, nrow=len(captions))  # (num * n, C, H, W)
    print(f"wrote {args.num} stor{'ies' if args.num > 1 else 'y'} of {len(captions)} frames to {out}",
          file=sys.stderr)
    return 0

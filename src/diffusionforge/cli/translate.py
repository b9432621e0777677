"""`dforge translate RUN_DIR INPUT.png [--mask MASK.png] --steps K --out OUT.png`.

Image-to-image translation with a bridge run (task=bridge, e.g. `dforge
train fashion-lbm-sr`). INPUT is read like the run's training sources:

- an image of the run's size (``data.image_size`` square) is the source as is;
- for a super-resolution run, an image ``scale`` times smaller on each side is
  the low-resolution input: it is brought up to size with the run's
  ``data.degradation.upsample`` mode first, as the training sources were;
- for an inpainting run, MASK (same size as INPUT, white = the hole to fill)
  is required: the hole is filled with ``data.degradation.fill`` as in
  training, and the pixels outside it are kept in the output.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..utils.outputs import PNG, check_output_file

EXAMPLE = """examples:
  dforge translate runs/fashion-lbm-sr LR.png --steps 1 --out SR.png       # 7x7 -> 28x28
  dforge translate runs/fashion-lbm-inpaint photo.png --mask hole.png --out filled.png"""


def add_parser(sub) -> None:
    p = sub.add_parser("translate", help="translate an image with a bridge (LBM) run", epilog=EXAMPLE,
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a bridge run (task=bridge) made by `dforge train`")
    p.add_argument("input", metavar="INPUT.png", help="the source image")
    p.add_argument("--mask", default=None, metavar="MASK.png",
                   help="inpainting runs: white = region to fill (same size as INPUT)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's bridge.steps)")
    p.add_argument("--out", default="translated.png", help="output PNG (default translated.png)")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class-conditional runs: the class of the image")
    p.add_argument("--seed", type=int, default=0, help="seed of the bridge noise between steps (default 0)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="network arithmetic (default fp32)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    out = check_output_file(args.out, PNG)
    from ..runs import open_run
    from ..tasks import command_task
    from ..tasks.bridge import source_batch, translate_image
    from ..utils.images import save_png, to_uint8

    run_dir, config = open_run(args.run_dir)  # every input is checked before the model is built
    task = command_task(config, "translate", run_dir)
    batch = source_batch(config, args.input, args.mask)
    model = task.load(run_dir, config, use_ema=not args.raw)
    image = translate_image(model, batch, args.class_label, args.steps, args.seed, args.precision)
    save_png(to_uint8(image)[0], out)
    steps = model.sample_steps if args.steps is None else args.steps
    print(f"wrote {out} ({steps} step{'s' if steps > 1 else ''})", file=sys.stderr)
    return 0

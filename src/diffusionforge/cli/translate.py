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

import torch

from ..errors import ConfigError, DataError
from ..runs import load_run_model, open_run
from ..utils.images import load_image, save_png, to_uint8
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


def source_batch(config, input_path: str, mask_path: str | None) -> dict:
    """The batch translate() needs: source (1, C, S, S) in [-1, 1] (+ mask (1, 1, S, S), 1 = hole)."""
    from ..data.degradations import upsample

    data, degradation = config.data, config.data.degradation
    size = data.image_size
    image = load_image(input_path, data.channels)
    height, width = image.shape[-2:]
    if (height, width) != (size, size):
        scale = degradation.scale if degradation.task == "super_resolution" else None
        if scale is not None and (height * scale, width * scale) == (size, size):
            image = upsample(image, (size, size), degradation.upsample)
        else:
            low = f" or {size // scale}x{size // scale} (low resolution, x{scale})" if scale else ""
            raise DataError(f"{input_path}: is {width}x{height}; this run translates {size}x{size} images{low}")
    batch = {config.bridge.source_key: image}
    if degradation.task == "inpainting":
        if mask_path is None:
            raise ConfigError("--mask: this run inpaints; give the mask of the region to fill (white = fill)")
        mask = (load_image(mask_path, 1, any_mode=True) > 0).float()  # white (255) -> 1, black -> 0
        if mask.shape[-2:] != image.shape[-2:]:
            raise DataError(f"{mask_path}: is {mask.shape[-1]}x{mask.shape[-2]}, the input is "
                            f"{image.shape[-1]}x{image.shape[-2]}; they must be the same size")
        batch[config.bridge.source_key] = image * (1 - mask) + degradation.fill * mask
        batch["mask"] = mask
    elif mask_path is not None:
        raise ConfigError(f"--mask: this run does {degradation.task}, which takes no mask")
    return batch


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    out = check_output_file(args.out, PNG)
    config = open_run(args.run_dir)[1]  # every input is checked before the model is built
    if config.task != "bridge":
        raise ConfigError(f"{args.run_dir} is a task={config.task} run; translate needs a bridge run "
                          "(task=bridge, e.g. `dforge train fashion-lbm-sr`)")
    batch = source_batch(config, args.input, args.mask)
    model, config = load_run_model(args.run_dir, use_ema=not args.raw)
    if model.num_classes is not None:
        if args.class_label is None or not 0 <= args.class_label < model.num_classes:
            raise ConfigError(f"--class: this run is class-conditional; give a class in 0..{model.num_classes - 1}")
        batch.update(model.label_batch(torch.tensor([args.class_label])))
    elif args.class_label is not None:
        raise ConfigError("--class given but the run is not class-conditional")
    generator = torch.Generator().manual_seed(args.seed)
    image = model.translate(batch, steps=args.steps, generator=generator, precision=args.precision)
    save_png(to_uint8(image)[0], out)
    steps = model.sample_steps if args.steps is None else args.steps
    print(f"wrote {out} ({steps} step{'s' if steps > 1 else ''})", file=sys.stderr)
    return 0

"""`dforge`: train, sample, evaluate, convert weights, serve a local page and list presets.

Every user error (bad config key, missing file, wrong checkpoint) is a
``DForgeError``: printed as one line ``dforge: error: ...`` with exit
status 2, never a traceback.

Start-up is instant: argparse needs every subcommand's parser for ``--help``,
so ``build_parser`` imports every ``cli`` module, and a ``cli`` module imports
at module level only the standard library and light diffusionforge modules
(``errors``, ``utils.outputs``, ``config.loader``, other ``cli`` modules).
Everything else (``runs``, ``tasks``, ``models``, ``interop``, ``plotting``,
and through them torch, Lightning, numpy, PIL) is imported inside the function
that runs the command. ``tests/test_architecture.py`` checks the imports as
written, ``tests/test_startup.py`` what a fresh interpreter actually loads;
``benchmarks/startup.py`` times it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from ..errors import DForgeError, one_line

EXAMPLES = """examples:
  dforge train                                   # default preset, class-conditional Fashion-MNIST
  dforge train tiny trainer.max_steps=50         # a preset or YAML file, then key=value overrides
  dforge train --resume runs/fashion-flow-20261123-101500
  dforge shard tiny --out shards/fashion        # tar shards (webdataset); then data.name=shards data.root=shards/fashion
  dforge cache fashion-ldm-text --out caches/fashion-text    # encode the data once; then data.cache=caches/fashion-text
  dforge sample runs/fashion-flow-20261123-101500 --num 64 --sampler flow_euler --steps 50 --guidance 2 --out grid.png
  dforge translate runs/fashion-lbm-sr-20261123-101500 low_res.png --steps 1 --out high_res.png
  dforge story runs/fashion-arldm-20261123-101500 --captions "a sneaker at the top left" "it moves to the right" --out story.png
  dforge convert stable-diffusion-v1-5 --kind vae --to ours --out sd15-vae
  dforge import stable-diffusion-v1-5 --out runs/sd15        # a pretrained pipeline as a run directory
  dforge plot runs/fashion-flow-20261123-101500      # loss.png: train and validation loss against step
  dforge serve runs                              # a local page: browse runs, generate (http://127.0.0.1:7860)
  dforge presets
"""


def build_parser() -> argparse.ArgumentParser:
    from . import cache, convert, evaluate, import_, plot, presets, sample, serve, shard, story, train, translate

    parser = argparse.ArgumentParser(
        prog="dforge", description="Train, sample and evaluate diffusion models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, shard, cache, sample, translate, story, evaluate, convert, import_, plot, serve, presets):
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.monotonic()  # trainer.time_budget counts from here
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`dforge train tiny --no-progress seed=1`) join the command's list
        dest = getattr(args, "intermixed", None)
        if dest is None or any(token.startswith("-") or "=" not in token for token in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, dest, [*getattr(args, dest), *extra])
    args.started = started
    try:
        return args.handler(args) or 0
    except DForgeError as err:
        print(f"dforge: error: {one_line(err)}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("dforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

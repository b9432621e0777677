"""`dforge plot RUN_DIR [--out PATH]`: draw the run's loss curve (loss.png)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CheckpointError

DESCRIPTION = """Draw the loss curve of a run from its logs/version_N/metrics.csv: the train
loss (raw and smoothed) and the validation loss against the global step,
across every fit of the run (a resume adds a version). `dforge train` writes
the same RUN_DIR/loss.png at the end of every fit; this redraws it, e.g.
while the run is still training.

examples:
  dforge plot runs/fashion-flow-20261123-101500
  dforge plot runs/fashion-flow-20261123-101500 --out curve.png"""


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss curve (loss.png)", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `dforge train`")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="where to write the PNG (default: RUN_DIR/loss.png)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..plotting import write_loss_plot
    from ..runs import CONFIG_FILE

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    print(write_loss_plot(run_dir, args.out))
    return 0

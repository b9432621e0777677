"""`dforge shard SRC [key=value ...] --out DIR`: write a dataset as webdataset tar shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError

DESCRIPTION = """Write the dataset of a config as POSIX tar shards (webdataset layout: one PNG
per image, .cls labels, .json captions, .source.png / .mask.png of paired
folders) plus DIR/index.json (samples per shard, image size, channels, class
names, which fields exist). SRC is a preset name or a YAML file, then
key=value overrides as for `dforge train` (e.g. data.name=folder
data.root=photos/). Train from the shards with data.name=shards
data.root=DIR (a folder or any URL webdataset opens): the stream is split
across ranks and workers, shuffled per epoch and resumable mid-epoch.

--split train writes every training image of SRC (a run on the shards holds
out data.val_size of them for validation); all writes the run's training
images under DIR/train and its validation images under DIR/val; val only the
latter."""

EXAMPLES = """examples:
  dforge shard tiny --out shards/fashion --shard-size 1000
  dforge shard tiny data.name=folder data.root=photos/ --out shards/photos --split all
  dforge train tiny data.name=shards data.root=shards/fashion
  dforge train tiny data.name=shards data.root=https://example.org/shards/fashion"""


def add_parser(sub) -> None:
    p = sub.add_parser("shard", help="write a dataset as tar shards (data.name=shards)", description=DESCRIPTION,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="a preset name or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.root=photos/)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not hold shards yet)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--split", choices=("train", "val", "all"), default="train",
                   help="which split to write (default train)")
    p.set_defaults(handler=run, intermixed="overrides")  # key=value after the options joins them (main.py)


def run(args: argparse.Namespace) -> int:
    source, overrides = args.source, args.overrides
    if "=" in source or any("=" not in o for o in overrides):
        raise ConfigError("dforge shard: SRC (a preset name or a YAML file) comes first, then key=value overrides")
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size: must be >= 1, got {args.shard_size}")
    from ..config.loader import load_config

    config = load_config(source, overrides)
    from ..data.datamodule import ImageDataModule
    from ..data.shard_writer import write_shards

    out = Path(args.out)
    datamodule = ImageDataModule(config.data, seed=config.seed)
    index = write_shards(datamodule, out, args.split, args.shard_size, seed=config.seed,
                         made_from=f"{source} (data.name={config.data.name})")
    total = sum(len(shards) for shards in index.splits.values())
    print(f"wrote {total} shards and {out / 'index.json'}", file=sys.stderr)
    return 0

"""`dforge cache RUN_OR_CONFIG --out DIR [key=value ...]`: encode a latent run's training data once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError

DESCRIPTION = """Encode the training images of a latent run once through its frozen first
stage (the posterior's mean and std) and text encoder (each caption's token
embeddings, and the empty caption's for classifier-free guidance), with their
class labels, into DIR: safetensors files and index.json. RUN_OR_CONFIG is a
latent run directory or a config / preset (its frozen parts built as `dforge
train` builds them). Train from it with data.cache=DIR: each step then samples
the stored posterior and skips the VAE encoder and the text encoder."""

EXAMPLE = """examples:
  dforge cache fashion-ldm-text model.latent.run_dir=runs/fashion-vae --out caches/fashion-text
  dforge train fashion-ldm-text model.latent.run_dir=runs/fashion-vae data.cache=caches/fashion-text
  dforge cache runs/fashion-ldm-text-20261123-101500 --out caches/fashion-text"""


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="encode a latent run's training data once (latents + text embeddings)",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_OR_CONFIG", help="a latent run directory, a preset name or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (e.g. data.root=...)")
    p.add_argument("--out", required=True, metavar="DIR", help="the cache folder to write (new, empty or a cache)")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder batch (default 256)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run, intermixed="overrides")  # key=value after the options joins them (main.py)


def check_out(out: str) -> Path:
    """--out must be new, empty, or an earlier cache (which is replaced)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / "index.json").is_file():  # data/latent_cache.INDEX_FILE
        raise ConfigError(f"--out {out}: a non-empty folder that is not a latent cache; choose a new folder")
    return path


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]!r}: overrides are key=value (one RUN_OR_CONFIG comes first)")
    out = check_out(args.out)
    from ..caching import cache

    summary = cache(args.source, out, args.overrides, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"wrote {summary.count} latents and {summary.captions} distinct caption embeddings to "
          f"{summary.directory} ({summary.seconds:.1f} s encoding)", file=sys.stderr)
    return 0

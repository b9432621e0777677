"""`dforge train [CONFIG] [key=value ...]` and `dforge train --resume RUN_DIR`."""

from __future__ import annotations

import argparse
import time

DESCRIPTION = """Train a model. With no CONFIG the default preset (class-conditional
rectified flow on the embedded Fashion-MNIST subset, fashion-flow) runs. CONFIG is a preset name
(see `dforge presets`) or a YAML file; key=value overrides follow it, e.g.
trainer.max_steps=500 data.batch_size=64 model.unet.model_channels=32.
`dforge train fashion-vae` trains a KL autoencoder (task=autoencoder), the
first stage of latent diffusion; it writes autoencoder.safetensors."""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="preset name or YAML file, then overrides")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from checkpoints/last.ckpt (overrides may extend it, "
                        "e.g. trainer.max_steps=6000)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run, intermixed="args")  # key=value after the options joins args (main.py)


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(CONFIG or None, the key=value overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def run(args: argparse.Namespace) -> int:
    source, overrides = split_args(args.args)
    started = getattr(args, "started", time.monotonic())  # the time budget counts from the command's start
    if not args.resume:  # a config error answers before Lightning is imported
        from ..config.loader import DEFAULT_PRESET, load_config

        load_config(source or DEFAULT_PRESET, overrides)
    from ..training import train

    return train(source, overrides, resume=args.resume, progress=not args.no_progress, started=started)

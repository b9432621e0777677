"""`dforge presets`: list the shipped configs."""

from __future__ import annotations

import argparse

from ..config.loader import list_presets, preset_description


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the shipped preset configs",
                       description="List the preset configs shipped with diffusionforge.")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name, path in list_presets().items():
        print(f"{name:20s} {preset_description(path)}")
    return 0

"""`dforge convert SRC --kind {vae,unet,dit} --to {ours,diffusers} --out DST`: one network between formats.

SRC is a `dforge train` run directory (read by its task), or any layout
``interop.detect`` recognises: our folder, a diffusers model or pipeline
folder, a CompVis / official DiT checkpoint file. DST is written in a
temporary folder beside it and renamed into place at the end, so a failure
never leaves a half-written DST.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.outputs import check_output_folder, check_output_parent

KINDS = ("dit", "unet", "vae")  # interop.registry.INTEROP's rows
FORMATS = ("ours", "diffusers")

EXAMPLE = """examples:
  dforge convert stable-diffusion-v1-5 --kind vae --to ours --out sd15-vae     # diffusers pipeline folder
  dforge convert v1-5-pruned-emaonly.ckpt --kind unet --to diffusers --out sd15-unet
  dforge convert kl-f4.ckpt --kind vae --config kl-f4-autoencoder.yaml --to ours --out kl-f4  # AutoencoderConfig fields
  dforge convert sd15-vae --kind vae --to diffusers --out sd15-vae-diffusers --overwrite
  dforge convert DiT-XL-2-256x256.pt --kind dit --to diffusers --out dit-xl-2   # official DiT checkpoint
  dforge convert runs/fashion-dit-<time> --kind dit --to ours --out fashion-dit"""

DESCRIPTION = """Convert one network (the KL autoencoder, the Stable Diffusion UNet or
the class-conditional DiT) between formats. SRC is a diffusers model or pipeline folder, a CompVis
checkpoint (.ckpt/.pt/.pth, or .safetensors with CompVis keys; the config
defaults to Stable Diffusion v1, or --config), our format (a folder with
config.json + model.safetensors), or a run directory of `dforge train`. --config is a JSON or YAML
file with our config's fields (AutoencoderConfig / UNetConfig) or a diffusers config.json."""


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a VAE, UNet or DiT between diffusers, CompVis / official and our format",
                       description=DESCRIPTION, epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="diffusers folder, CompVis .ckpt/.safetensors, our folder or a run")
    p.add_argument("--kind", choices=KINDS, required=True, help="which network SRC holds / to take")
    p.add_argument("--to", choices=FORMATS, required=True,
                   help="ours = config.json + model.safetensors; diffusers = a from_pretrained folder")
    p.add_argument("--out", metavar="DST", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--config", metavar="CONFIG", default=None,
                   help="JSON/YAML network config for a CompVis checkpoint (default: Stable Diffusion v1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), check_output_parent(args.out)
    check_output_folder(src, dst, args.overwrite)
    from ..interop.registry import INTEROP, save_network
    from ..tasks import read_network
    from ..utils.atomic import write_folder_atomically

    network, layout = read_network(src, args.kind, None if args.config is None else Path(args.config))
    if args.to == "diffusers":  # refuse what diffusers cannot express before writing anything
        INTEROP[args.kind].config_to_diffusers(network.config)
    write_folder_atomically(dst, lambda folder: save_network(network, args.kind, args.to, folder))
    count = sum(p.numel() for p in network.parameters())
    print(f"wrote {dst}: {args.kind} ({type(network).__name__}, {count:,} parameters) "
          f"in {args.to} format, from the {layout} {src}")
    return 0

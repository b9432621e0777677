"""`dforge import SRC --out RUN_DIR`: a pretrained Stable Diffusion or DiT becomes a run directory.

SRC is a diffusers ``StableDiffusionPipeline`` or ``DiTPipeline`` folder, an
official ``DiT-XL-2-256x256.pt`` (with ``--vae``), or a CompVis Stable
Diffusion v1 ``.ckpt`` / ``.safetensors`` file (with ``--text-encoder``). The
run is written in a temporary folder beside RUN_DIR and renamed into place
at the end (``tasks/imported.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.outputs import check_output_folder, check_output_parent

EXAMPLE = """examples:
  dforge import stable-diffusion-v1-5 --out runs/sd15                 # diffusers StableDiffusionPipeline folder
  dforge sample runs/sd15 --prompt "a photo of an astronaut" --steps 50 --guidance 7.5 --out astronaut.png
  dforge import DiT-XL-2-256 --out runs/dit-xl-2                      # diffusers DiTPipeline folder
  dforge import DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --out runs/dit-xl-2  # official DiT + a diffusers VAE
  dforge import v1-5-pruned-emaonly.ckpt --text-encoder stable-diffusion-v1-5 --out runs/sd15  # CompVis file
  dforge import DiT-XL-2-256 data.root=imagenet-val sample.steps=25 --out runs/dit-xl-2  # overrides after SRC
  dforge evaluate runs/dit-xl-2 --num 1000 --features inception
  dforge convert runs/sd15 --kind unet --to diffusers --out sd15-unet"""

DESCRIPTION = """Import a pretrained pipeline as a normal run directory that `dforge sample`,
`evaluate` and `convert` take: config.yaml (the scheduler as model.process and
sample, the VAE's scaling factor as model.latent.scale_factor),
model.safetensors, first_stage.safetensors, and for Stable Diffusion the CLIP
text encoder + tokenizer in text_encoder/ (encoded as SD does: 77 tokens,
no padding mask). A DiT's class names (id2label) go to class_names.json.
CompVis files hold no tokenizer: --text-encoder names a diffusers
text_encoder + tokenizer folder or a pipeline folder; the CLIP weights in the
file (cond_stage_model.transformer.*) replace that folder's."""


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="import a Stable Diffusion / DiT pipeline or checkpoint as a run directory",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="diffusers pipeline folder, official DiT .pt, or CompVis SD .ckpt/.safetensors")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings of the run's config on top of SRC's, e.g. data.root=DIR "
                        "(evaluate's reference images)")
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="the run directory to write (must not exist or be empty)")
    p.add_argument("--vae", metavar="DIR", default=None, help="diffusers AutoencoderKL folder (official DiT checkpoints)")
    p.add_argument("--text-encoder", metavar="DIR", default=None,
                   help="CLIP text_encoder + tokenizer folder, or a pipeline folder (CompVis SD checkpoints)")
    p.add_argument("--num-heads", type=int, default=None, metavar="N",
                   help="attention heads of an official DiT checkpoint of no published size (S/B/L/XL are known)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty RUN_DIR")
    p.set_defaults(handler=run, intermixed="overrides")  # key=value after the options joins them (main.py)


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), check_output_parent(args.out)
    check_output_folder(src, out, args.overwrite)
    from ..tasks.imported import import_pipeline

    result = import_pipeline(src, out, vae=None if args.vae is None else Path(args.vae),
                             text_encoder=None if args.text_encoder is None else Path(args.text_encoder),
                             num_heads=args.num_heads, overrides=args.overrides)
    parts = ", ".join(f"{name} {count:,}" for name, count in result.parameters.items())
    print(f"wrote {out}: a run from the {result.layout} {src} ({parts} parameters)")
    return 0

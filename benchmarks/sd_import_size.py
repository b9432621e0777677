"""Stable Diffusion v1 at full size on the meta device: the networks `dforge import` builds, counted.

The import path of a CompVis v1 checkpoint builds our ``UNet`` from
``interop.unet.sd_v1_unet_config()``, our ``AutoencoderKL`` from
``interop.vae.sd_v1_vae_config()`` and a ``transformers.CLIPTextModel`` from
``interop.pipelines.sd_v1_text_config()`` (the diffusers pipeline path reads
the same sizes from its config.json files). On the meta device no memory is
allocated, so this runs in a few seconds anywhere; the counts must be the
published ones: UNet 859,520,964 + VAE 83,653,863 + CLIP text 123,060,480 =
1,066,235,307 parameters. Exits 1 on a mismatch.

    python benchmarks/sd_import_size.py
"""

from __future__ import annotations

import sys

import torch

EXPECTED = {"UNet": 859_520_964, "VAE (AutoencoderKL)": 83_653_863, "CLIP text encoder": 123_060_480}


def build_counts() -> dict[str, int]:
    import transformers

    from diffusionforge.backbones.unet import UNet
    from diffusionforge.first_stage.autoencoder import AutoencoderKL
    from diffusionforge.interop.pipelines import sd_v1_text_config
    from diffusionforge.interop.unet import sd_v1_unet_config
    from diffusionforge.interop.vae import sd_v1_vae_config

    with torch.device("meta"):
        networks = {
            "UNet": UNet(sd_v1_unet_config()),
            "VAE (AutoencoderKL)": AutoencoderKL(sd_v1_vae_config()),
            "CLIP text encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**sd_v1_text_config())),
        }
    return {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()}


def main() -> int:
    counts = build_counts()
    ok = True
    print(f"{'network':<22} {'parameters':>15} {'expected':>15}")
    for name, count in counts.items():
        match = count == EXPECTED[name]
        ok &= match
        print(f"{name:<22} {count:>15,} {EXPECTED[name]:>15,} {'ok' if match else 'MISMATCH'}")
    total, expected = sum(counts.values()), sum(EXPECTED.values())
    print(f"{'total':<22} {total:>15,} {expected:>15,} {'ok' if total == expected else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

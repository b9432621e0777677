"""The interop registry: how each kind of network is read and written in the foreign formats.

One row per kind (``vae``: the KL autoencoder, ``unet``: the Stable Diffusion
UNet, ``dit``: the class-conditional DiT): its diffusers class and pipeline
subfolder, its key prefix in a whole CompVis / LDM checkpoint, its default
config, and the functions of ``interop.vae`` / ``unet`` / ``dit`` that map
configs and state dicts. ``interop.detect`` reads SRC through this table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from torch import Tensor, nn

from .dit import (OFFICIAL_DIT_KEY, dit_config_from_diffusers, dit_config_to_diffusers, load_diffusers_dit,
                  load_official_dit, save_diffusers_dit)
from .ours import Kind, save_ours
from .unet import (COMPVIS_UNET_PREFIX, load_compvis_unet, load_diffusers_unet, save_diffusers_unet,
                   sd_v1_unet_config, unet_config_from_diffusers, unet_config_to_diffusers)
from .vae import (COMPVIS_PREFIX, load_compvis_vae, load_diffusers_vae, save_diffusers_vae, sd_v1_vae_config,
                  vae_config_from_diffusers, vae_config_to_diffusers)


class Interop(NamedTuple):
    """How one kind of network is read and written in the foreign formats."""

    diffusers_class: str  # "_class_name" of its diffusers config.json
    subfolder: str  # its folder inside a diffusers pipeline folder
    compvis_prefix: str  # its key prefix inside a whole CompVis / LDM checkpoint
    bare_key: str  # a key that only its unprefixed state dict has
    default_config: Callable[[], Any]  # config of a CompVis checkpoint without --config (SD v1)
    config_from_diffusers: Callable[[Mapping[str, Any]], Any]
    config_to_diffusers: Callable[[Any], dict]  # raises CheckpointError for what diffusers cannot express
    load_diffusers: Callable[[Path], nn.Module]
    load_compvis: Callable[[Mapping[str, Tensor], Any], nn.Module]
    save_diffusers: Callable[[nn.Module, Path], Path]


INTEROP: dict[str, Interop] = {
    "vae": Interop("AutoencoderKL", "vae", COMPVIS_PREFIX, "encoder.conv_in.weight", sd_v1_vae_config,
                   vae_config_from_diffusers, vae_config_to_diffusers, load_diffusers_vae, load_compvis_vae,
                   save_diffusers_vae),
    "unet": Interop("UNet2DConditionModel", "unet", COMPVIS_UNET_PREFIX, "input_blocks.0.0.weight",
                    sd_v1_unet_config, unet_config_from_diffusers, unet_config_to_diffusers, load_diffusers_unet,
                    load_compvis_unet, save_diffusers_unet),
    # DiT: "CompVis" stands for the official facebookresearch/DiT state dict; its config is read off the shapes
    "dit": Interop("DiTTransformer2DModel", "transformer", "y_embedder.", OFFICIAL_DIT_KEY, lambda: None,
                   dit_config_from_diffusers, dit_config_to_diffusers, load_diffusers_dit, load_official_dit,
                   save_diffusers_dit),
}
FORMATS = ("ours", "diffusers")


def save_network(model: nn.Module, kind: Kind, to: str, directory: Path) -> Path:
    """Write ``model`` into ``directory`` in format ``to`` ("ours" or "diffusers")."""
    if to == "ours":
        return save_ours(model, kind, directory)
    return INTEROP[kind].save_diffusers(model, directory)

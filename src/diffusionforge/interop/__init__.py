"""Weights from and for other codebases (diffusers, CompVis), one key-mapping module per model family.

``vae``: the KL autoencoder; ``unet``: the Stable Diffusion UNet; ``ours``:
our single-network folder (config.json + model.safetensors); ``files``: the
shared diffusers-folder, JSON and checked-loading helpers.
"""

from .ours import KINDS, Kind, load_ours, save_ours
from .unet import (
    load_compvis_unet,
    load_diffusers_unet,
    save_diffusers_unet,
    sd_v1_unet_config,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from .vae import (
    load_compvis_vae,
    load_diffusers_vae,
    save_diffusers_vae,
    sd_v1_vae_config,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)

__all__ = [
    "KINDS",
    "Kind",
    "load_compvis_unet",
    "load_compvis_vae",
    "load_diffusers_unet",
    "load_diffusers_vae",
    "load_ours",
    "save_diffusers_unet",
    "save_diffusers_vae",
    "save_ours",
    "sd_v1_unet_config",
    "sd_v1_vae_config",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_state_dict_from_diffusers",
    "unet_state_dict_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_to_diffusers",
]

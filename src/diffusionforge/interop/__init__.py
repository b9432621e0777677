"""Weights from and for other codebases (diffusers, CompVis), one key-mapping module per model family."""

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
    "load_compvis_vae",
    "load_diffusers_vae",
    "save_diffusers_vae",
    "sd_v1_vae_config",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_to_diffusers",
]

"""``BACKBONES``: config name -> ``(config dataclass, module class)``; build with ``cls(config_cls(**fields))``."""

from diffusionforge.backbones.dit import DiT, DiTConfig
from diffusionforge.backbones.unet import UNet, UNetConfig

BACKBONES = {"unet": (UNetConfig, UNet), "dit": (DiTConfig, DiT)}  # name -> (config dataclass, module class)

__all__ = ["BACKBONES"]

"""Backbones: plain ``nn.Module``s mapping ``(x, t, cond) -> tensor``.

A backbone knows nothing of noise schedules. ``forward(x: (B, C, H, W),
t: (B,), cond: Optional[dict[str, Tensor]]) -> (B, out_channels, H, W)``, with
``cond`` keyed by how conditioning is injected (``vector``, ``crossattn``,
``crossattn_mask``, ``concat``).

``BACKBONES`` maps a config name to ``(ConfigDataclass, ModuleClass)``; build
with ``cls(config_cls(**fields))``.
"""

from diffusionforge.backbones.dit import DIT_MODELS, DiT, DiTConfig
from diffusionforge.backbones.embeddings import timestep_embedding
from diffusionforge.backbones.unet import UNet, UNetConfig

BACKBONES = {"unet": (UNetConfig, UNet), "dit": (DiTConfig, DiT)}  # name -> (config dataclass, module class)

__all__ = ["BACKBONES", "DIT_MODELS", "DiT", "DiTConfig", "UNet", "UNetConfig", "timestep_embedding"]

"""Backbones: plain ``nn.Module``s mapping ``(x, t, cond) -> tensor``.

A backbone knows nothing of noise schedules. ``forward(x: (B, C, H, W),
t: (B,), cond: Optional[dict[str, Tensor]]) -> (B, out_channels, H, W)``, with
``cond`` keyed by how conditioning is injected (``vector``, ``crossattn``,
``crossattn_mask``, ``concat``).

``BACKBONES`` (``registry.py``) maps a config name to ``(ConfigDataclass,
ModuleClass)``; build with ``cls(config_cls(**fields))``. The config
dataclasses live in the torch-free ``config.py``; every name here is imported
on first use, so ``import diffusionforge.backbones.config`` does not import torch.
"""

from diffusionforge.utils.lazy import lazy_attributes

__all__ = ["BACKBONES", "DIT_MODELS", "DiT", "DiTConfig", "UNet", "UNetConfig", "timestep_embedding"]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "BACKBONES": ".registry",
    "DIT_MODELS": ".config",
    "DiTConfig": ".config",
    "UNetConfig": ".config",
    "DiT": ".dit",
    "UNet": ".unet",
    "timestep_embedding": ".embeddings",
})

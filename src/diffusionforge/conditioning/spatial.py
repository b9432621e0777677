"""Spatial conditioning stacked onto x_t as extra channels (LDM's ``concat`` mode).

A batch key holding a (B, C, H', W') tensor — a mask, a low-resolution
image, a depth or edge map — is resized to the grid the diffusion process
runs on (the image in pixel space, the latent in latent diffusion) and
handed to the backbone as ``concat`` channels, as CompVis LDM does for its
super-resolution and inpainting models (``conditioning_key: concat``, or
``hybrid`` together with a ``crossattn`` conditioner). A dropped sample's
channels are zeros. Conditions that must first be *encoded* by the
autoencoder (the masked-image latents of Stable Diffusion inpainting) are
a different conditioner, which VAE-encodes image keys.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import Conditioner
from .config import ConcatConditionerConfig


class SpatialConcat(Conditioner):
    kind = "concat"

    def __init__(self, config: ConcatConditionerConfig, size: tuple[int, int]):
        super().__init__(config.input_key, config.ucg_rate)
        self.channels = config.channels
        self.size = tuple(size)  # (H, W) of x_t
        self.interpolation = config.interpolation

    @property
    def dim(self) -> int:
        """Channels added to the backbone's input."""
        return self.channels

    def encode(self, value: Tensor, drop: Tensor) -> Tensor:
        """value: (B, channels, H', W'); drop: (B,) bool -> (B, channels, H, W)."""
        if value.ndim != 4 or value.shape[1] != self.channels:
            raise ValueError(f"batch['{self.input_key}'] must be (B, {self.channels}, H, W), "
                             f"got {tuple(value.shape)}")
        value = value.float()
        if tuple(value.shape[-2:]) != self.size:
            value = F.interpolate(value, size=self.size, mode=self.interpolation)
        return value * (~drop).to(value.dtype).view(-1, 1, 1, 1)

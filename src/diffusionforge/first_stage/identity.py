"""Pixel-space first stage: encode and decode are the identity.

A first stage maps images ``x: (B, C, H, W)`` in [-1, 1] to latents ``z`` and
back. Latent diffusion uses an autoencoder here; pixel-space DDPM uses this.
"""

from torch import Tensor, nn


class IdentityFirstStage(nn.Module):
    scale_factor: float = 1.0
    downsample_factor: int = 1

    def encode(self, x: Tensor, sample=None) -> Tensor:
        return x

    def decode(self, z: Tensor, grad: bool = False) -> Tensor:
        return z

"""Latent first stage: a frozen KL autoencoder with the latent scale factor.

Latent diffusion (Rombach et al. 2022, Sec. 3-4) runs the diffusion process
on ``z = s * E(x)`` instead of pixels, and decodes ``x = D(z / s)``.

| name | shape            | meaning                                             |
|------|------------------|-----------------------------------------------------|
| x    | (B, C, H, W)     | images in [-1, 1]                                   |
| z    | (B, c, H/f, W/f) | scaled latents, about unit variance                 |
| s    | scalar           | ``scale_factor``; SD v1 uses 0.18215               |

When the scale is not given it is estimated as ``1 / std(E(x))`` over a set
of training images (LDM App. D.1 "rescale-by-std", which LDM takes from its
first batch), so the latents the process sees have unit variance and the
noise schedule means the same thing as in pixel space.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .autoencoder import AutoencoderKL
from .distributions import reparameterise


class LatentFirstStage(nn.Module):
    """encode: x -> s * z (posterior sample or mode); decode: z -> D(z / s). Always frozen, eval."""

    def __init__(self, autoencoder: AutoencoderKL, scale_factor: float, sample_posterior: bool = True):
        super().__init__()
        if not scale_factor > 0:
            raise ValueError(f"latent scale_factor must be > 0, got {scale_factor}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.sample_posterior = sample_posterior

    def train(self, mode: bool = True) -> "LatentFirstStage":
        super().train(mode)
        self.autoencoder.eval()  # frozen: no dropout, whatever the parent's mode
        return self

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of images -> (c, H/f, W/f) of latents."""
        f = self.downsample_factor
        return (self.autoencoder.config.embed_dim, image_shape[1] // f, image_shape[2] // f)

    @torch.no_grad()
    def encode(self, x: Tensor, sample: Optional[bool] = None) -> Tensor:
        """x: (B, C, H, W) -> z: (B, c, H/f, W/f), scaled (``from_posterior`` of the encoder's moments)."""
        posterior = self.autoencoder.encode(x)
        return self.from_posterior(posterior.mean, posterior.std, sample)

    def from_posterior(self, mean: Tensor, std: Tensor, sample: Optional[bool] = None) -> Tensor:
        """The scaled latent ``s * (mean + std * eps)`` (or ``s * mean``) of a posterior given by its moments.

        ``mean, std: (B, c, H/f, W/f)``, as ``encode`` computes them or a latent cache stores them
        (``data/latent_cache.py``); ``eps`` is drawn as ``DiagonalGaussianDistribution.sample`` draws it,
        so a cached and an encoded batch give the same latents for the same random state.
        """
        use_sample = self.sample_posterior if sample is None else sample
        return (reparameterise(mean, std) if use_sample else mean) * self.scale_factor

    def decode(self, z: Tensor, grad: bool = False) -> Tensor:
        """z: (B, c, H/f, W/f) scaled -> x: (B, C, H, W); ``grad`` lets gradients reach z (pixel losses)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.autoencoder.decode(z / self.scale_factor)


@torch.no_grad()
def estimate_scale_factor(autoencoder: AutoencoderKL, images: Iterable[Tensor],
                          sample_posterior: bool = True, seed: int = 0) -> float:
    """1 / std of the (unscaled) latents of ``images`` (batches (B, C, H, W)); seeded posterior samples."""
    autoencoder.eval()
    latents = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in images:
            posterior = autoencoder.encode(batch)
            latents.append((posterior.sample() if sample_posterior else posterior.mode()).flatten())
    z = torch.cat(latents)
    if z.numel() < 2:
        raise ValueError("estimating the latent scale needs at least two latent values")
    return float(1.0 / z.std())

"""Pixel-space loss of a latent prediction (LBM ``pixel_loss``).

The predicted target latent ``z0_hat`` is decoded (gradients flow through the
frozen decoder into ``z0_hat``) and compared with the target image:

    L_pix = mean_{c,h,w} |D(z0_hat) - x0|^p        (l2: p = 2, l1: p = 1)
    L_pix = LPIPS(D(z0_hat), x0)                     (lpips, Zhang et al. 2018)

Decoding a full image at every step is what makes this loss expensive, so it
sees at most ``max_size`` pixels per side: a random ``max_size`` window
(``crop``: one window per batch, cut from the latent at ``max_size / f`` and
from the image at the matching pixels, as LBM does) or the decoded and target
images resized to ``max_size`` (``resize``). Images no larger than
``max_size`` are used whole.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PixelLoss(nn.Module):
    """(z0_hat (B, c, h, w), x0 (B, C, H, W)) -> (B,) per-sample loss (unweighted)."""

    def __init__(self, kind: Literal["l2", "l1", "lpips"], max_size: int,
                 window: Literal["crop", "resize"] = "crop", lpips: Optional[nn.Module] = None):
        super().__init__()
        if kind == "lpips" and lpips is None:
            raise ValueError("pixel loss 'lpips' needs LPIPS weights (VGG16 trunk and linear layers)")
        self.kind = kind
        self.max_size = max_size
        self.window = window
        self.lpips = lpips

    def forward(self, decode: Callable[[Tensor], Tensor], z0_hat: Tensor, x0: Tensor,
                generator: Optional[torch.Generator] = None) -> Tensor:
        f = x0.shape[-1] // z0_hat.shape[-1]
        height, width = x0.shape[-2:]
        if self.window == "crop" and max(height, width) > self.max_size:
            z0_hat, x0 = self._crop(z0_hat, x0, f, generator)
        prediction = decode(z0_hat).clamp(-1, 1).float()
        x0 = x0.float()
        if self.window == "resize" and max(height, width) > self.max_size:
            size = (min(height, self.max_size), min(width, self.max_size))
            prediction = F.interpolate(prediction, size=size, mode="bilinear", antialias=True, align_corners=False)
            x0 = F.interpolate(x0, size=size, mode="bilinear", antialias=True, align_corners=False)
        if self.kind == "lpips":
            return self.lpips(prediction, x0)
        diff = (prediction - x0).flatten(1)
        return diff.pow(2).mean(1) if self.kind == "l2" else diff.abs().mean(1)

    def _crop(self, z: Tensor, x: Tensor, f: int,
              generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """One random window of at most max_size pixels (max_size // f latents) per side."""
        side = max(self.max_size // f, 1)
        h, w = z.shape[-2:]
        top = int(torch.randint(0, max(h - side, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(0, max(w - side, 0) + 1, (1,), generator=generator))
        z = z[..., top:top + side, left:left + side]
        x = x[..., top * f:(top + side) * f, left * f:(left + side) * f]
        return z, x

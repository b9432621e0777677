"""PatchGAN discriminator and its losses (Isola et al. 2017; Esser et al. 2021).

``NLayerDiscriminator`` is the pix2pix PatchGAN as taming-transformers and
LDM use it: a stack of 4x4 convolutions (stride 2, then two of stride 1)
with BatchNorm and LeakyReLU(0.2) that maps an image to a map of logits,
one per overlapping patch. The module tree (``main.N``) matches taming's,
so its discriminator weights load key for key.

Notation
--------
============  ===============================================================
``x``         image ``(B, C, H, W)``
``D(x)``      patch logits ``(B, 1, H', W')``; each halving conv maps
              ``s -> floor(s / 2)``, each stride-1 conv ``s -> s - 1``
``ndf``       width of the first conv; layer n has ``ndf * min(2^n, 8)``
============  ===============================================================

Discriminator losses, on real logits ``r = D(x)`` and fake ``f = D(xhat)``:

    hinge:    L_D = 1/2 (E[relu(1 - r)] + E[relu(1 + f)])           (Lim & Ye 2017)
    vanilla:  L_D = 1/2 (E[softplus(-r)] + E[softplus(f)])           (Goodfellow et al. 2014)
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .config import DiscLossName

__all__ = ["NLayerDiscriminator", "init_weights", "hinge_d_loss", "vanilla_d_loss",
           "adopt_weight", "D_LOSSES", "DiscLossName"]

KERNEL = 4  # conv kernel of the PatchGAN
PADDING = 1  # conv padding of the PatchGAN
LEAK = 0.2  # LeakyReLU negative slope
MAX_WIDTH_MULT = 8  # widths stop growing at ndf * 8
INIT_STD = 0.02  # std of the DCGAN initialisation (Radford et al. 2016)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``(B, in_channels, H, W) -> (B, 1, H', W')`` logits."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, KERNEL, stride=2, padding=PADDING),
                                   nn.LeakyReLU(LEAK, inplace=True)]
        width = ndf
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution - 1
            out = ndf * min(2 ** n, MAX_WIDTH_MULT)
            layers += [nn.Conv2d(width, out, KERNEL, stride=stride, padding=PADDING, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(LEAK, inplace=True)]
            width = out
        layers.append(nn.Conv2d(width, 1, KERNEL, stride=1, padding=PADDING))  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """L_D = 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(xhat))]), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """L_D = 1/2 (E[-log sigmoid(D(x))] + E[-log(1 - sigmoid(D(xhat)))]), a scalar."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before (the GAN warm-up of taming/LDM)."""
    return value if global_step < threshold else weight

"""``AutoencoderLossConfig``: the weights of the autoencoder's objective, torch-free.

``config/schema.py`` composes it without importing torch;
``autoencoder_loss.py`` builds ``LPIPSWithDiscriminator`` from it and
re-exports it. ``__post_init__`` raises a one-line ``ConfigError`` naming the
first bad field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, get_args

from ..errors import ConfigError

__all__ = ["AutoencoderLossConfig", "DiscLossName"]

DiscLossName = Literal["hinge", "vanilla"]  # the keys of discriminator.D_LOSSES


@dataclass
class AutoencoderLossConfig:
    """Weights of ``LPIPSWithDiscriminator``; defaults are LDM's kl-f* autoencoder configs."""

    disc_start: int = 50001  # training batches before the GAN terms switch on (f(t) = 0 before)
    kl_weight: float = 1e-6  # weight of L_kl
    pixel_weight: float = 1.0  # weight of |x - xhat| in rec (LDM stores but never applies it: 1.0)
    perceptual_weight: float = 1.0  # weight of LPIPS in rec; unused (with a warning) without LPIPS
    disc_weight: float = 0.5  # scales the adaptive weight lambda
    disc_factor: float = 1.0  # f(t) after disc_start; 0 turns the GAN off entirely
    disc_loss: DiscLossName = "hinge"  # discriminator loss: hinge | vanilla
    disc_num_layers: int = 3  # stride-2 convs of the PatchGAN (2 suits 28x28 images)
    disc_in_channels: int = 3  # image channels the discriminator sees
    disc_ndf: int = 64  # width of the discriminator's first conv
    logvar_init: float = 0.0  # initial output log-variance s
    learn_logvar: bool = False  # train s with the autoencoder (LDM leaves it out of the optimiser)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                _check(isinstance(value, bool), f.name, "true or false", value)
            elif f.type in ("int", "float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                ok = ok and (isinstance(value, int) or f.type == "float") and math.isfinite(value)
                _check(ok, f.name, f"a finite {'integer' if f.type == 'int' else 'number'}", value)
        _check(self.disc_loss in get_args(DiscLossName), "disc_loss",
               f"one of {list(get_args(DiscLossName))}", self.disc_loss)
        for name in ("disc_start", "kl_weight", "pixel_weight", "perceptual_weight",
                     "disc_weight", "disc_factor"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        for name in ("disc_num_layers", "disc_in_channels", "disc_ndf"):
            _check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))


def _check(ok: bool, name: str, requirement: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"AutoencoderLossConfig.{name}: must be {requirement}, got {value!r}")


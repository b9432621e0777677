"""Training objectives that are not a diffusion process: the autoencoder's (LDM)."""

from .autoencoder_loss import (AutoencoderLossConfig, DiscriminatorLoss, GeneratorLoss,
                               LPIPSWithDiscriminator)
from .discriminator import NLayerDiscriminator, adopt_weight, hinge_d_loss, vanilla_d_loss
from .lpips import LPIPS, load_lpips

__all__ = ["AutoencoderLossConfig", "LPIPSWithDiscriminator", "GeneratorLoss", "DiscriminatorLoss",
           "NLayerDiscriminator", "adopt_weight", "hinge_d_loss", "vanilla_d_loss",
           "LPIPS", "load_lpips"]

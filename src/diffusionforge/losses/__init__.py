"""Training objectives that are not a diffusion process: the autoencoder's (LDM).

``AutoencoderLossConfig`` lives in the torch-free ``config.py``; every name
here is imported on first use, so ``import diffusionforge.losses.config`` does
not import torch.
"""

from diffusionforge.utils.lazy import lazy_attributes

__all__ = ["AutoencoderLossConfig", "LPIPSWithDiscriminator", "GeneratorLoss", "DiscriminatorLoss",
           "NLayerDiscriminator", "adopt_weight", "hinge_d_loss", "vanilla_d_loss",
           "LPIPS", "load_lpips"]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "AutoencoderLossConfig": ".config",
    "LPIPSWithDiscriminator": ".autoencoder_loss",
    "GeneratorLoss": ".autoencoder_loss",
    "DiscriminatorLoss": ".autoencoder_loss",
    "NLayerDiscriminator": ".discriminator",
    "adopt_weight": ".discriminator",
    "hinge_d_loss": ".discriminator",
    "vanilla_d_loss": ".discriminator",
    "LPIPS": ".lpips",
    "load_lpips": ".lpips",
})

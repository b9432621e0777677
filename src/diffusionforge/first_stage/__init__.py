"""First stages: maps between images and the space diffusion runs in.

``IdentityFirstStage`` (pixel space) and ``AutoencoderKL`` (``autoencoder.py``,
settings in the torch-free ``config.py``). Names here are imported on first
use, so ``import diffusionforge.first_stage.config`` does not import torch.
"""

from diffusionforge.utils.lazy import lazy_attributes

__all__ = ["IdentityFirstStage"]

__getattr__, __dir__ = lazy_attributes(__name__, {"IdentityFirstStage": ".identity"})

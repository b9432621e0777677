"""First stages: maps between images and the space diffusion runs in."""

from .identity import IdentityFirstStage

__all__ = ["IdentityFirstStage"]

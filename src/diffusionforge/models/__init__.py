"""LightningModules composing the parts."""

from .generative import GenerativeModel, SampleRequest

__all__ = ["GenerativeModel", "SampleRequest"]

"""LightningModules composing the parts (the shared base is in ``base.py``)."""

from .base import BaseModule, NetworkModule
from .generative import GenerativeModel, SampleRequest

__all__ = ["BaseModule", "GenerativeModel", "NetworkModule", "SampleRequest"]

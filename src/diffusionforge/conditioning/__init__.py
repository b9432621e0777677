"""Conditioners and the wrapper that merges their outputs by kind.

The settings dataclasses live in the torch-free ``config.py``; every name
here is imported on first use, so ``import diffusionforge.conditioning.config``
does not import torch.
"""

from diffusionforge.utils.lazy import lazy_attributes

__all__ = ["CONCAT_DIMS", "Cond", "ConditionKind", "Conditioner", "ConditionerWrapper",
           "ClassEmbedder", "ClassLabelConfig"]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "CONCAT_DIMS": ".base",
    "Cond": ".base",
    "ConditionKind": ".base",
    "Conditioner": ".base",
    "ConditionerWrapper": ".base",
    "ClassEmbedder": ".class_label",
    "ClassLabelConfig": ".config",
})

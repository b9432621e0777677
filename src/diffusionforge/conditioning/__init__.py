"""Conditioners and the wrapper that merges their outputs by kind."""

from .base import CONCAT_DIMS, Cond, ConditionKind, Conditioner, ConditionerWrapper
from .class_label import ClassEmbedder, ClassLabelConfig

__all__ = ["CONCAT_DIMS", "Cond", "ConditionKind", "Conditioner", "ConditionerWrapper",
           "ClassEmbedder", "ClassLabelConfig"]

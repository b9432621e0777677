"""Class-label conditioner with a learned null class.

A label ``y`` in 0..K-1 maps to a learned embedding ``e_y`` (B, D), injected
as a ``vector`` (added to the time embedding). Dropping a sample for
classifier-free guidance replaces its label by the null class ``K``, which
has its own learned embedding (DiT ``LabelEmbedder``; Ho & Salimans 2022).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Conditioner
from .config import ClassLabelConfig


class ClassEmbedder(Conditioner):
    kind = "vector"

    def __init__(self, config: ClassLabelConfig):
        super().__init__(config.input_key, config.ucg_rate)
        self.num_classes = config.num_classes
        self.embedding = nn.Embedding(config.num_classes + 1, config.embed_dim)

    @property
    def dim(self) -> int:
        """D of the output vector."""
        return self.embedding.embedding_dim

    @property
    def null_class(self) -> int:
        return self.num_classes

    def encode(self, value: Tensor, drop: Tensor) -> Tensor:
        """value: (B,) long labels; drop: (B,) bool -> (B, D)."""
        labels = value.long()
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"class labels must lie in 0..{self.num_classes} "
                             f"(null class {self.num_classes}), got {labels.tolist()}")
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.embedding(labels)

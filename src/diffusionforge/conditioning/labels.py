"""Class labels -> a conditioning batch, for grids, `dforge sample` and evaluation.

A class-conditional model reads ``batch[class_key]``; a text-conditioned
model trained on captions made from class names (``data.caption_template``)
reads ``batch[caption_key]``. ``LabelConditioning.batch`` builds whichever
the model's conditioners need from integer labels, so sampling "class k"
means the same thing for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..data.captions import make_captions


@dataclass
class LabelConditioning:
    num_classes: int                       # K: labels are 0..K-1
    class_key: Optional[str] = None        # batch key of the class conditioner, if any
    caption_key: Optional[str] = None      # batch key of the text conditioner, if any
    caption_template: Optional[str] = None  # e.g. "a photo of {}"
    caption_names: tuple[str, ...] = ()    # class name per label, with its article

    def batch(self, labels: Tensor) -> dict:
        """labels: (B,) long -> {class_key: labels, caption_key: [B captions]} (the keys in use)."""
        out: dict = {}
        if self.class_key is not None:
            out[self.class_key] = labels
        if self.caption_key is not None:
            out[self.caption_key] = make_captions(self.caption_template, self.caption_names,
                                                  labels.tolist())
        return out

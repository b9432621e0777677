"""Inception-style score on a classifier: ``exp(E_x KL(p(y|x) || p(y)))``.

Salimans et al. (2016) score images by how confidently *and* how diversely
a classifier labels them; on 28x28 data the classifier is the project's
own (``metrics.classifier``) instead of Inception-v3. The computation is
torchmetrics' ``InceptionScore`` with that classifier's logits as the
features: the samples are shuffled and split into ``splits`` groups, and
the score's mean and standard deviation over the groups are reported. The
shuffle is seeded, so the same images give the same score. The score lies
in [1, K] for K classes: K for confident predictions spread evenly over
the classes, 1 for uniform (or single-class) predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image.inception import InceptionScore


class ClassifierScore:
    def __init__(self, classifier: nn.Module, splits: int = 10, seed: int = 0):
        self.metric = InceptionScore(feature=classifier.eval(), splits=splits)
        self.seed = seed

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """images: (B, C, H, W) in the classifier's input range ([-1, 1])."""
        self.metric.update(images)

    def compute(self) -> tuple[float, float]:
        """(mean, std) over the splits."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            mean, std = self.metric.compute()
        return float(mean), float(std)

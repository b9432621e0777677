"""Metrics: the project's own feature network for FID/KID and class accuracy.

| module          | concept                                                          |
|-----------------|------------------------------------------------------------------|
| ``classifier``  | ``SmallClassifier`` CNN, its config, and the shipped weights     |
| ``efficientnet``| ``EfficientNetLite0`` ImageNet features (1280-d) for RGB images  |
| ``distribution``| FID and KID on any feature network (torchmetrics)                |
"""

from diffusionforge.metrics.classifier import (
    CLASSIFIER_SHA256,
    ClassifierConfig,
    SmallClassifier,
    classifier_path,
    classifier_sha256,
    file_sha256,
    load_classifier,
    load_classifier_file,
)

from diffusionforge.metrics.distribution import DistributionMetrics, DistributionScores
from diffusionforge.metrics.efficientnet import (EfficientNetLite0, efficientnet_sha256,
                                                 load_efficientnet_lite0)

__all__ = [
    "DistributionMetrics",
    "DistributionScores",
    "EfficientNetLite0",
    "efficientnet_sha256",
    "load_efficientnet_lite0",
    "CLASSIFIER_SHA256",
    "ClassifierConfig",
    "SmallClassifier",
    "classifier_path",
    "classifier_sha256",
    "file_sha256",
    "load_classifier",
    "load_classifier_file",
]

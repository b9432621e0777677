"""Metrics: the project's own feature network for FID/KID and class accuracy.

| module          | concept                                                          |
|-----------------|------------------------------------------------------------------|
| ``classifier``  | ``SmallClassifier`` CNN, its config, and the shipped weights     |
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

__all__ = [
    "CLASSIFIER_SHA256",
    "ClassifierConfig",
    "SmallClassifier",
    "classifier_path",
    "classifier_sha256",
    "file_sha256",
    "load_classifier",
    "load_classifier_file",
]

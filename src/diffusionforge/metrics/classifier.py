"""A small CNN classifier trained by the project: the feature network for FID/KID.

FID and KID compare the statistics of ``features(x)`` over real and generated
images; class-conditional accuracy asks whether ``forward(x).argmax(-1)`` is
the class a sample was conditioned on. Inception-v3 features (Heusel et al.
2017) are meaningless on 28x28 grey images, so the shipped networks are this
compact CNN trained with ``scripts/train_classifier.py``; the weights, their
sha256 and the exact command are listed in ``metrics/weights/README.md``.

| name        | shape              | meaning                                    |
|-------------|--------------------|--------------------------------------------|
| ``x``       | (B, C, 28, 28)     | images in [-1, 1]                          |
| ``h``       | (B, feature_dim)   | penultimate activations (FID/KID features) |
| ``logits``  | (B, num_classes)   | unnormalised class scores                  |
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from diffusionforge.errors import CheckpointError
from diffusionforge.weights import load_weights

ClassifierName = Literal["fashion-mnist", "mnist"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
CLASSIFIER_FILES: dict[str, str] = {  # name -> file in WEIGHTS_DIR
    "fashion-mnist": "classifier_fashion-mnist.safetensors",
    "mnist": "classifier_mnist.safetensors",
}
CLASSIFIER_SHA256: dict[str, str] = {  # name -> sha256 of the shipped file (see weights/README.md)
    "fashion-mnist": "83fb1fe4209c67f103cfb70cdceac3702626f4a9e28748e3cf5ce240f0995a6a",
    "mnist": "9517bfc4a8ae870757ffba3cbee6e5a019d64792dba0e16a9ea5dadbb0c8d172",
}


@dataclass
class ClassifierConfig:
    channels: int = 1  # input image channels
    num_classes: int = 10  # size of the logit vector
    widths: tuple[int, ...] = (32, 64, 128, 128)  # conv width per stage; a 2x2 max-pool between stages
    convs_per_stage: int = 1  # conv-BN-ReLU layers in each stage
    feature_dim: int = 128  # width of the penultimate layer returned by ``features``
    dropout: float = 0.1  # dropout on the features before the linear head (training only)


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 same-padding conv, batch norm, ReLU: (B, c_in, H, W) -> (B, c_out, H, W)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallClassifier(nn.Module):
    """Conv stages with max-pooling, global average pooling, a feature layer, a linear head."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        c_in = config.channels
        for i, width in enumerate(config.widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))  # 28 -> 14 -> 7 -> 3: the last stage sees the whole image
            for _ in range(config.convs_per_stage):
                layers.append(conv_bn_relu(c_in, width))
                c_in = width
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c_in, config.feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, 28, 28) in [-1, 1] -> h: (B, feature_dim), the penultimate activations."""
        pooled = self.trunk(x).mean(dim=(2, 3))  # (B, widths[-1])
        return self.embed(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, 28, 28) in [-1, 1] -> logits: (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_name(name: str) -> str:
    if name not in CLASSIFIER_FILES:
        raise ValueError(f"unknown classifier {name!r} (choose from {', '.join(CLASSIFIER_FILES)})")
    return name


def classifier_path(name: ClassifierName) -> Path:
    """Path of the shipped weights file of the named classifier."""
    return WEIGHTS_DIR / CLASSIFIER_FILES[_check_name(name)]


def classifier_sha256(name: ClassifierName) -> str:
    """The recorded sha256 of the named classifier's shipped weights file."""
    return CLASSIFIER_SHA256[_check_name(name)]


def load_classifier_file(path: str | Path, expected_sha256: str | None = None,
                         config: ClassifierConfig | None = None) -> SmallClassifier:
    """A SmallClassifier from a safetensors file, in eval mode; checks the sha256 when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: classifier weights file not found")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match the recorded "
                                  f"{expected_sha256[:12]}... (corrupt or replaced weights file)")
    model = load_weights(SmallClassifier(config), path)
    return model.eval()


def load_classifier(name: ClassifierName) -> SmallClassifier:
    """The shipped classifier for ``name`` in eval mode, sha256-checked."""
    return load_classifier_file(classifier_path(name), classifier_sha256(name))

"""Feature networks for FID/KID, chosen by name, with the hash that identifies them.

| name            | network                                   | dim  | images         |
|-----------------|-------------------------------------------|------|----------------|
| fashion-mnist   | shipped ``SmallClassifier`` (Fashion-MNIST)| 128  | 1x28x28 grey   |
| mnist           | shipped ``SmallClassifier`` (MNIST)        | 128  | 1x28x28 grey   |
| efficientnet    | ImageNet ``EfficientNetLite0``, pooled    | 1280 | any, grey->RGB |
| inception       | Inception-v3 pool3 (local weights only)   | 2048 | any, grey->RGB |

The recorded name and sha256 go into ``metrics.json`` so that a number can
only be compared with numbers measured on the same network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn

from .classifier import classifier_sha256, file_sha256, load_classifier
from .distribution import DistributionMetrics
from .efficientnet import FEATURE_DIM, efficientnet_sha256, load_efficientnet_lite0
from .inception import INCEPTION_DIM, find_inception_weights, load_inception

FeatureName = Literal["fashion-mnist", "mnist", "efficientnet", "inception"]
FEATURE_NAMES: tuple[str, ...] = get_args(FeatureName)
CLASSIFIER_FEATURES = ("fashion-mnist", "mnist")  # feature networks that also classify 28x28 images


@dataclass
class FeatureNetwork:
    name: str            # recorded name, e.g. classifier/fashion-mnist
    sha256: str          # sha256 of its weights file
    network: nn.Module   # eval-mode network (``features`` on [-1, 1], or uint8 -> features)
    dim: int             # feature width
    rgb: bool            # takes 3 channels (grey images are repeated)

    def metrics(self, image_shape: tuple[int, int, int]) -> DistributionMetrics:
        """Fresh FID/KID accumulators on this network for images of ``image_shape`` (C, H, W)."""
        return DistributionMetrics(self.network, self.dim, image_shape, rgb=self.rgb)


def load_feature_network(name: str) -> FeatureNetwork:
    """The named feature network; one-line errors for unknown names or missing weights."""
    if name in CLASSIFIER_FEATURES:
        network = load_classifier(name)
        return FeatureNetwork(f"classifier/{name}", classifier_sha256(name), network,
                              network.config.feature_dim, rgb=False)
    if name == "efficientnet":
        return FeatureNetwork("efficientnet-lite0", efficientnet_sha256(), load_efficientnet_lite0(),
                              FEATURE_DIM, rgb=True)
    if name == "inception":
        network = load_inception()
        return FeatureNetwork("inception-v3", file_sha256(find_inception_weights()), network,
                              INCEPTION_DIM, rgb=True)
    raise ValueError(f"unknown feature network {name!r} (choose from {', '.join(FEATURE_NAMES)})")

"""FID and KID on any feature network, through torchmetrics.

Frechet distance (Heusel et al. 2017, Eq. 6) between Gaussians fitted to
the features of real (r) and generated (g) images:

    FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over subsets.

torchmetrics owns both computations; this module adapts a feature network
that takes our images (float (B, C, H, W) in [-1, 1]) to the uint8 input
torchmetrics feeds its feature extractor.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class FeatureAdapter(nn.Module):
    """uint8 (B, C, H, W) from torchmetrics -> ``network.features`` on [-1, 1] -> (B, D).

    A network without ``features`` (e.g. torchmetrics' Inception-v3, which
    takes uint8 itself) is called on the uint8 batch directly.
    """

    def __init__(self, network: nn.Module, num_features: int):
        super().__init__()
        self.network = network.eval()
        self.num_features = num_features
        self._last: Optional[tuple[Tensor, Tensor]] = None  # (batch, its features)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        # FID and KID share this adapter and are updated with the same batch object:
        # the second call reuses the first's features instead of running the network again.
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        if not hasattr(self.network, "features"):
            features = self.network(images).double()
        else:
            features = self.network.features(images.float() / 127.5 - 1.0).double()
        self._last = (images, features)
        return features


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8, the rounding a saved PNG would apply."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass
class DistributionScores:
    fid: float
    kid_mean: float
    kid_std: float


class DistributionMetrics:
    """Accumulate real and generated images, then compute FID and KID."""

    def __init__(self, network: nn.Module, num_features: int,
                 image_shape: tuple[int, int, int], kid_subset_size: int = 1000,
                 rgb: bool = False):
        """rgb: the network takes 3 channels; grey images are repeated to RGB first."""
        self.rgb = rgb
        if rgb:
            image_shape = (3, *image_shape[1:])
        adapter = FeatureAdapter(network, num_features)
        self.fid = FrechetInceptionDistance(feature=adapter, input_img_size=image_shape,
                                            reset_real_features=False)
        self.kid = KernelInceptionDistance(feature=adapter, subset_size=kid_subset_size,
                                           reset_real_features=False)
        self.kid_subset_size = kid_subset_size

    def update(self, images: Tensor, real: bool) -> None:
        """images: (B, C, H, W) in [-1, 1]."""
        batch = to_uint8(images)
        if self.rgb and batch.shape[1] == 1:
            batch = batch.repeat(1, 3, 1, 1)
        self.fid.update(batch, real=real)
        self.kid.update(batch, real=real)

    def compute(self, seed: int = 0) -> DistributionScores:
        """FID and KID; KID's random subsets are drawn from ``seed`` so repeats agree."""
        n_fake = sum(len(x) for x in self.kid.fake_features)
        n_real = sum(len(x) for x in self.kid.real_features)
        self.kid.subset_size = min(self.kid_subset_size, n_fake, n_real)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            kid_mean, kid_std = self.kid.compute()
        return DistributionScores(fid=float(self.fid.compute()), kid_mean=float(kid_mean),
                                  kid_std=float(kid_std))

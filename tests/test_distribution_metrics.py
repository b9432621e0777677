"""FID/KID through torchmetrics on our feature network, against a direct computation."""

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from diffusionforge.metrics.distribution import DistributionMetrics, to_uint8


class LinearFeatures(nn.Module):
    """A fixed random projection of the pixels: a feature network with known features."""

    def __init__(self, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(28 * 28, dim)

    def features(self, x):
        return self.proj(x.flatten(1))


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def test_fid_matches_direct_computation_and_kid_separates():
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(200, 1, 28, 28, generator=gen) * 2 - 1
    fake = (torch.rand(200, 1, 28, 28, generator=gen) * 1.5 - 1).clamp(-1, 1)
    net = LinearFeatures()
    metrics = DistributionMetrics(net, 8, (1, 28, 28), kid_subset_size=100)
    metrics.update(real, real=True)
    metrics.update(fake, real=False)
    scores = metrics.compute()
    with torch.no_grad():
        feats = [net.features(to_uint8(x).float() / 127.5 - 1).double().numpy() for x in (real, fake)]
    assert scores.fid == pytest.approx(direct_fid(*feats), rel=1e-3)
    assert scores.kid_mean > 0


def test_identical_sets_score_zero():
    x = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    metrics = DistributionMetrics(LinearFeatures(), 8, (1, 28, 28), kid_subset_size=50)
    metrics.update(x, real=True)
    metrics.update(x, real=False)
    scores = metrics.compute()
    assert abs(scores.fid) < 1e-3
    assert abs(scores.kid_mean) < 1e-2

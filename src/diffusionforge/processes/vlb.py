"""Terms of the variational lower bound (VLB) of a Gaussian diffusion.

Ho et al. 2020, Eq. 5: ``L = L_T + sum_{t>1} L_{t-1} + L_0`` with
``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` (a KL between
two diagonal Gaussians) and the decoder term ``L_0 = -log p(x_0 | x_1)``
discretised into 256 pixel bins (Ho et al. 2020, Eq. 13). Nichol & Dhariwal
2021 (Sec. 3.1) train the variance on these terms in bits per dimension.

Notation

    ==========  =======================================================
    mean1/2     means of the two Gaussians, (B, C, H, W)
    logvar1/2   log-variances of the two Gaussians, broadcastable to mean
    x           data in [-1, 1], (B, C, H, W)
    log_scales  log standard deviation of the decoder, (B, C, H, W)
    ==========  =======================================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Half-width of one of the 256 pixel bins on [-1, 1]: the bins are 2/255 wide.
PIXEL_BIN_HALF_WIDTH = 1.0 / 255.0
# Edge pixels (x within this of -1 or 1) integrate to -inf / +inf (Ho et al. 2020, Eq. 13).
EDGE_THRESHOLD = 0.999
# Floor under probabilities before taking logs.
MIN_PROB = 1e-12


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats.

    ``KL = 0.5 * (logvar2 - logvar1 + e^(logvar1 - logvar2)
    + (mean1 - mean2)^2 e^-logvar2 - 1)``; arguments broadcast.
    """
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Standard normal CDF through the tanh approximation of Page (1977).

    ``Phi(x) ~ 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``, the form
    used by Ho et al. 2020 and Nichol & Dhariwal 2021 for ``L_0``.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability (nats) of 8-bit data under a Gaussian discretised to pixel bins.

    Ho et al. 2020, Eq. 13: the mass of ``N(means, e^(2 log_scales))`` on
    ``[x - 1/255, x + 1/255]``, with the outer bins extended to -inf/+inf.

    Args:
        x: ``(B, C, H, W)`` data rescaled to [-1, 1] from uint8.
        means, log_scales: ``(B, C, H, W)`` decoder mean and log std.

    Returns:
        ``(B, C, H, W)`` elementwise log-likelihoods.
    """
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centred + PIXEL_BIN_HALF_WIDTH))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centred - PIXEL_BIN_HALF_WIDTH))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=MIN_PROB))  # bin (-inf, x + 1/255]
    log_sf_lower = torch.log((1.0 - cdf_lower).clamp(min=MIN_PROB))  # bin [x - 1/255, inf)
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=MIN_PROB))
    inner = torch.where(x > EDGE_THRESHOLD, log_sf_lower, log_bin)
    return torch.where(x < -EDGE_THRESHOLD, log_cdf_upper, inner)

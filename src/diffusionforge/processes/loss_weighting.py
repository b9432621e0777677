"""Which noise levels a discrete Gaussian diffusion trains on, and how much each counts.

    ==========  ==============================================================
    abar_t      cumulative signal fraction of step t;  SNR_t = abar_t / (1 - abar_t)
    sigma_t     EDM noise level of step t: sqrt((1 - abar_t) / abar_t) = SNR_t^-1/2
    gamma       min-SNR clamp (Hang et al. 2023, "Efficient Diffusion Training
                via Min-SNR Weighting Strategy", Eq. 8 and Sec. 3.4)
    ==========  ==============================================================

Min-SNR-gamma weights the x0-space loss by ``min(SNR_t, gamma)``. Each
prediction type's plain MSE already carries a factor of SNR_t relative to
the x0-space loss, so its weight divides by it:

    eps:  ||eps - eps_hat||^2  = SNR_t ||x0 - x0_hat||^2        -> w_t = min(SNR_t, gamma) / SNR_t
    x0:   ||x0 - x0_hat||^2                                      -> w_t = min(SNR_t, gamma)
    v:    ||v - v_hat||^2      = (SNR_t + 1) ||x0 - x0_hat||^2   -> w_t = min(SNR_t, gamma) / (SNR_t + 1)

Log-normal timesteps (Karras et al. 2022, Table 1, "Training: ln(sigma) ~
N(P_mean, P_std^2)"): draw sigma, then take the step whose sigma_t is nearest
in log space, so training concentrates on the middle noise levels instead of
spending most draws where the task is trivial or hopeless.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def snr(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """``SNR_t = abar_t / (1 - abar_t)`` for ``t: (B,)`` -> ``(B,)``."""
    abar = alphas_cumprod[t].double()
    return (abar / (1.0 - abar)).clamp(max=1e12)


def min_snr_weight(snr_t: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample weight ``(B,)`` of the simple loss (module docstring, Hang et al. Sec. 3.4)."""
    clamped = snr_t.clamp(max=gamma)
    if prediction_type == "eps":  # min(SNR, gamma) / SNR, written to stay finite at SNR = 0
        return torch.where(snr_t > gamma, gamma / snr_t.clamp(min=gamma), torch.ones_like(snr_t))
    if prediction_type == "x0":
        return clamped
    if prediction_type == "v":
        return clamped / (snr_t + 1.0)
    raise ValueError(f"prediction_type must be eps, x0 or v, got {prediction_type!r}")


def lognormal_timesteps(alphas_cumprod: Tensor, batch_size: int, mean: float, std: float,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """``t: (B,)`` whose sigma_t is the nearest (in log sigma) to ``exp(N(mean, std^2))`` draws."""
    log_sigmas = 0.5 * (torch.log1p(-alphas_cumprod.double()) - torch.log(alphas_cumprod.double()))  # (T,) increasing
    device = alphas_cumprod.device
    draws = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float64) * std + mean
    right = torch.searchsorted(log_sigmas, draws).clamp(1, len(log_sigmas) - 1)  # (B,)
    left = right - 1
    nearer_left = (draws - log_sigmas[left]).abs() <= (log_sigmas[right] - draws).abs()
    return torch.where(nearer_left, left, right)

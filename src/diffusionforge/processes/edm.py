"""EDM: the preconditioned denoiser, noise levels and loss weight of Karras et al. 2022.

"Elucidating the Design Space of Diffusion-Based Generative Models", Table 1
(column "EDM") and Eq. 2, 7-8; NVlabs/edm ``EDMPrecond`` and ``EDMLoss``.
Noise is variance exploding: ``x = x0 + sigma n``, ``n ~ N(0, I)``, sigma a
float per sample (no discrete time).

    ============  ===========================================================
    x0            data, (B, C, H, W); sigma_data its expected std
    sigma         noise level (B,); x = x0 + sigma n
    F_theta       the backbone: F_theta(c_in x, c_noise, cond)
    D_theta       c_skip x + c_out F_theta(c_in x, c_noise)          (Eq. 7)
    c_skip        sigma_data^2 / (sigma^2 + sigma_data^2)            (Table 1)
    c_out         sigma sigma_data / sqrt(sigma^2 + sigma_data^2)    (Table 1)
    c_in          1 / sqrt(sigma^2 + sigma_data^2)                   (Table 1)
    c_noise       ln(sigma) / 4                                      (Table 1)
    p_train       ln(sigma) ~ N(P_mean, P_std^2)                     (Table 1)
    lambda        (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2   (Table 1)
    loss          E lambda(sigma) |D_theta(x0 + sigma n; sigma) - x0|^2            (Eq. 2, 8)
    ============  ===========================================================

With ``lambda = 1 / c_out^2`` the loss is the plain squared error of the raw
output against its effective target, ``|F - (x0 - c_skip x) / c_out|^2``
(Eq. 8): every noise level starts with unit loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from diffusionforge.conditioning.base import Cond
from diffusionforge.processes.config import EDMConfig
from diffusionforge.processes.flow import per_sample
from diffusionforge.processes.gaussian import LossOutput
from diffusionforge.samplers.denoiser import NetFn, log_interp_sigma_to_t, log_interp_t_to_sigma

__all__ = ["EDMConfig", "EDMDenoiser", "EDMProcess", "Preconditioning"]

# Entries of the denoiser's sigma table: geometric from sigma_min to sigma_max
# (EDM has no discrete time; the table only serves the `discrete` schedule and t <-> sigma).
SIGMA_TABLE_SIZE = 1000


class Preconditioning(NamedTuple):
    """The four scalings of Table 1, each ``(B,)`` (float64 or float32, as sigma)."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


class EDMProcess(nn.Module):
    """The EDM objective; holds no parameters (an ``nn.Module`` only to move with the model)."""

    def __init__(self, config: Optional[EDMConfig] = None):
        super().__init__()
        self.config = config = config or EDMConfig()
        self.sigma_data = float(config.sigma_data)

    def precondition(self, sigma: Tensor) -> Preconditioning:
        """c_skip, c_out, c_in, c_noise of ``sigma: (B,)`` (Table 1)."""
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2).sqrt()  # sqrt(sigma^2 + sigma_data^2)
        return Preconditioning(sd2 / (sigma**2 + sd2), sigma * self.sigma_data / norm, 1 / norm, sigma.log() / 4)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, ``(B,)`` (Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(self, batch: int, device: torch.device | str = "cpu",
                     generator: Optional[torch.Generator] = None) -> Tensor:
        """(batch,) training levels with ``ln(sigma) ~ N(P_mean, P_std^2)`` (Table 1)."""
        normal = torch.randn(batch, generator=generator, device=device)
        return (normal * self.config.p_std + self.config.p_mean).exp()

    def denoise(self, net_fn: NetFn, x: Tensor, sigma: Tensor, cond: Optional[Cond] = None) -> Tensor:
        """``D_theta(x; sigma) = c_skip x + c_out F_theta(c_in x, c_noise, cond)`` (Eq. 7); x: (B, C, H, W)."""
        c = self.precondition(sigma.to(x.device))  # in sigma's precision (float64 from the samplers)
        out = net_fn(per_sample(c.c_in, x) * x, c.c_noise, cond)[:, : x.shape[1]]
        return per_sample(c.c_skip, x) * x + per_sample(c.c_out, x) * out.to(x.dtype)

    def loss(self, net_fn: NetFn, x0: Tensor, cond: Optional[Cond] = None,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        """``lambda(sigma) |D_theta(x0 + sigma n; sigma) - x0|^2`` averaged (Eq. 2; ``EDMLoss``).

        ``loss_simple`` is the weighted per-sample mean ``(B,)``, i.e. the squared
        error of the raw output against its effective target (Eq. 8).
        """
        sigma = self.sample_sigma(x0.shape[0], x0.device, generator)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = x0 + per_sample(sigma, x0) * noise
        error = (self.denoise(net_fn, x, sigma, cond).float() - x0.float()).pow(2).flatten(1).mean(1)  # (B,)
        loss_simple = self.loss_weight(sigma).float() * error
        return LossOutput(loss_simple.mean(), loss_simple, None)

    def sigma_table(self) -> Tensor:
        """``(SIGMA_TABLE_SIZE,)`` float32 levels, geometric from sigma_min to sigma_max (ascending)."""
        c = self.config
        return torch.logspace(math.log10(c.sigma_min), math.log10(c.sigma_max), SIGMA_TABLE_SIZE,
                              dtype=torch.float64).float()

    def denoiser(self, net_fn: NetFn) -> "EDMDenoiser":
        """The ``samplers.denoiser.Denoiser`` view of ``net_fn(c_in x, c_noise, cond) -> F``."""
        return EDMDenoiser(self, net_fn)


class EDMDenoiser:
    """``D(x, sigma, cond) -> x0_hat``: EDM is variance exploding, so x is already in the samplers' coordinates."""

    def __init__(self, process: EDMProcess, net_fn: NetFn):
        self.process, self.net_fn = process, net_fn
        self.sigmas = process.sigma_table()  # (N,) ascending
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def __call__(self, x: Tensor, sigma: Tensor, cond: Optional[Cond] = None) -> Tensor:
        """x: (B, C, H, W), sigma: (B,) -> D_theta(x; sigma) (B, C, H, W)."""
        return self.process.denoise(self.net_fn, x, sigma, cond)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return log_interp_sigma_to_t(sigma, self.sigmas)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return log_interp_t_to_sigma(t, self.sigmas)

    def prior_scale(self, sigma: float) -> float:
        """``sigma``: x at level sigma_max is ``x0 + sigma n``, about ``sigma n`` (EDM Algorithm 1, line 1)."""
        return sigma

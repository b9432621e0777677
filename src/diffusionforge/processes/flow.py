"""Rectified flow / flow matching, and the straight-path algebra the LBM bridge shares.

Liu et al. 2023 ("Flow Straight and Fast"), Lipman et al. 2023 (flow
matching), Esser et al. 2024 (SD3: "Scaling Rectified Flow Transformers",
Sec. 3.1 time sampling, Sec. 5.3.2 the shift). Time ``t`` is a float in
``[0, 1]``; ``t = 0`` is data, ``t = 1`` is the source (noise here, the
degraded latent in ``bridge.py``).

    ==========  ===============================================================
    x0, x1      data and source, (B, C, H, W); x1 = eps ~ N(0, I) for the flow
    x_t         (1 - t) x0 + t x1                        (Esser et al. Eq. 3, a = 1 - t, b = t)
    v           dx_t/dt = x1 - x0: the regression target (Liu et al. Eq. 1)
    x0_hat      x_t - t v_hat: an Euler step from t straight to 0
    T           num_train_timesteps: training times lie on the grid k / T,
                k = 1..T, and the backbone sees t * T (diffusers' timesteps)
    s           SD3 shift: t' = s t / (1 + (s - 1) t)   (Esser et al. Sec. 5.3.2;
                s > 1 moves every time towards noise)
    sigma       the VE view of the samplers: sigma = t / (1 - t), x_VE = x_t / (1 - t)
    ==========  ===============================================================

Training times (diffusers' ``compute_density_for_timestep_sampling`` and its
training scripts, which LBM uses): a density draw ``u`` in ``[0, 1)`` indexes
the descending training grid, ``t = 1 - floor(u T) / T``, then the shift:

- ``uniform``:       ``t = k / T``, ``k ~ U{1..T}``
- ``logit_normal``:  ``u = sigmoid(n)``, ``n ~ N(m, s^2)``   (SD3 Eq. 19; with
  the descending grid, ``m > 0`` favours low noise)
- ``mode``:          ``u = f_mode(u'; s) = 1 - u' - s (cos^2(pi u' / 2) - 1 + u')``,
  ``u' ~ U[0, 1)``  (SD3 Eq. 20)

The bridge of ``bridge.py`` adds ``sigma_b sqrt(t (1 - t)) eps`` to the same
path: with ``x1 = eps`` and ``sigma_b = 0`` it *is* this rectified flow, and
both draw their times with ``sample_grid_times``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from diffusionforge.conditioning.base import Cond
from diffusionforge.processes.config import FlowTimeSampling, RectifiedFlowConfig
from diffusionforge.processes.gaussian import LossOutput
from diffusionforge.samplers.denoiser import NetFn, log_interp_sigma_to_t, log_interp_t_to_sigma

__all__ = ["FlowDenoiser", "RectifiedFlow", "RectifiedFlowConfig", "path_endpoint", "path_velocity", "per_sample",
           "sample_grid_times", "shift_time", "straight_path"]

# The smallest SNR = (1 - t)^2 / t^2 the VE view offers: diffusers clamps a zero-terminal
# abar to 2^-24 (EulerDiscreteScheduler), so t = 1 becomes sigma = 2^12.
MIN_TERMINAL_SNR = 2.0**-24


# ---------------------------------------------------------------- the straight path (shared with bridge.py)
def per_sample(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) in like's dtype."""
    return t.to(like.dtype).reshape(t.shape[0], *([1] * (like.ndim - 1)))


def straight_path(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t x1``; ``x0, x1: (B, C, H, W)``, ``t: (B,)`` (Esser et al. Eq. 3)."""
    tt = per_sample(t, x0)
    return (1 - tt) * x0 + tt * x1


def path_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """The regression target ``v = dx_t/dt = x1 - x0`` (Liu et al. 2023, Eq. 1)."""
    return x1 - x0


def path_endpoint(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``x0_hat = x_t - t v``: where an Euler step from t straight to 0 lands."""
    return x_t - per_sample(t, x_t) * v


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's shift ``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024, Sec. 5.3.2); ``s = 1`` is the identity."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_grid_times(kind: FlowTimeSampling, batch: int, num_train_timesteps: int, *, logit_mean: float = 0.0,
                      logit_std: float = 1.0, mode_scale: float = 1.29,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """(batch,) float32 times on the grid ``k / T``, ``k = 1..T``, drawn as ``kind`` says (module docstring).

    Draws on the CPU from ``generator`` (the global generator when None).
    """
    T = num_train_timesteps
    if kind == "uniform":
        return torch.randint(1, T + 1, (batch,), generator=generator).float() / T
    if kind == "logit_normal":  # SD3 Eq. 19
        u = torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    elif kind == "mode":  # SD3 Eq. 20
        u = torch.rand(batch, generator=generator)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        raise ValueError(f"time sampling must be uniform, logit_normal or mode, got {kind!r}")
    index = (u * T).long().clamp_(0, T - 1)  # u < 1 in exact arithmetic; guards float rounding
    return 1.0 - index.float() / T


# ---------------------------------------------------------------- the process
class RectifiedFlow(nn.Module):
    """Rectified flow from noise (t = 1) to data (t = 0); holds no parameters (a module to move with the model)."""

    def __init__(self, config: Optional[RectifiedFlowConfig] = None):
        super().__init__()
        self.config = config = config or RectifiedFlowConfig()
        self.num_train_timesteps = config.num_train_timesteps

    def sample_t(self, batch: int, device: torch.device | str = "cpu",
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """(batch,) training times in (0, 1]: the grid draw of ``time_sampling``, then the shift."""
        c = self.config
        t = sample_grid_times(c.time_sampling, batch, self.num_train_timesteps, logit_mean=c.logit_mean,
                              logit_std=c.logit_std, mode_scale=c.mode_scale, generator=generator)
        return shift_time(t, c.shift).to(device)

    def model_time(self, t: Tensor) -> Tensor:
        """The time the backbone sees: ``t * T``, diffusers' flow timesteps (the range the sinusoids expect)."""
        return t * self.num_train_timesteps

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - t) x0 + t eps``, ``(B, C, H, W)``."""
        return straight_path(x0, noise, t)

    @staticmethod
    def velocity(x0: Tensor, noise: Tensor) -> Tensor:
        """``v = eps - x0``."""
        return path_velocity(x0, noise)

    @staticmethod
    def predict_x0(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """``x0_hat = x_t - t v``."""
        return path_endpoint(x_t, v, t)

    def loss(self, net_fn: NetFn, x0: Tensor, cond: Optional[Cond] = None,
             generator: Optional[torch.Generator] = None) -> LossOutput:
        """Conditional flow matching ``E |v_theta(x_t, t T) - (eps - x0)|^2`` (Lipman et al. 2023, Eq. 23).

        ``net_fn(x_t, t * T, cond) -> v_hat``; ``loss_simple`` is the per-sample mean ``(B,)``.
        """
        t = self.sample_t(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.interpolate(x0, noise, t)
        v = net_fn(x_t, self.model_time(t), cond)
        loss_simple = (v.float() - self.velocity(x0, noise).float()).pow(2).flatten(1).mean(1)  # (B,)
        return LossOutput(loss_simple.mean(), loss_simple, None)

    # ---------------------------------------------------------------- sampling
    def sampling_times(self, num_steps: int, shift: Optional[float] = None) -> Tensor:
        """``(num_steps + 1,)`` float64 times of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``.

        ``linspace(1, t_min, K)`` shifted, then 0, where ``t_min = shift(1 / T)`` is
        the scheduler's ``sigma_min`` (its training grid is shifted at
        construction, and the inference grid is shifted once more, as there).
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {num_steps!r}")
        s = self.config.shift if shift is None else shift
        t_min = shift_time(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64), s)
        times = shift_time(torch.linspace(1.0, float(t_min), num_steps, dtype=torch.float64), s)
        return torch.cat([times, times.new_zeros(1)])

    def training_sigmas(self) -> Tensor:
        """``(T,)`` ascending float64 VE levels ``t / (1 - t)`` of the shifted training grid, top clamped."""
        grid = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
        return flow_t_to_sigma(shift_time(grid, self.config.shift))

    def denoiser(self, net_fn: NetFn) -> "FlowDenoiser":
        """The ``samplers.denoiser.Denoiser`` view of ``net_fn(x_t, t T, cond) -> v_hat``."""
        return FlowDenoiser(self, net_fn)


def flow_t_to_sigma(t: Tensor) -> Tensor:
    """``sigma = t / (1 - t)``, at most ``MIN_TERMINAL_SNR^-1/2`` (t = 1 would be infinite)."""
    return (t / (1 - t).clamp(min=1e-300)).clamp(max=MIN_TERMINAL_SNR**-0.5)


class FlowDenoiser:
    """``D(x, sigma, cond) -> x0_hat`` of a rectified flow, in the VE coordinates of ``samplers/denoiser.py``.

    ``x_VE = x_t / (1 - t)`` and ``sigma = t / (1 - t)``, so ``t = sigma / (1 + sigma)``
    and ``x_t = x_VE / (1 + sigma)``; then ``D = x_t - t v_theta(x_t, t T)``.
    """

    def __init__(self, process: RectifiedFlow, net_fn: NetFn):
        self.process, self.net_fn = process, net_fn
        self.sigmas = process.training_sigmas().float()  # (T,) ascending
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def __call__(self, x: Tensor, sigma: Tensor, cond: Optional[Cond] = None) -> Tensor:
        """x: (B, C, H, W) in VE coordinates, sigma: (B,) -> x0_hat (B, C, H, W)."""
        sigma = sigma.to(x.device)  # (B,), in its own precision (float64 from the samplers)
        t = sigma / (1 + sigma)  # (B,)
        x_t = x / per_sample(1 + sigma, x)
        v = self.net_fn(x_t, self.process.model_time(t), cond)[:, : x.shape[1]].to(x.dtype)
        return path_endpoint(x_t, v, t)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return log_interp_sigma_to_t(sigma, self.sigmas)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return log_interp_t_to_sigma(t, self.sigmas)

    def prior_scale(self, sigma: float) -> float:
        """``1 + sigma``: x_VE at level sigma is ``x_t / (1 - t)`` with ``x_t`` = the N(0, I) prior."""
        return 1.0 + sigma

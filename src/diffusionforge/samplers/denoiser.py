"""The denoiser view ``D(x, sigma, cond) -> x0_hat`` of a trained process (Karras et al. 2022).

Every process (discrete Gaussian / VP, EDM / VE, rectified flow) is seen by
the sigma samplers (Euler, Heun, DPM-Solver++, ...) through one object, the
``Denoiser`` below: k-diffusion's ``external.py`` wrappers, EDM's
``*Precond``. ``x`` is in the variance-exploding coordinates of Karras et al.
2022 (Eq. 1): ``x = x0 + sigma * eps``; the denoiser maps it to the process's
own coordinates, calls the network and returns its estimate of ``x0``.

    ===========  =========================================================
    x            (B, C, H, W) noisy sample in VE coordinates, x0 + sigma eps
    sigma        (B,) noise level, >= 0 (float, x's device)
    t            the process's own time, *fractional index* into ``sigmas``:
                 t_to_sigma(i) = sigmas[i] for integer i
    D            D(x, sigma, cond) -> (B, C, H, W) x0_hat
    ===========  =========================================================

Views of the processes:

    ================  ===============================  ======================
    process           sigma                            x_native
    ================  ===============================  ======================
    Gaussian (VP)     sqrt((1 - abar_t) / abar_t)      x / sqrt(sigma^2 + 1)
    EDM (VE)          native                           x   (c_in is EDM's)
    rectified flow    t / (1 - t)                      x / (1 + sigma) = (1-t) x
    ================  ===============================  ======================
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffusionforge.conditioning.base import Cond

# The network as the process's training saw it (guidance and autocast already wrapped around it):
# net_fn(x_native (B, C, H, W), model time (B,), cond) -> raw output (B, C_out, H, W).
NetFn = Callable[[Tensor, Tensor, Optional[Cond]], Tensor]


@runtime_checkable
class Denoiser(Protocol):
    """The contract every ``process.denoiser(net_fn)`` returns; the sigma samplers use nothing else.

    Attributes:
        sigmas: ``(N,)`` ascending float tensor, the noise levels of the
            process's discrete training times (``sigmas[i]`` is the level of
            time index ``i``). The ``discrete`` sigma schedule picks from it
            (as diffusers' ``timestep_spacing`` picks timesteps); a continuous
            process offers a table of N levels spanning its range. Finite and
            > 0 (a zero-terminal-SNR level is clamped, as diffusers does).
        sigma_min: ``float(sigmas[0])``, the smallest level the net was trained at.
        sigma_max: ``float(sigmas[-1])``, the largest; samplers start here.

    Methods:
        __call__(x, sigma, cond=None) -> x0_hat: ``x: (B, C, H, W)`` in VE
            coordinates, ``sigma: (B,)``; returns ``(B, C, H, W)`` in x's dtype.
            Only the prediction channels of the net are used (a learned
            variance's extra C channels are dropped). Guidance is not its
            business: it wraps ``net_fn`` before the denoiser is made.
        sigma_to_t(sigma) -> t: tensor -> tensor of the same shape, the
            fractional time index, interpolating ``log sigma`` linearly between
            the table's entries (k-diffusion ``DiscreteSchedule``).
        t_to_sigma(t) -> sigma: its inverse, ``exp`` of the linear
            interpolation of ``log sigmas`` at fractional index ``t``.
        prior_scale(sigma) -> float: the factor that makes a standard normal
            ``x_T`` the sampler's start at level ``sigma`` (usually
            ``sigma_max``): VP ``sqrt(sigma^2 + 1)`` (x_T is the process's
            N(0, I) prior); VE/EDM ``sigma``; flow ``1 + sigma``.
    """

    sigmas: Tensor
    sigma_min: float
    sigma_max: float

    def __call__(self, x: Tensor, sigma: Tensor, cond: Optional[Cond] = None) -> Tensor: ...

    def sigma_to_t(self, sigma: Tensor) -> Tensor: ...

    def t_to_sigma(self, t: Tensor) -> Tensor: ...

    def prior_scale(self, sigma: float) -> float: ...


def log_interp_sigma_to_t(sigma: Tensor, sigmas: Tensor) -> Tensor:
    """Fractional index of ``sigma`` in ascending ``sigmas: (N,)``, linear in log sigma (k-diffusion).

    Outside the table the index is clamped to ``[0, N - 1]``.
    """
    log_sigmas = sigmas.to(sigma.device, torch.float64).log()
    log_sigma = sigma.to(torch.float64).clamp(min=torch.finfo(torch.float64).tiny).log()
    dists = log_sigma.reshape(-1, 1) - log_sigmas  # (S, N)
    low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=len(sigmas) - 2)  # last entry <= sigma
    low_val, high_val = log_sigmas[low], log_sigmas[low + 1]
    w = ((low_val - log_sigma.reshape(-1)) / (low_val - high_val)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape).to(sigma.dtype)


def log_interp_t_to_sigma(t: Tensor, sigmas: Tensor) -> Tensor:
    """``exp`` of the linear interpolation of ``log sigmas`` at fractional indices ``t``."""
    log_sigmas = sigmas.to(t.device, torch.float64).log()
    t64 = t.to(torch.float64).clamp(0, len(sigmas) - 1)
    low = t64.floor().long().clamp(max=len(sigmas) - 2)
    w = t64 - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp().to(t.dtype)


# Zero-terminal-SNR schedules (Lin et al. 2024) reach abar = 0, an infinite sigma; that abar is
# replaced by this, as diffusers' EulerDiscreteScheduler does with rescale_betas_zero_snr.
MIN_ALPHA_CUMPROD = 2.0**-24


def _per_sample(values: Tensor, x: Tensor) -> Tensor:
    """``values: (B,)`` as ``(B, 1, ..., 1)`` in x's dtype and device."""
    return values.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class VPDenoiser:
    """``D(x, sigma, cond)`` of a discrete variance-preserving (Gaussian) process.

    k-diffusion ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``
    (Karras et al. 2022, Table 1, "VP"): with ``abar = 1 / (1 + sigma^2)``,
    ``x_VP = c_in x``, ``c_in = 1 / sqrt(sigma^2 + 1)``, and the network called
    at the fractional training time ``t = sigma_to_t(sigma)``:

        eps  D = x - sigma eps_theta                                   (c_skip 1, c_out -sigma)
        x0   D = x0_theta
        v    D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v_theta  (Salimans & Ho 2022, App. D)

    Args:
        net_fn: ``(x_VP, t (B,) float32 original timesteps, cond) -> (B, C or 2C, H, W)``.
        alphas_cumprod: ``(T,)`` abar of the process (read in float64).
        prediction_type: ``eps`` | ``x0`` | ``v``.
        learned_variance: the net returns 2C channels (DiT); the first C are the prediction.
        timestep_map: ``(T,)`` original timestep of each index (a respaced process); None: identity.
        quantize: call the net at the nearest integer time (k-diffusion ``quantize``; diffusers'
            DPMSolverMultistepScheduler rounds its Karras timesteps so).
    """

    def __init__(self, net_fn: NetFn, alphas_cumprod: Tensor, prediction_type: str = "eps", *,
                 learned_variance: bool = False, timestep_map: Optional[Tensor] = None,
                 quantize: bool = False) -> None:
        if prediction_type not in ("eps", "x0", "v"):
            raise ValueError(f"prediction_type must be eps, x0 or v, got {prediction_type!r}")
        abar = alphas_cumprod.detach().to("cpu", torch.float64)
        abar = torch.where(abar > 0, abar, torch.full_like(abar, MIN_ALPHA_CUMPROD))  # only a zero terminal SNR
        self.net_fn, self.prediction_type = net_fn, prediction_type
        self.learned_variance, self.quantize = learned_variance, quantize
        self.sigmas = ((1 - abar) / abar).sqrt()  # (T,) ascending, float64
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self.timestep_map = None if timestep_map is None else timestep_map.detach().to("cpu", torch.float64)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return log_interp_sigma_to_t(sigma, self.sigmas)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return log_interp_t_to_sigma(t, self.sigmas)

    def prior_scale(self, sigma: float) -> float:
        """``sqrt(sigma^2 + 1)``: ``x_T`` is the process's N(0, I) prior, ``x = x_T / sqrt(abar)``."""
        return (sigma**2 + 1) ** 0.5

    def model_time(self, sigma: Tensor) -> Tensor:
        """``(B,)`` float32 timesteps the net was trained with, at levels ``sigma: (B,)``."""
        t = self.sigma_to_t(sigma.to(torch.float64))
        if self.quantize:
            t = t.round()
        if self.timestep_map is not None:  # linear between the kept steps' original timesteps
            table = self.timestep_map.to(t.device)
            low = t.floor().long().clamp(0, max(len(table) - 2, 0))
            high = (low + 1).clamp(max=len(table) - 1)
            t = table[low] + (t - low) * (table[high] - table[low])
        return t.float()

    def __call__(self, x: Tensor, sigma: Tensor, cond: Optional[Cond] = None) -> Tensor:
        """``x: (B, C, H, W)`` (VE), ``sigma: (B,)`` -> ``x0_hat: (B, C, H, W)``."""
        sigma = sigma.to(x.device, torch.float64).expand(x.shape[0])
        scale = (sigma**2 + 1).rsqrt()  # c_in = sqrt(abar)
        out = self.net_fn(x * _per_sample(scale, x), self.model_time(sigma), cond).to(x.dtype)
        channels = x.shape[1]
        expected = 2 * channels if self.learned_variance else channels
        if out.shape[1] != expected:
            raise ValueError(f"the net returns {out.shape[1]} channels, the process expects {expected}")
        pred = out[:, :channels]
        if self.prediction_type == "eps":
            return x - _per_sample(sigma, x) * pred
        if self.prediction_type == "x0":
            return pred
        return x * _per_sample(scale**2, x) - _per_sample(sigma * scale, x) * pred

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

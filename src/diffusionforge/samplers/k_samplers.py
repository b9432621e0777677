"""Euler, Euler ancestral and Heun over a denoiser (Karras et al. 2022; k-diffusion ``sampling.py``).

The probability-flow ODE in VE coordinates (Karras et al. 2022, Eq. 4 with
s(t) = 1, sigma(t) = t):  ``dx / dsigma = (x - D(x, sigma)) / sigma``.

    ==============  =======================================================
    d               (x - D(x, sigma)) / sigma, the ODE's slope
    gamma_i         min(S_churn / n, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax, else 0
    sigma_hat       (1 + gamma_i) sigma_i, the level after churn
    S_noise         scale of the churn noise (Algorithm 2, line 5)
    sigma_up/down   ancestral split of a step: sigma_next^2 = sigma_down^2 + sigma_up^2
    ==============  =======================================================

Every solver has the signature of ``sigma_sampler.py``; the registry gets
them through ``registry_sampler``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from diffusionforge.samplers.denoiser import Denoiser
from diffusionforge.samplers.loop import Callback, Cond, SampleOutput, StepOutput, randn
from diffusionforge.samplers.sigma_sampler import denoise_at, sigma_walk


def churn(x: Tensor, sigma: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float, generator: Optional[torch.Generator]) -> tuple[Tensor, float]:
    """``(x_hat, sigma_hat)``: Algorithm 2, lines 4-6 of Karras et al. 2022 (no noise drawn when gamma = 0)."""
    gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn(x, generator), sigma_hat  # Alg. 2, line 6


def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None, *,
          generator: Optional[torch.Generator] = None, known_mask: Optional[Tensor] = None,
          x0_known: Optional[Tensor] = None, callback: Optional[Callback] = None, progress: bool = True,
          return_intermediates: bool = False,
          start: int = 0, x_init: Optional[Tensor] = None,
          known_noise: Optional[Tensor] = None, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0) -> SampleOutput:
    """Euler steps of the ODE, with optional churn (Algorithm 2 of Karras et al. 2022 without its line 9-11)."""
    n = len(sigmas) - 1

    def step(x: Tensor, i: int, sigma: float, sigma_next: float) -> StepOutput:
        x_hat, sigma_hat = churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = denoise_at(denoiser, x_hat, sigma_hat, cond)
        d = (x_hat - denoised) / sigma_hat  # Eq. 4 slope
        return StepOutput(x_hat + (sigma_next - sigma_hat) * d, denoised)  # Alg. 2, line 8

    return sigma_walk(step, x, sigmas, generator=generator, known_mask=known_mask, x0_known=x0_known,
                      callback=callback, progress=progress, return_intermediates=return_intermediates,
                      start=start, x_init=x_init, known_noise=known_noise,
                      desc="Euler")


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)``: the deterministic target level and the noise to add (k-diffusion)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None, *,
                    generator: Optional[torch.Generator] = None, known_mask: Optional[Tensor] = None,
                    x0_known: Optional[Tensor] = None, callback: Optional[Callback] = None,
                    progress: bool = True, return_intermediates: bool = False,
                    start: int = 0, x_init: Optional[Tensor] = None,
                    known_noise: Optional[Tensor] = None, s_noise: float = 1.0) -> SampleOutput:
    """Euler step to ``sigma_down``, then fresh noise of std ``sigma_up`` (eta = 1; not after the last step)."""

    def step(x: Tensor, i: int, sigma: float, sigma_next: float) -> StepOutput:
        denoised = denoise_at(denoiser, x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        x = x + (sigma_down - sigma) * (x - denoised) / sigma
        if sigma_next > 0:
            x = x + sigma_up * s_noise * randn(x, generator)
        return StepOutput(x, denoised)

    return sigma_walk(step, x, sigmas, generator=generator, known_mask=known_mask, x0_known=x0_known,
                      callback=callback, progress=progress, return_intermediates=return_intermediates,
                      start=start, x_init=x_init, known_noise=known_noise,
                      desc="Euler ancestral")


def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None, *,
         generator: Optional[torch.Generator] = None, known_mask: Optional[Tensor] = None,
         x0_known: Optional[Tensor] = None, callback: Optional[Callback] = None, progress: bool = True,
         return_intermediates: bool = False,
         start: int = 0, x_init: Optional[Tensor] = None,
         known_noise: Optional[Tensor] = None, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = math.inf, s_noise: float = 1.0) -> SampleOutput:
    """Karras et al. 2022, Algorithm 2: churn, an Euler step, and the trapezoidal correction unless sigma_next = 0.

    ``n`` steps cost ``2n - 1`` denoiser calls.
    """
    n = len(sigmas) - 1

    def step(x: Tensor, i: int, sigma: float, sigma_next: float) -> StepOutput:
        x_hat, sigma_hat = churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator)  # lines 4-6
        denoised = denoise_at(denoiser, x_hat, sigma_hat, cond)
        d = (x_hat - denoised) / sigma_hat  # line 7
        x_next = x_hat + (sigma_next - sigma_hat) * d  # line 8
        if sigma_next > 0:  # lines 9-11: second order correction
            d_prime = (x_next - denoise_at(denoiser, x_next, sigma_next, cond)) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_prime)
        return StepOutput(x_next, denoised)

    return sigma_walk(step, x, sigmas, generator=generator, known_mask=known_mask, x0_known=x0_known,
                      callback=callback, progress=progress, return_intermediates=return_intermediates,
                      start=start, x_init=x_init, known_noise=known_noise,
                      desc="Heun")

"""Beta schedules of discrete Gaussian diffusion.

A schedule is the variance of each forward step, ``beta_t`` for
``t = 0 .. T-1``, returned as a float64 tensor ``(T,)``. ``schedule_tables``
derives the LDM buffers from it (Ho et al. 2020, Eqs. 4, 6-7) and
``vlb_weights`` the per-step VLB weights; the process casts them to float32.

Notation

    =============  ====================================================
    T              number of diffusion steps (``num_timesteps``)
    beta_t         variance of q(x_t | x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t I)
    alpha_t        1 - beta_t
    abar_t         prod_{s<=t} alpha_s   ("alphas_cumprod")
    s              cosine offset (``cosine_s``), 0.008 in the paper
    beta_tilde_t   posterior variance (1 - abar_{t-1}) / (1 - abar_t) beta_t
    sigma_t^2      (1 - v) beta_tilde_t + v beta_t  (LDM ``v_posterior``)
    coef1, coef2   posterior mean = coef1_t x0 + coef2_t x_t
    =============  ====================================================

Schedules

- ``linear``: ``linspace(linear_start, linear_end, T)`` (Ho et al. 2020,
  Sec. 4; diffusers ``"linear"``).
- ``scaled_linear``: ``linspace(sqrt(start), sqrt(end), T) ** 2``; this is
  what CompVis latent-diffusion calls ``"linear"`` and diffusers calls
  ``"scaled_linear"`` (Rombach et al. 2022, used with 0.00085 .. 0.012).
- ``cosine``: Nichol & Dhariwal 2021, Eq. 17,
  ``abar(t) = f(t)/f(0)``, ``f(t) = cos((t/T + s)/(1 + s) * pi/2)^2``,
  ``beta_t = min(1 - abar(t+1)/abar(t), 0.999)``. This is diffusers'
  ``"squaredcos_cap_v2"`` (they agree to float32 rounding). CompVis LDM's
  ``"cosine"`` evaluates the same ratios on a normalised grid and clips with
  ``np.clip(., 0, 0.999)``; it is the same function and differs from ours
  only in float rounding, but diffusers is the reference our tests pin.

Zero terminal SNR (``rescale_zero_terminal_snr``; Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1; diffusers'
``rescale_betas_zero_snr``): shift ``sqrt(abar_t)`` so its last value is 0 and
scale it so its first value is unchanged, ``sqrt(abar_t) <- (sqrt(abar_t) -
sqrt(abar_{T-1})) sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_{T-1}))``, then
read the betas back from the ratios. The last step is then pure noise
(``abar_{T-1} = 0``, ``beta_{T-1} = 1``); only v-prediction can be trained
there, and samplers must start at ``T - 1`` (``trailing`` spacing).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import Tensor

from diffusionforge.errors import ConfigError
from diffusionforge.processes.config import BetaScheduleName

# Floor of the posterior variance before its log when T == 1 (LDM uses 1e-20).
MIN_LOG_VARIANCE_ARG = 1e-20
# Largest beta of the cosine schedule: avoids a singular last step (N&D Sec. 3.2).
COSINE_MAX_BETA = 0.999


def linear_betas(num_timesteps: int, linear_start: float, linear_end: float, cosine_s: float) -> torch.Tensor:
    """``beta_t`` evenly spaced from ``linear_start`` to ``linear_end`` (Ho et al. 2020, Sec. 4)."""
    return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, linear_start: float, linear_end: float, cosine_s: float) -> torch.Tensor:
    """``sqrt(beta_t)`` evenly spaced (LDM "linear", diffusers "scaled_linear")."""
    root = torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_timesteps, dtype=torch.float64)
    return root**2


def cosine_betas(num_timesteps: int, linear_start: float, linear_end: float, cosine_s: float) -> torch.Tensor:
    """Cosine schedule, Eq. 17 of Nichol & Dhariwal 2021, betas capped at 0.999."""
    grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T+1,) t/T
    f = torch.cos((grid + cosine_s) / (1.0 + cosine_s) * math.pi / 2) ** 2  # Eq. 17, N&D 2021
    betas = 1.0 - f[1:] / f[:-1]  # abar(t+1)/abar(t) = f(t+1)/f(t); f(0) cancels
    return betas.clamp(max=COSINE_MAX_BETA)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """``betas: (T,)`` float64 rescaled so that ``abar_{T-1} = 0`` (Lin et al. 2024, Algorithm 1)."""
    abar_sqrt = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)  # last -> 0, first kept
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


BETA_SCHEDULES: Dict[str, Callable[[int, float, float, float], torch.Tensor]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def make_beta_schedule(
    schedule: BetaScheduleName,
    num_timesteps: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """Return ``betas: (T,)`` float64 for the named schedule.

    ``linear_start``/``linear_end`` are used by the two linear schedules,
    ``cosine_s`` by the cosine schedule. Raises ``ConfigError`` for an
    unknown name.
    """
    if schedule not in BETA_SCHEDULES:
        raise ConfigError(f"beta_schedule: expected one of {sorted(BETA_SCHEDULES)}, got {schedule!r}")
    if num_timesteps < 1:
        raise ConfigError(f"num_timesteps: must be >= 1, got {num_timesteps}")
    return BETA_SCHEDULES[schedule](num_timesteps, linear_start, linear_end, cosine_s)


def schedule_tables(betas: Tensor, v_posterior: float) -> Dict[str, Tensor]:
    """Every LDM schedule buffer except ``lvlb_weights``, float64 ``(T,)``."""
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta_tilde = betas * (1.0 - abar_prev) / (1.0 - abar)  # Eq. 7, Ho et al. 2020
    post_var = (1.0 - v_posterior) * beta_tilde + v_posterior * betas  # LDM v_posterior mix
    if len(betas) > 1:  # the t=0 variance is 0: use the t=1 value (improved-diffusion)
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    else:
        post_log_var = torch.log(post_var.clamp(min=MIN_LOG_VARIANCE_ARG))
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_log_var,
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),  # Eq. 7, Ho et al. 2020
        "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),  # Eq. 7, Ho et al. 2020
    }


def vlb_weights(tables: Dict[str, Tensor], prediction_type: str) -> Tensor:
    """``w_t`` with ``L_{t-1} = w_t * ||target - prediction||^2`` (float64, ``(T,)``).

    ``L_{t-1} = ||mu_tilde - mu_theta||^2 / (2 sigma_t^2)`` (Ho et al. 2020, Eq. 8),
    so ``w_t`` is the squared coefficient of the target in ``mu`` over 2 sigma_t^2:
      eps: mu = (x_t - beta_t / sqrt(1-abar_t) eps) / sqrt(alpha_t)   (Ho Eq. 11)
           -> w = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t));
      x0:  mu = coef1_t x0 + coef2_t x_t -> w = coef1_t^2 / (2 sigma_t^2);
           (LDM's 0.5 sqrt(abar) / (2. * 1 - abar) is a precedence typo);
      v:   x0 = sqrt(abar_t) x_t - sqrt(1-abar_t) v, so an error dv moves x0 by
           sqrt(1-abar_t) dv -> w = coef1_t^2 (1 - abar_t) / (2 sigma_t^2).
    ``w_0`` is set to ``w_1`` as LDM does (sigma_0^2 = 0 there).
    """
    two_var = 2.0 * tables["posterior_variance"]
    abar, coef1 = tables["alphas_cumprod"], tables["posterior_mean_coef1"]
    if prediction_type == "eps":
        w = tables["betas"] ** 2 / (two_var * (1.0 - tables["betas"]) * (1.0 - abar))
    elif prediction_type == "x0":
        w = coef1**2 / two_var
    else:
        w = coef1**2 * (1.0 - abar) / two_var
    if len(w) > 1:
        w[0] = w[1]
    else:  # a single step has no KL term
        w = torch.zeros_like(w)
    return w

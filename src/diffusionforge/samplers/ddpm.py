"""Ancestral (DDPM) sampling, on all T steps or a respaced subset.

Ho et al. 2020, Algorithm 2: ``x_{t-1} = mu_theta(x_t, t) + sigma_t z``
with ``mu_theta`` the posterior mean at the predicted x0 (Eq. 7) and
``z ~ N(0, I)`` except at the last step. A step from ``t`` to an earlier
``t_prev`` uses the respaced process of Nichol & Dhariwal 2021 (Sec. 4):

    ============  ==========================================================
    abar_t        alphas_cumprod of the process at t;  abar_{-1} = 1
    beta'_t       1 - abar_t / abar_{t_prev}, the variance of the big step
    beta_tilde'   (1 - abar_{t_prev}) / (1 - abar_t) * beta'_t
    sigma_t^2     beta_tilde' (fixed_small), beta' (fixed_large), or the
                  learned interpolation between them (learned_range, N&D Eq. 15)
    ============  ==========================================================
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from diffusionforge.processes.gaussian import GaussianDiffusion
from diffusionforge.samplers.loop import (
    Callback,
    Cond,
    DenoiseFn,
    SampleOutput,
    StepOutput,
    batch_t,
    call_denoise,
    descending_pairs,
    randn,
    sampling_loop,
)
from diffusionforge.samplers.spacing import Spacing, make_timesteps


def ddpm_step(
    process: GaussianDiffusion,
    model_output: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    noise: Optional[Tensor],
    clip_denoised: bool = False,
) -> StepOutput:
    """One ancestral step from process step ``t`` to ``t_prev`` (``-1`` = final).

    Args:
        model_output: ``(B, C or 2C, H, W)`` raw backbone output at ``x_t``.
        x_t: ``(B, C, H, W)``.
        noise: ``(B, C, H, W)`` standard normal; may be None on the final step.

    When ``t_prev != t - 1`` the step uses the two-step respaced process
    ``process.respaced([t_prev, t])`` so the posterior is that of the big step.
    """
    if t_prev == t - 1:
        step_process, index = process, t
    else:
        step_process = process.respaced([t_prev, t] if t_prev >= 0 else [t])
        index = step_process.num_timesteps - 1
    tt = batch_t(index, x_t)
    p = step_process.p_mean_variance(model_output, x_t, tt, clip_denoised=clip_denoised)
    if index == 0:  # Algorithm 2, Ho et al. 2020: z = 0 at the last step
        return StepOutput(p.mean, p.pred_x0)
    if noise is None:
        raise ValueError("ddpm_step needs noise except on the final step")
    return StepOutput(p.mean + torch.exp(0.5 * p.log_variance) * noise, p.pred_x0)  # Alg. 2, Ho et al. 2020


def sample_ddpm(
    denoise: DenoiseFn,
    process: GaussianDiffusion,
    x_T: Tensor,
    cond: Cond = None,
    *,
    num_steps: Optional[int] = None,
    spacing: Spacing = "leading",
    clip_denoised: bool = False,
    generator: Optional[torch.Generator] = None,
    known_mask: Optional[Tensor] = None,
    x0_known: Optional[Tensor] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
    return_intermediates: bool = False, start: int = 0, x_init: Optional[Tensor] = None,
    known_noise: Optional[Tensor] = None,
) -> SampleOutput:
    """Ancestral sampling from ``x_T: (B, C, H, W)`` (usually N(0, I)).

    ``num_steps`` None walks all T steps; fewer steps walk the respaced
    process over ``make_timesteps(T, num_steps, spacing)``. The backbone is
    called with original timesteps. All noise comes from ``generator``.
    """
    timesteps = make_timesteps(process.num_timesteps, num_steps or process.num_timesteps, spacing)
    spaced = process.respaced(timesteps.tolist())
    n = spaced.num_timesteps

    def step(x: Tensor, i: int, t: int, t_next: int) -> StepOutput:
        j = n - 1 - i  # index of t in the respaced process
        out = call_denoise(denoise, spaced, x, j, cond)
        noise = randn(x, generator) if j > 0 else None
        return ddpm_step(spaced, out, x, j, j - 1, noise, clip_denoised)

    return sampling_loop(
        step, process, x_T, descending_pairs(timesteps), generator=generator, known_mask=known_mask,
        x0_known=x0_known, callback=callback, progress=progress, return_intermediates=return_intermediates,
        start=start, x_init=x_init, known_noise=known_noise,
        desc="DDPM",
    )

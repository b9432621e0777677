"""DDIM sampling and deterministic DDIM inversion (Song et al. 2021).

Eq. 12 of Song et al. 2021, for a step from ``t`` to ``t_prev``:

    x_{t_prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)   (Eq. 16)

    ===============  =====================================================
    abar_t           alphas_cumprod at t;  abar_prev at t_prev, or
                     ``final_alpha_cumprod`` (default 1) when t_prev = -1
    x0_hat, eps_hat  the backbone's prediction turned into x0 and eps
    eta              0: deterministic DDIM;  1: DDPM-like (fixed_small) noise
    ===============  =====================================================

Inversion runs the eta = 0 update backwards in time (the ODE encoding of
Song et al. 2021, Sec. 4.3, Eqs. 13-14): from level ``t`` (x0 at -1) to the
next timestep ``t_next`` the backbone is called at ``(x, t_next)``, its
output is read as eps at ``t_next``, and
``x_{t_next} = sqrt(abar_next) (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) + sqrt(1 - abar_next) eps``.
For eps-prediction this is diffusers' ``DDIMInverseScheduler``.
"""

from __future__ import annotations

import math
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
from diffusionforge.samplers.spacing import Spacing, make_timesteps, steps_offset_of


def _abar(process: GaussianDiffusion, t: int, at_minus_one: float) -> float:
    """``abar_t`` as a Python float (``at_minus_one`` for t = -1).

    The step coefficients are scalars computed in double precision: near
    abar = 0, ``1 - abar_prev - sigma^2`` cancels badly in float32.
    """
    return float(process.alphas_cumprod[t]) if t >= 0 else float(at_minus_one)


def ddim_step(
    process: GaussianDiffusion,
    model_output: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    eta: float,
    noise: Optional[Tensor],
    clip_denoised: bool = False,
    final_alpha_cumprod: float = 1.0,
) -> StepOutput:
    """One DDIM step from process step ``t`` to ``t_prev`` (``-1`` = final), Eq. 12.

    Args:
        model_output: ``(B, C or 2C, H, W)`` raw backbone output at ``x_t``
            (learned-variance channels are ignored).
        x_t: ``(B, C, H, W)``.
        noise: ``(B, C, H, W)`` standard normal; may be None when ``eta == 0``.
        clip_denoised: clamp x0_hat to [-1, 1] and re-derive eps_hat from it.
        final_alpha_cumprod: ``abar`` used for ``t_prev = -1`` (diffusers'
            ``set_alpha_to_one=True`` is 1.0).
    """
    tt = batch_t(t, x_t)
    x0, eps = process.model_output_to_x0_eps(model_output, x_t, tt, clip_denoised)
    abar_t, abar_prev = _abar(process, t, final_alpha_cumprod), _abar(process, t_prev, final_alpha_cumprod)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))  # Eq. 16, Song et al. 2021
    direction = math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps  # "direction pointing to x_t"
    prev = math.sqrt(abar_prev) * x0 + direction  # Eq. 12, Song et al. 2021
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        prev = prev + sigma * noise
    return StepOutput(prev, x0)


def ddim_invert_step(
    process: GaussianDiffusion, model_output: Tensor, x: Tensor, t: int, t_next: int
) -> StepOutput:
    """One eta = 0 DDIM step *up* from level ``t`` (-1 = data) to ``t_next > t``.

    ``model_output: (B, C or 2C, H, W)`` is the backbone at ``(x, t_next)``;
    it is read as eps at ``t_next`` (Song et al. 2021, Eq. 13 run forward).
    """
    _, eps = process.model_output_to_x0_eps(model_output, x, batch_t(t_next, x))
    abar_t, abar_next = _abar(process, t, 1.0), _abar(process, t_next, 1.0)
    x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)  # Eq. 12 solved for x0 at level t
    x_next = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps  # Eq. 12 with sigma = 0
    return StepOutput(x_next, x0)


def scheduler_options(process: GaussianDiffusion) -> tuple[int, float]:
    """``(steps_offset, final_alpha_cumprod)`` of the process config (diffusers' ``steps_offset`` and
    ``set_alpha_to_one``: False lands the last step on ``abar_0``, as Stable Diffusion's scheduler)."""
    config = getattr(process, "config", None)
    final = 1.0 if getattr(config, "set_alpha_to_one", True) else float(process.alphas_cumprod[0])
    return steps_offset_of(process), final


def sample_ddim(
    denoise: DenoiseFn,
    process: GaussianDiffusion,
    x_T: Tensor,
    cond: Cond = None,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
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
    """DDIM sampling from ``x_T: (B, C, H, W)`` over ``make_timesteps(T, num_steps, spacing)``.

    With ``eta == 0`` no noise is drawn, so the result does not depend on
    ``generator`` (unless inpainting, which noises the known region).
    """
    offset, final = scheduler_options(process)
    timesteps = make_timesteps(process.num_timesteps, num_steps, spacing, offset)

    def step(x: Tensor, i: int, t: int, t_prev: int) -> StepOutput:
        out = call_denoise(denoise, process, x, t, cond)
        noise = randn(x, generator) if eta > 0 else None
        return ddim_step(process, out, x, t, t_prev, eta, noise, clip_denoised, final)

    return sampling_loop(
        step, process, x_T, descending_pairs(timesteps), generator=generator, known_mask=known_mask,
        x0_known=x0_known, callback=callback, progress=progress, return_intermediates=return_intermediates,
        start=start, x_init=x_init, known_noise=known_noise,
        desc="DDIM",
    )


def invert_ddim(
    denoise: DenoiseFn,
    process: GaussianDiffusion,
    x0: Tensor,
    cond: Cond = None,
    *,
    num_steps: int = 50,
    spacing: Spacing = "leading",
    callback: Optional[Callback] = None,
    progress: bool = True,
    return_intermediates: bool = False,
) -> SampleOutput:
    """Deterministic DDIM inversion ``x0: (B, C, H, W) -> x_T`` at the largest visited timestep.

    Visits the same timesteps as ``sample_ddim`` with the same arguments, in
    reverse, so ``sample_ddim(denoise, process, invert_ddim(...).sample)``
    returns approximately ``x0``.
    """
    ascending = [int(s) for s in make_timesteps(process.num_timesteps, num_steps, spacing).flip(0)]
    pairs = list(zip([-1] + ascending[:-1], ascending))

    def step(x: Tensor, i: int, t: int, t_next: int) -> StepOutput:
        out = call_denoise(denoise, process, x, t_next, cond)
        return ddim_invert_step(process, out, x, t, t_next)

    return sampling_loop(
        step, process, x0, pairs, callback=callback, progress=progress,
        return_intermediates=return_intermediates, desc="DDIM inversion",
    )

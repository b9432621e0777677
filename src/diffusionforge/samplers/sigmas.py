"""Sigma schedules: the noise levels a sigma sampler visits, descending, ending in 0.

Each returns ``num_steps + 1`` float64 levels ``sigma_0 > ... > sigma_{n-1} > sigma_n = 0``
(diffusers' ``scheduler.sigmas`` with ``final_sigmas_type="zero"``):

    ===========  =========================================================  ========================
    discrete     the process's own levels at ``make_timesteps(N, n,          diffusers' timestep_spacing
                 spacing)``: ``sigmas[t_i]`` (``spacing.py``)                (leading / trailing)
    karras       ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``,  Karras et al. 2022, Eq. 5
                 rho = 7                                                      (``use_karras_sigmas``)
    exponential  ``exp(linspace(log s_max, log s_min, n))``                  ``use_exponential_sigmas``
    ===========  =========================================================  ========================

``s_min``/``s_max`` are the denoiser's ``sigma_min``/``sigma_max`` (its whole
trained range, as k-diffusion and diffusers' default ``linspace`` spacing
give); the spacing applies to ``discrete`` only, with the process's
``steps_offset`` for ``leading`` (diffusers'; Stable Diffusion's is 1) and,
for the multistep solvers (DPM-Solver++, UniPC), the ``n + 1``-point grid of
diffusers' multistep schedulers (``spacing.py``). ``discrete`` with
``linspace`` visits fractional times ``linspace(0, T - 1, n)`` with sigma
linear between the table's levels, as diffusers' Euler and Heun schedulers
do (the multistep solvers round them, ``spacing.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from diffusionforge.samplers.denoiser import Denoiser
from diffusionforge.samplers.names import SCHEDULE_NAMES, ScheduleName
from diffusionforge.samplers.spacing import Spacing, make_timesteps

KARRAS_RHO = 7.0  # Karras et al. 2022, Sec. 3 ("rho = 7")


def _with_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def discrete_sigmas(table: Tensor, num_steps: int, spacing: Spacing = "leading", steps_offset: int = 0,
                    multistep: bool = False) -> Tensor:
    """``(num_steps + 1,)``: ``table`` (ascending, one level per training time) at the spaced timesteps, then 0."""
    table = table.detach().cpu().to(torch.float64)
    if spacing == "linspace" and not multistep:  # fractional times, sigma linear between the table's levels
        times = np.linspace(0, len(table) - 1, num_steps)[::-1]
        return _with_zero(torch.from_numpy(np.interp(times, np.arange(len(table)), table.numpy())))
    timesteps = make_timesteps(len(table), num_steps, spacing, steps_offset, multistep)  # descending
    return _with_zero(table[timesteps])


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO) -> Tensor:
    """``(num_steps + 1,)`` levels of Karras et al. 2022, Eq. 5, then 0."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> Tensor:
    """``(num_steps + 1,)`` levels evenly spaced in log sigma, then 0."""
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp())


def make_sigmas(denoiser: Denoiser, num_steps: int, schedule: ScheduleName = "discrete",
                spacing: Spacing = "leading", steps_offset: int = 0, multistep: bool = False) -> Tensor:
    """The ``(num_steps + 1,)`` float64 levels of ``schedule`` for ``denoiser`` (``steps_offset`` and
    ``multistep``: the ``discrete`` grid, ``spacing.make_timesteps``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if schedule == "discrete":
        return discrete_sigmas(denoiser.sigmas, num_steps, spacing, steps_offset, multistep)
    if schedule == "karras":
        return karras_sigmas(denoiser.sigma_min, denoiser.sigma_max, num_steps)
    if schedule == "exponential":
        return exponential_sigmas(denoiser.sigma_min, denoiser.sigma_max, num_steps)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {schedule!r}")

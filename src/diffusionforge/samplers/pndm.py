"""PNDM and PLMS: pseudo numerical methods on the DDIM transfer (Liu et al. 2022).

Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds". The gradient part is the network's eps; the transfer part moves
x along it from level ``t`` to ``t'`` exactly as deterministic DDIM does:

    phi(x_t, eps, t, t') = sqrt(abar_t' / abar_t) x_t
        - (abar_t' - abar_t) eps / (abar_t sqrt(1 - abar_t') + sqrt(abar_t (1 - abar_t) abar_t'))   (Eq. 9)

    ===============  ======================================================
    abar_t           alphas_cumprod at t; at t = -1 (after the last step)
                     1 (``set_alpha_to_one``) or abar_0 (diffusers' default)
    e_t              eps at (x_t, t): the network's eps, or its x0 / v turned
                     into eps at that very point
    t, t'            a step's timesteps; delta = t - t', mid = t - delta // 2
    ===============  ======================================================

Pseudo linear multistep (Eq. 12): ``e' = (55 e_t - 59 e_{t+d} + 37 e_{t+2d}
- 9 e_{t+3d}) / 24`` over the eps of this and the last three steps (Adams-
Bashforth 4), then ``phi(x_t, e', t, t')``.

* **PNDM** (F-PNDM, Algorithm 2): the first three steps are pseudo
  Runge-Kutta steps (Eq. 13: e1 at t, e2 and e3 at mid, e4 at t', ``e' =
  (e1 + 2 e2 + 2 e3 + e4) / 6``; four network calls each), keeping e1 for
  the linear multistep that follows. diffusers' ``PNDMScheduler`` with
  ``skip_prk_steps=False``.
* **PLMS** (the LDM sampler; ``skip_prk_steps=True``): no Runge-Kutta;
  the first step is Heun's (``e' = (e_t + e_{t'}) / 2`` with ``e_{t'}`` at
  the Euler point ``phi(x_t, e_t, t, t')``, two calls), then Adams-Bashforth
  of order 2, 3 and 4 as eps accumulate.

With v-prediction each output is read as eps at its own (x, t) before the
eps are combined (LDM/SD 2 ``plms.py``); diffusers' ``PNDMScheduler`` instead
combines the raw v outputs and converts once at the step's start, so its
v-prediction trajectories differ from these (its eps ones do not).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import Tensor

from diffusionforge.processes.gaussian import GaussianDiffusion
from diffusionforge.samplers.ddim import scheduler_options
from diffusionforge.samplers.loop import (
    Callback,
    Cond,
    DenoiseFn,
    SampleOutput,
    StepOutput,
    batch_t,
    call_denoise,
    descending_pairs,
    sampling_loop,
)
from diffusionforge.samplers.spacing import Spacing, make_timesteps

# Adams-Bashforth weights of e_t, e_{t+d}, ... by the number of eps available (Eq. 12 and its warm-up).
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
PRK_STEPS = 3  # F-PNDM's Runge-Kutta warm-up: enough eps for Adams-Bashforth 4

EpsFn = Callable[[Tensor, int], Tensor]  # eps(x, t) at a process step t
TransferFn = Callable[[Tensor, Tensor, int, int], Tensor]  # phi(x, eps, t, t_prev)


def pndm_transfer(x: Tensor, eps: Tensor, abar_t: float, abar_prev: float) -> Tensor:
    """``phi(x_t, eps, t, t')`` of Liu et al. 2022, Eq. 9; ``x, eps: (B, C, H, W)``.

    Algebraically the eta = 0 DDIM step, written without forming x0.
    """
    denominator = abar_t * math.sqrt(1 - abar_prev) + math.sqrt(abar_t * (1 - abar_t) * abar_prev)
    return math.sqrt(abar_prev / abar_t) * x - ((abar_prev - abar_t) / denominator) * eps  # Eq. 9


def adams_bashforth(ets: List[Tensor]) -> Tensor:
    """The multistep eps from ``ets``, newest last (up to the last four are used, Eq. 12)."""
    recent = ets[-4:][::-1]
    return sum(w * e for w, e in zip(ADAMS_BASHFORTH[len(recent)], recent))


def runge_kutta_eps(eps_at: EpsFn, phi: TransferFn, x: Tensor, e1: Tensor, t: int, t_prev: int) -> Tensor:
    """The pseudo Runge-Kutta eps of one step ``t -> t_prev`` (Liu et al. 2022, Eq. 13), ``e1`` at ``(x, t)``."""
    mid = t - (t - t_prev) // 2
    e2 = eps_at(phi(x, e1, t, mid), mid)
    e3 = eps_at(phi(x, e2, t, mid), mid)
    e4 = eps_at(phi(x, e3, t, t_prev), t_prev)
    return (e1 + 2 * e2 + 2 * e3 + e4) / 6  # Eq. 13


def sample_pndm(
    denoise: DenoiseFn,
    process: GaussianDiffusion,
    x_T: Tensor,
    cond: Cond = None,
    *,
    num_steps: int = 50,
    runge_kutta: bool = True,
    spacing: Spacing = "leading",
    steps_offset: Optional[int] = None,
    set_alpha_to_one: Optional[bool] = None,
    clip_denoised: bool = False,
    generator: Optional[torch.Generator] = None,
    known_mask: Optional[Tensor] = None,
    x0_known: Optional[Tensor] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
    return_intermediates: bool = False, start: int = 0, x_init: Optional[Tensor] = None,
    known_noise: Optional[Tensor] = None,
) -> SampleOutput:
    """F-PNDM from ``x_T: (B, C, H, W)``: three pseudo Runge-Kutta steps, then pseudo linear multistep.

    ``num_steps >= 4`` steps over ``make_timesteps(T, num_steps, spacing,
    steps_offset)``, ``num_steps + 9`` network calls; ``runge_kutta=False``
    is PLMS (``sample_plms``). ``set_alpha_to_one``: the last step lands on
    abar = 1 instead of abar_0. ``steps_offset`` and ``set_alpha_to_one``
    default to the process config's (diffusers' scheduler settings, as
    DDIM reads them: ``ddim.scheduler_options``). Deterministic: ``generator`` only feeds the
    inpainting noise of the known region. ``clip_denoised`` clamps the x0
    each eps is read from to [-1, 1].
    """
    if runge_kutta and num_steps < PRK_STEPS + 1:
        raise ValueError(f"PNDM needs num_steps >= {PRK_STEPS + 1} ({PRK_STEPS} Runge-Kutta steps first), "
                         f"got {num_steps}")
    config_offset, config_final = scheduler_options(process)
    steps_offset = config_offset if steps_offset is None else steps_offset
    timesteps = make_timesteps(process.num_timesteps, num_steps, spacing, steps_offset)
    if float(process.alphas_cumprod[timesteps[0]]) <= 0:  # Eq. 9 divides by abar_t; eps is undefined there
        raise ValueError(f"PNDM/PLMS step in eps, undefined at abar = 0 (zero terminal SNR at "
                         f"t = {int(timesteps[0])}); use spacing leading or linspace, or a sigma sampler")
    final_abar = config_final if set_alpha_to_one is None else (
        1.0 if set_alpha_to_one else float(process.alphas_cumprod[0]))
    ets: List[Tensor] = []  # eps at the start of each step so far

    def eps_at(x: Tensor, t: int) -> Tensor:
        out = call_denoise(denoise, process, x, t, cond)
        return process.model_output_to_x0_eps(out, x, batch_t(t, x), clip_denoised)[1]

    def phi(x: Tensor, e: Tensor, t: int, t_prev: int) -> Tensor:
        abar_prev = float(process.alphas_cumprod[t_prev]) if t_prev >= 0 else final_abar
        return pndm_transfer(x, e, float(process.alphas_cumprod[t]), abar_prev)

    def step(x: Tensor, i: int, t: int, t_prev: int) -> StepOutput:
        ets.append(eps_at(x, t))
        if runge_kutta and i - start < PRK_STEPS:  # the warm-up counts from the first step taken
            e = runge_kutta_eps(eps_at, phi, x, ets[-1], t, t_prev)
        elif not runge_kutta and i == start and t_prev >= 0:  # PLMS's first step: Heun
            e = (ets[-1] + eps_at(phi(x, ets[-1], t, t_prev), t_prev)) / 2
        else:
            e = adams_bashforth(ets)
            del ets[:-3]
        return StepOutput(phi(x, e, t, t_prev), process.predict_x0_from_eps(x, batch_t(t, x), e))

    return sampling_loop(
        step, process, x_T, descending_pairs(timesteps), generator=generator, known_mask=known_mask,
        x0_known=x0_known, callback=callback, progress=progress, return_intermediates=return_intermediates,
        start=start, x_init=x_init, known_noise=known_noise,
        desc="PNDM" if runge_kutta else "PLMS",
    )


def sample_plms(denoise: DenoiseFn, process: GaussianDiffusion, x_T: Tensor, cond: Cond = None,
                **options) -> SampleOutput:
    """PLMS (LDM) from ``x_T: (B, C, H, W)``: a Heun step, then pseudo linear multistep.

    ``sample_pndm`` without its Runge-Kutta steps, with the same keywords:
    ``num_steps`` steps, ``num_steps + 1`` network calls (one when ``num_steps == 1``).
    """
    return sample_pndm(denoise, process, x_T, cond, runge_kutta=False, **options)

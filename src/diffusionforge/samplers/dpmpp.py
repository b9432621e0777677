"""DPM-Solver++ multistep, ODE and SDE, orders 1-3 (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and App. B).

Written in the VE coordinates of the denoiser (alpha = 1, so x_VE = x_VP / alpha
and the VP formulas of diffusers' ``DPMSolverMultistepScheduler`` lose their
``alpha_t`` factors). For a step from ``sigma`` (= s_0) to ``sigma_next``:

    ============  =========================================================
    lambda        -log sigma (log-SNR / 2);  h = lambda_next - lambda_0
    m_k           D(x_k, s_k), the k-th latest denoised (m_0 now)
    r_0, r_1      h_0 / h, h_1 / h with h_0 = lambda_0 - lambda_1, h_1 = lambda_1 - lambda_2
    D1, D2        divided differences of m (Lu et al. 2022, Eq. 18; App. B)
    ============  =========================================================

ODE (dpmsolver++)::

    x' = e^-h x - expm1(-h) m_0                                   order 1 (= DDIM)
         - expm1(-h) (D1 / 2)                                     order 2, midpoint
         + (expm1(-h) / h + 1) D1 - ((expm1(-h) + h) / h^2 - 1/2) D2   order 3

SDE (sde-dpmsolver++, Lu et al. 2022; noise z ~ N(0, I))::

    x' = e^-2h x - expm1(-2h) m_0 + sigma_next sqrt(-expm1(-2h)) z   order 1
         - expm1(-2h) (D1 / 2)                                    order 2, midpoint
         + phi_2 D1 - phi_3 D2                                    order 3

with ``phi_2 = expm1(-2h) / (2h) + 1`` and ``phi_3 = phi_2 / (2h) - 1/2`` (the
integrals of ``2 e^{-2(h-u)} u^k / k!`` over [0, h], divided by h^k, as in
k-diffusion's ``sample_dpmpp_3m_sde``). diffusers 0.42 writes the order-3 SDE
``D2`` coefficient as ``-(phi_3 + 1)``; the tests check the integral and the
rest of the trajectory against diffusers.

Order schedule (diffusers' defaults): order ``min(order, steps taken + 1)``;
the last step (to sigma = 0) returns ``m_0``; with fewer than 15 steps the
second-to-last step uses at most order 2 (``lower_order_final``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from diffusionforge.samplers.denoiser import Denoiser
from diffusionforge.samplers.loop import Callback, Cond, SampleOutput, StepOutput, randn
from diffusionforge.samplers.sigma_sampler import denoise_at, sigma_walk

LOWER_ORDER_FINAL_STEPS = 15  # below this many steps the second-to-last step is at most order 2 (diffusers)


def _differences(history: List[Tuple[Tensor, float]], h: float, order: int) -> Tuple[Tensor, Optional[Tensor]]:
    """``(D1, D2)`` of the latest ``order`` denoised values; ``history`` newest first as ``(m_k, lambda_k)``."""
    (m0, l0), (m1, l1) = history[0], history[1]
    r0 = (l0 - l1) / h
    d1_0 = (m0 - m1) / r0
    if order == 2:
        return d1_0, None
    m2, l2 = history[2]
    r1 = (l1 - l2) / h
    d1_1 = (m1 - m2) / r1
    return d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def dpmpp_update(x: Tensor, history: List[Tuple[Tensor, float]], sigma: float, sigma_next: float, order: int,
                 sde: bool, noise: Optional[Tensor]) -> Tensor:
    """One multistep DPM-Solver++ update of ``x: (B, C, H, W)`` (formulas in the module docstring)."""
    m0 = history[0][0]
    h = math.log(sigma / sigma_next)
    hh = 2 * h if sde else h  # the SDE integrates e^{-2(h - u)}
    phi_1 = -math.expm1(-hh)  # 1 - e^{-hh}
    x_next = (math.exp(-hh) if sde else sigma_next / sigma) * x + phi_1 * m0
    if order == 2:
        d1, _ = _differences(history, h, 2)
        x_next = x_next + 0.5 * phi_1 * d1  # midpoint
    elif order == 3:
        d1, d2 = _differences(history, h, 3)
        phi_2 = math.expm1(-hh) / hh + 1
        phi_3 = phi_2 / hh - 0.5
        x_next = x_next + phi_2 * d1 - phi_3 * d2
    if sde:
        x_next = x_next + sigma_next * math.sqrt(phi_1) * noise
    return x_next


def dpmpp_multistep(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None, *, order: int = 2,
                    sde: bool = False, s_noise: float = 1.0, generator: Optional[torch.Generator] = None,
                    known_mask: Optional[Tensor] = None, x0_known: Optional[Tensor] = None,
                    callback: Optional[Callback] = None, progress: bool = True,
                    return_intermediates: bool = False,
                    start: int = 0, x_init: Optional[Tensor] = None,
                    known_noise: Optional[Tensor] = None) -> SampleOutput:
    """DPM-Solver++(``order``M), ODE or SDE, over ``sigmas``; one denoiser call per step."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    n = len(sigmas) - 1
    history: List[Tuple[Tensor, float]] = []  # (denoised, lambda = -log sigma), newest first

    def step(x: Tensor, i: int, sigma: float, sigma_next: float) -> StepOutput:
        denoised = denoise_at(denoiser, x, sigma, cond)
        history.insert(0, (denoised, -math.log(sigma)))
        del history[order:]
        if sigma_next == 0:  # the final step: first order to sigma = 0 is x0_hat itself
            return StepOutput(denoised, denoised)
        k = min(order, len(history))
        if i == n - 2 and n < LOWER_ORDER_FINAL_STEPS:
            k = min(k, 2)
        noise = s_noise * randn(x, generator) if sde else None
        return StepOutput(dpmpp_update(x, history, sigma, sigma_next, k, sde, noise), denoised)

    return sigma_walk(step, x, sigmas, generator=generator, known_mask=known_mask, x0_known=x0_known,
                      callback=callback, progress=progress, return_intermediates=return_intermediates,
                      start=start, x_init=x_init, known_noise=known_noise,
                      desc=f"DPM-Solver++({order}M{' SDE' if sde else ''})")


def _variant(order: int, sde: bool, name: str, doc: str):
    def solver(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None, **options) -> SampleOutput:
        return dpmpp_multistep(denoiser, x, sigmas, cond, order=order, sde=sde, **options)

    solver.__name__ = solver.__qualname__ = name
    solver.__doc__ = doc
    return solver


dpmpp_2m = _variant(2, False, "dpmpp_2m", "DPM-Solver++(2M): the multistep ODE solver, order 2.")
dpmpp_3m = _variant(3, False, "dpmpp_3m", "DPM-Solver++(3M): the multistep ODE solver, order 3.")
dpmpp_2m_sde = _variant(2, True, "dpmpp_2m_sde", "DPM-Solver++(2M) SDE: the multistep SDE solver, order 2.")
dpmpp_3m_sde = _variant(3, True, "dpmpp_3m_sde", "DPM-Solver++(3M) SDE: the multistep SDE solver, order 3.")

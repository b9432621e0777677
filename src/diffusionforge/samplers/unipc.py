"""UniPC multistep sampling, data prediction, ``B(h) = e^h - 1`` ("bh2").

Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector
Framework for Fast Sampling of Diffusion Models": the predictor UniP-p and
the corrector UniC-p in their data-prediction (x0) form, on the exponential
integrator of DPM-Solver++ (Lu et al. 2022). One network call per step: the
denoiser's x0 at the predicted ``x_t`` first corrects ``x_t`` (UniC), then
drives the next prediction (UniP). diffusers' ``UniPCMultistepScheduler``
with ``predict_x0=True, solver_type="bh2", lower_order_final=True,
final_sigmas_type="zero"`` is the oracle.

The sampler walks ``process.denoiser(denoise)`` (``denoiser.py``) in the
variance-exploding coordinates ``x = x0 + sigma eps`` of Karras et al. 2022,
so it serves every process (Gaussian / VP, EDM, rectified flow). A VP sample
is ``x / sqrt(sigma^2 + 1)``; the update below is diffusers' VP update divided
by ``alpha_t`` (lambda = log(alpha / sigma_VP) = -log sigma).

Notation (one step from level ``s`` to level ``t < s``)

    ==========  ==============================================================
    sigma       VE noise level;  lambda = -log sigma (+inf at the data)
    h           lambda_t - lambda_s = log(sigma_s / sigma_t) > 0;  hh = -h
    x0_s        the denoiser's x0 at level s ("m" in diffusers)
    s_m, r_m    earlier levels and r_m = (lambda_{s_m} - lambda_s) / h  (< 0);
                the corrector adds t itself as r = 1
    D_m         (x0_{s_m} - x0_s) / r_m
    B(h)        e^hh - 1 (bh2)
    g_k         hh phi_{k+1}(hh) k! / B(h);  phi_1(z) = (e^z - 1) / z,
                phi_{k+1}(z) = (phi_k(z) - 1/k!) / z
    R_p         p x p, (R_p)_{k,m} = r_m^(k-1)
    ==========  ==============================================================

    UniP-p:  x_t   = e^hh x_s - (e^hh - 1) x0_s - B(h) sum_{m<p} a_m D_m,   R_{p-1} a = g_{1..p-1}
    UniC-p:  x_t^c = e^hh x_s - (e^hh - 1) x0_s - B(h) (sum_{m<p} c_m D_m + c_p (x0_t - x0_s)),
                                                                             R_p c = g_{1..p}

with ``a = 1/2`` for p = 2 and ``c = 1/2`` for p = 1 (the paper's and
diffusers' simplification); UniC-p is accurate to order p + 1. The order
ramps up over the first steps (multistep warm-up) and drops over the last
ones (``lower_order_final``); the last step goes to sigma = 0, where UniP-1
returns the denoiser's x0.

``unipc`` is a solver of ``sigma_sampler.py`` (any descending sigmas ending
in 0); ``sample_unipc`` its registry function, on the ``discrete`` grid of
diffusers' UniPC: ``leading`` / ``linspace`` timesteps over ``n + 1`` points
(as its DPM-Solver++ does, ``spacing.py``), ``steps_offset`` from the process.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from diffusionforge.samplers.denoiser import Denoiser
from diffusionforge.samplers.loop import Callback, Cond, SampleOutput, StepOutput
from diffusionforge.samplers.sigma_sampler import denoise_at, registry_sampler, sigma_walk

MAX_ORDER = 3  # UniPC-3, the paper's choice for unconditional sampling (2 for guided)

History = Sequence[Tuple[float, Tensor]]  # (sigma_m, x0 at sigma_m), newest first


def bh2_g(hh: float, order: int) -> List[float]:
    """``[g_1, ..., g_order]``, ``g_k = hh phi_{k+1}(hh) k! / B(h)`` with ``B(h) = e^hh - 1``."""
    b_h = math.expm1(hh)
    h_phi = math.expm1(hh) / hh - 1.0  # hh phi_2(hh)
    g, factorial = [], 1
    for k in range(1, order + 1):
        g.append(h_phi * factorial / b_h)
        factorial *= k + 1
        h_phi = h_phi / hh - 1.0 / factorial  # hh phi_{k+2}(hh)
    return g


def _solve(rs: Sequence[float], g: Sequence[float]) -> List[float]:
    """Solve ``R_p w = g`` with ``(R_p)_{k,m} = r_m^(k-1)``, ``p = len(rs)`` (float64)."""
    matrix = torch.tensor([[r**k for r in rs] for k in range(len(rs))], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(g, dtype=torch.float64)).tolist()


def unipc_update(x_s: Tensor, s: float, t: float, x0_s: Tensor, history: History,
                 x0_t: Optional[Tensor] = None) -> Tensor:
    """UniP (``x0_t`` None) or UniC (``x0_t`` given) from level ``s`` to ``t``, VE coordinates.

    Args:
        x_s: ``(B, C, H, W)`` the sample at sigma ``s``.
        x0_s: ``(B, C, H, W)`` the denoiser's x0 at ``(x_s, s)``.
        history: earlier ``(sigma_m, x0_m)``, newest first; the predictor's
            order is ``len(history) + 1``.
        x0_t: the denoiser's x0 at the predicted sample at ``t``: makes this
            UniC-p, ``p = len(history) + 1``.

    Returns the sample at ``t``; at ``t = 0`` (UniP-1 only) that is ``x0_s``.
    """
    if t == 0:
        if history or x0_t is not None:
            raise ValueError("the step to sigma = 0 is first order (the predictor alone)")
        return x0_s
    h = math.log(s / t)
    hh = -h
    rs = [math.log(s / s_m) / h for s_m, _ in history]
    diffs = [(x0_m - x0_s) / r for r, (_, x0_m) in zip(rs, history)]  # D_m
    if x0_t is not None:  # UniC: the new point is r = 1
        rs, diffs = rs + [1.0], diffs + [x0_t - x0_s]
    weights = _solve(rs, bh2_g(hh, len(rs))) if len(rs) > 1 else [0.5]  # a = 1/2 (UniP-2), c = 1/2 (UniC-1)
    b_h = math.expm1(hh)  # B(h), bh2
    x_t = math.exp(hh) * x_s - math.expm1(hh) * x0_s  # DPM-Solver++(1), Lu et al. 2022, in VE coordinates
    if diffs:
        x_t = x_t - b_h * sum(w * d for w, d in zip(weights, diffs))
    return x_t


def unipc_orders(num_steps: int, order: int, start: int = 0) -> List[int]:
    """The predictor's order at each step: warm-up ``min(i - start + 1, order)`` from the first step taken
    (diffusers' ``lower_order_nums``), lower order over the last steps."""
    return [min(order, max(i - start, 0) + 1, num_steps - i) for i in range(num_steps)]


def unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Cond = None, *,
          generator: Optional[torch.Generator] = None, known_mask: Optional[Tensor] = None,
          x0_known: Optional[Tensor] = None, callback: Optional[Callback] = None, progress: bool = True,
          return_intermediates: bool = False,
          start: int = 0, x_init: Optional[Tensor] = None,
          known_noise: Optional[Tensor] = None, order: int = 2) -> SampleOutput:
    """UniPC-``order`` (bh2, x0) from ``x`` at ``sigmas[0]`` down ``sigmas: (n + 1,)`` to 0, n network calls.

    The solver signature of ``sigma_sampler.py`` (VE coordinates). Deterministic:
    ``generator`` only feeds the inpainting noise of the known region.
    """
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be in 1..{MAX_ORDER}, got {order}")
    levels = [float(s) for s in sigmas]
    orders = unipc_orders(len(levels) - 1, order, start)
    past: List[Tuple[float, Tensor]] = []  # (sigma, x0) of the steps so far, newest first
    base: Optional[Tensor] = None  # x_s of the last predictor, where the corrector starts

    def step(x: Tensor, i: int, s: float, t: float) -> StepOutput:
        nonlocal base
        x0 = denoise_at(denoiser, x, s, cond)
        if past:  # UniC-p (p: the last predictor's order) corrects x with the x0 the network saw there
            x = unipc_update(base, levels[i - 1], s, past[0][1], past[1:orders[i - 1]], x0_t=x0)
        past.insert(0, (s, x0))
        del past[MAX_ORDER:]
        base = x
        return StepOutput(unipc_update(x, s, t, x0, past[1:orders[i]]), x0)

    return sigma_walk(step, x, sigmas, generator=generator, known_mask=known_mask, x0_known=x0_known,
                      callback=callback, progress=progress, return_intermediates=return_intermediates,
                      start=start, x_init=x_init, known_noise=known_noise,
                      desc=f"UniPC-{order}")


# The registry function: process.denoiser(denoise), a sigma schedule (sigmas.py), x_T scaled to sigmas[0].
sample_unipc = registry_sampler(unipc, multistep=True)

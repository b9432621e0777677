"""What every sigma sampler shares: the walk over sigmas and the registry adapter.

A *solver* (``k_samplers.py``, ``dpmpp.py``) has one signature over a
``Denoiser`` (``denoiser.py``) and a descending sigma schedule ending in 0::

    solver(denoiser, x, sigmas, cond=None, *, generator=None, known_mask=None,
           x0_known=None, callback=None, progress=True,
           return_intermediates=False, **its options) -> SampleOutput

    ===============  =====================================================
    x                (B, C, H, W) start at level sigmas[0], VE coordinates
    sigmas           (n + 1,) descending levels, sigmas[n] = 0 (sigmas.py)
    known_mask       inpainting: before the step from sigma the known
                     region becomes x0_known + sigma * noise; after the
                     last step, x0_known
    callback         callback(i, sigma, x, x0_hat) after each step
    start, x_init    image-to-image: skip the first ``start`` steps and begin
                     at x_init + sigmas[start] * x (``loop.walk``); the
                     registry function then hands x_T over unscaled
    intermediates    x after each step (VE coordinates; the last is the sample)
    ===============  =====================================================

``registry_sampler(solver)`` turns a solver into a registry function
(``samplers/__init__.py``): it asks the process for its denoiser, makes the
sigma schedule (the ``discrete`` one with the process's ``steps_offset``, on
the ``n + 1``-point grid of diffusers' multistep schedulers for a
``multistep`` solver), scales the standard normal ``x_T`` to ``sigmas[0]``
with ``Denoiser.prior_scale`` and runs the solver.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from diffusionforge.samplers.denoiser import Denoiser
from diffusionforge.samplers.loop import Callback, Cond, DenoiseFn, SampleOutput, StepOutput, walk
from diffusionforge.samplers.names import ScheduleName
from diffusionforge.samplers.sigmas import make_sigmas
from diffusionforge.samplers.spacing import Spacing, steps_offset_of

# step(x, i, sigma, sigma_next) -> StepOutput: one step of a solver between two levels.
SigmaStep = Callable[[Tensor, int, float, float], StepOutput]
Solver = Callable[..., SampleOutput]


def sigma_batch(sigma: float, x: Tensor) -> Tensor:
    """``sigma`` as a ``(B,)`` tensor on x's device (float64 where the device has it)."""
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)


def denoise_at(denoiser: Denoiser, x: Tensor, sigma: float, cond: Optional[Cond]) -> Tensor:
    """``D(x, sigma, cond) -> x0_hat (B, C, H, W)`` at a scalar level."""
    return denoiser(x, sigma_batch(sigma, x), cond)


def sigma_walk(step: SigmaStep, x: Tensor, sigmas: Tensor, *, generator: Optional[torch.Generator] = None,
               known_mask: Optional[Tensor] = None, x0_known: Optional[Tensor] = None,
               callback: Optional[Callback] = None, progress: bool = True, return_intermediates: bool = False,
               desc: str = "sampling", start: int = 0, x_init: Optional[Tensor] = None,
               known_noise: Optional[Tensor] = None) -> SampleOutput:
    """Walk ``x`` through ``step`` over consecutive pairs of ``sigmas: (n + 1,)``."""
    levels = [float(s) for s in sigmas]
    if len(levels) < 2 or levels[-1] != 0 or any(a <= b for a, b in zip(levels, levels[1:])):
        raise ValueError("sigmas must descend strictly and end in 0")

    def renoise(x0: Tensor, sigma: float, noise: Tensor) -> Tensor:
        return x0 + sigma * noise  # VE: x = x0 + sigma eps

    return walk(step, x, list(zip(levels[:-1], levels[1:])), renoise, generator=generator,
                known_mask=known_mask, x0_known=x0_known, callback=callback, progress=progress,
                return_intermediates=return_intermediates, desc=desc, start=start, x_init=x_init,
                known_noise=known_noise)


class Clamped:
    """A ``Denoiser`` whose ``x0_hat`` is clamped to ``[-limit, limit]`` (DDIM's ``clip_denoised``)."""

    def __init__(self, denoiser: Denoiser, limit: float = 1.0) -> None:
        self.denoiser, self.limit = denoiser, limit

    def __call__(self, x: Tensor, sigma: Tensor, cond: Optional[Cond] = None) -> Tensor:
        return self.denoiser(x, sigma, cond).clamp(-self.limit, self.limit)

    def __getattr__(self, name: str):
        if name == "denoiser":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)  # sigmas, sigma_min, sigma_max, sigma_to_t, ...


def registry_sampler(solver: Solver, multistep: bool = False) -> Callable[..., SampleOutput]:
    """The registry function (one signature, ``samplers/__init__.py``) of a sigma ``solver``; ``multistep``:
    its ``discrete`` timesteps as diffusers' multistep schedulers space them (DPM-Solver++, UniPC)."""

    def sample(denoise: DenoiseFn, process, x_T: Tensor, cond: Cond = None, *, num_steps: int = 50,
               schedule: ScheduleName = "discrete", spacing: Spacing = "leading", clip_denoised: bool = False,
               generator: Optional[torch.Generator] = None, known_mask: Optional[Tensor] = None,
               x0_known: Optional[Tensor] = None, callback: Optional[Callback] = None, progress: bool = True,
               return_intermediates: bool = False, **options) -> SampleOutput:
        denoiser = process.denoiser(denoise)
        sigmas = make_sigmas(denoiser, num_steps, schedule, spacing, steps_offset_of(process), multistep)
        img2img = options.get("x_init") is not None  # x_T is the noise added to x_init (loop.walk)
        x = x_T if img2img else x_T * denoiser.prior_scale(float(sigmas[0]))
        model = Clamped(denoiser) if clip_denoised else denoiser
        return solver(model, x, sigmas, cond, generator=generator, known_mask=known_mask, x0_known=x0_known,
                      callback=callback, progress=progress, return_intermediates=return_intermediates, **options)

    sample.__name__ = sample.__qualname__ = f"sample_{solver.__name__}"
    sample.__doc__ = f"``{solver.__name__}`` over ``process.denoiser(denoise)`` and a sigma schedule.\n\n{solver.__doc__}"
    return sample

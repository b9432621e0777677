"""Samplers: plain functions that walk a process with a ``denoise`` callable.

Every sampler has the signature
``sample_x(denoise, process, x_T, cond=None, *, num_steps, ..., generator,
known_mask, x0_known, callback, progress, return_intermediates) -> SampleOutput``
where ``denoise(x_t (B, C, H, W), t (B,) original timesteps, cond) -> raw
output``. Classifier-free guidance wraps ``denoise``; it is not a sampler
option. ``SAMPLERS`` maps config names to the functions.
"""

from typing import Callable, Dict

from diffusionforge.samplers.ddim import ddim_invert_step, ddim_step, invert_ddim, sample_ddim
from diffusionforge.samplers.ddpm import ddpm_step, sample_ddpm
from diffusionforge.samplers.guidance import classifier_free_guidance
from diffusionforge.samplers.precision import SamplePrecision, autocast_denoise
from diffusionforge.samplers.loop import Callback, Cond, DenoiseFn, SampleOutput, StepOutput, sampling_loop
from diffusionforge.samplers.spacing import Spacing, make_timesteps

SAMPLERS: Dict[str, Callable[..., SampleOutput]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
}

__all__ = [
    "SAMPLERS",
    "Callback",
    "Cond",
    "DenoiseFn",
    "SampleOutput",
    "SamplePrecision",
    "Spacing",
    "StepOutput",
    "autocast_denoise",
    "classifier_free_guidance",
    "ddim_invert_step",
    "ddim_step",
    "ddpm_step",
    "invert_ddim",
    "make_timesteps",
    "sample_ddim",
    "sample_ddpm",
    "sampling_loop",
]

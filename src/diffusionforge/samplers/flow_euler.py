"""Euler sampler of rectified flow in flow time: diffusers' ``FlowMatchEulerDiscreteScheduler``.

From noise (``t = 1``) to data (``t = 0``) over the K + 1 times of
``RectifiedFlow.sampling_times`` (the scheduler's ``set_timesteps(K)`` with
its shift; SD3 and LBM sample so):

    v_i     = denoise(x_i, t_i * T, cond)          predicted velocity eps - x0
    x_{i+1} = x_i + (t_{i+1} - t_i) v_i            Euler step of dx/dt = v

``x_0 = x_T`` itself (the flow's prior at t = 1 is N(0, I)). With
``clip_denoised`` the step's x0 estimate ``x_i - t_i v_i`` is clamped to
[-1, 1] and the velocity re-derived from it, ``v_i = (x_i - x0) / t_i``.
Mask inpainting as in ``loop.sampling_loop``: before each step the known
region becomes ``(1 - t_i) x0_known + t_i eps``, after the last step
``x0_known``. The same steps in sigma = t / (1 - t) are the ``euler``
sampler over ``RectifiedFlow.denoiser`` (Euler is invariant to that change
of coordinates); this one visits diffusers' times exactly.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusionforge.processes.flow import RectifiedFlow, path_endpoint, per_sample
from diffusionforge.samplers.loop import Callback, Cond, DenoiseFn, SampleOutput, check_start, randn


def _paste(x: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """Known pixels from ``known`` where ``mask`` is 1, the rest from ``x``."""
    return mask * known + (1.0 - mask) * x


@torch.no_grad()
def sample_flow_euler(denoise: DenoiseFn, process: RectifiedFlow, x_T: Tensor, cond: Cond = None, *,
                      num_steps: int = 28, shift: Optional[float] = None, clip_denoised: bool = False,
                      generator: Optional[torch.Generator] = None, known_mask: Optional[Tensor] = None,
                      x0_known: Optional[Tensor] = None, callback: Optional[Callback] = None,
                      progress: bool = True, return_intermediates: bool = False, start: int = 0,
                      x_init: Optional[Tensor] = None, known_noise: Optional[Tensor] = None) -> SampleOutput:
    """Walk ``x_T (B, C, H, W) ~ N(0, I)`` to data in ``num_steps`` Euler steps of flow time.

    ``denoise(x_t, t * T (B,), cond) -> v (B, C or more, H, W)``; ``shift``
    overrides the process's (``model.flow.shift``). ``callback(i, t_i, x_{i+1}, x0_hat)``.
    ``start`` / ``x_init``: image-to-image as ``loop.walk`` (begin at step ``start`` from
    ``(1 - t) x_init + t x_T``, diffusers' ``FlowMatchEulerDiscreteScheduler.scale_noise``);
    ``known_noise``: the known region noised with it after each step (``loop.walk``).
    """
    if (known_mask is None) != (x0_known is None):
        raise ValueError("known_mask and x0_known must be given together")
    check_start(start, num_steps, x_init, x_T)
    times = process.sampling_times(num_steps, shift)  # (K + 1,) float64, descending to 0
    x = x_T
    if x_init is not None:
        if start == num_steps:
            return SampleOutput(x_init, [])
        x = process.interpolate(x_init, x_T, torch.full((x.shape[0],), float(times[start])))
    intermediates: List[Tensor] = []
    for i in tqdm(range(start, num_steps), desc="flow euler", disable=not progress):
        t, t_next = float(times[i]), float(times[i + 1])
        if known_mask is not None and known_noise is None:  # the known region at level t (LDM, flow path)
            x = _paste(x, process.interpolate(x0_known, randn(x, generator), torch.full((x.shape[0],), t)),
                       known_mask)
        t_batch = torch.full((x.shape[0],), t, device=x.device)  # (B,)
        v = denoise(x, process.model_time(t_batch), cond)[:, : x.shape[1]].to(x.dtype)
        x0_hat = path_endpoint(x, v, t_batch)
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            v = (x - x0_hat) / per_sample(t_batch, x)
        x = x + (t_next - t) * v
        if known_mask is not None and i == num_steps - 1:
            x = _paste(x, x0_known, known_mask)
        elif known_mask is not None and known_noise is not None:  # diffusers: after the step, fixed noise
            x = _paste(x, process.interpolate(x0_known, known_noise, torch.full((x.shape[0],), t_next)), known_mask)
        if callback is not None:
            callback(i, t, x, x0_hat)
        if return_intermediates:
            intermediates.append(x)
    return SampleOutput(x, intermediates)

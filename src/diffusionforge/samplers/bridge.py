"""Euler sampler of a bridge process: from the source (t = 1) to the target (t = 0).

LBM ``LBMModel.sample`` (Chadebec et al. 2025, Algorithm 2) with its
FlowMatchEulerDiscreteScheduler written out. With K steps the times are
``t_i = 1 - i / K`` (``linspace(1, 1/K, K)``) and ``t_K = 0``:

    v_i     = denoise(x_i, t_i * T, cond)                 predicted velocity z1 - z0
    x_{i+1} = x_i + (t_{i+1} - t_i) v_i                   Euler step of dx/dt = v
    x_{i+1} += sigma_b sqrt(t_{i+1} (1 - t_{i+1})) eps    bridge noise, not after the last step

Starting from ``x_0 = z1`` exactly (no noise at t = 1). One step is
``z0_hat = z1 - v(z1, T)``, the main use. With the exact conditional field
``v(x, t) = (x - z0) / t`` every step lands on the bridge to ``z0`` and the
last one on ``z0`` itself, whatever the noise: the property the tests check.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusionforge.processes.bridge import BridgeMatching
from diffusionforge.samplers.loop import Cond, DenoiseFn, SampleOutput, randn

# callback(i, t, x) after each step: step index, the time reached, the new x.
BridgeCallback = Callable[[int, float, Tensor], None]


@torch.no_grad()
def sample_bridge(denoise: DenoiseFn, process: BridgeMatching, x_source: Tensor, cond: Optional[Cond] = None, *,
                  num_steps: int = 1, generator: Optional[torch.Generator] = None,
                  known_mask: Optional[Tensor] = None, x0_known: Optional[Tensor] = None,
                  callback: Optional[BridgeCallback] = None, progress: bool = False,
                  return_intermediates: bool = False) -> SampleOutput:
    """Walk ``x_source (B, C, H, W)`` to the target in ``num_steps`` Euler steps (the registry's
    ``bridge_euler``: its ``x_T`` is the source, not noise).

    ``denoise(x, t (B,) in model time t * T, cond) -> v (B, C, H, W)``. A bridge
    inpaints through its conditioning and pastes the known pixels after decoding
    (``BridgeModel.translate``), so ``known_mask`` / ``x0_known`` are refused.
    """
    if known_mask is not None or x0_known is not None:
        raise ValueError("the bridge sampler takes no known_mask / x0_known: a bridge inpaints through its "
                         "conditioning (data.degradation.kind=inpainting) and pastes the known pixels")
    times = process.sampling_times(num_steps)
    x = x_source
    intermediates: List[Tensor] = []
    for i in tqdm(range(num_steps), desc="bridge", disable=not progress):
        t, t_next = times[i], times[i + 1]
        model_t = torch.full((x.shape[0],), t * process.num_train_timesteps, device=x.device)
        v = denoise(x, model_t, cond).to(x.dtype)
        if v.shape != x.shape:
            raise ValueError(f"the backbone predicts {tuple(v.shape)}, the bridge needs the latent shape "
                             f"{tuple(x.shape)} (a learned variance has no meaning for a bridge)")
        x = x + (t_next - t) * v
        if i < num_steps - 1:
            x = x + process.noise_std(t_next) * randn(x, generator)
        if callback is not None:
            callback(i, t_next, x)
        if return_intermediates:
            intermediates.append(x)
    return SampleOutput(x, intermediates)

"""The loop every sampler shares: progress, callbacks, intermediates, inpainting.

A sampler is a plain function that builds a ``step(x, i, t, t_next)``
closure and hands it to ``sampling_loop`` with the ``(t, t_next)`` pairs to
visit (k-diffusion style; no scheduler state to set beforehand). Both it and
the sigma samplers' ``sigma_walk`` (``sigma_sampler.py``) are ``walk`` with
their own way of noising the known region.

Notation

    =============  ========================================================
    denoise        DenoiseFn: (x_t (B, C, H, W), t (B,) long, cond) -> output
    t, t_next      timesteps (indices of the process) of x before/after a step;
                   -1 stands for "data" (abar = 1)
    known_mask     (B or 1, 1 or C, H, W), 1 = pixel known from ``x0_known``
    x0_known       (B, C, H, W) image whose known pixels are kept
    =============  ========================================================

Mask inpainting (Rombach et al. 2022, LDM ``p_sample_loop``; Lugmayr et al.
2022 without resampling): before the step at ``t`` the known region of x is
replaced by ``q_sample(x0_known, t, noise)``; after the last step by
``x0_known`` itself.

Image-to-image (SDEdit, Meng et al. 2022; diffusers' img2img pipelines):
``start = k`` skips the first ``k`` steps; with ``x_init`` the walk begins
at ``renoise(x_init, level_k, x)``, ``x`` being the standard normal noise
(``scheduler.add_noise(init_latents, noise, timesteps[k])``). Steps keep
their index ``i`` in the full walk. ``start`` = the number of steps returns
``x_init`` unchanged (no step left).

``known_noise`` (inpainting as diffusers' ``StableDiffusionInpaintPipeline``
with a 4-channel UNet): the known region is noised with this fixed tensor
(the request's noise) and pasted *after* each step at the level the step
reached, instead of with fresh noise before each step.
"""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusionforge.conditioning.base import Cond
from diffusionforge.processes.gaussian import GaussianDiffusion

# Cond (conditioning/base.py) is the cond dict a ConditionerWrapper returns; None: unconditional
DenoiseFn = Callable[[Tensor, Tensor, Optional[Cond]], Tensor]
# callback(i, level, x, pred_x0) after each step: step index, the level the step started from (the
# process's timestep for ddpm/ddim, sigma for the sigma samplers), new x, predicted x0.
Callback = Callable[[int, Any, Tensor, Tensor], None]


class StepOutput(NamedTuple):
    """One sampler step; both ``(B, C, H, W)``."""

    prev_sample: Tensor  # x at t_next
    pred_x0: Tensor  # the x0 the step used


class SampleOutput(NamedTuple):
    """A finished chain."""

    sample: Tensor  # (B, C, H, W) final x
    intermediates: List[Tensor]  # x after each step, when asked for; else []


StepFn = Callable[[Tensor, int, int, int], StepOutput]


# A sampler's source of fresh noise: one generator for the batch, or one per row (diffusers' list of
# generators): then row i's noise depends on its own generator only, not on the batch it is drawn in.
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(shape_like: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like ``shape_like`` (B, ...): drawn from ``generator`` on x's device, or
    with a list of B generators row i from generator i on that generator's device (as diffusers'
    ``randn_tensor`` with a list), then moved to x's device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape_like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape_like.shape[0]}")
        rows = [torch.randn(shape_like.shape[1:], generator=g, device=g.device, dtype=shape_like.dtype)
                for g in generator]
        return torch.stack(rows).to(shape_like.device)
    return torch.randn(shape_like.shape, generator=generator, device=shape_like.device, dtype=shape_like.dtype)


def batch_t(t: int, x: Tensor) -> Tensor:
    """``t`` as a LongTensor ``(B,)`` on x's device."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def call_denoise(denoise: DenoiseFn, process: GaussianDiffusion, x: Tensor, t: int,
                 cond: Optional[Cond]) -> Tensor:
    """Run the backbone at process step ``t``, passing it the original timestep."""
    return denoise(x, process.timestep_map[batch_t(t, x)], cond)


def descending_pairs(timesteps: Tensor) -> List[Tuple[int, int]]:
    """``[(t_0, t_1), ..., (t_{n-1}, -1)]`` from a descending ``timesteps: (n,)``."""
    ts = [int(s) for s in timesteps]
    return list(zip(ts, ts[1:] + [-1]))


def _check_mask(known_mask: Optional[Tensor], x0_known: Optional[Tensor], x: Tensor) -> None:
    if (known_mask is None) != (x0_known is None):
        raise ValueError("known_mask and x0_known must be given together")
    if known_mask is not None:
        if known_mask.ndim != x.ndim or x0_known.shape != x.shape:
            shapes = f"known_mask {tuple(known_mask.shape)}, x0_known {tuple(x0_known.shape)}"
            raise ValueError(f"{shapes} do not fit x {tuple(x.shape)}")
        torch.broadcast_shapes(known_mask.shape, x.shape)


def _paste(x: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """Known pixels from ``known`` where ``mask`` is 1, the rest from ``x``."""
    return mask * known + (1.0 - mask) * x


# renoise(x0_known, level, noise) -> the known region at the level a step starts from
Renoise = Callable[[Tensor, Any, Tensor], Tensor]


def check_start(start: int, num_steps: int, x_init: Optional[Tensor], x: Tensor) -> None:
    """ValueError unless ``0 <= start <= num_steps`` and ``x_init`` (if any) has x's shape."""
    if not 0 <= start <= num_steps:
        raise ValueError(f"start must be in 0..{num_steps} (the steps of the walk), got {start}")
    if start == num_steps and x_init is None:
        raise ValueError("start = the number of steps leaves no step to take: give x_init")
    if x_init is not None and x_init.shape != x.shape:
        raise ValueError(f"x_init {tuple(x_init.shape)} does not fit x {tuple(x.shape)}")


def start_point(x: Tensor, pairs: Sequence[Tuple[Any, Any]], renoise: Renoise, start: int,
                x_init: Optional[Tensor]) -> Tensor:
    """Where a walk begins: ``x``, or ``x_init`` noised with ``x`` to the level of step ``start``."""
    check_start(start, len(pairs), x_init, x)
    if x_init is None:
        return x
    if start == len(pairs):
        return x_init
    return renoise(x_init, pairs[start][0], x)


def walk(
    step: Callable[[Tensor, int, Any, Any], StepOutput],
    x: Tensor,
    pairs: Sequence[Tuple[Any, Any]],
    renoise: Renoise,
    *,
    generator: Optional[torch.Generator] = None,
    known_mask: Optional[Tensor] = None,
    x0_known: Optional[Tensor] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
    return_intermediates: bool = False,
    desc: str = "sampling",
    start: int = 0,
    x_init: Optional[Tensor] = None,
    known_noise: Optional[Tensor] = None,
) -> SampleOutput:
    """Walk ``x: (B, C, H, W)`` through ``step(x, i, level, level_next)`` over the ``(level, level_next)`` pairs.

    A level is a timestep (``sampling_loop``) or a sigma (the sigma samplers).
    With a mask, the known region is set to ``renoise(x0_known, level, noise)``
    before each step and to ``x0_known`` after the last. ``start`` / ``x_init``:
    image-to-image (module docstring).
    """
    _check_mask(known_mask, x0_known, x)
    x = start_point(x, pairs, renoise, start, x_init)
    if start == len(pairs):
        return SampleOutput(x, [])
    intermediates: List[Tensor] = []
    for i, (level, level_next) in enumerate(tqdm(pairs[start:], desc=desc, disable=not progress), start):
        if known_mask is not None and known_noise is None:  # the known region at the step's level (LDM)
            x = _paste(x, renoise(x0_known, level, randn(x, generator)), known_mask)
        out = step(x, i, level, level_next)
        x = out.prev_sample
        if known_mask is not None and i == len(pairs) - 1:
            x = _paste(x, x0_known, known_mask)
        elif known_mask is not None and known_noise is not None:  # diffusers: after the step, fixed noise
            x = _paste(x, renoise(x0_known, level_next, known_noise), known_mask)
        if callback is not None:
            callback(i, level, x, out.pred_x0)
        if return_intermediates:
            intermediates.append(x)
    return SampleOutput(x, intermediates)


def sampling_loop(
    step: StepFn,
    process: GaussianDiffusion,
    x: Tensor,
    pairs: Sequence[Tuple[int, int]],
    *,
    generator: Optional[torch.Generator] = None,
    known_mask: Optional[Tensor] = None,
    x0_known: Optional[Tensor] = None,
    callback: Optional[Callback] = None,
    progress: bool = True,
    return_intermediates: bool = False,
    desc: str = "sampling",
    start: int = 0,
    x_init: Optional[Tensor] = None,
    known_noise: Optional[Tensor] = None,
) -> SampleOutput:
    """Walk ``x: (B, C, H, W)`` through ``step`` over the ``(t, t_next)`` timestep pairs of ``process``."""

    def renoise(x0: Tensor, t: int, noise: Tensor) -> Tensor:
        return process.q_sample(x0, batch_t(t, x0), noise)

    return walk(step, x, pairs, renoise, generator=generator, known_mask=known_mask, x0_known=x0_known,
                callback=callback, progress=progress, return_intermediates=return_intermediates, desc=desc,
                start=start, x_init=x_init, known_noise=known_noise)

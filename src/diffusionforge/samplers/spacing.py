"""Which of the ``T`` training timesteps a sampler visits.

The three rules of Lin et al. 2024 ("Common Diffusion Noise Schedules and
Sample Steps are Flawed"), Table 2, with diffusers' ``timestep_spacing``
semantics exactly (the tests compare against ``DDIMScheduler.timesteps``):

    ========  ==================================================  ===========
    leading   arange(0, n) * (T // n) + steps_offset              Song 2021
    trailing  round(arange(T, 0, -T / n)) - 1                     Lin 2024
    linspace  round(linspace(0, T - 1, n))                        Ho 2020
    ========  ==================================================  ===========

``T`` = ``num_train_timesteps``, ``n`` = ``num_steps``; ``steps_offset``
applies to ``leading`` only (as in diffusers; Stable Diffusion uses 1).
Rounding is half-to-even, as numpy's.

diffusers' multistep solvers (``DPMSolverMultistepScheduler``,
``UniPCMultistepScheduler``) space ``n + 1`` points and drop the last one
(t = 0) for ``leading`` and ``linspace``; ``multistep=True`` gives their grid:

    ========  ==================================================
    leading   arange(1, n + 1) * (T // (n + 1)) + steps_offset
    linspace  round(linspace(0, T - 1, n + 1))[1:]
    trailing  as above (the same in every scheduler)
    ========  ==================================================
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

Spacing = Literal["leading", "trailing", "linspace"]


def steps_offset_of(process) -> int:
    """The process config's ``steps_offset`` (diffusers'; 0 where the process has none)."""
    return int(getattr(getattr(process, "config", None), "steps_offset", 0))


def make_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: Spacing = "leading", steps_offset: int = 0,
    multistep: bool = False,
) -> Tensor:
    """Descending LongTensor ``(num_steps,)`` of timesteps in ``0 .. T-1`` (``multistep``: the grid of
    diffusers' multistep solvers, ``n + 1`` points without the last)."""
    T, n = num_train_timesteps, num_steps
    most = T - 1 if multistep and spacing != "trailing" else T
    if not 1 <= n <= most:
        raise ValueError(f"num_steps must be in 1..{most}, got {n}")
    if spacing == "leading":
        points = n + 1 if multistep else n
        steps = np.arange(points - n, points) * (T // points) + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)) - 1
    elif spacing == "linspace":
        steps = np.round(np.linspace(0, T - 1, n + 1))[1:] if multistep else np.round(np.linspace(0, T - 1, n))
    else:
        raise ValueError(f"spacing must be one of 'leading', 'trailing', 'linspace', got {spacing!r}")
    steps = np.sort(steps.astype(np.int64))[::-1].copy()
    if steps[0] >= T or steps[-1] < 0:
        raise ValueError(f"timesteps {steps[-1]}..{steps[0]} fall outside 0..{T - 1} (steps_offset={steps_offset})")
    return torch.from_numpy(steps)

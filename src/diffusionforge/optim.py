"""Learning-rate schedule shared by the diffusion and autoencoder modules.

Linear warm-up from 0 to ``lr`` over ``warmup_steps`` scheduler steps, then
either constant (``lr_decay: none``) or a half cosine from ``lr`` down to
``min_lr_ratio * lr`` at ``total_steps`` (``lr_decay: cosine``), where it
stays. ``total_steps`` is the run's ``trainer.max_steps`` in scheduler steps;
a run stopped earlier by ``trainer.max_time`` ends before the decay does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config.schema import OptimConfig


def lr_factor(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """step -> multiplier of ``optim.lr`` (for ``torch.optim.lr_scheduler.LambdaLR``)."""
    warmup = max(1, optim.warmup_steps)
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.lr_decay == "none":
            return 1.0
        progress = min(1.0, (step - warmup) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine

    return factor


def lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                 total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, total_steps))

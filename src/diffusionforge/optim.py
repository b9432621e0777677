"""Learning-rate and EMA schedules shared by the diffusion and autoencoder modules.

Two clocks, chosen by ``optim.schedule``:

``steps``   warm-up over ``warmup_steps`` scheduler steps, then constant
            (``lr_decay: none``) or a half cosine down to ``min_lr_ratio * lr``
            at ``total_steps`` (the run's ``trainer.max_steps``). A run cut
            short by ``trainer.max_time`` ends before its decay does.
``budget``  the same shape on the fraction ``p`` of the run's budget used,
            ``p = max(step / max_steps, elapsed / max_time)`` — whichever
            bound ends the run — so a slow machine and a fast one both warm up
            over the first ``warmup_fraction`` of their run and finish the
            decay when their time is up.

    factor(p) = p / w                                           p < w
              = m + (1 - m) * (1 + cos(pi * (p - w) / (1 - w))) / 2    (cosine)

The EMA of the weights (``optim.ema_*``) warms up with the inverse-power form
of k-diffusion's ``EMAWarmup`` (Karras et al. 2022 use the same idea as a
ramp-up of the EMA half-life):

    decay_k = min(ema_decay, 1 - (1 + k / ema_inv_gamma) ** -ema_power)

after the k-th update, so the average of a short run does not hold stale
early weights: its horizon ``1 / (1 - decay_k) ~ k ** ema_power`` grows with
the run. ``ema_power = 0`` keeps the constant ``ema_decay``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .config.schema import OptimConfig

Progress = Callable[[], float]  # the fraction of the run's budget used, in [0, 1]


def decay_factor(optim: OptimConfig, progress: float, warmup: float) -> float:
    """Multiplier of ``optim.lr`` at ``progress`` (same unit as ``warmup``, end of run = 1)."""
    if progress < warmup:
        return progress / warmup
    if optim.lr_decay == "none":
        return 1.0
    frac = min(1.0, (progress - warmup) / max(1e-12, 1.0 - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * frac))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


def lr_factor(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Step-clock schedule: step -> multiplier of ``optim.lr`` (for ``LambdaLR``)."""
    warmup = max(1, optim.warmup_steps)
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay_factor(optim, (step - warmup) / decay_steps, 0.0)

    return factor


def budget_lr_factor(optim: OptimConfig, progress: Progress) -> Callable[[int], float]:
    """Budget-clock schedule: ignores the step count LambdaLR passes, reads ``progress()``."""
    return lambda _step: decay_factor(optim, min(1.0, max(0.0, progress())), optim.warmup_fraction)


def lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int,
                 progress: Optional[Progress] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule; ``progress`` is required when ``optim.schedule == "budget"``."""
    if optim.schedule == "budget":
        if progress is None:
            raise ValueError("optim.schedule=budget needs the run's progress")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, budget_lr_factor(optim, progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, total_steps))


def trainer_progress(trainer) -> Progress:
    """The fraction of a Lightning run's budget used: max(step / max_steps, elapsed / max_time)."""
    from lightning.pytorch.callbacks import Timer

    timers = [c for c in trainer.callbacks if isinstance(c, Timer)]

    def progress() -> float:
        fractions = [trainer.global_step / trainer.max_steps] if trainer.max_steps > 0 else []
        for timer in timers:
            elapsed, left = timer.time_elapsed(), timer.time_remaining()
            if left is not None and elapsed + left > 0:
                fractions.append(elapsed / (elapsed + left))
        return min(1.0, max(fractions, default=0.0))

    return progress


# ------------------------------------------------------------------------ EMA
def ema_decay_at(optim: OptimConfig, k: int) -> float:
    """EMA decay of the k-th update (k >= 1); k-diffusion's inverse-power warm-up."""
    if optim.ema_power <= 0:
        return optim.ema_decay
    warm = 1.0 - (1.0 + k / optim.ema_inv_gamma) ** -optim.ema_power
    return min(optim.ema_decay, max(0.0, warm))


def ema_initial_share(optim: OptimConfig, updates: int) -> float:
    """Weight the EMA still gives the initial weights after ``updates`` updates: prod_k decay_k."""
    if optim.ema_power <= 0:
        return optim.ema_decay ** updates
    share = 1.0
    for k in range(1, updates + 1):
        share *= ema_decay_at(optim, k)
        if share < 1e-12:
            return 0.0
    return share


def ema_multi_avg_fn(optim: OptimConfig):
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: lerp by ``1 - decay_k``.

    AveragedModel passes the number of updates done so far; its first update
    copies the weights, so the k-th call here is update k. Under FSDP the
    parameters are DTensors and the buffers plain tensors: each kind is lerped
    on its own (a foreach op takes one kind).
    """

    @torch.no_grad()
    def update(ema: Sequence[Tensor], current: Sequence[Tensor], num_averaged: Tensor) -> None:
        weight = 1.0 - ema_decay_at(optim, int(num_averaged))
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            kinds: dict[type, tuple[list[Tensor], list[Tensor]]] = {}
            for e, c in zip(ema, current, strict=True):
                kinds.setdefault(type(e), ([], []))[0].append(e)
                kinds[type(e)][1].append(c)
            for es, cs in kinds.values():
                torch._foreach_lerp_(es, cs, weight)
        else:
            for e, c in zip(ema, current, strict=True):
                e.copy_(e * (1.0 - weight) + c * weight)

    return update

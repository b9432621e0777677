"""The conditioning protocol: conditioners and the wrapper that merges them.

A ``Conditioner`` reads one key of the batch and returns a tensor that is
injected into the backbone in one of three ways (its ``kind``), as in the
Stability-AI ``sgm`` and gojasper ``LBM`` code:

| kind       | shape          | how the backbone uses it                       |
|------------|----------------|------------------------------------------------|
| vector     | (B, D)         | added to the time embedding / adaLN input      |
| crossattn  | (B, L, D)      | a sequence attended by cross-attention         |
| concat     | (B, C, H, W)   | channels stacked onto x_t                      |

For classifier-free guidance (Ho & Salimans 2022) each conditioner may drop
itself per sample with its own rate ``ucg_rate`` during training; how it is
dropped (a learned null class, a zero embedding, an empty caption) is the
conditioner's business, through ``unconditional``/``drop``.

``ConditionerWrapper`` runs every conditioner and concatenates outputs of the
same kind: ``vector`` and ``crossattn`` along the feature dimension
(the last), ``concat`` along channels (dim 1).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

ConditionKind = Literal["vector", "crossattn", "concat"]
CONCAT_DIMS: dict[str, int] = {"vector": -1, "crossattn": -1, "concat": 1}

Cond = dict[str, Tensor]


class Conditioner(nn.Module):
    """One source of conditioning.

    Subclasses set ``kind`` and implement ``encode(value, drop)`` where
    ``value`` is ``batch[input_key]`` and ``drop`` is a (B,) bool tensor of
    the samples to make unconditional.
    """

    kind: ConditionKind

    def __init__(self, input_key: str, ucg_rate: float = 0.0):
        super().__init__()
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1], got {ucg_rate}")
        self.input_key = input_key
        self.ucg_rate = ucg_rate

    def encode(self, value: Tensor, drop: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: dict, *, force_uncond: bool = False,
                generator: Optional[torch.Generator] = None) -> Tensor:
        if self.input_key not in batch:
            raise KeyError(f"conditioner needs batch key '{self.input_key}'")
        value = batch[self.input_key]
        batch_size = len(value)
        if force_uncond:
            drop = torch.ones(batch_size, dtype=torch.bool, device=value.device)
        elif self.training and self.ucg_rate > 0:
            u = torch.rand(batch_size, generator=generator, device=value.device)
            drop = u < self.ucg_rate
        else:
            drop = torch.zeros(batch_size, dtype=torch.bool, device=value.device)
        return self.encode(value, drop)


class ConditionerWrapper(nn.Module):
    """Runs conditioners and merges their outputs by kind into a cond dict."""

    def __init__(self, conditioners: list[Conditioner]):
        super().__init__()
        self.conditioners = nn.ModuleList(conditioners)

    def forward(self, batch: dict, *, force_uncond: bool = False) -> Cond:
        outputs: dict[str, list[Tensor]] = {}
        for conditioner in self.conditioners:
            out = conditioner(batch, force_uncond=force_uncond)
            outputs.setdefault(conditioner.kind, []).append(out)
        return {kind: torch.cat(parts, dim=CONCAT_DIMS[kind])
                for kind, parts in outputs.items()}

    @property
    def input_keys(self) -> list[str]:
        return [c.input_key for c in self.conditioners]

    def __len__(self) -> int:
        return len(self.conditioners)

"""Classifier-free guidance as a wrapper around a denoise callable.

Ho & Salimans 2022, Eq. 6 (written for the raw output ``D``, which may be
eps, x0 or v; guidance is linear so it commutes with their conversions):

    D_guided = D(x, t, uncond) + s * (D(x, t, cond) - D(x, t, uncond))

    ===============  ====================================================
    s                guidance ``scale``; s = 1 is the conditional model
    cond, uncond     dicts ``{"vector" | "crossattn" | "concat": Tensor}``;
                     uncond has the same keys, batch 1 or B
    guided_channels  guide only the first k output channels and take the
                     rest (e.g. learned variance) from the conditional
                     output, as DiT's ``forward_with_cfg`` does
    ===============  ====================================================

Both branches run in one batched forward: ``[cond; uncond]`` along dim 0.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from diffusionforge.samplers.loop import Cond, DenoiseFn


def _batched_cond(cond: Dict[str, Tensor], uncond: Dict[str, Tensor], batch: int) -> Dict[str, Tensor]:
    """Each cond tensor ``(B, ...)`` stacked over its uncond ``(1 or B, ...)``: ``(2B, ...)``."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
    return {key: torch.cat([cond[key], uncond[key].expand(batch, *cond[key].shape[1:])]) for key in cond}


def classifier_free_guidance(
    denoise: DenoiseFn, scale: float, uncond: Dict[str, Tensor], *, guided_channels: Optional[int] = None
) -> DenoiseFn:
    """Wrap ``denoise`` so it returns the guided output ``(B, C_out, H, W)``.

    Args:
        denoise: ``(x (B, C, H, W), t (B,), cond) -> (B, C_out, H, W)``.
        scale: guidance scale; 1 returns the conditional output with one pass.
        uncond: the "empty" conditioning, same keys as each ``cond``.
        guided_channels: None guides every output channel; k guides the first k.
    """

    def guided(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a cond dict")
        if scale == 1.0:
            return denoise(x, t, cond)
        batch = x.shape[0]
        both = denoise(torch.cat([x, x]), torch.cat([t, t]), _batched_cond(cond, uncond, batch))  # (2B, C_out, H, W)
        cond_out, uncond_out = both.chunk(2)
        k = cond_out.shape[1] if guided_channels is None else guided_channels
        mixed = uncond_out[:, :k] + scale * (cond_out[:, :k] - uncond_out[:, :k])  # Eq. 6, Ho & Salimans 2022
        return torch.cat([mixed, cond_out[:, k:]], dim=1)

    return guided

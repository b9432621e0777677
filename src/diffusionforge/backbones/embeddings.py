"""Timestep embeddings shared by the backbones.

The diffusion step ``t`` enters a network as a sinusoidal feature vector
(the Transformer position encoding of Vaswani et al. 2017, used for time by
Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Sec. 4) that an
MLP then maps to the width of the residual blocks' embedding input
(Dhariwal & Nichol 2021, "ADM"; Rombach et al. 2022, LDM).

Notation
--------
==========  ==================================================================
``t``       timesteps, ``(B,)``; integer steps or float times, both accepted
``D``       embedding width (``dim``)
``P``       ``max_period``: the longest wavelength, 10000 as in LDM and ADM
``w_i``     frequencies ``P ** (-i / (D // 2))`` for ``i = 0 .. D//2 - 1``
==========  ==================================================================

``timestep_embedding(t, D)[b] = [cos(t_b w_0), ..., cos(t_b w_{D/2-1}),
sin(t_b w_0), ..., sin(t_b w_{D/2-1})]``: cosines first, then sines. This is
the order of LDM/ADM ``timestep_embedding`` and of diffusers with
``flip_sin_to_cos=True, downscale_freq_shift=0``; checkpoints trained with one
order do not work with the other. An odd ``D`` gets a trailing zero column.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DEFAULT_MAX_PERIOD = 10_000  # longest wavelength of the sinusoids (LDM, ADM)


def timestep_embedding(t: Tensor, dim: int, max_period: int = DEFAULT_MAX_PERIOD,
                       freq_shift: int = 0) -> Tensor:
    """Sinusoidal features of timesteps ``t: (B,)`` -> ``(B, dim)`` float32, cos first.

    ``freq_shift`` = s uses frequencies ``P ** (-i / (D // 2 - s))``: 0 everywhere
    here and in LDM/ADM/DiT; diffusers' DiT (``CombinedTimestepLabelEmbeddings``)
    uses 1, so its converted checkpoints need it.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    # the references' order of operations: (-log P * i) / (D/2 - s); another order moves
    # freqs by an ulp, which at t ~ 1000 shifts the phases by ~1e-4
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    freqs = torch.exp(exponent)  # (D/2,)
    args = t.float()[:, None] * freqs[None, :]  # (B, D/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * (D/2))
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, D)
    return emb


def mlp_embedder(in_dim: int, dim: int) -> nn.Sequential:
    """``Linear(in_dim, dim) -> SiLU -> Linear(dim, dim)``: LDM's ``time_embed`` and SGM's ``label_emb``.

    Indices 0 and 2 hold the weights, so state-dict keys match the reference
    checkpoints (``time_embed.0.weight``, ``time_embed.2.weight``).
    """
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

"""Convolutional building blocks of the ADM / LDM UNet.

Residual block with a timestep embedding (Ho et al. 2020, Sec. 4 and App. B;
Dhariwal & Nichol 2021 "ADM", Sec. 3: adaptive group normalisation, i.e.
"scale-shift norm", and residual up/down-sampling), plus the resampling layers
and the float32 GroupNorm. Module and attribute names follow LDM's
``openaimodel.py`` (Rombach et al. 2022) so that CompVis / Stable Diffusion
state dicts map one-to-one: ``in_layers``, ``emb_layers``, ``out_layers``,
``skip_connection``, ``op`` (Downsample), ``conv`` (Upsample).

Notation
--------
==========  ====================================================
``x, h``    feature maps, ``(B, C, H, W)``
``emb``     timestep (+ vector) embedding, ``(B, E)``
``C_out``   output channels of a block
AdaGN       ``h = GN(h) * (1 + scale) + shift``, ``[scale, shift] = Linear(SiLU(emb))``
==========  ====================================================
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so bf16/fp16 autocast stays stable (ADM)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, groups: int, eps: float = 1e-5) -> GroupNorm32:
    """The UNet's normalisation layer: ``GroupNorm32(groups, channels)``."""
    return GroupNorm32(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it (ADM's zero-initialised outputs)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class Downsample(nn.Module):
    """Halve H and W: stride-2 3x3 conv (padding 1) or 2x2 average pooling.

    ``x: (B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))`` for the conv,
    ``floor`` for the pooling. Pooling requires ``C_out == C``.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError(f"average-pool Downsample cannot change channels {channels} -> {out_channels}")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to ``size``), then an optional 3x3 conv.

    ``x: (B, C, H, W) -> (B, C_out, 2H, 2W)``, or ``(B, C_out, *size)`` when
    ``size`` is given. The UNet passes the spatial size of the skip connection
    it will be concatenated with; for inputs whose sides are divisible by
    ``2 ** (levels - 1)`` that is exactly ``2H, 2W`` and the result equals
    LDM's. Only for odd intermediate sizes (28 -> 14 -> 7 -> 4 -> 7) does this
    deviate from LDM, which fails on such inputs.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError(f"conv-less Upsample cannot change channels {channels} -> {out_channels}")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding, optionally resampling (ADM Sec. 3).

    ``x: (B, C, H, W), emb: (B, E) -> (B, C_out, H', W')`` with ``H' = H`` or
    resampled when ``up``/``down``. The last conv is zero-initialised, so a
    fresh block is the identity on its skip path.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        *,
        norm_groups: int = 32,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, layer: nn.Module, x: Tensor, size: Optional[tuple[int, int]]) -> Tensor:
        return layer(x, size) if isinstance(layer, Upsample) else layer(x)

    def forward(self, x: Tensor, emb: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        """``size``: target spatial size when this block upsamples (see ``Upsample``)."""
        if self.updown:
            h = self.in_layers[:-1](x)  # (B, C, H, W): GN, SiLU
            h = self._resample(self.h_upd, h, size)
            x = self._resample(self.x_upd, x, size)
            h = self.in_layers[-1](h)  # (B, C_out, H', W')
        else:
            h = self.in_layers(x)  # (B, C_out, H, W)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift  # AdaGN, ADM Sec. 3
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

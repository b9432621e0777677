"""The LDM / Stable Diffusion first stage: a KL-regularised convolutional autoencoder.

Rombach et al. 2022 (LDM), Sec. 3.1 and App. G: an encoder ``E`` maps an
image ``x`` to the parameters of a diagonal Gaussian ``q(z | x)``, a decoder
``D`` maps a latent back, ``x_rec = D(z)``; training adds a small KL penalty
towards ``N(0, I)`` (the "KL-reg." autoencoder; the loss lives elsewhere).
The network is LDM's ``Encoder`` / ``Decoder`` (derived from the DDPM UNet of
Ho et al. 2020 without timestep embedding or skip connections). Module names
are CompVis' one-to-one (``encoder.down.0.block.0.norm1.weight``,
``encoder.mid.attn_1.q.weight``, ``decoder.up.3.upsample.conv.weight``,
``quant_conv.weight``), so the ``first_stage_model.`` part of an LDM or SD
checkpoint loads after stripping that prefix (see ``diffusionforge.interop``);
SD v1 settings give 83,653,863 parameters.

Notation
--------
===========  ===============================================================
``x``        image ``(B, in_channels, H, W)`` in [-1, 1]
``f``        downsampling factor ``2 ** (len(channel_mult) - 1)``
``h, w``     latent size ``H / f, W / f``
``moments``  ``quant_conv(E(x))``: ``[mu, log sigma^2]``, ``(B, 2 embed_dim, h, w)``
``z``        unscaled latent ``(B, embed_dim, h, w)``; diffusion runs on
             ``scaling_factor * z`` (LDM Sec. 4.3.2, App. D.1)
===========  ===============================================================

Attention (mid-block, and in the levels whose feature-map size is listed in
``attn_resolutions``) is single-head self-attention over the ``h * w``
positions, ``softmax(q k^T / sqrt(C)) v`` (Vaswani et al. 2017, Eq. 1) via
``F.scaled_dot_product_attention``; ``attn_type="linear"`` is LDM's
``LinAttnBlock`` (Katharopoulos et al. 2020 style, softmax over keys).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffusionforge.backbones.blocks import Upsample, normalization
from diffusionforge.errors import ConfigError
from diffusionforge.first_stage.config import AutoencoderConfig
from diffusionforge.first_stage.distributions import DiagonalGaussianDistribution

__all__ = ["AutoencoderConfig", "AutoencoderKL", "Decoder", "Encoder", "ResnetBlock", "AttnBlock", "LinAttnBlock"]

NORM_EPS = 1e-6  # LDM's GroupNorm epsilon in the autoencoder (the UNet uses 1e-5)


# ---------------------------------------------------------------------- blocks
class ResnetBlock(nn.Module):
    """``x + conv2(drop(SiLU(GN(conv1(SiLU(GN(x)))))))``, ``(B, C, H, W) -> (B, C_out, H, W)``.

    The skip is a 1x1 ``nin_shortcut`` when ``C != C_out`` (LDM's default
    ``conv_shortcut=False``). No timestep embedding: the autoencoder has none.
    """

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = normalization(in_channels, norm_groups, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalization(out_channels, norm_groups, eps=NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention ``x + proj_out(Attn(q, k, v))`` on ``GN(x)``; ``(B, C, H, W) -> same``.

    ``q, k, v, proj_out`` are 1x1 convs as in LDM (diffusers stores them as
    Linear layers; ``diffusionforge.interop.vae`` reshapes).
    """

    def __init__(self, channels: int, *, norm_groups: int = 32):
        super().__init__()
        self.norm = normalization(channels, norm_groups, eps=NORM_EPS)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, N, C), scale 1 / sqrt(C)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height)
        return x + self.proj_out(out)


class LinAttnBlock(nn.Module):
    """LDM's ``LinAttnBlock``: one head, ``to_out(v softmax_N(k)^T q)``; ``(B, C, H, W) -> same``.

    Keys are normalised with a softmax over the ``N`` positions, then the
    ``C x C`` context ``sum_n k_n v_n^T`` is applied to each query, costing
    ``O(N C^2)`` instead of ``O(N^2 C)``. As in LDM it has neither an input
    norm nor a residual connection, so CompVis weights reproduce their outputs.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.to_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        q, k, v = rearrange(self.to_qkv(x), "b (three c) h w -> three b c (h w)", three=3)  # (B, C, N) each
        k = k.softmax(dim=-1)
        context = torch.einsum("bdn,ben->bde", k, v)  # (B, C, C)
        out = torch.einsum("bde,bdn->ben", context, q)  # (B, C, N)
        return self.to_out(rearrange(out, "b c (h w) -> b c h w", h=height))


def make_attn(channels: int, config: AutoencoderConfig) -> nn.Module:
    """The attention layer of ``config.attn_type`` on ``channels`` channels (``none`` = identity)."""
    if config.attn_type == "vanilla":
        return AttnBlock(channels, norm_groups=config.norm_groups)
    if config.attn_type == "linear":
        return LinAttnBlock(channels)
    return nn.Identity()


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv: ``(B, C, H, W) -> (B, C, H/2, W/2)``.

    The asymmetric padding is LDM's (and diffusers'); for even ``H`` it gives
    exactly ``H / 2``, for odd ``H`` ``floor(H / 2)``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    """One resolution level as LDM builds it: a bare module with ``block`` and ``attn`` lists."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, config: AutoencoderConfig) -> nn.Module:
    """LDM's middle: ``block_1``, ``attn_1``, ``block_2`` at the lowest resolution."""
    mid = nn.Module()
    kw = dict(dropout=config.dropout, norm_groups=config.norm_groups)
    mid.block_1 = ResnetBlock(channels, channels, **kw)
    mid.attn_1 = make_attn(channels, config)
    mid.block_2 = ResnetBlock(channels, channels, **kw)
    return mid


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    """Each ResnetBlock of a level, followed by its attention when the level has any."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


# ------------------------------------------------------------ encoder/decoder
class Encoder(nn.Module):
    """LDM ``Encoder``: ``x: (B, in_channels, H, W) -> (B, 2 z_channels or z_channels, H/f, W/f)``."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        kw = dict(dropout=c.dropout, norm_groups=c.norm_groups)
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = c.base_channels
        for i, (mult, size) in enumerate(zip(c.channel_mult, c.level_resolutions)):
            block_out = c.base_channels * mult
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, **kw) for j in range(c.num_res_blocks)]
            attns = [make_attn(block_out, c) for _ in blocks] if size in c.attn_resolutions else []
            level = _level(blocks, attns)
            if i != len(c.channel_mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
            block_in = block_out
        self.mid = _mid(block_in, c)
        self.norm_out = normalization(block_in, c.norm_groups, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (B, C_i, H_i / 2, W_i / 2)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """LDM ``Decoder``: ``z: (B, z_channels, h, w) -> (B, out_channels, f h, f w)``.

    ``up[i]`` is the level of encoder level ``i`` (built lowest resolution
    first and prepended, as LDM does), with ``num_res_blocks + 1`` blocks and
    a nearest-x2 + 3x3 conv ``upsample`` for every level but 0.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = config
        kw = dict(dropout=c.dropout, norm_groups=c.norm_groups)
        block_in = c.base_channels * c.channel_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, c)
        self.up = nn.ModuleList()
        for i in reversed(range(len(c.channel_mult))):
            block_out = c.base_channels * c.channel_mult[i]
            n = c.num_res_blocks + 1
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, **kw) for j in range(n)]
            attns = [make_attn(block_out, c) for _ in blocks] if c.level_resolutions[i] in c.attn_resolutions else []
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_out, use_conv=True)  # attribute ``conv`` as LDM's
            self.up.insert(0, level)
            block_in = block_out
        self.norm_out = normalization(block_in, c.norm_groups, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(block_in, c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))  # (B, C_last, h, w)
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, C_i, 2 H_i, 2 W_i)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------- autoencoder
class AutoencoderKL(nn.Module):
    """LDM ``AutoencoderKL``: ``encode(x) -> q(z | x)``, ``decode(z) -> x_rec``.

    ``quant_conv`` (1x1, ``2 z_channels -> 2 embed_dim``) maps the encoder
    output to the posterior's moments, ``post_quant_conv`` (1x1,
    ``embed_dim -> z_channels``) maps a latent into the decoder.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        if not config.double_z:
            raise ConfigError("AutoencoderConfig.double_z must be true for AutoencoderKL (the posterior needs "
                              "mean and logvar)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        """``f``: latents are ``H / f`` by ``W / f``."""
        return self.config.downsample_factor

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """``x: (B, in_channels, H, W)`` in [-1, 1], ``H, W`` divisible by ``f`` -> ``q(z | x)``.

        The posterior lives on latents ``(B, embed_dim, H/f, W/f)``.
        """
        c, f = self.config, self.downsample_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % f or x.shape[3] % f:
            msg = f"x must have shape (B, in_channels={c.in_channels}, H, W) with H, W divisible by f={f}"
            raise ValueError(f"{msg}, got {tuple(x.shape)}")
        moments = self.quant_conv(self.encoder(x))  # (B, 2 embed_dim, h, w)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent ``z: (B, embed_dim, h, w)`` -> ``(B, out_channels, f h, f w)``."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"z must have shape (B, embed_dim={self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x`` through a posterior sample (or its mode); returns ``(x_rec, posterior)``."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> nn.Parameter:
        """The decoder's last weight, for the adaptive GAN weight of LDM's loss (Esser et al. 2021, Eq. 7)."""
        return self.decoder.conv_out.weight

"""``AutoencoderConfig``: the KL autoencoder's hyper-parameters, torch-free.

``config/schema.py`` composes it without importing torch; ``autoencoder.py``
builds ``AutoencoderKL`` from it and re-exports it. ``__post_init__`` checks
every field against the others (levels, attention sizes, GroupNorm groups)
and raises a one-line ``ConfigError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

from diffusionforge.errors import ConfigError

__all__ = ["ATTN_TYPES", "AttnType", "AutoencoderConfig"]

AttnType = Literal["vanilla", "linear", "none"]
ATTN_TYPES = get_args(AttnType)


@dataclass
class AutoencoderConfig:
    """Hyper-parameters of ``AutoencoderKL``; names and meanings as LDM's ``ddconfig``."""

    in_channels: int = 1  # image channels of x
    out_channels: int = 1  # channels the decoder produces (LDM "out_ch")
    base_channels: int = 64  # LDM "ch": width of level 0; level i has base_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; f = 2 ** (len - 1)
    num_res_blocks: int = 1  # ResnetBlocks per encoder level (the decoder has one more)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes (pixels, e.g. 14) with attention after each block
    z_channels: int = 4  # channels of the encoder's output (x2 when double_z) and the decoder's input
    embed_dim: int = 4  # latent channels after quant_conv: z is (B, embed_dim, H / f, W / f)
    double_z: bool = True  # encoder outputs mean and log-variance (must be true for AutoencoderKL)
    dropout: float = 0.0  # dropout inside ResnetBlocks
    attn_type: AttnType = "vanilla"  # vanilla = softmax attention (SDPA), linear = LDM LinAttnBlock, none
    norm_groups: int = 32  # GroupNorm groups; must divide every channel count
    resolution: int = 28  # training image size; attn_resolutions are read against it, must be divisible by f
    # Latent scale: diffusion runs on scaling_factor * z (SD v1: 0.18215, LDM App. D.1: 1 / std of
    # the latents of the training data). None = not known yet; estimate it from data before use.
    scaling_factor: Optional[float] = None

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "z_channels", "embed_dim"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.norm_groups >= 1, "norm_groups", f"must be >= 1, got {self.norm_groups}")
        _require(len(self.channel_mult) >= 1, "channel_mult", "must have at least one level")
        _require(all(m >= 1 for m in self.channel_mult), "channel_mult", f"must be >= 1, got {self.channel_mult}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.attn_type in ATTN_TYPES, "attn_type", f"must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        sf = self.scaling_factor
        _require(sf is None or sf > 0, "scaling_factor", f"must be None or > 0, got {sf}")
        self._check_sizes()

    def _check_sizes(self) -> None:
        f = self.downsample_factor
        msg = f"{self.resolution} is not divisible by the downsampling factor f = {f}"
        _require(self.resolution >= 1 and self.resolution % f == 0, "resolution", msg)
        sizes = self.level_resolutions
        for r in self.attn_resolutions:
            msg = f"{r} is not a feature-map size of this autoencoder (one of {sizes}); not a downsampling factor"
            _require(r in sizes, "attn_resolutions", msg)
        for ch in (self.base_channels,) + tuple(self.base_channels * m for m in self.channel_mult):
            msg = f"{self.norm_groups} does not divide the channel count {ch}"
            _require(ch % self.norm_groups == 0, "norm_groups", msg)

    @property
    def downsample_factor(self) -> int:
        """``f``: the latent is ``H / f`` by ``W / f``."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level for ``resolution``-pixel inputs (LDM's ``curr_res``)."""
        return tuple(self.resolution // 2**i for i in range(len(self.channel_mult)))


def _require(ok: bool, field: str, message: str) -> None:
    """Raise ``ConfigError("AutoencoderConfig.<field> <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"AutoencoderConfig.{field} {message}")


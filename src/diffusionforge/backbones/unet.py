"""The ADM / LDM UNet backbone: ``(x, t, cond) -> output``.

Ho et al. 2020 (DDPM, App. B: a PixelCNN++-style UNet with a sinusoidal time
embedding), Dhariwal & Nichol 2021 ("ADM": multi-head attention at several
resolutions, scale-shift norm, residual resampling), Rombach et al. 2022
(LDM, Sec. 3.3: SpatialTransformer cross-attention to a conditioning
sequence). The module tree is LDM's ``openaimodel.UNetModel`` one-to-one:
``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``, so CompVis / Stable Diffusion v1 state dicts map
key for key (SD v1 settings give 859,520,964 parameters).

Notation
--------
===============  ============================================================
``x``            noisy input ``(B, in_channels, H, W)``
``t``            timesteps ``(B,)`` (int steps or float times) or a scalar
``emb``          ``time_embed(timestep_embedding(t)) [+ label_emb(vector)]``,
                 ``(B, 4 * model_channels)``
``ds``           downsampling factor of a level: 1, 2, 4, ...
===============  ============================================================

Conditioning (``cond`` dict, keyed by how it is injected):

* ``"vector"``: ``(B, vector_dim)``, added to ``emb`` through ``label_emb``.
* ``"crossattn"``: ``(B, L, context_dim)``, attended by every SpatialTransformer.
* ``"crossattn_mask"`` (optional): ``(B, L)`` bool, True = may be attended.
* ``"concat"``: ``(B, concat_channels, H, W)``, stacked onto ``x`` before ``conv_in``.

Keys the config requires must be present; keys it does not use are an
error (so conditioning is never silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor, nn

from diffusionforge.backbones.attention import AttentionBlock, SpatialTransformer
from diffusionforge.backbones.blocks import Downsample, ResBlock, Upsample, normalization, zero_module
from diffusionforge.backbones.embeddings import mlp_embedder, timestep_embedding
from diffusionforge.backbones.inputs import check_inputs
from diffusionforge.errors import ConfigError

__all__ = ["UNet", "UNetConfig", "TimestepEmbedSequential"]



@dataclass
class UNetConfig:
    """Hyper-parameters of ``UNet``; names and meanings as in LDM's ``UNetModel``."""

    in_channels: int = 1  # channels of x (without the concat conditioning)
    out_channels: int = 1  # output channels; 2 * in_channels for a learned variance
    model_channels: int = 64  # base width; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; one level per entry
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (2,)  # downsampling factors (1, 2, 4, ...) with attention
    num_heads: int = 4  # attention heads, used when num_head_channels == -1
    num_head_channels: int = -1  # channels per head (heads = channels // this); -1 = use num_heads
    dropout: float = 0.0  # dropout in ResBlocks and transformer blocks
    use_scale_shift_norm: bool = True  # AdaGN h = GN(h) * (1 + scale) + shift (ADM); False adds emb
    resblock_updown: bool = False  # resample with ResBlocks (ADM/BigGAN) instead of Down/Upsample
    conv_resample: bool = True  # Down/Upsample use a 3x3 conv (else avg-pool / plain nearest)
    norm_groups: int = 32  # GroupNorm groups; must divide every channel count
    context_dim: Optional[int] = None  # width of cond["crossattn"]; enables SpatialTransformer blocks
    transformer_depth: int = 1  # BasicTransformerBlocks per SpatialTransformer
    use_linear_in_transformer: bool = False  # SD2-style Linear proj_in/out (SD1: 1x1 conv)
    concat_channels: int = 0  # channels of cond["concat"], stacked onto x before conv_in
    vector_dim: Optional[int] = None  # width of cond["vector"], added to the time embedding

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self._check_types()
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "norm_groups"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.transformer_depth >= 1, "transformer_depth", f"must be >= 1, got {self.transformer_depth}")
        _require(self.concat_channels >= 0, "concat_channels", f"must be >= 0, got {self.concat_channels}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("context_dim", "vector_dim"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, f"must be None or >= 1, got {value}")
        _require(
            self.context_dim is not None or not self.use_linear_in_transformer,
            "use_linear_in_transformer",
            "needs context_dim (it only affects SpatialTransformer blocks)",
        )
        self._check_levels()

    def _check_types(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            if "tuple" in kind:
                ok = len(value) > 0 or f.name == "attention_resolutions"
                ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                _require(ok, f.name, f"must be a {'' if ok else 'non-empty '}list of ints, got {value}")
            elif kind == "bool":
                _require(isinstance(value, bool), f.name, f"must be true or false, got {value!r}")
            elif "int" in kind:
                ok = (value is None and "Optional" in kind) or (isinstance(value, int) and not isinstance(value, bool))
                _require(ok, f.name, f"must be an integer, got {value!r}")
            elif kind == "float":
                _require(isinstance(value, (int, float)), f.name, f"must be a number, got {value!r}")

    def _check_levels(self) -> None:
        _require(all(m >= 1 for m in self.channel_mult), "channel_mult", f"must be >= 1, got {self.channel_mult}")
        factors = tuple(2**i for i in range(len(self.channel_mult)))
        for r in self.attention_resolutions:
            msg = f"{r} is not a downsampling factor of this UNet (one of {factors}); not a pixel size"
            _require(r in factors, "attention_resolutions", msg)
        for i, mult in enumerate(self.channel_mult):
            ch = self.model_channels * mult
            msg = f"{self.norm_groups} does not divide model_channels * channel_mult[{i}] = {ch}"
            _require(ch % self.norm_groups == 0, "norm_groups", msg)
        attn_levels = {i for i, f in enumerate(factors) if f in self.attention_resolutions}
        attn_levels.add(len(self.channel_mult) - 1)  # the middle block always has attention
        if self.num_head_channels == -1:
            _require(self.num_heads >= 1, "num_heads", f"must be >= 1, got {self.num_heads}")
        else:
            msg = f"must be -1 or >= 1, got {self.num_head_channels}"
            _require(self.num_head_channels >= 1, "num_head_channels", msg)
        name = "num_heads" if self.num_head_channels == -1 else "num_head_channels"
        for i in sorted(attn_levels):
            ch = self.model_channels * self.channel_mult[i]
            msg = f"{getattr(self, name)} does not divide the {ch} channels of attention level {i}"
            _require(ch % getattr(self, name) == 0, name, msg)

    def heads_for(self, channels: int) -> tuple[int, int]:
        """``(heads, dim_head)`` of an attention layer on ``channels`` channels (LDM's rule)."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


def _require(ok: bool, field: str, message: str) -> None:
    """Raise ``ConfigError("UNetConfig.<field> <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"UNetConfig.{field} {message}")


class TimestepEmbedSequential(nn.Sequential):
    """A sequential block that hands each layer what it needs (LDM's ``TimestepEmbedSequential``).

    ``x: (B, C, H, W)`` -> ``(B, C', H', W')``; ``emb: (B, E)`` goes to ResBlocks,
    ``context: (B, L, C_ctx)`` and ``mask: (B, L)`` to SpatialTransformers,
    ``size`` (the next skip's spatial size) to upsampling layers.
    """

    def forward(self, x, emb, context=None, mask=None, size=None):  # noqa: D102
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, size)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """LDM ``UNetModel``: ``forward(x, t, cond) -> (B, out_channels, H, W)``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        self.time_embed_dim = 4 * mc
        self.time_embed = mlp_embedder(mc, self.time_embed_dim)
        if config.vector_dim is not None:
            # Nested as in SGM (``label_emb.0.0.weight``) for checkpoint compatibility.
            self.label_emb = nn.Sequential(mlp_embedder(config.vector_dim, self.time_embed_dim))
        skip_channels = self._build_input_blocks()
        ch = mc * config.channel_mult[-1]
        self.middle_block = TimestepEmbedSequential(self._resblock(ch, ch), self._attention(ch), self._resblock(ch, ch))
        self._build_output_blocks(skip_channels)
        self.out = nn.Sequential(
            normalization(mc, config.norm_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(mc, config.out_channels, 3, padding=1)),
        )

    # ----------------------------------------------------------------- build
    def _resblock(self, channels: int, out_channels: int, *, up: bool = False, down: bool = False) -> ResBlock:
        c = self.config
        return ResBlock(
            channels,
            self.time_embed_dim,
            c.dropout,
            out_channels,
            norm_groups=c.norm_groups,
            use_scale_shift_norm=c.use_scale_shift_norm,
            up=up,
            down=down,
        )

    def _attention(self, channels: int) -> nn.Module:
        """Self-attention (no ``context_dim``) or a SpatialTransformer, with LDM's head rule."""
        c = self.config
        heads, dim_head = c.heads_for(channels)
        if c.context_dim is None:
            return AttentionBlock(channels, heads, norm_groups=c.norm_groups)
        return SpatialTransformer(
            channels,
            heads,
            dim_head,
            context_dim=c.context_dim,
            depth=c.transformer_depth,
            dropout=c.dropout,
            use_linear=c.use_linear_in_transformer,
            norm_groups=c.norm_groups,
        )

    def _build_input_blocks(self) -> list[int]:
        """Create ``input_blocks``; return the channel count of every skip connection."""
        c = self.config
        ch = c.model_channels
        conv_in = nn.Conv2d(c.in_channels + c.concat_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [self._resblock(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(self._attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                down = self._resblock(ch, ch, down=True) if c.resblock_updown else Downsample(ch, c.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        return skip_channels

    def _build_output_blocks(self, skip_channels: list[int]) -> None:
        """Create ``output_blocks``, consuming ``skip_channels`` in reverse (LIFO)."""
        c = self.config
        skip_channels = list(skip_channels)
        ch, ds = c.model_channels * c.channel_mult[-1], 2 ** (len(c.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers: list[nn.Module] = [self._resblock(ch + skip_channels.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(self._attention(ch))
                if level and i == c.num_res_blocks:
                    up = self._resblock(ch, ch, up=True) if c.resblock_updown else Upsample(ch, c.conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    # --------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Tensor, cond: Optional[dict[str, Tensor]] = None) -> Tensor:
        """``x: (B, in_channels, H, W)``, ``t: (B,)`` -> ``(B, out_channels, H, W)``."""
        x, t, vector, context, mask = self._check_inputs(x, t, cond or {})
        t_emb = timestep_embedding(t, self.config.model_channels)  # (B, mc) float32
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # (B, 4 mc)
        if vector is not None:
            emb = emb + self.label_emb(vector)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, mask)
            hs.append(h)
        h = self.middle_block(h, emb, context, mask)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)  # (B, C + C_skip, H, W)
            size = tuple(hs[-1].shape[-2:]) if hs else None  # next skip's size, for Upsample
            h = block(h, emb, context, mask, size)
        return self.out(h)

    def _check_inputs(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]):
        """Validate shapes; return ``(x [+ concat], t (B,), vector, context, mask)``."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (B, in_channels={c.in_channels}, H, W), got {tuple(x.shape)}")
        return check_inputs(x, t, cond, vector_dim=c.vector_dim, context_dim=c.context_dim,
                            concat_channels=c.concat_channels, backbone="UNet")

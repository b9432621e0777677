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

from typing import Optional

import torch
from torch import Tensor, nn

from diffusionforge.backbones.attention import AttentionBlock, SpatialTransformer
from diffusionforge.backbones.blocks import Downsample, ResBlock, Upsample, normalization, zero_module
from diffusionforge.backbones.config import UNetConfig
from diffusionforge.backbones.embeddings import mlp_embedder, timestep_embedding
from diffusionforge.backbones.inputs import check_inputs

__all__ = ["UNet", "UNetConfig", "TimestepEmbedSequential"]


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
        # the input side it works at, when known (a run's image / latent side; diffusers' ``sample_size``, which
        # a pipeline takes as its default height / vae_scale_factor); written to an exported config.json
        self.sample_size: Optional[int] = None
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

"""DiT, the diffusion transformer backbone: ``(x, t, cond) -> output``.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers". The image
(or latent) is cut into ``p x p`` patches, each embedded by a strided conv,
plus fixed 2-D sin-cos position embeddings; the timestep embedding (plus the
conditioning vector, e.g. a class embedding) drives every block through
adaLN-Zero: a zero-initialised linear layer regresses shift, scale and a
gate for the attention and the MLP branch (Sec. 3.2), so every block is the
identity at initialisation. A final adaLN layer and a linear map turn each
token back into a ``p x p x out_channels`` patch (unpatchify).

Module names follow facebookresearch/DiT ``models.py`` (``x_embedder.proj``,
``t_embedder.mlp``, ``blocks.N.attn.qkv``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2``, ``adaLN_modulation.1``, ``final_layer.linear``, ``pos_embed``),
so an official checkpoint maps one to one (``interop/dit.py``); its
``y_embedder.embedding_table`` is our ``ClassEmbedder`` (a learned null class
at index K, label dropout = its ``ucg_rate``) with ``embed_dim =
hidden_size``.

Notation
--------
==========  ==============================================================
``x``       input ``(B, C_in, H, W)``; H and W multiples of ``p``
``p``       patch size; ``N = (H / p) * (W / p)`` tokens of width ``D``
``c``       conditioning ``(B, D)`` = t_embedder(t) [+ vector]
``modulate``  ``LN(x) * (1 + scale) + shift``
==========  ==============================================================

Conditioning (``cond`` dict, as for the UNet):

* ``"vector"``: ``(B, vector_dim)``, added to the timestep embedding (through a
  linear map ``vector_proj`` when ``vector_dim != hidden_size``).
* ``"crossattn"`` (+ optional ``"crossattn_mask"``): ``(B, L, context_dim)``; each
  block then has a cross-attention branch after self-attention (as in
  PixArt-alpha), with a LayerNorm and a zero-initialised output projection
  so the block is still the identity at init.
* ``"concat"``: ``(B, concat_channels, H, W)`` stacked onto x before patchifying.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from diffusionforge.backbones.attention import CrossAttention, multihead_attention
from diffusionforge.backbones.config import DIT_MODELS, DiTConfig, LabelDiTConfig
from diffusionforge.backbones.embeddings import timestep_embedding
from diffusionforge.backbones.inputs import check_inputs
from diffusionforge.errors import ConfigError

__all__ = ["DIT_MODELS", "DiT", "DiTConfig", "LabelDiT", "LabelDiTConfig", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position embeddings ``(grid_size**2, dim)`` (DiT / MAE ``get_2d_sincos_pos_embed``).

    Token ``n = i * grid_size + j`` (row i, column j) gets ``[emb_1d(j), emb_1d(i)]``
    with ``emb_1d(pos) = [sin(pos w_k), cos(pos w_k)]``, ``w_k = 10000 ** (-k / (dim / 4))``:
    the first half encodes the column, as in the reference (``meshgrid(w, h)``).
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (G*G, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (G*G, D/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (G*G, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with ``x: (B, N, D)``, ``shift, scale: (B, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """``(B, C, H, W) -> (B, N, D)`` by a ``p x p`` conv with stride p (timm ``PatchEmbed``)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class TimestepEmbedder(nn.Module):
    """``t: (B,) -> (B, D)``: sinusoidal features (cos first) then ``Linear-SiLU-Linear``."""

    def __init__(self, dim: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """timm ``Attention``: fused ``qkv`` linear, SDPA, ``proj``; ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, N, D); qkv rows are [q; k; v], heads inside
        return self.proj(multihead_attention(q, k, v, self.num_heads))


class Mlp(nn.Module):
    """timm ``Mlp`` with tanh-approximated GELU: ``fc2(GELU(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block (Fig. 3): ``x + g1 * Attn(mod(LN(x))) [+ XAttn(LN(x), ctx)] + g2 * MLP(mod(LN(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, context_dim: Optional[int] = None,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, num_heads, dim // num_heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, context: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """``Linear(mod(LN(x)))``: each token to a ``p * p * out_channels`` patch."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The diffusion transformer: ``forward(x, t, cond) -> (B, out_channels, H, W)``."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.input_size is None:
            raise ConfigError("DiTConfig.input_size must be set (a run derives it from the image or latent size)")
        self.config = c = config
        dim = c.hidden_size
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels + c.concat_channels, dim)
        self.t_embedder = TimestepEmbedder(dim, c.frequency_embedding_size, c.timestep_freq_shift)
        if c.vector_dim is not None and c.vector_dim != dim:
            self.vector_proj = nn.Linear(c.vector_dim, dim)
        # fixed, not trained; persistent so official checkpoints (which hold it) load one to one
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, c.grid_size)[None], persistent=True)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, c.num_heads, c.mlp_ratio, context_dim=c.context_dim, mlp_norm_eps=c.mlp_norm_eps)
            for _ in range(c.depth))
        self.final_layer = FinalLayer(dim, c.patch_size, c.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's initialisation (``DiT.initialize_weights``)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear over the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if hasattr(block, "cross_attn"):
                nn.init.zeros_(block.cross_attn.to_out[0].weight)
                nn.init.zeros_(block.cross_attn.to_out[0].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """``(B, N, p * p * C) -> (B, C, H, W)`` (tokens row-major, each patch ``(p, q, c)``)."""
        g, p = self.config.grid_size, self.config.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=p, q=p)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[dict[str, Tensor]] = None) -> Tensor:
        """``x: (B, in_channels, H, W)``, ``t: (B,)`` -> ``(B, out_channels, H, W)``."""
        x, t, vector, context, mask = self._check_inputs(x, t, cond or {})
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        if vector is not None:
            c = c + (self.vector_proj(vector) if hasattr(self, "vector_proj") else vector)
        for block in self.blocks:
            h = block(h, c, context, mask)
        return self.unpatchify(self.final_layer(h, c))  # (B, out_channels, H, W)

    def _check_inputs(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]):
        c = self.config
        expected = (c.in_channels, c.input_size, c.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, in_channels, input_size, input_size) = (B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}), got {tuple(x.shape)}")
        return check_inputs(x, t, cond, vector_dim=c.vector_dim, context_dim=c.context_dim,
                            concat_channels=c.concat_channels, backbone="DiT")



class LabelEmbedder(nn.Module):
    """DiT's ``LabelEmbedder`` table, ``(K + 1, D)``; row K is the null class used for guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class LabelDiT(DiT):
    """The published class-conditional DiT as one network: ``forward(x, t, y) -> (B, out_channels, H, W)``.

    Its state dict is facebookresearch/DiT's, key for key (``y_embedder.embedding_table``
    included); it is the unit ``dforge convert --kind dit`` reads and writes. In a
    training run the same table lives in the ``ClassEmbedder`` conditioner.
    """

    def __init__(self, config: LabelDiTConfig):
        super().__init__(config)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        """``y: (B,)`` labels in 0..K (K = the null class)."""
        return super().forward(x, t, {"vector": self.y_embedder(y.long())})

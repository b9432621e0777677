"""Attention blocks of the UNet: ADM self-attention and the LDM SpatialTransformer.

* ``AttentionBlock``: spatial self-attention over the ``H*W`` positions of a
  feature map with a 1x1 ``qkv`` projection and a zero-initialised output
  projection (Dhariwal & Nichol 2021, "ADM"; Ho et al. 2020 used one head at
  16x16).
* ``SpatialTransformer``: LDM's cross-attention block (Rombach et al. 2022,
  Sec. 3.3): ``proj_in``, ``transformer_depth`` x ``BasicTransformerBlock``
  (self-attention, cross-attention to a context sequence ``c``, GEGLU
  feed-forward, each pre-LayerNorm and residual), zero-initialised
  ``proj_out``.

Every attention goes through ``torch.nn.functional.scaled_dot_product_attention``:
``Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` (Vaswani et al. 2017, Eq. 1).
Attribute names follow LDM (``qkv``, ``proj_out``; ``attn1``, ``attn2``,
``to_q``, ``to_k``, ``to_v``, ``to_out``, ``ff.net``, ``norm1..3``) so that
reference state dicts load one-to-one.

Notation
--------
=========  ===============================================
``x``      feature map ``(B, C, H, W)``; ``N = H * W`` positions
``c``      context sequence ``(B, L, C_ctx)``
``mask``   ``(B, L)`` bool, True = the token may be attended to
``h, d``   number of heads, channels per head
=========  ===============================================
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusionforge.backbones.blocks import normalization, zero_module


def multihead_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Optional[Tensor] = None) -> Tensor:
    """Scaled dot-product attention split into ``heads`` heads.

    ``q: (B, N, h*d)``, ``k, v: (B, L, h*d)``, ``mask: (B, L)`` bool (True =
    attend) -> ``(B, N, h*d)``. A row of ``mask`` that is all False gives NaN
    (nothing to attend to); callers must keep at least one token per sample.
    """
    q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=heads) for z in (q, k, v))
    attn_mask = None if mask is None else rearrange(mask.bool(), "b l -> b 1 1 l")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
    return rearrange(out, "b h n d -> b n (h d)")


class AttentionBlock(nn.Module):
    """ADM spatial self-attention: ``x + proj_out(Attn(qkv(GN(x))))``, ``(B, C, H, W) -> same``.

    The ``qkv`` output channels are laid out per head as ``(h, [q, k, v], d)``:
    the order of ADM/LDM ``QKVAttentionLegacy``, which their checkpoints use.
    """

    def __init__(self, channels: int, num_heads: int, *, norm_groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        # The 1x1 convs run as Linear layers on position-major tokens (same weights, same map),
        # so q, k, v come out with ``d`` innermost: SDPA's fused CPU kernel needs that, and a
        # matmul is cheaper than a 1x1 Conv1d on CPU.
        height = x.shape[2]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, N, C)
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)  # (B, N, 3C)
        q, k, v = rearrange(qkv, "b n (h three d) -> three b h n d", three=3, h=self.num_heads)
        # On CPU in bf16 the math path is ~2.5x faster than the fused kernel (torch 2.13, N = 49)
        low_precision_cpu = q.device.type == "cpu" and q.dtype != torch.float32
        with sdpa_kernel(SDPBackend.MATH) if low_precision_cpu else nullcontext():
            out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, C)
        out = F.linear(out, self.proj_out.weight[:, :, 0], self.proj_out.bias)  # (B, N, C)
        return x + rearrange(out, "b (h w) c -> b c h w", h=height)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x: (B, N, C)`` to ``context: (B, L, C_ctx)`` (self when None) -> ``(B, N, C)``."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, context_dim: Optional[int] = None, dropout=0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        context = x if context is None else context
        out = multihead_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask)
        return self.to_out(out)  # (B, N, C)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``a * gelu(g)`` with ``[a, g] = proj(x)``; ``(..., D) -> (..., D_out)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """LDM's gated feed-forward: ``Linear(GEGLU(x))`` with hidden width ``mult * dim``; ``(B, N, D) -> same``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attn, cross-attn to ``context``, GEGLU FF; ``(B, N, D) -> same``."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM cross-attention block on a feature map: ``x: (B, C, H, W), c: (B, L, C_ctx) -> (B, C, H, W)``.

    ``use_linear=False`` (SD v1): ``proj_in``/``proj_out`` are 1x1 convs applied
    before/after flattening; ``use_linear=True`` (SD v2): Linear layers applied
    to the flattened tokens. Both are the same map; only the weight shapes differ.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        *,
        context_dim: int,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = normalization(channels, norm_groups, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, channels, 1))

    def forward(self, x: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        height = x.shape[2]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        h = rearrange(h, "b c h w -> b (h w) c")  # (B, N, inner or C)
        if self.use_linear:
            h = self.proj_in(h)  # (B, N, inner)
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        if self.use_linear:
            h = self.proj_out(h)  # (B, N, C)
        h = rearrange(h, "b (h w) c -> b c h w", h=height)
        if not self.use_linear:
            h = self.proj_out(h)  # (B, C, H, W)
        return x + h

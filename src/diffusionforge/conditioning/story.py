"""Story conditioning (AR-LDM): each frame sees its caption and every earlier (caption, frame).

AR-LDM (Pan et al. 2024, WACV; xichenpan/ARLDM ``ARLDM.forward``) generates
frame ``j`` of a story by latent diffusion conditioned on a multimodal
*history*: the caption of frame ``j`` encoded by a text encoder, and for every
earlier frame ``k < j`` its caption fused with its image by BLIP's
image-grounded text encoder. This module builds that cross-attention sequence
and its mask for the UNet; ``models/story.py`` trains and samples with it.

Notation
--------
==========  ==================================================================
``B``       stories in the batch
``F``       frames per story (``frames``); history segments are frames
            ``0 .. F-2`` (the last frame is never history)
``T``       target frames a call conditions (``batch["targets"]``; all F by
            default); output rows are ordered story-major ``(b, j)``
``L``       caption tokens after padding (``max_length``)
``D``       ``dim``: width of the sequence the UNet attends to
``P``       image tokens of one frame: ``(h / patch) * (w / patch)`` of the
            first-stage latent ``(c, h, w)`` (the frame itself in pixel space)
==========  ==================================================================

Sequence of target frame ``j`` (``(1 + F - 1) * L`` tokens, width D)::

    [ W_c tau(y_j) + type_0 | H_0 + type_1 + time_0 | ... | H_{F-2} + type_1 + time_{F-2} ]

* ``tau``: the frozen caption encoder (all-MiniLM-L6-v2 offline by default,
  or a CLIP text tower from a local folder), outputs cached per caption;
  ``W_c`` a learned projection to D.
* ``H_k = Fuse(W_h tau(y_k), Img(E(x_k)))``: the history encoder. ``Img``
  embeds the first-stage latent of frame ``k`` (posterior mode) as P patch
  tokens with learned positions and ``image_layers`` transformer layers (the
  role of BLIP's ViT); ``Fuse`` is ``fusion_layers`` layers of
  self-attention over the caption tokens, cross-attention from them to the
  image tokens, and an MLP (BLIP's image-grounded text encoder, the
  ``mode='multimodal'`` of ARLDM's ``mm_encoder``). Its output keeps the
  caption's L positions. ``history_encoder=blip`` uses BLIP itself from a
  local folder instead (``blip.py``: its ViT over the decoded frame, its
  text encoder over the caption, frozen, plus a learned projection to D).
* ``type_0 / type_1``: learned modality-type embeddings (current caption /
  history); ``time_k``: learned frame-time embedding of history segment k.
  As in ARLDM, the current caption gets no time embedding.

Mask (True = may be attended), for target ``j``: the current caption's real
tokens; history segment ``k``'s real tokens iff ``k < j`` (ARLDM's
``torch.triu`` square mask). So frame j never sees a frame or caption
``>= j`` other than its own caption; ``tests/test_story.py`` perturbs later
frames and captions and checks that the UNet output does not move.

Classifier-free guidance: a dropped row (probability ``ucg_rate``, 0.1 as in
ARLDM) has its caption replaced by the empty caption ``""`` and every history
segment by the *null segment* ``Fuse(W_h tau(""), Img(E(black frame)))``
(ARLDM's ``blip_text_null_token`` / ``blip_image_null_token``), under the
same causal mask; ``force_uncond`` drops every row (the unconditional branch
of guidance).

``history=False`` is the captions-only ablation: the history segments are
masked out entirely, which is the same function as leaving them out, so they
are not computed and the sequence is the current caption alone.

New characters (AR-LDM adds tokens for PororoSV / FlintstonesSV names that
the tokenizer splits): ``characters={"pororo": "penguin"}`` adds ``pororo``
as one token whose input embedding starts as the mean embedding of the word
pieces of ``"penguin"`` (``text.add_character_tokens``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Conditioner, MaskedCond
from .config import StoryConditionerConfig
from .text import EMPTY_CAPTION, TextConditioner, add_character_tokens

__all__ = ["StoryConditioner", "StoryConditionerConfig", "HistoryEncoder", "causal_history_mask"]

MODALITIES = 2  # type 0: the target frame's caption, type 1: a history segment


class ImageTokens(nn.Module):
    """Latent ``(N, c, h, w)`` -> ``(N, P, D)`` patch tokens with learned positions, then transformer layers."""

    def __init__(self, channels: int, height: int, width: int, dim: int, heads: int, patch: int, layers: int):
        super().__init__()
        if height % patch or width % patch:
            raise ConfigError(f"model.conditioning.story.patch: {patch} does not divide the "
                              f"{height}x{width} latent")
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (height // patch) * (width // patch), dim) * 0.02)
        self.layers = nn.ModuleList(_encoder_layer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, z: Tensor) -> Tensor:
        tokens = self.proj(z).flatten(2).transpose(1, 2) + self.pos  # (N, P, D)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm(tokens)


def _encoder_layer(dim: int, heads: int) -> nn.Module:
    return nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                      activation="gelu", batch_first=True, norm_first=True)


class HistoryEncoder(nn.Module):
    """(caption tokens, frame latent) -> fused caption tokens (BLIP's image-grounded text encoder).

    Each layer: self-attention over the caption tokens (padding masked),
    cross-attention from them to the image tokens, MLP; pre-norm residuals
    (``nn.TransformerDecoderLayer`` without a causal mask).
    """

    def __init__(self, text_dim: int, latent_shape: tuple[int, int, int], config: StoryConditionerConfig):
        super().__init__()
        c, h, w = latent_shape
        self.text_proj = nn.Linear(text_dim, config.dim)
        self.image = ImageTokens(c, h, w, config.dim, config.heads, config.patch, config.image_layers)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(config.dim, config.heads, dim_feedforward=4 * config.dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.fusion_layers))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, text: Tensor, text_mask: Tensor, latents: Tensor) -> Tensor:
        """text ``(N, L, Dt)``, text_mask ``(N, L)`` bool, latents ``(N, c, h, w)`` -> ``(N, L, D)``."""
        x = self.text_proj(text)
        image = self.image(latents)
        padding = ~text_mask
        for layer in self.layers:
            x = layer(x, image, tgt_key_padding_mask=padding)
        return self.norm(x)


def causal_history_mask(targets: Sequence[int], segments: int, device=None) -> Tensor:
    """``(T, segments)`` bool: row i may see history segment k iff ``k < targets[i]`` (ARLDM's triu mask)."""
    target = torch.as_tensor(list(targets), device=device).unsqueeze(1)  # (T, 1)
    return torch.arange(segments, device=device).unsqueeze(0) < target


class StoryConditioner(Conditioner):
    """Stories -> ``MaskedCond`` of the crossattn sequence (module docstring) for each target frame.

    Reads ``batch["captions"]`` (B lists of F str), ``batch["frames"]``
    ``(B, F, C, H, W)`` in [-1, 1] (frames at or after a target may hold
    anything: they are never seen) and optionally ``batch["targets"]``
    (frame indices; default all F). Returns ``(B * T, (1 + F - 1) * L, D)``
    and its ``(B * T, ...)`` mask, rows ordered ``(b, j)``.
    """

    kind = "crossattn"
    needs_first_stage = True

    def __init__(self, config: StoryConditionerConfig, frames: int, latent_shape: tuple[int, int, int]):
        super().__init__("captions", config.ucg_rate)
        if frames < 1:
            raise ConfigError(f"data.story.frames: a story needs at least 1 frame, got {frames}")
        self.config = config
        self.frames = frames
        self.text = TextConditioner(config.text_config())
        if config.characters:
            add_character_tokens(self.text.tokenizer, self.text.encoder, config.characters)
        text_dim = self.text.dim
        self.caption_proj = nn.Linear(text_dim, config.dim)
        self.type_embedding = nn.Embedding(MODALITIES, config.dim)
        self.time_embedding = nn.Embedding(max(frames - 1, 1), config.dim)
        has_history = config.history and frames > 1  # one-frame stories have no history
        self.history = self.build_history(config, text_dim, latent_shape) if has_history else None

    @staticmethod
    def build_history(config: StoryConditionerConfig, text_dim: int, latent_shape) -> nn.Module:
        if config.history_encoder == "blip":
            from .blip import BlipHistoryEncoder

            return BlipHistoryEncoder(config.blip_path, config.dim, config.max_length)
        return HistoryEncoder(text_dim, latent_shape, config)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def input_keys(self) -> tuple[str, ...]:
        return ("captions", "frames")

    def read(self, batch: dict) -> dict:
        if "captions" not in batch:
            raise KeyError("the story conditioner needs batch key 'captions' (B lists of F captions)")
        captions = batch["captions"]
        if not isinstance(captions, (list, tuple)) or not all(
                isinstance(story, (list, tuple)) and len(story) == self.frames for story in captions):
            raise ValueError(f"batch['captions'] must be B lists of {self.frames} captions (data.story.frames)")
        targets = [int(j) for j in batch.get("targets", range(self.frames))]
        if not targets or not all(0 <= j < self.frames for j in targets):
            raise ValueError(f"batch['targets'] must be frame indices in 0..{self.frames - 1}, got {targets}")
        frames = batch.get("frames")
        if self.history is not None:
            if frames is None:
                raise KeyError("the story conditioner needs batch key 'frames' (B, F, C, H, W) for the history")
            if frames.dim() != 5 or frames.shape[:2] != (len(captions), self.frames):
                raise ValueError(f"batch['frames'] must have shape (B, F, C, H, W) with B={len(captions)}, "
                                 f"F={self.frames}, got {tuple(frames.shape)}")
        return {"captions": captions, "frames": frames, "targets": targets}

    def forward(self, batch: dict, *, force_uncond: bool = False, force_zero: bool = False,
                generator: Optional[torch.Generator] = None,
                first_stage: Optional[nn.Module] = None) -> MaskedCond:
        value = self.read(batch)
        rows = len(value["captions"]) * len(value["targets"])
        device = self.caption_proj.weight.device
        if force_uncond:
            drop = torch.ones(rows, dtype=torch.bool, device=device)
        elif self.training and self.ucg_rate > 0:
            drop = torch.rand(rows, generator=generator, device=device) < self.ucg_rate
        else:
            drop = torch.zeros(rows, dtype=torch.bool, device=device)
        out = self.encode(value, drop, first_stage)
        return MaskedCond(torch.zeros_like(out.value), out.mask) if force_zero else out

    def encode(self, value: dict, drop: Tensor, first_stage: Optional[nn.Module] = None) -> MaskedCond:
        """``value`` from ``read``; ``drop: (B * T,)`` bool rows made unconditional."""
        captions, targets = value["captions"], value["targets"]
        stories, count = len(captions), len(targets)
        current = [captions[b][j] for b in range(stories) for j in targets]  # (B * T) story-major
        tokens, mask = self.text.encode(current, drop)  # "" for dropped rows
        sequence = self.caption_proj(tokens) + self.type_embedding.weight[0]  # (B*T, L, D)
        if self.history is None:
            return MaskedCond(sequence, mask)
        if first_stage is None:
            raise ValueError("the story conditioner needs the first stage (pass first_stage=...)")
        history, history_mask = self.history_rows(captions, value["frames"], count, drop, first_stage)
        segments = history.shape[1]
        history = history + self.type_embedding.weight[1] + self.time_embedding.weight[:segments, None, :]
        causal = causal_history_mask(targets, segments, drop.device).repeat(stories, 1)  # (B*T, S)
        history_mask = history_mask & causal.unsqueeze(-1)
        sequence = torch.cat([sequence, history.flatten(1, 2)], dim=1)
        return MaskedCond(sequence, torch.cat([mask, history_mask.flatten(1, 2)], dim=1))

    def history_rows(self, captions: list, frames: Tensor, count: int, drop: Tensor,
                     first_stage: nn.Module) -> tuple[Tensor, Tensor]:
        """Each row's history segments ``(B*T, F-1, L, D)`` and masks ``(B*T, F-1, L)`` before embeddings.

        A row's own segments, or the null segment in each place for a dropped
        row. Only what the rows use is encoded: the unconditional branch of
        guidance (every row dropped) never runs the history encoder on frames,
        and the null segment is fused only when some row is dropped.
        """
        shape = (len(captions) * count, self.frames - 1)
        if not drop.all():
            history, mask = self.encode_history(captions, frames, first_stage)  # (B, F-1, L, D)
            history = history.repeat_interleave(count, dim=0)
            mask = mask.repeat_interleave(count, dim=0)
        if not drop.any():
            return history, mask
        null, null_mask = self.null_segment(first_stage, frames)  # (L, D), (L,)
        null = null.expand(*shape, *null.shape)
        null_mask = null_mask.expand(*shape, *null_mask.shape)
        if drop.all():
            return null, null_mask
        return (torch.where(drop.view(-1, 1, 1, 1), null, history),
                torch.where(drop.view(-1, 1, 1), null_mask, mask))

    def encode_history(self, captions: list, frames: Tensor, first_stage: nn.Module) -> tuple[Tensor, Tensor]:
        """Fused segments of frames 0 .. F-2: ``(B, F-1, L, D)`` and their token masks ``(B, F-1, L)``."""
        segments = self.frames - 1
        stories = len(captions)
        texts = [captions[b][k] for b in range(stories) for k in range(segments)]
        fused, mask = self.fuse(texts, frames[:, :segments].flatten(0, 1), first_stage)
        return fused.unflatten(0, (stories, segments)), mask.unflatten(0, (stories, segments))

    def null_segment(self, first_stage: nn.Module, frames: Tensor) -> tuple[Tensor, Tensor]:
        """The history segment of a dropped row: the empty caption fused with a black frame."""
        fused, mask = self.fuse([EMPTY_CAPTION], -torch.ones_like(frames[:1, 0]), first_stage)
        return fused[0], mask[0]

    def fuse(self, texts: list[str], frames: Tensor, first_stage: nn.Module) -> tuple[Tensor, Tensor]:
        """N captions with their frames ``(N, C, H, W)`` -> fused segments ``(N, L, D)`` and masks ``(N, L)``."""
        if self.config.history_encoder == "blip":
            return self.history(texts, frames)
        tokens, mask = self.text.encode(texts, torch.zeros(len(texts), dtype=torch.bool))
        return self.history(tokens, mask, self.frame_latents(frames, first_stage)), mask

    @staticmethod
    def frame_latents(images: Tensor, first_stage: nn.Module) -> Tensor:
        """Frames ``(N, C, H, W)`` -> the first stage's posterior mode (the frame itself in pixel space)."""
        with torch.no_grad():
            return first_stage.encode(images, sample=False)

    def train(self, mode: bool = True) -> "StoryConditioner":
        super().train(mode)
        self.text.train(mode)  # keeps a frozen encoder in eval mode
        return self

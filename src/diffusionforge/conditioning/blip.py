"""BLIP's image-grounded text encoder as the story history encoder, from a local folder.

AR-LDM fuses each earlier (caption, frame) pair with BLIP (Li et al. 2022):
the ViT encodes the frame, and the BERT text encoder, whose layers
cross-attend to the ViT tokens, encodes the caption (``mode='multimodal'`` of
ARLDM's ``mm_encoder``). Here the same pair of networks comes from a local
Hugging Face ``BlipForImageTextRetrieval`` folder (e.g. a saved
``Salesforce/blip-itm-base-coco``) through ``transformers``, never from the
network, frozen; a learned projection maps its hidden size to the story
sequence width ``D``.

| name        | shape              | meaning                                          |
|-------------|--------------------|--------------------------------------------------|
| captions    | N str              | the captions of the history frames               |
| frames      | (N, C, H, W)       | the frames in [-1, 1] (grey frames repeated to RGB)|
| pixels      | (N, 3, R, R)       | resized to the ViT's ``image_size`` R (bicubic),  |
|             |                    | normalised with the folder's image mean / std     |
| out         | (N, L, D)          | projected text-encoder states, one per token      |
| mask        | (N, L) bool        | real caption tokens                               |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from .text import check_model_folder, load_local_pretrained

# BLIP's preprocessing (the OpenAI CLIP statistics) when the folder has no preprocessor_config.json
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_blip(path: Union[str, Path]):
    """``(tokenizer, BlipForImageTextRetrieval, mean, std)`` from a local folder; one-line errors."""
    directory = Path(path)
    what = "BLIP history encoder"
    check_model_folder(what, directory)
    try:
        from transformers import AutoTokenizer, BlipForImageTextRetrieval
    except ImportError:
        raise CheckpointError("the BLIP history encoder needs the 'transformers' package") from None
    tokenizer, model = load_local_pretrained(what, directory, AutoTokenizer, BlipForImageTextRetrieval)
    mean, std = BLIP_MEAN, BLIP_STD
    preprocessor = directory / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean, std = tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
    return tokenizer, model, mean, std


class BlipHistoryEncoder(nn.Module):
    """(captions, frames) -> BLIP's image-grounded caption states projected to ``dim`` (module docstring)."""

    def __init__(self, path: Union[str, Path], dim: int, max_length: int):
        super().__init__()
        self.tokenizer, blip, mean, std = load_blip(path)
        self.vision = blip.vision_model.requires_grad_(False).eval()
        self.text = blip.text_encoder.requires_grad_(False).eval()
        self.max_length = max_length
        self.image_size = blip.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.proj = nn.Linear(blip.config.text_config.hidden_size, dim)

    def train(self, mode: bool = True) -> "BlipHistoryEncoder":
        super().train(mode)
        self.vision.eval()  # frozen: no dropout
        self.text.eval()
        return self

    def pixels(self, frames: Tensor) -> Tensor:
        """Frames in [-1, 1] -> the ViT's normalised RGB input."""
        if frames.shape[1] == 1:
            frames = frames.expand(-1, 3, -1, -1)
        size = (self.image_size, self.image_size)
        images = F.interpolate((frames + 1) / 2, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return (images - self.mean) / self.std

    def forward(self, captions: list[str], frames: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        ids = tokens["input_ids"].to(frames.device)
        mask = tokens["attention_mask"].to(frames.device)
        with torch.no_grad():
            image = self.vision(pixel_values=self.pixels(frames)).last_hidden_state  # (N, P, Dv)
            image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=frames.device)
            states = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                               encoder_attention_mask=image_mask).last_hidden_state  # (N, L, Dt)
        return self.proj(states), mask.bool()

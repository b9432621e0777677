"""Backbone hyper-parameters: ``UNetConfig``, ``DiTConfig`` and the DiT model table.

Torch-free, so loading a config (``config/schema.py``) never imports a
network: ``unet.py`` and ``dit.py`` build the modules from these and
re-export them. Validation runs in ``__post_init__``: a bad value is a
one-line ``ConfigError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from diffusionforge.errors import ConfigError

__all__ = ["DIT_MODELS", "DiTConfig", "LORA_TARGETS", "LabelDiTConfig", "LoRAConfig", "UNetConfig"]


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


# name -> (depth, hidden_size, num_heads, patch_size); Table 1 of Peebles & Xie 2023.
DIT_MODELS: dict[str, tuple[int, int, int, int]] = {
    f"DiT-{size}/{patch}": (*dims, patch)
    for size, dims in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items()
    for patch in (2, 4, 8)
}
_SMALL = (6, 256, 4, 2)  # depth, hidden, heads, patch when neither name nor the fields are given
_ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")


@dataclass
class DiTConfig:
    """Hyper-parameters of ``DiT``. ``name`` (e.g. ``"DiT-S/2"``) fills the four architecture fields."""

    name: Optional[str] = None  # one of DIT_MODELS; fills depth/hidden_size/num_heads/patch_size
    depth: Optional[int] = None  # transformer blocks (None: from name, else 6)
    hidden_size: Optional[int] = None  # token width D (None: from name, else 256)
    num_heads: Optional[int] = None  # attention heads (None: from name, else 4)
    patch_size: Optional[int] = None  # p (None: from name, else 2)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D
    in_channels: int = 4  # channels of x (without concat); derived from data / latents
    out_channels: int = 4  # 2 * in_channels for a learned sigma; derived from the process
    input_size: Optional[int] = None  # H = W of x; derived from data / latents in a run
    vector_dim: Optional[int] = None  # width of cond["vector"]; derived from the conditioners
    context_dim: Optional[int] = None  # width of cond["crossattn"]; adds cross-attention per block
    concat_channels: int = 0  # channels of cond["concat"]
    frequency_embedding_size: int = 256  # sinusoidal timestep features fed to t_embedder
    timestep_freq_shift: int = 0  # 0 = official DiT; diffusers' DiTTransformer2DModel uses 1
    mlp_norm_eps: float = 1e-6  # eps of the LayerNorm before the MLP (diffusers' DiT: its norm_eps, 1e-5)

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in DIT_MODELS:
            raise ConfigError(f"DiTConfig.name '{self.name}' is not one of {sorted(DIT_MODELS)}")
        base = DIT_MODELS[self.name] if self.name is not None else _SMALL
        for field_name, value in zip(_ARCH_FIELDS, base):
            given = getattr(self, field_name)
            if given is None:
                setattr(self, field_name, value)
            elif self.name is not None and given != value:
                raise ConfigError(f"DiTConfig.{field_name}={given} contradicts name {self.name} "
                                  f"({field_name} {value}); set one or the other ({field_name}=null "
                                  f"takes the name's)")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name",) or value is None:
                continue
            if f.type in ("int", "Optional[int]") and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"DiTConfig.{f.name} must be an integer, got {value!r}")
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "out_channels",
                     "input_size", "frequency_embedding_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"DiTConfig.num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.hidden_size % 4:
            raise ConfigError(f"DiTConfig.hidden_size must be a multiple of 4 (2-D sin-cos embedding), "
                              f"got {self.hidden_size}")
        if self.input_size is not None and self.input_size % self.patch_size:
            raise ConfigError(f"DiTConfig.patch_size {self.patch_size} does not divide the input size "
                              f"{self.input_size} (image or latent side)")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("vector_dim", "context_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"DiTConfig.{name} must be None or >= 1, got {value}")

    @property
    def grid_size(self) -> int:
        """Patches per side, ``input_size / patch_size``."""
        return self.input_size // self.patch_size

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels


@dataclass
class LabelDiTConfig(DiTConfig):
    """A class-conditional DiT as published: ``num_classes`` labels plus a null class."""

    num_classes: int = 1000  # K; the label table has K + 1 rows (the last is the null class)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.vector_dim = self.hidden_size  # the label table's rows add to the timestep embedding
        if self.num_classes < 1:
            raise ConfigError(f"LabelDiTConfig.num_classes must be >= 1, got {self.num_classes}")


# The attention projections LoRA can adapt, per backbone (the module names of backbones/attention.py's
# CrossAttention and backbones/dit.py's Attention; "to_out" is to_out.0, the Linear before the dropout).
LORA_TARGETS = {"unet": ("to_q", "to_k", "to_v", "to_out"), "dit": ("qkv", "proj")}


@dataclass
class LoRAConfig:
    """Low-rank adapters on the backbone's attention projections (``model.lora``; Hu et al. 2022, through peft):
    ``W x + (alpha / rank) B A x`` with ``A: (rank, d_in)``, ``B: (d_out, rank)`` zero at the start. With
    ``rank`` > 0 only the adapters of the backbone train (its own weights are frozen; the conditioner follows
    ``model.freeze``); the run needs ``init_from``."""

    rank: int = 0  # r; 0 = no LoRA
    alpha: Optional[float] = None  # the scale's numerator; None = rank (scale 1)
    targets: Optional[list[str]] = None  # projections to adapt: unet to_q, to_k, to_v, to_out; dit qkv, proj; None = all of the backbone's
    dropout: float = 0.0  # dropout on the adapters' input (peft lora_dropout)

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"model.lora.rank: must be >= 0 (0 = no LoRA), got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha: must be > 0 (or null = rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")
        known = sorted({name for names in LORA_TARGETS.values() for name in names})
        if self.targets is not None and (not self.targets or any(t not in known for t in self.targets)):
            raise ConfigError(f"model.lora.targets: a non-empty list of {', '.join(known)}, got {self.targets}")

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of ``B A``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

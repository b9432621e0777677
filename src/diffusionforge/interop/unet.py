"""Stable Diffusion UNet interop: diffusers ``UNet2DConditionModel`` and CompVis state dicts.

Our ``UNet`` has the module tree of CompVis LDM's ``openaimodel.UNetModel``
(Rombach et al. 2022), so a CompVis / Stable Diffusion v1-v2 checkpoint loads
after stripping the ``model.diffusion_model.`` prefix. diffusers stores the
same network (SD v1/v2 family: ``CrossAttnDownBlock2D``/``DownBlock2D``,
``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D``/``UpBlock2D``) under other
names; this module maps configs and state dicts both ways, one function per
direction, and reads/writes diffusers model folders
(``config.json`` + ``diffusion_pytorch_model.safetensors``).

Key mapping (ours = LDM; ``r = num_res_blocks``, level ``l`` counted from the
top, up block ``u = n_levels - 1 - l``):

==============================================  =============================================
ours (LDM)                                      diffusers
==============================================  =============================================
``time_embed.0`` / ``.2``                       ``time_embedding.linear_1`` / ``linear_2``
``input_blocks.0.0``                            ``conv_in``
``input_blocks.{1 + l(r+1) + j}.0`` / ``.1``    ``down_blocks.l.resnets.j`` / ``attentions.j``
``input_blocks.{(l+1)(r+1)}.0.op``              ``down_blocks.l.downsamplers.0.conv``
``middle_block.0`` / ``.1`` / ``.2``            ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``output_blocks.{u(r+1) + j}.0`` / ``.1``       ``up_blocks.u.resnets.j`` / ``attentions.j`` (j <= r)
``output_blocks.{u(r+1) + r}.{1|2}.conv``       ``up_blocks.u.upsamplers.0.conv``
``out.0`` / ``out.2``                           ``conv_norm_out`` / ``conv_out``
ResBlock ``in_layers.0``, ``in_layers.2``       ResnetBlock2D ``norm1``, ``conv1``
``emb_layers.1``, ``out_layers.0``, ``.3``      ``time_emb_proj``, ``norm2``, ``conv2``
``skip_connection``                             ``conv_shortcut``
==============================================  =============================================

SpatialTransformer parameter names are identical on both sides; no tensor is
reshaped, so the round trip is exact.

diffusers naming quirk: in SD v1/v2 configs ``attention_head_dim`` is the
number of heads (an int, or one entry per level: SD v2 ``[5, 10, 20, 20]`` =
64 channels per head). An int maps to ``UNetConfig.num_heads``, a list to
``num_head_channels`` (or to ``num_heads`` when the list is constant but the
head width is not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from diffusionforge.backbones.unet import UNet, UNetConfig
from diffusionforge.errors import CheckpointError, ConfigError

from .files import (
    DIFFUSERS_CONFIG_NAME,
    DIFFUSERS_WEIGHTS_NAME,
    diffusers_folder,
    load_checked,
    read_json,
    read_safetensors,
    write_diffusers_folder,
)

__all__ = [
    "COMPVIS_UNET_PREFIX",
    "DIFFUSERS_UNET_CONFIG",
    "DIFFUSERS_UNET_WEIGHTS",
    "load_compvis_unet",
    "load_diffusers_unet",
    "save_diffusers_unet",
    "sd_v1_unet_config",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_state_dict_from_diffusers",
    "unet_state_dict_to_diffusers",
]

DIFFUSERS_UNET_CONFIG = DIFFUSERS_CONFIG_NAME  # file names of a diffusers model folder
DIFFUSERS_UNET_WEIGHTS = DIFFUSERS_WEIGHTS_NAME
COMPVIS_UNET_PREFIX = "model.diffusion_model."  # UNet keys inside a CompVis LDM checkpoint
COMPVIS_IGNORED_PREFIXES = ("first_stage_model.", "cond_stage_model.", "model_ema.")  # other parts of it

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers' own defaults for the keys we map (old config.json files omit some).
_MAPPED_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN],
    "up_block_types": [PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP],
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "cross_attention_dim": 1280,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "transformer_layers_per_block": 1,
    "resnet_time_scale_shift": "default",
    "dropout": 0.0,
}

# Keys outside the SD v1/v2 architecture: each must hold one of these values.
_FIXED: dict[str, tuple] = {
    **dict.fromkeys(("addition_embed_type", "addition_time_embed_dim", "class_embed_type", "cross_attention_norm",
                     "encoder_hid_dim", "encoder_hid_dim_type", "num_class_embeds",
                     "projection_class_embeddings_input_dim", "reverse_transformer_layers_per_block",
                     "time_cond_proj_dim", "time_embedding_act_fn", "timestep_post_act"), (None,)),
    **dict.fromkeys(("center_input_sample", "class_embeddings_concat", "dual_cross_attention",
                     "only_cross_attention", "resnet_skip_time_act"), (False,)),
    "act_fn": ("silu",), "attention_type": ("default",), "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "mid_block_only_cross_attention": (None, False),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "downsample_padding": (1,),
    "flip_sin_to_cos": (True,), "freq_shift": (0,),  # cos-first sinusoids, as timestep_embedding
    "mid_block_scale_factor": (1,), "resnet_out_scale_factor": (1.0,), "norm_eps": (1e-5,),
}

# Keys with no effect on the float32 network: sample size (a pipeline default),
# upcast_attention (fp16 softmax precision), heads of the unused addition embedding.
_IGNORED = ("sample_size", "upcast_attention", "addition_embed_type_num_heads", "time_embedding_dim")

_SCALE_SHIFT = {"default": False, "scale_shift": True}  # resnet_time_scale_shift -> use_scale_shift_norm


# ------------------------------------------------------------------ configs
def sd_v1_unet_config() -> UNetConfig:
    """The Stable Diffusion v1 UNet (CompVis ``v1-inference.yaml``): 859,520,964 parameters."""
    return UNetConfig(
        in_channels=4,
        out_channels=4,
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(1, 2, 4),  # the yaml lists 4, 2, 1; the order does not matter
        num_heads=8,
        transformer_depth=1,
        context_dim=768,
        use_scale_shift_norm=False,
    )


def unet_config_from_diffusers(config_json: Mapping[str, Any]) -> UNetConfig:
    """``UNetConfig`` of a diffusers ``UNet2DConditionModel`` config (SD v1/v2 family).

    Raises ``CheckpointError`` naming the config key for anything outside that
    family (class/addition embeddings, other activations, time embeddings,
    block types, ...).
    """
    cfg = {**_MAPPED_DEFAULTS, **{k: v for k, v in config_json.items() if not k.startswith("_")}}
    _check_fixed_keys(cfg)
    channels = _as_list(cfg, "block_out_channels")
    if not all(isinstance(c, int) and c >= 1 for c in channels):
        raise _unsupported("block_out_channels", channels, "expected positive integers")
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        why = f"every entry must be a multiple of the first, {model_channels}"
        raise _unsupported("block_out_channels", channels, why)
    time_dim = cfg.get("time_embedding_dim")
    if time_dim not in (None, 4 * model_channels):
        raise _unsupported("time_embedding_dim", time_dim, "the SD UNet uses 4 * block_out_channels[0]")
    attention = _attention_levels(cfg, len(channels))
    try:
        return UNetConfig(
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            model_channels=model_channels,
            channel_mult=tuple(c // model_channels for c in channels),
            num_res_blocks=_uniform(cfg, "layers_per_block"),
            attention_resolutions=tuple(2**level for level in attention),
            dropout=float(cfg["dropout"]),
            use_scale_shift_norm=_scale_shift(cfg),
            norm_groups=_norm_groups(cfg),
            context_dim=_uniform(cfg, "cross_attention_dim"),
            transformer_depth=_uniform(cfg, "transformer_layers_per_block"),
            use_linear_in_transformer=bool(cfg["use_linear_projection"]),
            **_heads_from_diffusers(cfg, channels, attention),
        )
    except ConfigError as err:
        raise CheckpointError(f"diffusers UNet config does not describe a valid UNet: {err}") from None


def unet_config_to_diffusers(config: UNetConfig, *, sample_size: Optional[int] = None) -> dict[str, Any]:
    """A ``config.json`` dict that ``diffusers.UNet2DConditionModel.from_pretrained`` builds ``config`` from.

    Raises ``CheckpointError`` naming the ``UNetConfig`` field that the SD
    v1/v2 diffusers layout cannot express.
    """
    unsupported = {
        "context_dim": (config.context_dim is None, "UNet2DConditionModel always has cross-attention"),
        "vector_dim": (config.vector_dim is not None, "a label embedding is not part of SD v1/v2"),
        "concat_channels": (config.concat_channels > 0, "fold them into in_channels"),
        "resblock_updown": (config.resblock_updown, "SD resamples with Down/Upsample convs"),
        "conv_resample": (not config.conv_resample, "SD resamples with Down/Upsample convs"),
    }
    for field, (bad, why) in unsupported.items():
        if bad:
            raise CheckpointError(f"cannot export to diffusers: UNetConfig.{field}={getattr(config, field)!r} ({why})")
    channels = [config.model_channels * m for m in config.channel_mult]
    cross = [2**level in config.attention_resolutions for level in range(len(channels))]
    if config.num_head_channels == -1:
        heads: Any = config.num_heads
    else:
        heads = [max(1, c // config.num_head_channels) for c in channels]  # unused where there is no attention
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": channels,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": [CROSS_DOWN if c else PLAIN_DOWN for c in cross],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [CROSS_UP if c else PLAIN_UP for c in reversed(cross)],
        "attention_head_dim": heads,  # diffusers' name for the number of heads
        "cross_attention_dim": config.context_dim,
        "transformer_layers_per_block": config.transformer_depth,
        "use_linear_projection": config.use_linear_in_transformer,
        "norm_num_groups": config.norm_groups,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "dropout": config.dropout,
    }


def _unsupported(key: str, value: Any, why: str) -> CheckpointError:
    """The one-line error for a config key outside the SD v1/v2 family (the caller raises it)."""
    return CheckpointError(f"diffusers UNet config: {key}={value!r} is not supported ({why})")


def _as_list(cfg: Mapping[str, Any], key: str) -> list:
    value = cfg[key]
    if not isinstance(value, (list, tuple)) or not value:
        raise _unsupported(key, value, "expected a non-empty list")
    return list(value)


def _uniform(cfg: Mapping[str, Any], key: str) -> Any:
    """An int config value, or a list whose entries are all equal (one value per level)."""
    value = cfg[key]
    if isinstance(value, (list, tuple)):
        if not value or any(v != value[0] for v in value) or isinstance(value[0], (list, tuple)):
            raise _unsupported(key, value, "only the same value at every level is supported")
        value = value[0]
    return value


def _check_fixed_keys(cfg: Mapping[str, Any]) -> None:
    for key, value in cfg.items():
        if key in _MAPPED_DEFAULTS or key in _IGNORED:
            continue
        if key not in _FIXED:
            raise _unsupported(key, value, "unknown UNet2DConditionModel option")
        if isinstance(value, (list, tuple)):
            value = _uniform(cfg, key)
        if value not in _FIXED[key]:
            raise _unsupported(key, value, f"the SD v1/v2 UNet needs {' or '.join(map(repr, _FIXED[key]))}")


def _attention_levels(cfg: Mapping[str, Any], levels: int) -> list[int]:
    """Levels whose down and up blocks have cross-attention (they must mirror each other)."""
    down, up = _as_list(cfg, "down_block_types"), _as_list(cfg, "up_block_types")
    for key, blocks, known in (("down_block_types", down, (CROSS_DOWN, PLAIN_DOWN)),
                               ("up_block_types", up, (CROSS_UP, PLAIN_UP))):
        if len(blocks) != levels:
            raise _unsupported(key, blocks, f"expected one entry per block_out_channels entry ({levels})")
        for block in blocks:
            if block not in known:
                raise _unsupported(key, blocks, f"block {block!r}; the SD v1/v2 UNet uses {' and '.join(known)}")
    attention = [level for level, block in enumerate(down) if block == CROSS_DOWN]
    mirrored = [CROSS_UP if level in attention else PLAIN_UP for level in reversed(range(levels))]
    if up != mirrored:
        raise _unsupported("up_block_types", up, f"must mirror down_block_types, i.e. {mirrored}")
    return attention


def _heads_from_diffusers(cfg: Mapping[str, Any], channels: list[int], attention: list[int]) -> dict[str, int]:
    """``num_heads`` or ``num_head_channels`` from diffusers' heads per level (see the module docstring)."""
    key = "attention_head_dim" if cfg["num_attention_heads"] is None else "num_attention_heads"
    heads = cfg[key]
    if not isinstance(heads, (list, tuple)):
        return {"num_heads": heads}
    if len(heads) != len(channels):
        raise _unsupported(key, heads, f"expected one entry per block_out_channels entry ({len(channels)})")
    used = sorted({*attention, len(channels) - 1})  # the middle block uses the last entry
    widths = {divmod(channels[i], heads[i]) if heads[i] else (0, 1) for i in used}  # (channels per head, rest)
    if len(widths) == 1 and next(iter(widths))[1] == 0:
        return {"num_head_channels": next(iter(widths))[0]}
    if len({heads[i] for i in used}) == 1:
        return {"num_heads": heads[used[0]]}
    raise _unsupported(key, heads, "heads must be the same at every attention level, or the channels per head")
    return {}  # unreachable


def _scale_shift(cfg: Mapping[str, Any]) -> bool:
    value = cfg["resnet_time_scale_shift"]
    if value not in _SCALE_SHIFT:
        raise _unsupported("resnet_time_scale_shift", value, f"expected one of {sorted(_SCALE_SHIFT)}")
    return _SCALE_SHIFT[value]


def _norm_groups(cfg: Mapping[str, Any]) -> int:
    if cfg["norm_num_groups"] is None:
        raise _unsupported("norm_num_groups", None, "the SD UNet normalises its output")
    return cfg["norm_num_groups"]


# -------------------------------------------------------------- state dicts
_RESNET_NAMES = {  # ours (LDM ResBlock) -> diffusers ResnetBlock2D
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _module_pairs(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """``(our module, diffusers module, is_resblock)`` for every module holding weights."""
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("middle_block.0", "mid_block.resnets.0", True),
        ("middle_block.1", "mid_block.attentions.0", False),
        ("middle_block.2", "mid_block.resnets.1", True),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
    ]
    levels, r = len(config.channel_mult), config.num_res_blocks
    block = 1
    for level in range(levels):
        attn = 2**level in config.attention_resolutions
        for j in range(r):
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", True))
            if attn:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", False))
            block += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False))
            block += 1
    block = 0
    for u, level in enumerate(reversed(range(levels))):
        attn = 2**level in config.attention_resolutions
        for j in range(r + 1):
            pairs.append((f"output_blocks.{block}.0", f"up_blocks.{u}.resnets.{j}", True))
            if attn:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{u}.attentions.{j}", False))
            if level and j == r:
                upsample = f"output_blocks.{block}.{2 if attn else 1}.conv"  # after the attention, if any
                pairs.append((upsample, f"up_blocks.{u}.upsamplers.0.conv", False))
            block += 1
    return pairs


def _key_renamer(config: UNetConfig, to_diffusers: bool) -> Callable[[str], str]:
    """A function renaming one key through ``_module_pairs``; an unknown key raises CheckpointError."""
    src, dst = (0, 1) if to_diffusers else (1, 0)
    table = {pair[src]: pair for pair in _module_pairs(config)}
    resnet = _RESNET_NAMES if to_diffusers else {v: k for k, v in _RESNET_NAMES.items()}

    def rename(key: str) -> str:
        parts = key.split(".")
        pair = next((table[p] for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in table), None)
        rest = key[len(pair[src]) + 1:] if pair else ""
        if pair and pair[2]:
            module, _, param = rest.rpartition(".")
            rest = f"{resnet[module]}.{param}" if module in resnet else ""
        if not rest:
            side = "ours" if to_diffusers else "diffusers"
            raise CheckpointError(f"unexpected key {key!r} ({side}): no counterpart in this UNet config's layout")
        return f"{pair[dst]}.{rest}"

    return rename


def unet_state_dict_to_diffusers(sd: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Our (= CompVis LDM, unprefixed) UNet state dict -> diffusers ``UNet2DConditionModel`` keys."""
    rename = _key_renamer(config, to_diffusers=True)
    return {rename(key): value for key, value in sd.items()}


def unet_state_dict_from_diffusers(sd: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict -> our (= CompVis LDM) keys; inverse of the above."""
    rename = _key_renamer(config, to_diffusers=False)
    return {rename(key): value for key, value in sd.items()}


# -------------------------------------------------------------------- files
def load_diffusers_unet(directory: str | Path) -> UNet:
    """Our ``UNet`` (eval mode) from a diffusers model folder (config.json + safetensors weights).

    ``directory`` may also be a pipeline folder with a ``unet/`` subfolder.
    Errors name the file and, for weights, the first bad key as the file spells it.
    """
    config_path, weights_path = diffusers_folder(directory, "unet", "UNet")
    config_json = read_json(config_path)
    try:
        config = unet_config_from_diffusers(config_json)
    except CheckpointError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    weights = read_safetensors(weights_path)
    try:
        state = unet_state_dict_from_diffusers(weights, config)
    except CheckpointError as err:
        raise CheckpointError(f"{weights_path}: {err}") from None
    unet = UNet(config)
    load_checked(unet, state, str(weights_path), "UNet", name=_key_renamer(config, to_diffusers=True))
    unet.sample_size = config_json.get("sample_size")
    return unet.eval()


def save_diffusers_unet(unet: UNet, directory: str | Path, *, sample_size: Optional[int] = None) -> Path:
    """Write ``unet`` as a diffusers ``UNet2DConditionModel`` folder (config.json + safetensors); return it.

    ``sample_size`` (latent pixels) is only a pipeline default; None: the UNet's own ``sample_size`` (a run's
    latent side, a diffusers folder's value), unset when that is unknown too.
    """
    sample_size = getattr(unet, "sample_size", None) if sample_size is None else sample_size
    config_json = unet_config_to_diffusers(unet.config, sample_size=sample_size)
    return write_diffusers_folder(directory, config_json, unet_state_dict_to_diffusers(unet.state_dict(), unet.config))


def load_compvis_unet(state_dict: Mapping[str, Any], config: UNetConfig) -> UNet:
    """Our ``UNet`` (eval mode) from a CompVis / LDM checkpoint's state dict.

    Accepts a whole LDM checkpoint (``{"state_dict": ...}`` or its contents):
    with ``model.diffusion_model.`` keys present only those are used; the
    first-stage, text-encoder, EMA and schedule-buffer entries are ignored.
    Bare UNet keys (our own state dict) load as they are.
    """
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping):
        state_dict = inner
    keys = [k for k in state_dict if not k.startswith(COMPVIS_IGNORED_PREFIXES)]
    if any(k.startswith(COMPVIS_UNET_PREFIX) for k in keys):
        state = {k[len(COMPVIS_UNET_PREFIX):]: state_dict[k] for k in keys if k.startswith(COMPVIS_UNET_PREFIX)}
    else:
        state = {k: state_dict[k] for k in keys}
    return load_checked(UNet(config), state, "CompVis UNet state dict", "UNet").eval()

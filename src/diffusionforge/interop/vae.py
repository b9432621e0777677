"""KL-autoencoder weights in the diffusers and CompVis (LDM / Stable Diffusion) formats.

``AutoencoderKL`` uses CompVis' module names, so a CompVis state dict needs
only its ``first_stage_model.`` prefix stripped. diffusers names the same
tensors differently; one table (``_RENAMES``) maps them both ways:

==========================================  ==============================================
ours (= CompVis)                            diffusers ``AutoencoderKL``
==========================================  ==============================================
``encoder.down.{i}.block.{j}.``             ``encoder.down_blocks.{i}.resnets.{j}.``
``encoder.down.{i}.downsample.``            ``encoder.down_blocks.{i}.downsamplers.0.``
``decoder.up.{i}.block.{j}.``               ``decoder.up_blocks.{L-1-i}.resnets.{j}.``
``decoder.up.{i}.upsample.``                ``decoder.up_blocks.{L-1-i}.upsamplers.0.``
``mid.block_1.`` / ``mid.block_2.``         ``mid_block.resnets.0.`` / ``.1.``
``mid.attn_1.{norm,q,k,v,proj_out}.``       ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.``
``nin_shortcut.``                           ``conv_shortcut.``
``norm_out.``                               ``conv_norm_out.``
==========================================  ==============================================

``L`` is the number of levels (diffusers lists decoder blocks lowest
resolution first, LDM by level). The attention projections are 1x1 convs
``(C, C, 1, 1)`` here and Linear ``(C, C)`` in diffusers; the maps reshape.
What diffusers cannot express (attention inside levels, linear attention,
``z_channels != embed_dim``) is refused with a one-line error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from einops import rearrange
from torch import Tensor

from diffusionforge.errors import CheckpointError, DForgeError
from diffusionforge.first_stage.autoencoder import AutoencoderConfig, AutoencoderKL

from .files import diffusers_folder, load_checked, read_json, read_safetensors, write_diffusers_folder

__all__ = [
    "load_compvis_vae",
    "load_diffusers_vae",
    "save_diffusers_vae",
    "sd_v1_vae_config",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_to_diffusers",
]

COMPVIS_PREFIX = "first_stage_model."  # the autoencoder's prefix inside an LDM / SD checkpoint
SD_V1_SCALING_FACTOR = 0.18215  # SD v1 latent scale: 1 / std of its latents (LDM App. D.1)

# (ours, diffusers); {i}, {j}: same index; {u} (ours) and {r} (diffusers): r = L - 1 - u.
_RENAMES = [
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{u}.block.{j}.", "decoder.up_blocks.{r}.resnets.{j}."),
    ("decoder.up.{u}.upsample.", "decoder.up_blocks.{r}.upsamplers.0."),
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
    ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
    ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
    ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
    ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0."),
    ("nin_shortcut.", "conv_shortcut."),
    ("norm_out.", "conv_norm_out."),
]
# Attention names of diffusers checkpoints written before 0.14 (still accepted by diffusers).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_WEIGHT = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


# ------------------------------------------------------------- key mapping
def _compile(template: str) -> re.Pattern:
    """``"a.{i}.b."`` -> a regex with a named digit group per placeholder, anchored at a key segment."""
    pattern = re.escape(template)
    for name in "ijur":
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(r"(?<![^.])" + pattern)


def _rename_rules(to_diffusers: bool, levels: int) -> list[tuple[re.Pattern, Callable[[re.Match], str]]]:
    """Regex substitutions mapping keys in one direction; ``levels`` = L for the decoder reversal."""
    rules = []
    for ours, theirs in _RENAMES:
        source, target = (ours, theirs) if to_diffusers else (theirs, ours)

        def fill(match: re.Match, target: str = target) -> str:
            groups = {k: int(v) for k, v in match.groupdict().items()}
            if "u" in groups:
                groups["r"] = levels - 1 - groups["u"]
            if "r" in groups:
                groups["u"] = levels - 1 - groups["r"]
            return target.format(**groups)

        rules.append((_compile(source), fill))
    return rules


def _rename(key: str, rules) -> str:
    for pattern, fill in rules:
        key = pattern.sub(fill, key)
    return key


def _count_levels(keys, pattern: str) -> int:
    """1 + the largest decoder level index found by ``pattern`` (0 when there is no decoder)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def vae_state_dict_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our (= CompVis) ``AutoencoderKL`` state dict -> diffusers ``AutoencoderKL`` names and shapes."""
    rules = _rename_rules(True, _count_levels(state_dict, r"decoder\.up\.(\d+)\."))
    out = {}
    for key, value in state_dict.items():
        if _ATTN_WEIGHT.search(key) and value.ndim == 4:
            value = rearrange(value, "o i 1 1 -> o i")  # 1x1 conv -> Linear
        out[_rename(key, rules)] = value
    return out


def vae_state_dict_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict (current or pre-0.14 attention names) -> ours."""
    rules = _rename_rules(False, _count_levels(state_dict, r"decoder\.up_blocks\.(\d+)\."))
    legacy = re.compile(r"(?<=attentions\.0\.)(" + "|".join(_LEGACY_ATTENTION) + r")(?=\.)")
    out = {}
    for key, value in state_dict.items():
        key = _rename(legacy.sub(lambda m: _LEGACY_ATTENTION[m.group(1)], key), rules)
        if _ATTN_WEIGHT.search(key) and value.ndim == 2:
            value = rearrange(value, "o i -> o i 1 1")  # Linear -> 1x1 conv
        out[key] = value
    return out


# ------------------------------------------------------------------ configs
def sd_v1_vae_config() -> AutoencoderConfig:
    """The Stable Diffusion v1 autoencoder (``kl-f8``, 4 latent channels, 83,653,863 parameters)."""
    return AutoencoderConfig(
        in_channels=3,
        out_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attn_resolutions=(),
        z_channels=4,
        embed_dim=4,
        norm_groups=32,
        resolution=256,
        scaling_factor=SD_V1_SCALING_FACTOR,
    )


def _diffusers_requires(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise CheckpointError(f"diffusers AutoencoderKL config: {key} {message}")


def vae_config_from_diffusers(config_json: Mapping[str, Any]) -> AutoencoderConfig:
    """A diffusers ``AutoencoderKL`` config (the dict of its config.json) -> ``AutoencoderConfig``.

    Missing keys take diffusers' defaults. Features our network does not
    have (other block types or activations, no quant convs, latent shift or
    per-channel statistics) raise ``CheckpointError`` naming the key.
    """
    c = {**_DIFFUSERS_DEFAULTS, **config_json}
    name = c.get("_class_name", "AutoencoderKL")
    _diffusers_requires(name == "AutoencoderKL", "_class_name", f"must be 'AutoencoderKL', got {name!r}")
    channels = list(c["block_out_channels"])
    base = channels[0]
    mult = tuple(ch // base for ch in channels)
    ok = all(base * m == ch for m, ch in zip(mult, channels))
    _diffusers_requires(ok, "block_out_channels", f"{channels} are not all multiples of {base}")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(c[key])
        _diffusers_requires(types == [block] * len(channels), key, f"must be {len(channels)} x {block!r}, got {types}")
    _diffusers_requires(c["act_fn"] == "silu", "act_fn", f"must be 'silu', got {c['act_fn']!r}")
    for key in ("use_quant_conv", "use_post_quant_conv"):
        _diffusers_requires(bool(c[key]), key, "must be true (AutoencoderKL always has quant_conv and post_quant_conv)")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        _diffusers_requires(c.get(key) is None, key, f"is not supported (must be null), got {c.get(key)!r}")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        _diffusers_requires(len(set(size)) == 1, "sample_size", f"must be square, got {list(size)}")
        size = size[0]
    return AutoencoderConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=c["layers_per_block"],  # diffusers' decoder also has layers_per_block + 1 per level
        attn_resolutions=(),
        z_channels=c["latent_channels"],
        embed_dim=c["latent_channels"],
        attn_type="vanilla" if c["mid_block_add_attention"] else "none",
        norm_groups=c["norm_num_groups"],
        resolution=size,
        scaling_factor=c["scaling_factor"],
    )


_DIFFUSERS_DEFAULTS = {  # diffusers.AutoencoderKL.__init__ defaults, for keys a config.json leaves out
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": SD_V1_SCALING_FACTOR,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def vae_config_to_diffusers(config: AutoencoderConfig) -> dict[str, Any]:
    """``AutoencoderConfig`` -> a diffusers ``AutoencoderKL`` config.json dict.

    ``scaling_factor=None`` is written as 1.0 (no scaling), since diffusers
    needs a number. Raises ``CheckpointError`` for what diffusers cannot express.
    """
    z, embed = config.z_channels, config.embed_dim
    problems = [
        (config.attn_resolutions == (), "attn_resolutions", "must be empty (diffusers has mid-block attention only)"),
        (config.attn_type != "linear", "attn_type", "'linear' has no diffusers equivalent"),
        (z == embed, "z_channels", f"{z} must equal embed_dim {embed}"),
    ]
    for ok, field, message in problems:
        if not ok:
            raise CheckpointError(f"AutoencoderConfig.{field} {message}; cannot write a diffusers AutoencoderKL")
    levels = len(config.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.base_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.embed_dim,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.resolution,
        "scaling_factor": 1.0 if config.scaling_factor is None else config.scaling_factor,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": config.attn_type == "vanilla",
    }


# -------------------------------------------------------------- load / save
def load_diffusers_vae(directory: Union[str, Path]) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` folder (config.json + safetensors weights) -> our model, in eval mode.

    ``directory`` may also be a pipeline folder with a ``vae/`` subfolder.
    """
    config_path, weights_path = diffusers_folder(directory, "vae", "AutoencoderKL")
    config_json = read_json(config_path)
    try:
        config = vae_config_from_diffusers(config_json)
    except DForgeError as err:  # CheckpointError, or ConfigError from AutoencoderConfig's checks
        raise CheckpointError(f"{config_path}: {err}") from None
    state_dict = vae_state_dict_from_diffusers(read_safetensors(weights_path))
    to_diffusers = _rename_rules(True, len(config.channel_mult))
    model = AutoencoderKL(config)
    load_checked(model, state_dict, str(weights_path), "AutoencoderKL", lambda key: _rename(key, to_diffusers))
    return model.eval()


def save_diffusers_vae(model: AutoencoderKL, directory: Union[str, Path]) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderKL`` folder (config.json + safetensors); returns the folder.

    ``diffusers.AutoencoderKL.from_pretrained(directory)`` loads it.
    """
    config = vae_config_to_diffusers(model.config)
    return write_diffusers_folder(directory, config, vae_state_dict_to_diffusers(model.state_dict()))


def load_compvis_vae(state_dict: Mapping[str, Tensor], config: Optional[AutoencoderConfig] = None) -> AutoencoderKL:
    """A CompVis / LDM autoencoder state dict -> our model, in eval mode.

    Accepts a whole LDM / SD checkpoint's state dict (only the
    ``first_stage_model.`` keys are used), a Lightning checkpoint dict with a
    ``"state_dict"`` entry, or the bare autoencoder keys; the ``loss.*`` keys
    of an autoencoder training checkpoint (discriminator, LPIPS) are ignored.
    ``config`` defaults to ``sd_v1_vae_config()``.
    """
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if any(k.startswith(COMPVIS_PREFIX) for k in state_dict):
        state_dict = {k[len(COMPVIS_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(COMPVIS_PREFIX)}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    model = AutoencoderKL(config if config is not None else sd_v1_vae_config())
    return load_checked(model, state_dict, "CompVis VAE state dict", "AutoencoderKL").eval()

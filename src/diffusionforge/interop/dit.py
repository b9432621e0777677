"""DiT weights: the official facebookresearch/DiT state dict and the diffusers ``DiTTransformer2DModel``.

Our ``LabelDiT`` uses the official module names, so an official checkpoint
(e.g. ``DiT-XL-2-256x256.pt``, a bare EMA state dict, or a ``train.py``
checkpoint ``{"model", "ema", ...}``) loads key for key; its config is read
off the tensor shapes (heads from the named sizes of the paper, or given).

diffusers spells the same network differently:

==========================================================  ====================================
diffusers                                                   ours (official)
==========================================================  ====================================
``pos_embed.proj``                                          ``x_embedder.proj``
``transformer_blocks.0.norm1.emb.timestep_embedder.linear_1/2``  ``t_embedder.mlp.0/2``
``transformer_blocks.0.norm1.emb.class_embedder.embedding_table``  ``y_embedder.embedding_table``
``transformer_blocks.i.norm1.linear``                       ``blocks.i.adaLN_modulation.1``
``transformer_blocks.i.attn1.to_q/to_k/to_v``               ``blocks.i.attn.qkv`` (stacked q, k, v)
``transformer_blocks.i.attn1.to_out.0``                     ``blocks.i.attn.proj``
``transformer_blocks.i.ff.net.0.proj`` / ``ff.net.2``       ``blocks.i.mlp.fc1`` / ``fc2``
``proj_out_1`` / ``proj_out_2``                             ``final_layer.adaLN_modulation.1`` / ``final_layer.linear``
==========================================================  ====================================

diffusers keeps a copy of the timestep and label embedders in every block
(the conversion script copies the same weights into each); we read block 0's,
check the others equal it, and write the copies back on export. Two numeric
differences are part of the diffusers model and carried by our config:
its sinusoidal timestep features use ``downscale_freq_shift=1``
(``timestep_freq_shift``) and the LayerNorm before the MLP uses its
``norm_eps`` (``mlp_norm_eps``); the official DiT uses 0 and 1e-6.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from diffusionforge.backbones.dit import DIT_MODELS, LabelDiT, LabelDiTConfig, sincos_pos_embed_2d
from diffusionforge.errors import CheckpointError, ConfigError

from .files import diffusers_folder, load_checked, read_json, read_safetensors, write_diffusers_folder

__all__ = [
    "OFFICIAL_DIT_KEY",
    "dit_config_from_diffusers",
    "dit_config_from_state_dict",
    "dit_config_to_diffusers",
    "dit_state_dict_from_diffusers",
    "dit_state_dict_to_diffusers",
    "load_diffusers_dit",
    "load_official_dit",
    "save_diffusers_dit",
]

OFFICIAL_DIT_KEY = "x_embedder.proj.weight"  # a key only a (bare) DiT state dict has
DIFFUSERS_CLASS = "DiTTransformer2DModel"
_EMB = "transformer_blocks.{}.norm1.emb."
_BLOCK_PAIRS = (  # (diffusers suffix, our suffix) inside block i, besides the stacked qkv
    ("norm1.linear", "adaLN_modulation.1"),
    ("attn1.to_out.0", "attn.proj"),
    ("ff.net.0.proj", "mlp.fc1"),
    ("ff.net.2", "mlp.fc2"),
)
_TOP_PAIRS = (
    ("pos_embed.proj", "x_embedder.proj"),
    (_EMB.format(0) + "timestep_embedder.linear_1", "t_embedder.mlp.0"),
    (_EMB.format(0) + "timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("proj_out_1", "final_layer.adaLN_modulation.1"),
    ("proj_out_2", "final_layer.linear"),
)


# --------------------------------------------------------------- official
def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The DiT weights of a bare state dict or a ``train.py`` checkpoint (its EMA weights)."""
    for key in ("ema", "model", "state_dict"):
        inner = state_dict.get(key)
        if isinstance(inner, Mapping) and OFFICIAL_DIT_KEY in inner:
            return inner
    return state_dict


def dit_config_from_state_dict(state_dict: Mapping[str, Tensor], num_heads: Optional[int] = None) -> LabelDiTConfig:
    """The ``LabelDiTConfig`` an official state dict was built with, read off its shapes.

    The head count is not in the weights: it comes from the paper's named
    sizes (depth and width identify S/B/L/XL) unless ``num_heads`` is given.
    """
    state_dict = _unwrap(state_dict)
    for key in (OFFICIAL_DIT_KEY, "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise CheckpointError(f"not an official DiT state dict: missing key {key!r}")
    proj = state_dict[OFFICIAL_DIT_KEY]  # (D, C_in, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    tokens = state_dict["pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid")
    if num_heads is None:
        named = {(d, h): heads for d, h, heads, _ in DIT_MODELS.values()}
        if (depth, hidden) not in named:
            raise CheckpointError(f"depth {depth} and width {hidden} are no named DiT size; give num_heads")
        num_heads = named[(depth, hidden)]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    return LabelDiTConfig(
        depth=depth, hidden_size=hidden, num_heads=num_heads, patch_size=patch,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        in_channels=in_channels, out_channels=out_channels, input_size=grid * patch,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1)


def load_official_dit(state_dict: Mapping[str, Any], config: Optional[LabelDiTConfig] = None) -> LabelDiT:
    """Our ``LabelDiT`` (eval mode) from a facebookresearch/DiT state dict, key for key."""
    state_dict = _unwrap(state_dict)
    config = dit_config_from_state_dict(state_dict) if config is None else config
    state = {key: value for key, value in state_dict.items() if isinstance(value, Tensor)}
    return load_checked(LabelDiT(config), state, "official DiT state dict", "DiT").eval()


# --------------------------------------------------------------- diffusers
def dit_config_from_diffusers(cfg: Mapping[str, Any]) -> LabelDiTConfig:
    """Our config of a diffusers ``DiTTransformer2DModel`` config.json."""
    fixed = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
             "norm_elementwise_affine": False, "upcast_attention": False}
    for key, value in fixed.items():
        if cfg.get(key, value) != value:
            raise CheckpointError(f"config.json: {key}={cfg[key]!r} is not supported (DiT has {value!r})")
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    in_channels = cfg.get("in_channels", 4)
    out_channels = cfg.get("out_channels") or in_channels
    try:
        return LabelDiTConfig(
            depth=cfg.get("num_layers", 28), hidden_size=heads * head_dim, num_heads=heads,
            patch_size=cfg.get("patch_size", 2), in_channels=in_channels, out_channels=out_channels,
            input_size=cfg.get("sample_size", 32), num_classes=cfg.get("num_embeds_ada_norm", 1000),
            timestep_freq_shift=1, mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)))
    except ConfigError as err:  # from the dataclass checks
        raise CheckpointError(f"config.json: {err}") from None


def dit_config_to_diffusers(config: LabelDiTConfig) -> dict[str, Any]:
    """A diffusers config.json for ``config``; refuses what ``DiTTransformer2DModel`` cannot express."""
    if not isinstance(config, LabelDiTConfig):
        raise CheckpointError("diffusers' DiTTransformer2DModel is class-conditional: convert a LabelDiT")
    if config.context_dim is not None or config.concat_channels:
        raise CheckpointError("diffusers' DiTTransformer2DModel has no cross-attention or concat input")
    if config.mlp_ratio != 4.0 or config.frequency_embedding_size != 256:
        raise CheckpointError("diffusers' DiTTransformer2DModel fixes mlp_ratio 4 and 256 timestep features")
    if config.timestep_freq_shift != 1:
        warnings.warn("diffusers' DiTTransformer2DModel computes timestep features with downscale_freq_shift=1; "
                      "this DiT uses 0 (the official DiT), so the exported model's outputs differ slightly",
                      stacklevel=2)
    return {
        "_class_name": DIFFUSERS_CLASS, "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "num_layers": config.depth, "dropout": 0.0,
        "norm_num_groups": 32, "attention_bias": True, "sample_size": config.input_size,
        "patch_size": config.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": config.mlp_norm_eps,
    }


def _pairs(config: LabelDiTConfig) -> list[tuple[str, str]]:
    """(diffusers module, our module) pairs whose ``.weight``/``.bias`` map one to one."""
    pairs = list(_TOP_PAIRS)
    for i in range(config.depth):
        pairs += [(f"transformer_blocks.{i}.{theirs}", f"blocks.{i}.{ours}") for theirs, ours in _BLOCK_PAIRS]
    return pairs


def dit_state_dict_from_diffusers(sd: Mapping[str, Tensor], config: LabelDiTConfig) -> dict[str, Tensor]:
    """A diffusers DiT state dict -> ours (official keys); their per-block embedder copies must agree."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"missing key {key!r}")
        used.add(key)
        return sd[key]

    for theirs, ours in _pairs(config):
        for param in ("weight", "bias"):
            out[f"{ours}.{param}"] = take(f"{theirs}.{param}")
    table = _EMB.format(0) + "class_embedder.embedding_table.weight"
    out["y_embedder.embedding_table.weight"] = take(table)
    for i in range(config.depth):
        attn = f"transformer_blocks.{i}.attn1."
        for param in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([take(f"{attn}to_{n}.{param}") for n in "qkv"])
        for suffix in ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
                       "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
                       "class_embedder.embedding_table.weight"):
            copy = take(_EMB.format(i) + suffix)
            if not torch.equal(copy, sd[_EMB.format(0) + suffix]):
                raise CheckpointError(f"{_EMB.format(i) + suffix} differs from block 0's copy; "
                                      f"our DiT has one shared embedder")
    unused = [key for key in sd if key not in used and not key.endswith("pos_embed.pos_embed")]
    if unused:
        raise CheckpointError(f"unexpected key {unused[0]!r} for a DiT")
    out["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None]  # fixed, not stored
    return out


def dit_state_dict_to_diffusers(sd: Mapping[str, Tensor], config: LabelDiTConfig) -> dict[str, Tensor]:
    """Our (official) DiT state dict -> diffusers keys, embedders copied into every block."""
    out: dict[str, Tensor] = {}
    for theirs, ours in _pairs(config):
        for param in ("weight", "bias"):
            out[f"{theirs}.{param}"] = sd[f"{ours}.{param}"]
    dim = config.hidden_size
    for i in range(config.depth):
        attn = f"transformer_blocks.{i}.attn1."
        for param in ("weight", "bias"):
            for n, part in zip("qkv", sd[f"blocks.{i}.attn.qkv.{param}"].split(dim)):
                out[f"{attn}to_{n}.{param}"] = part
        emb = _EMB.format(i)
        for j, linear in ((0, "linear_1"), (2, "linear_2")):
            for param in ("weight", "bias"):
                out[f"{emb}timestep_embedder.{linear}.{param}"] = sd[f"t_embedder.mlp.{j}.{param}"]
        out[f"{emb}class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return {key: value.clone() for key, value in out.items()}


def load_diffusers_dit(directory: str | Path) -> LabelDiT:
    """Our ``LabelDiT`` (eval mode) from a diffusers ``DiTTransformer2DModel`` folder (or a pipeline's ``transformer/``)."""
    config_path, weights_path = diffusers_folder(directory, "transformer", "DiT")
    try:
        config = dit_config_from_diffusers(read_json(config_path))
    except CheckpointError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    try:
        state = dit_state_dict_from_diffusers(read_safetensors(weights_path), config)
    except CheckpointError as err:
        raise CheckpointError(f"{weights_path}: {err}") from None
    return load_checked(LabelDiT(config), state, str(weights_path), "DiT").eval()


def save_diffusers_dit(model: LabelDiT, directory: str | Path) -> Path:
    """Write ``model`` as a diffusers ``DiTTransformer2DModel`` folder; returns it."""
    config_json = dit_config_to_diffusers(model.config)
    return write_diffusers_folder(directory, config_json, dit_state_dict_to_diffusers(model.state_dict(), model.config))

"""Stable Diffusion UNet interop (``diffusionforge.interop.unet``).

The peer is diffusers itself: a small randomly initialised
``UNet2DConditionModel`` saved with ``save_pretrained`` must load into our
``UNet`` and give the same output, and our ``UNet`` written with
``save_diffusers_unet`` must load with ``from_pretrained`` and agree. Also:
exact state-dict round trips, config mapping (SD v1 / v2 config.json files),
and one-line errors for unsupported configs and bad files.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusionforge.backbones import UNet, UNetConfig
from diffusionforge.errors import CheckpointError
from diffusionforge.interop.unet import (
    load_compvis_unet,
    load_diffusers_unet,
    save_diffusers_unet,
    sd_v1_unet_config,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)

from tolerances import assert_close_scaled, float64_group_norm, reduction_depth

diffusers = pytest.importorskip("diffusers")

TINY_DIFFUSERS = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=2,  # diffusers' name for the number of heads
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_OURS = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(1,), num_heads=2, norm_groups=8, context_dim=16, use_scale_shift_norm=False)

# Ours -> diffusers -> ours: heads as an int and as channels per head, both resampling kinds of
# attention placement, deeper transformers, scale-shift norm, linear projections (num_heads is unused
# with num_head_channels; import gives back the default 4).
EXPORT_CONFIGS = [
    dict(),
    dict(use_linear_in_transformer=True, transformer_depth=2),
    dict(channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_head_channels=16, num_heads=4, num_res_blocks=2),
    dict(use_scale_shift_norm=True, attention_resolutions=(), out_channels=8, dropout=0.1),
]

# The published config.json files of SD v1.5 and SD v2.1 (UNet folder).
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = {
    **SD15_CONFIG, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "sample_size": 96, "upcast_attention": True, "use_linear_projection": True,
}
SD_V1_PARAMS = 859_520_964


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _inputs(context_dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    return x, torch.tensor([3, 700]), torch.randn(2, 5, context_dim, generator=gen)  # x, t, context (B, L, D)


def _ours(**overrides) -> UNet:
    return _randomise(UNet(UNetConfig(**{**TINY_OURS, **overrides})))


def _outputs_in_float64(ours: UNet, ref: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') outputs on ``_inputs()`` with both models converted to float64 in place.

    float64 keeps the comparison exact to ~1e-12 on every CPU (tests/tolerances.py), so a
    swapped or misplaced weight cannot hide under a tolerance.
    """
    x, t, context = (v.double() if v.is_floating_point() else v for v in _inputs())
    ours, ref = ours.double(), ref.double()
    with torch.no_grad(), float64_group_norm():
        return ours(x, t, {"crossattn": context}), ref(x, t, encoder_hidden_states=context).sample


# ------------------------------------------------------------------ diffusers -> ours
@pytest.mark.parametrize("use_linear", [False, True])
def test_diffusers_folder_loads_and_matches(tmp_path, use_linear):
    ref = _randomise(diffusers.UNet2DConditionModel(**TINY_DIFFUSERS, use_linear_projection=use_linear))
    ref.save_pretrained(tmp_path)
    ours = load_diffusers_unet(tmp_path)
    assert ours.config == UNetConfig(**TINY_OURS, use_linear_in_transformer=use_linear)
    actual, expected = _outputs_in_float64(ours, ref)
    assert expected.abs().mean() > 1e-3
    assert_close_scaled(actual, expected, depth=reduction_depth(ours))


# ------------------------------------------------------------------ ours -> diffusers
@pytest.mark.parametrize("overrides", EXPORT_CONFIGS)
def test_exported_folder_loads_in_diffusers_and_matches(tmp_path, overrides):
    ours = _ours(**overrides)
    save_diffusers_unet(ours, tmp_path, sample_size=16)
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert ref.config.sample_size == 16
    actual, expected = _outputs_in_float64(ours, ref)
    assert_close_scaled(actual, expected, depth=reduction_depth(ours))
    assert load_diffusers_unet(tmp_path).config == ours.config


@pytest.mark.parametrize("overrides", EXPORT_CONFIGS)
def test_state_dict_round_trip_is_exact(overrides):
    ours = _ours(**overrides)
    config_json = unet_config_to_diffusers(ours.config)
    theirs = unet_state_dict_to_diffusers(ours.state_dict(), ours.config)
    ref = diffusers.UNet2DConditionModel.from_config(config_json)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in theirs.items()} == ref_shapes
    back = unet_state_dict_from_diffusers(theirs, ours.config)
    assert list(back) == list(ours.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("overrides", EXPORT_CONFIGS)
def test_config_round_trip(overrides):
    config = UNetConfig(**{**TINY_OURS, **overrides})
    assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config


def test_sd_v1_config_from_published_json():
    config = unet_config_from_diffusers(SD15_CONFIG)
    assert config == sd_v1_unet_config()
    with torch.device("meta"):
        count = sum(p.numel() for p in UNet(config).parameters())
        ref_count = sum(p.numel() for p in diffusers.UNet2DConditionModel.from_config(SD15_CONFIG).parameters())
    assert count == ref_count == SD_V1_PARAMS


def test_sd_v2_config_maps_heads_list_to_head_channels():
    config = unet_config_from_diffusers(SD21_CONFIG)
    assert (config.num_head_channels, config.context_dim, config.use_linear_in_transformer) == (64, 1024, True)
    assert config.attention_resolutions == (1, 2, 4)
    assert unet_config_to_diffusers(config)["attention_head_dim"] == [5, 10, 20, 20]


@pytest.mark.parametrize(
    "key, value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("act_fn", "gelu"),
        ("time_embedding_type", "fourier"),
        ("time_embedding_act_fn", "silu"),
        ("resnet_time_scale_shift", "ada_group"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"]),  # does not mirror the down blocks
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("transformer_layers_per_block", [1, 2]),
        ("block_out_channels", [32, 48]),
        ("some_future_option", 1),
    ],
)
def test_unsupported_config_names_key(key, value):
    with pytest.raises(CheckpointError, match=f"diffusers UNet config: {key}=") as info:
        unet_config_from_diffusers({**TINY_DIFFUSERS, key: value})
    assert "\n" not in str(info.value)


def test_unrepresentable_config_names_field(tmp_path):
    with pytest.raises(CheckpointError, match=r"UNetConfig.vector_dim=4"):
        save_diffusers_unet(_ours(vector_dim=4), tmp_path)


# ------------------------------------------------------------------ CompVis
def test_compvis_checkpoint_loads_prefixed_or_bare():
    ours = _ours()
    state = ours.state_dict()
    checkpoint = {"model.diffusion_model." + k: v for k, v in state.items()}
    checkpoint.update({"first_stage_model.encoder.conv_in.weight": torch.zeros(1),
                       "cond_stage_model.transformer.x": torch.zeros(1), "model_ema.decay": torch.tensor(0.9999),
                       "model_ema.diffusion_modelout2weight": torch.zeros(1), "betas": torch.zeros(1000)})
    for source in (checkpoint, {"state_dict": checkpoint}, state):
        loaded = load_compvis_unet(source, ours.config)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_compvis_mismatch_names_key_and_shapes():
    ours = _ours()
    state = dict(ours.state_dict())
    state["out.2.weight"] = torch.zeros(3, 32, 3, 3)
    with pytest.raises(CheckpointError, match=r"key 'out.2.weight' has shape \(3, 32, 3, 3\) .*\(4, 32, 3, 3\)"):
        load_compvis_unet(state, ours.config)
    del state["out.2.weight"]
    with pytest.raises(CheckpointError, match=r"missing key 'out.2.weight'"):
        load_compvis_unet(state, ours.config)


# ------------------------------------------------------------------ bad files
def _write_folder(path, **overrides):
    save_diffusers_unet(_ours(**overrides), path)
    return path / "config.json", path / "diffusion_pytorch_model.safetensors"


def _one_line_error(directory, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_diffusers_unet(directory)
    assert "\n" not in str(info.value)


def test_pipeline_folder_with_unet_subfolder(tmp_path):
    ours = _ours()
    save_diffusers_unet(ours, tmp_path / "unet")
    loaded = load_diffusers_unet(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_missing_files_named(tmp_path):
    _one_line_error(tmp_path / "nowhere", r"nowhere/config.json: file not found")
    config_path, weights_path = _write_folder(tmp_path)
    weights_path.unlink()
    _one_line_error(tmp_path, r"diffusion_pytorch_model.safetensors: file not found")


def test_corrupt_files_named(tmp_path):
    config_path, weights_path = _write_folder(tmp_path)
    weights_path.write_bytes(b"not a safetensors file")
    _one_line_error(tmp_path, r"diffusion_pytorch_model.safetensors: cannot read safetensors")
    config_path.write_text("{broken")
    _one_line_error(tmp_path, r"config.json: cannot read JSON")


def test_wrong_weights_name_file_key_and_shapes(tmp_path):
    config_path, weights_path = _write_folder(tmp_path)
    weights = load_file(weights_path)
    weights["conv_out.weight"] = torch.zeros(2, 32, 3, 3)
    save_file(weights, weights_path)
    _one_line_error(tmp_path, r"safetensors: key 'conv_out.weight' has shape \(2, 32, 3, 3\) in the checkpoint, "
                              r"\(4, 32, 3, 3\) expected")
    weights["conv_out.weight"] = torch.zeros(4, 32, 3, 3)
    weights["down_blocks.0.extra.weight"] = torch.zeros(1)
    save_file(weights, weights_path)
    _one_line_error(tmp_path, r"safetensors: unexpected key 'down_blocks.0.extra.weight'")
    del weights["down_blocks.0.extra.weight"], weights["conv_in.bias"]
    save_file(weights, weights_path)
    _one_line_error(tmp_path, r"safetensors: missing key 'conv_in.bias' \(shape \(32,\)\)")


def test_config_of_other_architecture_named_with_file(tmp_path):
    config_path, _ = _write_folder(tmp_path)
    config_json = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config_json, "class_embed_type": "projection"}))
    _one_line_error(tmp_path, r"config.json: diffusers UNet config: class_embed_type='projection'")

"""Tests of the ADM / LDM UNet backbone (``diffusionforge.backbones``).

Fast CPU checks: shapes (including odd intermediate sizes), zero-initialised
output, that every conditioning path reaches the output, the crossattn mask,
the SD v1 parameter count, and agreement with independent implementations
(diffusers' ``UNet2DConditionModel`` loaded through diffusers' own LDM key
conversion, diffusers ``ResnetBlock2D`` and ``get_timestep_embedding``, and a
naive softmax attention in ADM's legacy qkv layout).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffusionforge.backbones import BACKBONES, UNet, UNetConfig, timestep_embedding
from diffusionforge.backbones.attention import AttentionBlock
from diffusionforge.backbones.blocks import GroupNorm32, ResBlock
from diffusionforge.errors import ConfigError

from tolerances import assert_close_scaled, float64_group_norm, reduction_depth

SD_V1 = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=(4, 2, 1),
    num_res_blocks=2,
    channel_mult=(1, 2, 4, 4),
    num_heads=8,
    transformer_depth=1,
    context_dim=768,
    use_scale_shift_norm=False,
)
SD_V1_PARAMS = 859_520_964  # CompVis stable-diffusion v1 UNet

TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2)


def _randomise(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, so zero-initialised layers stop hiding paths."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def _build(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(**{**TINY, **overrides}))


# ----------------------------------------------------------------- shapes
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("channel_mult", [(1, 2, 2), (1, 2, 4)])
def test_output_shape(size, channel_mult):
    model = _build(channel_mult=channel_mult, num_res_blocks=2, in_channels=2, out_channels=4)
    out = model(torch.randn(3, 2, size, size), torch.tensor([0, 10, 999]))
    assert out.shape == (3, 4, size, size)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # conv resampling: 28 -> 14 -> 7 -> 4, upsampled back to 7
        dict(resblock_updown=True),  # ResBlock resampling (avg-pool 7 -> 3)
        dict(conv_resample=False),  # avg-pool / plain nearest
    ],
)
def test_odd_intermediate_sizes(overrides):
    model = _randomise(_build(channel_mult=(1, 1, 2, 2), attention_resolutions=(4,), **overrides))
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([1.5, 7.0]))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def test_registry_builds_unet():
    config_cls, module_cls = BACKBONES["unet"]
    assert isinstance(module_cls(config_cls()), UNet)


# ------------------------------------------------------- initialisation
def test_fresh_unet_outputs_exact_zeros():
    model = _build(context_dim=8, vector_dim=4, concat_channels=1)
    cond = {"crossattn": torch.randn(2, 3, 8), "vector": torch.randn(2, 4), "concat": torch.randn(2, 1, 16, 16)}
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([5, 500]), cond)
    assert torch.equal(out, torch.zeros_like(out))


def test_time_embedding_changes_output():
    model = _randomise(_build())
    x = torch.randn(1, 1, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 800]))
        scalar_t = model(x, torch.tensor(3))
    assert (out[0] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(scalar_t[0], out[0])


# ------------------------------------------------------- conditioning
def _cond_model():
    return _randomise(_build(context_dim=8, vector_dim=4, concat_channels=2))


def _cond(batch=2, tokens=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "vector": torch.randn(batch, 4, generator=gen),
        "crossattn": torch.randn(batch, tokens, 8, generator=gen),
        "concat": torch.randn(batch, 2, 16, 16, generator=gen),
    }


@pytest.mark.parametrize("key", ["vector", "crossattn", "concat"])
def test_each_conditioning_changes_output(key):
    model, x, t = _cond_model(), torch.randn(2, 1, 16, 16), torch.tensor([10, 10])
    cond, other = _cond(seed=0), _cond(seed=1)
    changed = {**cond, key: other[key]}
    with torch.no_grad():
        diff = (model(x, t, cond) - model(x, t, changed)).abs().max()
    assert diff > 1e-4


def test_crossattn_mask_hides_token():
    """In float64, so that "hidden" holds to ~1e-13 on every CPU (tests/tolerances.py)."""
    model, x, t = _cond_model().double(), torch.randn(2, 1, 16, 16).double(), torch.tensor([10, 20])
    cond = {k: v.double() for k, v in _cond(tokens=4).items()}
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    changed = cond["crossattn"].clone()
    changed[0, 3] = 100.0
    changed[1, 1] = -100.0
    with torch.no_grad(), float64_group_norm():
        masked = model(x, t, {**cond, "crossattn_mask": mask})
        masked_changed = model(x, t, {**cond, "crossattn": changed, "crossattn_mask": mask})
        unmasked_changed = model(x, t, {**cond, "crossattn": changed})
    assert_close_scaled(masked, masked_changed, depth=reduction_depth(model))
    assert (masked - unmasked_changed).abs().max() > 1e-4  # the token matters when not masked


# --------------------------------------------- parameter count / peers
def test_sd_v1_parameter_count():
    with torch.device("meta"):
        model = UNet(UNetConfig(**SD_V1))
    assert sum(p.numel() for p in model.parameters()) == SD_V1_PARAMS


@pytest.mark.parametrize("use_linear", [False, True])
def test_matches_diffusers_unet2dcondition_via_ldm_keys(use_linear):
    """Our state dict, converted by diffusers' own LDM -> diffusers mapping, gives the same outputs."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    small = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2))
    config = UNetConfig(**{**SD_V1, **small, "num_heads": 2, "context_dim": 16}, use_linear_in_transformer=use_linear)
    ours = _randomise(UNet(config))
    ref_config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[32, 64, 64],
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=2,  # diffusers' name for the number of heads in SD v1 configs
        use_linear_projection=use_linear,
    )
    state = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref = diffusers.UNet2DConditionModel(**ref_config).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(state, ref_config), strict=True)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    with torch.no_grad(), float64_group_norm():  # float64: exact to ~1e-13 on every CPU (tests/tolerances.py)
        expected = ref.double()(x.double(), t, encoder_hidden_states=context.double()).sample
        actual = ours.double()(x.double(), t, {"crossattn": context.double()})
    assert expected.abs().mean() > 1e-3
    assert_close_scaled(actual, expected, depth=reduction_depth(ours))


@pytest.mark.parametrize("mode", ["same", "down", "up"])
def test_resblock_scale_shift_matches_diffusers(mode):
    resnet = pytest.importorskip("diffusers.models.resnet")
    ours = _randomise(ResBlock(32, 24, 0.0, 64, up=mode == "up", down=mode == "down"))
    ref = resnet.ResnetBlock2D(
        in_channels=32, out_channels=64, temb_channels=24, eps=1e-5, time_embedding_norm="scale_shift",
        up=mode == "up", down=mode == "down",
    ).eval()
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    state = {}
    for key, value in ours.state_dict().items():
        module, param = key.rsplit(".", 1)
        state[f"{names[module]}.{param}"] = value
    ref.load_state_dict(state, strict=True)
    x, emb = torch.randn(2, 32, 8, 8, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
    with torch.no_grad(), float64_group_norm():  # float64: exact to ~1e-14 on every CPU (tests/tolerances.py)
        assert_close_scaled(ours.double()(x, emb), ref.double()(x, emb), depth=reduction_depth(ours))


def test_attention_block_equals_naive_softmax_attention():
    """SDPA with the einops layout == ADM's legacy reshape-and-split, written with plain matmuls."""
    heads, channels = 4, 32
    block = _randomise(AttentionBlock(channels, heads)).double()  # float64: see tests/tolerances.py
    x = torch.randn(2, channels, 5, 6, dtype=torch.float64)
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    with torch.no_grad(), float64_group_norm():
        qkv = block.qkv(block.norm(flat)).reshape(b * heads, 3 * c // heads, h * w)
        q, k, v = qkv.split(c // heads, dim=1)  # each (B*heads, d, N)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c // heads), dim=-1)  # (B*heads, N, N)
        naive = (v @ weights.transpose(1, 2)).reshape(b, c, h * w)
        expected = (flat + block.proj_out(naive)).reshape(b, c, h, w)
        assert_close_scaled(block(x), expected, depth=reduction_depth(block) + h * w)


@pytest.mark.parametrize("dim", [64, 33])
def test_timestep_embedding_matches_diffusers_cos_first(dim):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 1, 17, 999])
    expected = embeddings.get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    actual = timestep_embedding(t, dim)
    torch.testing.assert_close(actual, expected)
    assert torch.equal(actual[0, : dim // 2], torch.ones(dim // 2))  # cos(0) first


# ------------------------------------------------------------ gradients
def test_gradients_reach_every_parameter():
    model = _randomise(_build(context_dim=8, vector_dim=4, concat_channels=2, attention_resolutions=(1, 2)))
    model.train()
    x = torch.randn(2, 1, 16, 16)
    model(x, torch.tensor([1, 2]), _cond()).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_bf16_autocast_forward_is_finite():
    model = _randomise(_build(context_dim=8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), {"crossattn": torch.randn(2, 3, 8)})
    assert torch.isfinite(out).all()
    norm = GroupNorm32(4, 8)
    assert norm(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "field, value",
    [
        ("model_channels", 0),
        ("model_channels", 48),  # not divisible by norm_groups=32
        ("channel_mult", ()),
        ("channel_mult", (1, 0)),
        ("attention_resolutions", (16,)),  # a pixel size, not a downsampling factor
        ("num_heads", 3),
        ("num_head_channels", 24),
        ("dropout", 1.0),
        ("use_scale_shift_norm", "yes"),
        ("num_res_blocks", 1.5),
        ("context_dim", 0),
        ("vector_dim", -4),
        ("concat_channels", -1),
        ("transformer_depth", 0),
        ("use_linear_in_transformer", True),  # without context_dim
    ],
)
def test_bad_config_names_field(field, value):
    expected = "norm_groups" if (field, value) == ("model_channels", 48) else field
    with pytest.raises(ConfigError, match=f"UNetConfig.{expected}"):
        UNetConfig(**{**TINY, field: value})


def test_config_accepts_yaml_lists():
    config = UNetConfig(channel_mult=[1, 2], attention_resolutions=[2])
    assert config.channel_mult == (1, 2) and config.attention_resolutions == (2,)
    assert dataclasses.asdict(config)["channel_mult"] == (1, 2)


@pytest.mark.parametrize(
    "cond, match",
    [
        ({"crossattn": torch.randn(2, 3, 8)}, r"cond\['vector'\] is required: expected shape \(B, vector_dim\)"),
        ({"vector": torch.randn(2, 4)}, r"cond\['crossattn'\] is required: expected shape \(B, L, context_dim\)"),
        ({"vector": torch.randn(2, 5), "crossattn": torch.randn(2, 3, 8)}, r"cond\['vector'\] must have shape .*\(2, 4\)"),
        ({"vector": torch.randn(2, 4), "crossattn": torch.randn(2, 3, 7)}, r"cond\['crossattn'\] must have shape"),
        ({"vector": torch.randn(2, 4), "crossattn": torch.randn(2, 3, 8), "concat": torch.randn(2, 1, 16, 16)},
         r"cond\['concat'\] given but"),
        ({"vector": torch.randn(2, 4), "crossattn": torch.randn(2, 3, 8), "label": torch.zeros(2)}, "unknown cond key"),
        ({"vector": torch.randn(2, 4), "crossattn": torch.randn(2, 3, 8), "crossattn_mask": torch.ones(2, 4).bool()},
         r"cond\['crossattn_mask'\] must have shape \(B, L\) = \(2, 3\)"),
        ({"vector": torch.randn(2, 4), "crossattn": torch.randn(2, 3, 8), "crossattn_mask": torch.ones(2, 3)},
         "must be bool"),
    ],
)
def test_bad_cond_names_key_and_shape(cond, match):
    model = _build(context_dim=8, vector_dim=4)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), cond)


def test_bad_x_and_t_shapes():
    model = _build()
    with pytest.raises(ValueError, match=r"in_channels=1"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2, 3]))
    concat_model = _build(concat_channels=2)
    with pytest.raises(ValueError, match=r"cond\['concat'\] must have shape \(B, concat_channels, H, W\)"):
        concat_model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), {"concat": torch.randn(2, 2, 8, 8)})

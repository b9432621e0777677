"""VAE weight interop: diffusers AutoencoderKL and CompVis state dicts load into ours and give the same outputs."""

import json
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from diffusionforge.errors import CheckpointError
from diffusionforge.first_stage.autoencoder import AutoencoderConfig, AutoencoderKL
from diffusionforge.interop.vae import (
    load_compvis_vae,
    load_diffusers_vae,
    save_diffusers_vae,
    sd_v1_vae_config,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)

from tolerances import assert_close_scaled, float64_group_norm, reduction_depth

SD_V1_VAE_PARAMETERS = 83_653_863

def _blocks(levels: int) -> dict:
    return dict(down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)


SMALL = dict(  # the brief's small config: two levels, one resnet per encoder level
    **_blocks(2),
    in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, latent_channels=4, sample_size=32,
)
THREE_LEVELS = dict(  # three levels, two resnets, no mid attention, odd latent width, own scale
    **_blocks(3),
    in_channels=1, out_channels=2, block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
    latent_channels=3, sample_size=16, mid_block_add_attention=False, scaling_factor=0.5,
)


def _diffusers_vae(kwargs: dict, seed: int = 0) -> DiffusersAutoencoderKL:
    """A diffusers AutoencoderKL with every parameter randomised (norm weights too, so swaps show)."""
    torch.manual_seed(seed)
    model = DiffusersAutoencoderKL(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _plain(value):
    """Lists and tuples compare equal (JSON gives lists, diffusers' init keeps tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _ours(config: AutoencoderConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _assert_same_outputs(ours: AutoencoderKL, theirs: DiffusersAutoencoderKL) -> None:
    """Equal outputs in float64 (both models are converted in place): a ~1e-12 tolerance proves the mapping."""
    ours, theirs = ours.double(), theirs.double()
    c, h = ours.config, ours.config.resolution // ours.downsample_factor
    x = torch.rand(2, c.in_channels, c.resolution, c.resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, c.embed_dim, h, h, generator=torch.Generator().manual_seed(2))
    x, z = x.double(), z.double()
    encoder, decoder = reduction_depth(ours.encoder), reduction_depth(ours.decoder)
    with torch.no_grad(), float64_group_norm():
        q_theirs, q_ours = theirs.encode(x).latent_dist, ours.encode(x)
        assert_close_scaled(q_ours.mean, q_theirs.mean, depth=encoder)
        assert_close_scaled(q_ours.logvar, q_theirs.logvar, depth=encoder)
        assert_close_scaled(ours.decode(z), theirs.decode(z).sample, depth=decoder)
        rec, _ = ours(x, sample_posterior=False)
        assert_close_scaled(rec, theirs(x, sample_posterior=False).sample, depth=encoder + decoder)


# ---------------------------------------------------------------- diffusers
@pytest.mark.parametrize("kwargs", [SMALL, THREE_LEVELS], ids=["small", "three-levels"])
def test_diffusers_vae_loads_and_matches(kwargs, tmp_path):
    theirs = _diffusers_vae(kwargs)
    theirs.save_pretrained(tmp_path)
    ours = load_diffusers_vae(tmp_path)
    assert not ours.training
    assert ours.config == vae_config_from_diffusers(dict(theirs.config))
    assert ours.config.scaling_factor == theirs.config.scaling_factor
    _assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("kwargs", [SMALL, THREE_LEVELS], ids=["small", "three-levels"])
def test_saved_vae_loads_in_diffusers_and_matches(kwargs, tmp_path):
    ours = _ours(vae_config_from_diffusers(kwargs), seed=3)
    save_diffusers_vae(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    theirs = DiffusersAutoencoderKL.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    for key, value in kwargs.items():
        assert _plain(theirs.config[key]) == _plain(value), key
    _assert_same_outputs(ours, theirs)
    assert load_diffusers_vae(tmp_path).config == ours.config


def test_state_dict_mapping_round_trips_exactly():
    ours = _ours(vae_config_from_diffusers(THREE_LEVELS | {"mid_block_add_attention": True}))
    sd = ours.state_dict()
    back = vae_state_dict_from_diffusers(vae_state_dict_to_diffusers(sd))
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    theirs = _diffusers_vae(SMALL).state_dict()
    again = vae_state_dict_to_diffusers(vae_state_dict_from_diffusers(theirs))
    assert set(again) == set(theirs)
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_mapping_reverses_decoder_levels_and_reshapes_attention():
    config = vae_config_from_diffusers(THREE_LEVELS | {"mid_block_add_attention": True})
    sd = vae_state_dict_to_diffusers(AutoencoderKL(config).state_dict())
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in sd  # LDM up.2 (lowest resolution)
    assert "decoder.up_blocks.2.resnets.0.conv_shortcut.weight" in sd  # LDM up.0: 16 -> 8 channels
    assert "decoder.up_blocks.2.upsamplers.0.conv.weight" not in sd
    assert sd["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (16, 16)
    assert "encoder.conv_norm_out.weight" in sd and "decoder.mid_block.resnets.1.norm2.bias" in sd


def test_legacy_diffusers_attention_names_load():
    theirs = _diffusers_vae(SMALL).state_dict()
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in theirs.items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    current, old = vae_state_dict_from_diffusers(theirs), vae_state_dict_from_diffusers(legacy)
    assert list(current) == list(old) and all(torch.equal(current[k], old[k]) for k in current)


def test_config_round_trips_through_diffusers_form():
    config = vae_config_from_diffusers(THREE_LEVELS)
    assert config.channel_mult == (1, 2, 2) and config.base_channels == 8 and config.attn_type == "none"
    assert config.z_channels == config.embed_dim == 3 and config.num_res_blocks == 2
    assert vae_config_from_diffusers(vae_config_to_diffusers(config)) == config


# ------------------------------------------------------------------ CompVis
def test_compvis_state_dicts_load(tmp_path):
    config = vae_config_from_diffusers(SMALL)
    source = _ours(config, seed=5)
    sd = source.state_dict()
    full = {f"first_stage_model.{k}": v for k, v in sd.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    full["first_stage_model.loss.logvar"] = torch.zeros(())
    full["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(2)
    x = torch.rand(1, 3, 32, 32)
    for given in (full, {"state_dict": full}, sd, {**sd, "loss.logvar": torch.zeros(())}):
        loaded = load_compvis_vae(given, config)
        assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x).mean, source.encode(x).mean, atol=0, rtol=0)


# ------------------------------------------------------------------- errors
def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json") as err:
        load_diffusers_vae(tmp_path / "nowhere")
    _one_line(err)
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors") as err:
        load_diffusers_vae(tmp_path)
    _one_line(err)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: cannot read") as err:
        load_diffusers_vae(tmp_path)
    _one_line(err)
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "sample_size": 31}))
    with pytest.raises(CheckpointError, match=r"config\.json: AutoencoderConfig\.resolution ") as err:
        load_diffusers_vae(tmp_path)
    _one_line(err)


def test_mismatched_diffusers_weights_name_the_key_and_shapes(tmp_path):
    _diffusers_vae(SMALL).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "latent_channels": 3}))
    with pytest.raises(CheckpointError, match=r"'encoder\.conv_out\.weight' has shape \(8, 64, 3, 3\)") as err:
        load_diffusers_vae(tmp_path)
    assert "(6, 64, 3, 3)" in _one_line(err)
    (tmp_path / "config.json").write_text(json.dumps({**config, "mid_block_add_attention": False}))
    with pytest.raises(CheckpointError, match=r"unexpected key '(en|de)coder\.mid_block\.attentions\.0\.") as err:
        load_diffusers_vae(tmp_path)
    _one_line(err)


def test_compvis_missing_key_is_named():
    config = vae_config_from_diffusers(SMALL)
    sd = {f"first_stage_model.{k}": v for k, v in AutoencoderKL(config).state_dict().items()}
    del sd["first_stage_model.decoder.up.1.upsample.conv.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'decoder\.up\.1\.upsample\.conv\.bias'") as err:
        load_compvis_vae(sd, config)
    _one_line(err)


@pytest.mark.parametrize(
    "key, value",
    [("shift_factor", 0.1159), ("act_fn", "gelu"), ("use_quant_conv", False), ("block_out_channels", [32, 48])],
)
def test_unsupported_diffusers_config_is_refused(key, value):
    with pytest.raises(CheckpointError, match=key) as err:
        vae_config_from_diffusers({**SMALL, key: value})
    _one_line(err)


@pytest.mark.parametrize(
    "overrides",
    [dict(attn_type="linear"), dict(attn_resolutions=(16,)), dict(z_channels=8)],
)
def test_what_diffusers_cannot_express_is_refused_on_save(overrides, tmp_path):
    config = AutoencoderConfig(in_channels=3, out_channels=3, base_channels=8, norm_groups=4, resolution=32)
    config = replace(config, **overrides)
    with pytest.raises(CheckpointError, match="cannot write a diffusers AutoencoderKL") as err:
        save_diffusers_vae(AutoencoderKL(config), tmp_path)
    _one_line(err)


# -------------------------------------------------------------------- SD v1
def test_sd_v1_vae_has_the_diffusers_parameter_count():
    with torch.device("meta"):
        ours = AutoencoderKL(sd_v1_vae_config())
        config_json = vae_config_to_diffusers(sd_v1_vae_config())
        theirs = DiffusersAutoencoderKL(**{k: v for k, v in config_json.items() if k != "_class_name"})
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters()) == SD_V1_VAE_PARAMETERS
    assert tuple(theirs.config.block_out_channels) == (128, 256, 512, 512) and theirs.config.layers_per_block == 2
    mapped = vae_state_dict_to_diffusers(ours.state_dict())
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours.config.scaling_factor == 0.18215 and ours.downsample_factor == 8

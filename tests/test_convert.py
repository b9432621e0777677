"""`dforge convert`: diffusers <-> ours <-> CompVis for the VAE and the UNet, checked against diffusers itself.

Tiny randomised diffusers models go through the CLI and must give the same
outputs as before (compared in float64, see tests/tolerances.py); bad input
is one error line, exit status 2, and never leaves a DST (or a temporary
folder) behind.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from diffusionforge.backbones import UNet, UNetConfig
from diffusionforge.interop import registry as interop_registry
from diffusionforge.cli.main import main
from diffusionforge.first_stage.autoencoder import AutoencoderConfig, AutoencoderKL
from diffusionforge.interop.ours import load_ours, save_ours

from tolerances import assert_close_scaled, float64_group_norm, reduction_depth

diffusers = pytest.importorskip("diffusers")

VAE_DIFFUSERS = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    latent_channels=4, sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
UNET_DIFFUSERS = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
VAE_OURS = AutoencoderConfig(in_channels=3, out_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                             norm_groups=4, resolution=16, scaling_factor=0.5)
UNET_OURS = UNetConfig(in_channels=4, out_channels=4, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(1,), num_heads=2, norm_groups=4, context_dim=8,
                       use_scale_shift_norm=False)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights too, so a swapped tensor shows in the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _ours(kind: str, seed: int = 0) -> torch.nn.Module:
    return _randomise(AutoencoderKL(VAE_OURS) if kind == "vae" else UNet(UNET_OURS), seed)


def _theirs(kind: str, seed: int = 0) -> torch.nn.Module:
    if kind == "vae":
        return _randomise(diffusers.AutoencoderKL(**VAE_DIFFUSERS), seed)
    return _randomise(diffusers.UNet2DConditionModel(**UNET_DIFFUSERS), seed)


def _from_pretrained(kind: str, path) -> torch.nn.Module:
    cls = diffusers.AutoencoderKL if kind == "vae" else diffusers.UNet2DConditionModel
    return cls.from_pretrained(path, low_cpu_mem_usage=False).eval()


def _assert_same_outputs(kind: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Equal outputs in float64 (both models are converted in place): a ~1e-12 tolerance proves the mapping."""
    gen = torch.Generator().manual_seed(1)
    ours, theirs = ours.double(), theirs.double()
    with torch.no_grad(), float64_group_norm():
        if kind == "vae":
            x = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1  # (B, C, H, W)
            z = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)  # (B, embed_dim, H / f, W / f)
            assert_close_scaled(ours.encode(x).mean, theirs.encode(x).latent_dist.mean,
                                depth=reduction_depth(ours.encoder))
            assert_close_scaled(ours.decode(z), theirs.decode(z).sample, depth=reduction_depth(ours.decoder))
        else:
            x, t = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([3, 700])
            context = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)  # (B, L, D)
            expected = theirs(x, t, encoder_hidden_states=context).sample
            assert expected.abs().mean() > 1e-3
            assert_close_scaled(ours(x, t, {"crossattn": context}), expected, depth=reduction_depth(ours))


def _count(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()):,} parameters"


def _convert(capsys, *argv):
    code = main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("dforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _assert_nothing_beside(folder, *expected):
    """Only ``expected`` names in ``folder``: no DST and no temporary folders were left."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


# ------------------------------------------------------------------ diffusers -> ours
@pytest.mark.parametrize("kind", ["vae", "unet"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["model-folder", "pipeline-folder"])
def test_diffusers_to_ours_matches_diffusers(tmp_path, capsys, kind, pipeline):
    theirs = _theirs(kind)
    src = tmp_path / "src"
    theirs.save_pretrained(src / kind if pipeline else src)
    if pipeline:
        _theirs("unet" if kind == "vae" else "vae").save_pretrained(src / ("unet" if kind == "vae" else "vae"))
    dst = tmp_path / "out" / "net"
    code, out, err = _convert(capsys, src, "--kind", kind, "--to", "ours", "--out", dst)
    assert code == 0, err
    assert str(dst) in out and _count(theirs) in out
    ours, loaded_kind = load_ours(dst)
    assert loaded_kind == kind and not ours.training
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_outputs(kind, ours, theirs)
    _assert_nothing_beside(dst.parent, "net")


# ------------------------------------------------------------------ ours -> diffusers
@pytest.mark.parametrize("kind", ["vae", "unet"])
def test_ours_to_diffusers_loads_in_diffusers_and_matches(tmp_path, capsys, kind):
    ours = _ours(kind, seed=3)
    save_ours(ours, kind, tmp_path / "ours")
    dst = tmp_path / "diffusers"
    code, out, err = _convert(capsys, tmp_path / "ours", "--kind", kind, "--to", "diffusers", "--out", dst)
    assert code == 0, err
    assert _count(ours) in out and "diffusers" in out
    _assert_same_outputs(kind, ours, _from_pretrained(kind, dst))


def test_diffusers_unet_keeps_its_sample_size(tmp_path, capsys):
    """diffusers -> diffusers: the UNet's sample_size (a pipeline's default latent side) is carried over."""
    _theirs("unet").save_pretrained(tmp_path / "src")
    dst = tmp_path / "dst"
    code, _, err = _convert(capsys, tmp_path / "src", "--kind", "unet", "--to", "diffusers", "--out", dst)
    assert code == 0, err
    assert json.loads((dst / "config.json").read_text())["sample_size"] == 8


@pytest.mark.parametrize("kind", ["vae", "unet"])
def test_ours_round_trips_exactly(tmp_path, kind):
    ours = _ours(kind, seed=4)
    save_ours(ours, kind, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["format"], config["kind"]) == ("diffusionforge", kind)
    loaded, loaded_kind = load_ours(tmp_path)
    assert loaded_kind == kind and loaded.config == ours.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


# ------------------------------------------------------------------ CompVis
def _compvis_checkpoint(vae: AutoencoderKL, unet: UNet) -> dict:
    """A whole LDM checkpoint: both networks under their prefixes, plus entries convert must skip."""
    state = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    state.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    state.update({"betas": torch.zeros(10), "model_ema.decay": torch.tensor(0.999),
                  "cond_stage_model.transformer.x": torch.zeros(1)})
    return state


def _config_file(path, config, as_yaml: bool):
    plain = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists
    path.write_text(yaml.safe_dump(plain) if as_yaml else json.dumps(plain))
    return path


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compvis_checkpoint_with_config(tmp_path, capsys, suffix):
    vae, unet = _ours("vae", seed=5), _ours("unet", seed=6)
    state = _compvis_checkpoint(vae, unet)
    src = tmp_path / f"ldm{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 7}, src)
    else:
        save_file(state, src)
    for kind, model, config in (("vae", vae, _config_file(tmp_path / "vae.yaml", VAE_OURS, True)),
                                ("unet", unet, _config_file(tmp_path / "unet.json", UNET_OURS, False))):
        dst = tmp_path / f"{kind}-out"
        code, out, err = _convert(capsys, src, "--kind", kind, "--config", config, "--to", "ours", "--out", dst)
        assert code == 0, err
        assert "CompVis" in out and _count(model) in out
        loaded, _ = load_ours(dst)
        assert loaded.config == model.config
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_compvis_config_may_be_a_diffusers_config_json(tmp_path, capsys):
    theirs = _theirs("unet", seed=7)
    theirs.save_pretrained(tmp_path / "ref")
    ours, _ = _load_ours_via_cli(tmp_path, capsys, tmp_path / "ref", "unet")
    torch.save({f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}, tmp_path / "unet.ckpt")
    code, _, err = _convert(capsys, tmp_path / "unet.ckpt", "--kind", "unet", "--config",
                            tmp_path / "ref" / "config.json", "--to", "diffusers", "--out", tmp_path / "back")
    assert code == 0, err
    _assert_same_outputs("unet", ours, _from_pretrained("unet", tmp_path / "back"))


def _load_ours_via_cli(tmp_path, capsys, src, kind):
    code, _, err = _convert(capsys, src, "--kind", kind, "--to", "ours", "--out", tmp_path / "via-cli")
    assert code == 0, err
    return load_ours(tmp_path / "via-cli")


# ------------------------------------------------------------------ errors
def test_missing_src(tmp_path, capsys):
    code, _, err = _convert(capsys, tmp_path / "nowhere", "--kind", "vae", "--to", "ours", "--out", tmp_path / "d")
    _assert_one_line_error(code, err, "nowhere: no such file or directory")
    _assert_nothing_beside(tmp_path)


def test_non_empty_dst_is_refused_then_overwritten(tmp_path, capsys):
    _theirs("vae").save_pretrained(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = _convert(capsys, tmp_path / "src", "--kind", "vae", "--to", "ours", "--out", dst)
    _assert_one_line_error(code, err, "exists and is not empty", "--overwrite")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    code, _, err = _convert(capsys, tmp_path / "src", "--kind", "vae", "--to", "ours", "--out", dst, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    _assert_nothing_beside(tmp_path, "src", "dst")


def test_empty_dst_is_used(tmp_path, capsys):
    save_ours(_ours("vae"), "vae", tmp_path / "src")
    (tmp_path / "dst").mkdir()
    code, _, err = _convert(capsys, tmp_path / "src", "--kind", "vae", "--to", "diffusers", "--out", tmp_path / "dst")
    assert code == 0, err
    assert (tmp_path / "dst" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("layout", ["diffusers", "pipeline", "ours", "checkpoint"])
def test_wrong_kind(tmp_path, capsys, layout):
    src = tmp_path / "src"
    if layout == "diffusers":
        _theirs("vae").save_pretrained(src)
    elif layout == "pipeline":
        _theirs("vae").save_pretrained(src / "vae")
    elif layout == "ours":
        save_ours(_ours("vae"), "vae", src)
    else:
        src = tmp_path / "vae.ckpt"
        torch.save({f"first_stage_model.{k}": v for k, v in _ours("vae").state_dict().items()}, src)
    code, _, err = _convert(capsys, src, "--kind", "unet", "--to", "ours", "--out", tmp_path / "dst")
    _assert_one_line_error(code, err, "kind mismatch")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "config.yaml").write_text("task: diffusion\n"), "a pixel-space run has no vae"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "unknown layout"),
])
def test_unsupported_folders(tmp_path, capsys, make, message):
    (tmp_path / "src").mkdir()
    make(tmp_path / "src")
    code, _, err = _convert(capsys, tmp_path / "src", "--kind", "vae", "--to", "ours", "--out", tmp_path / "dst")
    _assert_one_line_error(code, err, message)
    assert not (tmp_path / "dst").exists()


def test_compvis_checkpoint_that_does_not_fit_the_config(tmp_path, capsys):
    torch.save({f"first_stage_model.{k}": v for k, v in _ours("vae").state_dict().items()}, tmp_path / "vae.ckpt")
    code, _, err = _convert(capsys, tmp_path / "vae.ckpt", "--kind", "vae", "--to", "ours", "--out", tmp_path / "d")
    _assert_one_line_error(code, err, "vae.ckpt: CompVis VAE state dict:", "of this AutoencoderKL")
    _assert_nothing_beside(tmp_path, "vae.ckpt")


def test_what_diffusers_cannot_express_is_refused_before_writing(tmp_path, capsys):
    model = AutoencoderKL(dataclasses.replace(VAE_OURS, attn_resolutions=(8,)))
    save_ours(model, "vae", tmp_path / "src")
    code, _, err = _convert(capsys, tmp_path / "src", "--kind", "vae", "--to", "diffusers", "--out", tmp_path / "d")
    _assert_one_line_error(code, err, "attn_resolutions")
    _assert_nothing_beside(tmp_path, "src")


def test_failed_write_leaves_neither_dst_nor_temporary_folder(tmp_path, capsys, monkeypatch):
    save_ours(_ours("vae"), "vae", tmp_path / "src")
    original = interop_registry.save_network

    def fail_halfway(model, kind, to, directory):
        original(model, kind, to, directory)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(interop_registry, "save_network", fail_halfway)
    code, _, err = _convert(capsys, tmp_path / "src", "--kind", "vae", "--to", "ours", "--out", tmp_path / "dst")
    _assert_one_line_error(code, err, "cannot write", "No space left on device")
    _assert_nothing_beside(tmp_path, "src")


def test_dst_holding_src_is_refused(tmp_path, capsys):
    save_ours(_ours("vae"), "vae", tmp_path / "nets" / "vae")
    code, _, err = _convert(capsys, tmp_path / "nets" / "vae", "--kind", "vae", "--to", "diffusers",
                            "--out", tmp_path / "nets", "--overwrite")
    _assert_one_line_error(code, err, "would replace SRC")
    assert (tmp_path / "nets" / "vae" / "model.safetensors").is_file()


def test_diffusion_run_backbone_converts_to_our_format(tiny_run, tmp_path, capsys):
    from diffusionforge.tasks import load_run_model

    code, out, err = _convert(capsys, tiny_run, "--kind", "unet", "--to", "ours", "--out", tmp_path / "unet")
    assert code == 0, err
    converted, kind = load_ours(tmp_path / "unet")
    backbone = load_run_model(tiny_run)[0].sampling_net()["backbone"]
    assert kind == "unet"
    for key, value in backbone.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key

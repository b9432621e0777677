"""Latent diffusion end to end through the CLI: a tiny fashion-vae run, then fashion-ldm,
fashion-ldm-text and fashion-dit on its latents, then sample, evaluate, resume and convert those runs."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from diffusionforge.cli.main import main
from diffusionforge.tasks import load_run_model
from test_autoencoder_run import TINY_VAE
from tolerances import assert_close_scaled, float64_group_norm, reduction_depth

# A seconds-long latent UNet on the tiny VAE's 4x14x14 latents.
TINY_LDM = ["data.limit_train=256", "data.batch_size=16", "data.val_size=32",
            "model.unet.model_channels=16", "model.unet.channel_mult=[1,2]",
            "model.unet.num_res_blocks=1", "model.unet.attention_resolutions=[2]",
            "model.unet.num_head_channels=16", "model.unet.norm_groups=8",
            "model.process.num_timesteps=100", "model.latent.scale_images=64",
            "optim.warmup_steps=2", "optim.ema_decay=0.5", "trainer.max_steps=6",
            "trainer.max_time=null", "trainer.val_every_n_steps=3",
            "trainer.checkpoint_every_n_steps=3", "trainer.limit_val_batches=1",
            "trainer.precision=32-true", "sample.steps=3", "sample.per_class=1"]
# The same run settings for a tiny latent DiT (its own architecture keys instead of the UNet's).
TINY_DIT = [o for o in TINY_LDM if not o.startswith("model.unet.")] + [
    "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2", "model.dit.patch_size=2",
    "model.conditioning.class_label.embed_dim=32"]
LATENT_PRESETS = ["fashion-ldm", "fashion-ldm-text", "fashion-dit"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent-runs")
    vae = root / "vae"
    assert main(["train", "fashion-vae", *TINY_VAE, f"run_dir={vae}", "--no-progress"]) == 0
    made = {"vae": vae}
    for preset in LATENT_PRESETS:
        made[preset] = root / preset
        overrides = TINY_DIT if preset == "fashion-dit" else TINY_LDM
        assert main(["train", preset, *overrides, f"model.latent.run_dir={vae}",
                     f"run_dir={made[preset]}", "--no-progress"]) == 0
    return made


@pytest.mark.parametrize("preset", LATENT_PRESETS)
def test_latent_run_directory_records_its_scale_and_first_stage(runs, preset):
    run_dir = runs[preset]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    scale = config["model"]["latent"]["scale_factor"]
    assert isinstance(scale, float) and scale > 0  # estimated from data and written to the run
    for name in ["model.safetensors", "first_stage.safetensors", "samples/final.png",
                 "checkpoints/last.ckpt"]:
        assert (run_dir / name).is_file(), name
    with safe_open(str(run_dir / "first_stage.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["autoencoder_config"])["base_channels"] == 8
    grid = np.asarray(Image.open(run_dir / "samples" / "final.png"))
    assert grid.ndim == 2 and grid.std() > 0  # decoded to 28x28 grey images


def test_latent_run_loads_without_its_autoencoder_run(runs, tmp_path):
    """The run carries its first stage: moving the VAE run away does not break sampling."""
    model, config = load_run_model(runs["fashion-ldm"])
    vae_copy = runs["vae"].rename(tmp_path / "moved")
    try:
        model2, _ = load_run_model(runs["fashion-ldm"])
        for a, b in zip(model.first_stage.state_dict().values(), model2.first_stage.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        vae_copy.rename(runs["vae"])
    assert model.first_stage.scale_factor == pytest.approx(config.model.latent.scale_factor)


@pytest.mark.parametrize("preset", LATENT_PRESETS)
def test_sample_and_evaluate_a_latent_run(runs, preset, tmp_path, capsys):
    run_dir = runs[preset]
    out = tmp_path / "grid.png"
    assert main(["sample", str(run_dir), "--num", "4", "--class", "7", "--steps", "2",
                 "--seed", "0", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).std() > 0
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", str(run_dir), "--num", "10", "--steps", "2", "--guidance", "2",
                 "--seed", "0", "--out", str(metrics)]) == 0
    record = json.loads(metrics.read_text())
    assert np.isfinite(record["metrics"]["fid"])
    assert 0.0 <= record["metrics"]["class_accuracy"] <= 1.0  # captions made from the labels
    capsys.readouterr()


def test_resume_keeps_the_recorded_scale(runs, tmp_path):
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(runs["fashion-ldm"], copy)
    before = yaml.safe_load((copy / "config.yaml").read_text())["model"]["latent"]["scale_factor"]
    assert main(["train", "--resume", str(copy), "trainer.max_steps=8", "--no-progress"]) == 0
    after = yaml.safe_load((copy / "config.yaml").read_text())["model"]["latent"]["scale_factor"]
    assert after == before
    assert json.loads((copy / "train_summary.json").read_text())["global_step"] == 8


def test_convert_a_latent_run_to_diffusers(runs, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE

    out = tmp_path / "vae-diffusers"
    assert main(["convert", str(runs["fashion-ldm"]), "--kind", "vae", "--to", "diffusers",
                 "--out", str(out)]) == 0
    theirs = DiffusersVAE.from_pretrained(out).eval()
    model, _ = load_run_model(runs["fashion-ldm"])
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64) * 2 - 1
    autoencoder = model.first_stage.autoencoder.double()  # float64: exact on every CPU (tests/tolerances.py)
    with torch.no_grad(), float64_group_norm():
        ours = autoencoder.encode(x).mode()
        assert_close_scaled(theirs.double().encode(x).latent_dist.mode(), ours,
                            depth=reduction_depth(autoencoder.encoder))


def test_convert_a_latent_dit_run_to_the_published_layouts(runs, tmp_path):
    """A class-conditional DiT run exports as the official state dict (ours) and as diffusers' DiT."""
    from diffusers import DiTTransformer2DModel

    from diffusionforge.interop import load_ours

    run_dir = runs["fashion-dit"]
    assert main(["convert", str(run_dir), "--kind", "dit", "--to", "ours", "--out", str(tmp_path / "ours")]) == 0
    label_dit, kind = load_ours(tmp_path / "ours")
    assert kind == "dit" and label_dit.config.learn_sigma and label_dit.config.patch_size == 2
    model, config = load_run_model(run_dir)
    net = model.sampling_net()
    x, t, y = torch.randn(3, 4, 14, 14, dtype=torch.float64), torch.tensor([0, 50, 99]), torch.tensor([1, 7, 10])
    net, label_dit = net.double(), label_dit.double()  # float64: exact on every CPU (tests/tolerances.py)
    with torch.no_grad():
        want = net["backbone"](x, t, net["conditioner"]({"class_label": y}))
        assert_close_scaled(label_dit(x, t, y), want, depth=reduction_depth(label_dit))  # label 10: guidance's null
    with pytest.warns(UserWarning, match="downscale_freq_shift=1"):
        assert main(["convert", str(run_dir), "--kind", "dit", "--to", "diffusers",
                     "--out", str(tmp_path / "diffusers")]) == 0
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "diffusers").eval()
    assert sum(p.numel() for p in theirs.transformer_blocks[0].parameters()) > 0
    assert main(["convert", str(run_dir), "--kind", "unet", "--to", "ours", "--out", str(tmp_path / "x")]) == 2

"""task=autoencoder end to end: `dforge train fashion-vae`, resume, `dforge evaluate`, loading, errors."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from scipy.ndimage import gaussian_filter
from torch import nn

from diffusionforge.tasks import autoencoder as autoencoder_run
from diffusionforge.tasks.autoencoder import (AUTOENCODER_WEIGHTS, build_autoencoder,
                                            build_autoencoder_module, load_autoencoder_run,
                                            loss_config)
from diffusionforge.cli.main import main
from diffusionforge.config import load_config
from diffusionforge.config.loader import config_to_yaml
from diffusionforge.errors import CheckpointError
from diffusionforge.evaluation.evaluate import split_images
from diffusionforge.evaluation.reconstruction import evaluate_autoencoder
from diffusionforge.metrics.classifier import file_sha256
from test_cli import assert_one_line_error

# A seconds-long fashion-vae: 256 images, an 8-channel f=2 network, the GAN on from batch 4.
TINY_VAE = ["data.limit_train=256", "data.batch_size=16", "data.val_size=32",
            "autoencoder.network.base_channels=8", "autoencoder.network.channel_mult=[1,2]",
            "autoencoder.network.norm_groups=4", "autoencoder.loss.disc_start=4",
            "autoencoder.loss.disc_ndf=8", "optim.grad_clip=1.0", "optim.warmup_steps=2",
            "trainer.max_steps=16",
            "trainer.max_time=null", "trainer.val_every_n_steps=4",
            "trainer.checkpoint_every_n_steps=8", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=2", "trainer.precision=32-true"]
STEPS = 16  # optimiser steps of TINY_VAE: 8 batches x (generator + discriminator)
EVAL_NUM = 48  # test images reconstructed by the evaluate tests


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-vae"
    assert main(["train", "fashion-vae", *TINY_VAE, f"run_dir={run_dir}", "--no-progress"]) == 0
    return run_dir


def test_train_writes_an_autoencoder_run_directory(vae_run):
    for name in ["config.yaml", AUTOENCODER_WEIGHTS, "checkpoints/last.ckpt", "samples/final.png",
                 "samples/recon_latest.png", "logs/version_0/metrics.csv", "train_summary.json"]:
        assert (vae_run / name).is_file(), name
    assert not (vae_run / "model.safetensors").exists()
    summary = json.loads((vae_run / "train_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["resumed_from_step"] == 0
    assert summary["wall_time_s"] > 0 and summary["peak_rss_mb"] > 0
    header = (vae_run / "logs/version_0/metrics.csv").read_text().splitlines()[0]
    assert "train/rec_loss" in header and "val/psnr" in header and "train/disc_loss" in header
    rows = list(csv.DictReader((vae_run / "logs/version_0/metrics.csv").open()))
    lrs = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    assert lrs[-1] < 0.2 * max(lrs)  # the preset's cosine decay, stepped once per batch
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # monotone after the 2-batch warm-up
    grid = np.asarray(Image.open(vae_run / "samples" / "final.png"))
    assert grid.shape == (2 * 30 + 2, 16 * 30 + 2) and grid.std() > 0  # inputs over reconstructions


def test_exported_weights_are_the_autoencoder_only(vae_run):
    with safe_open(str(vae_run / AUTOENCODER_WEIGHTS), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    autoencoder, config = load_autoencoder_run(vae_run)
    assert keys == set(autoencoder.state_dict())
    assert json.loads(meta["autoencoder_config"])["base_channels"] == 8
    assert config.task == "autoencoder" and not autoencoder.training
    c = autoencoder.config
    assert (c.in_channels, c.out_channels, c.resolution) == (1, 1, 28)
    z = autoencoder.encode(torch.zeros(2, 1, 28, 28)).mode()
    assert z.shape == (2, 4, 14, 14)


def test_resume_continues_from_the_checkpoint(vae_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(vae_run, copy)
    code, err = run_cli(capsys, "train", "--resume", copy, f"trainer.max_steps={STEPS + 8}",
                        "--no-progress")
    assert code == 0, err
    summary = json.loads((copy / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == STEPS and summary["global_step"] == STEPS + 8
    assert (copy / "logs/version_1/metrics.csv").is_file()
    before = load_autoencoder_run(vae_run)[0].state_dict()
    after = load_autoencoder_run(copy)[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_evaluate_scores_reconstructions_and_repeats_exactly(vae_run, tmp_path, capsys):
    outs = [tmp_path / "m1.json", tmp_path / "m2.json"]
    code, err = run_cli(capsys, "evaluate", vae_run, "--num", EVAL_NUM, "--batch-size", 20,
                        "--out", outs[0])
    assert code == 0, err
    code, err = run_cli(capsys, "evaluate", vae_run, "--num", EVAL_NUM, "--batch-size", 20,
                        "--steps", 3, "--seed", 9, "--out", outs[1])  # sampling flags are ignored
    assert code == 0, err
    first, second = (json.loads(p.read_text()) for p in outs)
    assert first["metrics"] == second["metrics"] and first["protocol"] == second["protocol"]
    metrics, protocol = first["metrics"], first["protocol"]
    assert set(metrics) == {"psnr", "ssim", "rfid", "rkid_mean", "rkid_std"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert protocol["num_images"] == protocol["reference_size"] == EVAL_NUM
    assert protocol["weights"] == AUTOENCODER_WEIGHTS
    assert protocol["weights_sha256"] == file_sha256(vae_run / AUTOENCODER_WEIGHTS)
    assert protocol["features"] == "classifier/fashion-mnist" and protocol["features_sha256"]
    assert protocol["reference_split"] == "fashion-mnist-embedded/test"
    assert protocol["package_version"] and protocol["git_commit"]
    assert first["timing"]["seconds_per_image"] > 0


def ssim_numpy(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    """Wang et al. 2004, Eq. 13 with gaussian (sigma 1.5, 11 px) local statistics, mean over all
    pixels; borders mirror-padded (torch's "reflect"), as torchmetrics does."""
    blur = lambda image: gaussian_filter(image, sigma=1.5, truncate=3.5, mode="mirror")  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim.mean())


def test_psnr_and_ssim_agree_with_numpy(vae_run):
    autoencoder, config = load_autoencoder_run(vae_run)
    result, _ = evaluate_autoencoder(autoencoder, config, num=EVAL_NUM, batch_size=16)
    x = torch.stack([split_images(config, "test")[i]["image"] for i in range(EVAL_NUM)])
    with torch.no_grad():
        x_hat = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
    x, x_hat = x.double().numpy()[:, 0], x_hat.double().numpy()[:, 0]  # (N, H, W)
    mse = ((x - x_hat) ** 2).mean(axis=(1, 2))
    assert result.psnr == pytest.approx(np.mean(10 * np.log10(2.0**2 / mse)), rel=1e-5)
    ssim = np.mean([ssim_numpy(a, b) for a, b in zip(x, x_hat)])
    assert result.ssim == pytest.approx(ssim, abs=1e-5)


class IdentityAutoencoder(nn.Module):
    """x -> x exactly: the best possible autoencoder."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the evaluator a device

    def encode(self, x):
        return type("Posterior", (), {"mode": lambda _: x})()

    def decode(self, z):
        return z


def test_perfect_reconstruction_scores_infinite_psnr_and_zero_rfid():
    config = load_config("fashion-vae")
    result, protocol = evaluate_autoencoder(IdentityAutoencoder(), config, num=64, batch_size=32)
    assert result.psnr == math.inf and result.ssim == pytest.approx(1.0, abs=1e-5)
    # the unbiased MMD^2 of a set with itself is (S - m D) / (m^2 (m - 1)) <= 0 for a PSD kernel
    assert abs(result.rfid) < 1e-3 and -0.1 < result.rkid_mean <= 1e-9
    assert protocol["weights"] is None and protocol["num_images"] == 64


def test_channels_and_resolution_are_derived_from_data():
    config = load_config("fashion-vae", ["data.channels=3", "data.image_size=32"])
    c = build_autoencoder(config).config
    assert (c.in_channels, c.out_channels, c.resolution) == (3, 3, 32)
    assert loss_config(config).disc_in_channels == 3


def test_lpips_comes_from_the_configured_paths(monkeypatch):
    calls = []
    monkeypatch.setattr(autoencoder_run, "load_lpips", lambda *paths: calls.append(paths))
    small = ["autoencoder.network.base_channels=8", "autoencoder.network.norm_groups=4"]
    build_autoencoder_module(load_config("fashion-vae", small))
    assert calls == []  # perceptual_weight=0 in the preset: LPIPS is not loaded at all
    config = load_config("fashion-vae", small + ["autoencoder.loss.perceptual_weight=1.0",
                                                 "autoencoder.lpips_vgg=/x/vgg.pth",
                                                 "autoencoder.lpips_lin=/x/lin.pth"])
    with pytest.warns(UserWarning, match="no LPIPS weights"):
        module = build_autoencoder_module(config)
    assert calls == [("/x/vgg.pth", "/x/lin.pth")] and module.loss.perceptual is None


def test_diffusion_run_is_not_an_autoencoder_run(tmp_path):
    (tmp_path / "config.yaml").write_text(config_to_yaml(load_config("tiny")))
    with pytest.raises(CheckpointError, match="task=diffusion") as info:
        load_autoencoder_run(tmp_path)
    assert "\n" not in str(info.value)


def test_autoencoder_run_without_weights_is_a_one_line_error(vae_run, tmp_path):
    shutil.copy(vae_run / "config.yaml", tmp_path / "config.yaml")
    with pytest.raises(CheckpointError, match=AUTOENCODER_WEIGHTS) as info:
        load_autoencoder_run(tmp_path)
    assert "\n" not in str(info.value)


def test_bad_network_values_are_one_line_errors(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "fashion-vae", "autoencoder.network.norm_groups=7",
                        f"run_dir={tmp_path / 'a'}")
    assert_one_line_error(code, err, "autoencoder.network", "norm_groups")
    code, err = run_cli(capsys, "train", "fashion-vae", "data.image_size=30",
                        f"run_dir={tmp_path / 'b'}")  # 30 is not divisible by f = 4
    assert_one_line_error(code, err, "autoencoder.network", "resolution")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

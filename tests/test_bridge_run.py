"""Latent Bridge Matching end to end through the CLI: the fashion-lbm-sr and
fashion-lbm-inpaint presets on a tiny VAE, then translate and evaluate, and the
one-line errors of bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionforge.cli.main import main
from diffusionforge.data.datasets import build_dataset
from diffusionforge.data.degradations import low_resolution
from diffusionforge.tasks import load_run_model
from diffusionforge.utils.images import save_png, to_uint8
from test_autoencoder_run import TINY_VAE
from test_latent_run import TINY_LDM

TINY_BRIDGE = [o for o in TINY_LDM if not o.startswith(("model.process.", "sample."))] + ["bridge.steps=2"]
PRESETS = ["fashion-lbm-sr", "fashion-lbm-inpaint"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge-runs")
    vae = root / "vae"
    assert main(["train", "fashion-vae", *TINY_VAE, f"run_dir={vae}", "--no-progress"]) == 0
    made = {}
    for preset in PRESETS:
        made[preset] = root / preset
        assert main(["train", preset, *TINY_BRIDGE, f"model.latent.run_dir={vae}",
                     f"run_dir={made[preset]}", "--no-progress"]) == 0
    return made


@pytest.fixture(scope="module")
def test_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge-inputs")
    x = build_dataset("fashion-mnist-embedded", "test", image_size=28, channels=1)[0]["image"][None]
    save_png(to_uint8(x)[0], root / "full.png")
    save_png(to_uint8(low_resolution(x, 4))[0], root / "low.png")
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., 8:20, 10:18] = 1
    save_png(to_uint8(mask * 2 - 1)[0], root / "mask.png")
    return root


@pytest.mark.parametrize("preset", PRESETS)
def test_bridge_run_directory(runs, preset):
    run_dir = runs[preset]
    for name in ["model.safetensors", "first_stage.safetensors", "samples/final.png", "checkpoints/last.ckpt"]:
        assert (run_dir / name).is_file(), name
    grid = np.asarray(Image.open(run_dir / "samples" / "final.png"))
    rows = 4  # source, 1 step, 2 steps (bridge.steps), target
    assert grid.shape[0] == rows * 30 + 2 and grid.std() > 0
    model, config = load_run_model(run_dir)
    assert config.task == "bridge" and model.sample_steps == 2


def test_translate_super_resolution_from_a_low_resolution_png(runs, test_image, tmp_path, capsys):
    out = tmp_path / "sr.png"
    assert main(["translate", str(runs["fashion-lbm-sr"]), str(test_image / "low.png"), "--steps", "1",
                 "--out", str(out)]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (28, 28) and image.std() > 0
    again = tmp_path / "again.png"  # a full-size input is taken as the source itself
    assert main(["translate", str(runs["fashion-lbm-sr"]), str(test_image / "full.png"), "--out", str(again)]) == 0


def test_translate_inpainting_keeps_the_pixels_outside_the_mask(runs, test_image, tmp_path):
    out = tmp_path / "filled.png"
    assert main(["translate", str(runs["fashion-lbm-inpaint"]), str(test_image / "full.png"),
                 "--mask", str(test_image / "mask.png"), "--steps", "2", "--out", str(out)]) == 0
    filled = np.asarray(Image.open(out)).astype(int)
    original = np.asarray(Image.open(test_image / "full.png")).astype(int)
    outside = np.ones((28, 28), bool)
    outside[8:20, 10:18] = False
    assert np.array_equal(filled[outside], original[outside])


@pytest.mark.parametrize("argv, message", [
    (["{inpaint}", "{full}"], "--mask: this run inpaints"),
    (["{sr}", "{full}", "--mask", "{mask}"], "takes no mask"),
    (["{sr}", "{mask_small}"], "this run translates 28x28 images or 7x7"),
    (["{sr}", "{missing}"], "image file not found"),
    (["{sr}", "{full}", "--steps", "0"], "--steps: must be >= 1"),
])
def test_translate_errors_are_one_line(runs, test_image, tmp_path, capsys, argv, message):
    small = tmp_path / "small.png"
    save_png(np.zeros((10, 10, 1), np.uint8), small)
    names = dict(inpaint=runs["fashion-lbm-inpaint"], sr=runs["fashion-lbm-sr"], full=test_image / "full.png",
                 mask=test_image / "mask.png", mask_small=small, missing=tmp_path / "nope.png")
    assert main(["translate", *[a.format(**names) for a in argv], "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_sample_refuses_a_bridge_run(runs, capsys):
    assert main(["sample", str(runs["fashion-lbm-sr"]), "--num", "2"]) == 2
    assert "use `dforge translate`" in capsys.readouterr().err


def test_evaluate_super_resolution_beside_the_baselines(runs, tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(runs["fashion-lbm-sr"]), "--num", "24", "--steps", "1", "2",
                 "--batch-size", "16", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["metrics"]) == {"input", "bicubic", "lbm_1_steps", "lbm_2_steps"}
    for scores in record["metrics"].values():
        assert {"psnr", "ssim", "fid", "kid_mean"} <= set(scores)
    assert record["protocol"]["num_images"] == 24 and record["protocol"]["steps"] == [1, 2]
    assert record["protocol"]["degradation"]["scale"] == 4


def test_evaluate_inpainting_reports_the_holes(runs, tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(runs["fashion-lbm-inpaint"]), "--num", "16", "--steps", "1",
                 "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["metrics"]["lbm_1_steps"]
    assert scores["outside_max_abs_diff"] == 0.0  # the known pixels are the source's
    assert scores["outside_max_abs_diff_unpasted"] > 0.0  # the network alone changes them a little
    assert np.isfinite(scores["psnr_hole"])


def test_bridge_training_needs_pairs():
    from diffusionforge.tasks import build_model
    from diffusionforge.config.loader import load_config
    from diffusionforge.errors import ConfigError

    with pytest.raises(ConfigError, match="data.degradation: task=bridge"):
        build_model(load_config("tiny", ["task=bridge"]))
    with pytest.raises(ConfigError, match="latents_concat: batch keys \\['mask'\\]"):
        build_model(load_config("tiny", ["task=bridge", "data.degradation.kind=denoising",
                                         "model.conditioning.latents_concat.mask_keys=[mask]"]))

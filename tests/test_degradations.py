"""Tests of diffusionforge.data.degradations and the skimage-photos source.

Degradations are checked against closed forms (block means, constant
images, measured noise std) and against scipy's Gaussian filter; the
skimage photos are the ones shipped inside scikit-image (no download).
"""

import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffusionforge.data import datasets as datasets_module
from diffusionforge.data.datamodule import DataConfig, ImageDataModule
from diffusionforge.data.datasets import ArrayImageDataset, build_skimage_photos, crop_photos, skimage_photos
from diffusionforge.data.degradations import (
    DegradationConfig,
    PairedDataset,
    box_mask,
    degrade,
    free_form_mask,
    gaussian_blur,
    low_resolution,
    pair_seed,
    upsample,
)
from diffusionforge.errors import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def signed_noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed)) * 2 - 1


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- super-resolution ------------------------------------------------------------

def test_low_resolution_is_the_block_mean():
    x = signed_noise(2, 3, 12, 8)
    low = low_resolution(x, 4)
    blocks = x.reshape(2, 3, 3, 4, 2, 4).mean(dim=(3, 5))  # (B, C, H / 4, W / 4)
    assert low.shape == (2, 3, 3, 2)
    torch.testing.assert_close(low, blocks)
    torch.testing.assert_close(low_resolution(x[0], 4), blocks[0])  # single image


def test_low_resolution_of_a_constant_is_constant():
    low = low_resolution(torch.full((1, 28, 28), 0.3), 3)
    assert low.shape == (1, 9, 9) and torch.allclose(low, torch.tensor(0.3))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_super_resolution_source_is_upsampled_low_resolution(mode):
    x = signed_noise(3, 16, 16)
    config = DegradationConfig(kind="super_resolution", scale=4, upsample=mode)
    out = degrade(x, config, gen(0))
    assert set(out) == {"source"} and out["source"].shape == (3, 16, 16)
    torch.testing.assert_close(out["source"], upsample(low_resolution(x, 4), 16, mode))
    assert out["source"].min() >= -1 and out["source"].max() <= 1


def test_nearest_upsampling_repeats_blocks_and_bicubic_is_clamped():
    low = signed_noise(1, 4, 4)
    torch.testing.assert_close(upsample(low, (8, 12), "nearest"),
                               low.repeat_interleave(2, -2).repeat_interleave(3, -1))
    edge = torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]])
    assert upsample(edge, 8, "bicubic").abs().max() == 1  # unclamped bicubic overshoots 1


# --- blur and noise ----------------------------------------------------------------

def test_blur_of_a_constant_is_constant_and_checkerboard_is_smoothed():
    constant = torch.full((2, 3, 20, 20), -0.4)
    torch.testing.assert_close(gaussian_blur(constant, 1.5), constant)
    board = (torch.arange(20).view(-1, 1) + torch.arange(20)).remainder(2).float().mul(2).sub(1)
    blurred = gaussian_blur(board.expand(1, 20, 20), 1.5)
    assert board.abs().mean() == 1 and blurred.abs().max() < 0.05


def test_blur_matches_scipy_gaussian_filter():
    x = signed_noise(2, 17, 23)
    ours = gaussian_blur(x, 1.5)
    # scipy's "mirror" is torch's "reflect"; truncate=3 gives radius int(3 * 1.5 + 0.5) = ceil(4.5) = 5
    theirs = ndimage.gaussian_filter(x.double().numpy(), sigma=(0, 1.5, 1.5), mode="mirror", truncate=3.0)
    torch.testing.assert_close(ours, torch.from_numpy(theirs).float(), atol=1e-5, rtol=0)


def test_deblurring_source_is_the_blurred_image():
    x = signed_noise(1, 12, 12)
    out = degrade(x, DegradationConfig(kind="deblurring", blur_sigma=0.8), gen(0))
    torch.testing.assert_close(out["source"], gaussian_blur(x, 0.8))


def test_denoising_noise_std():
    out = degrade(torch.zeros(1, 128, 128), DegradationConfig(kind="denoising", noise_std=0.2), gen(0))
    noise = out["source"]
    assert abs(noise.std().item() - 0.2) < 0.01 and abs(noise.mean().item()) < 0.01
    clamped = degrade(torch.ones(1, 8, 8), DegradationConfig(kind="denoising"), gen(0))["source"]
    assert clamped.max() <= 1 and clamped.min() < 1


# --- masks -------------------------------------------------------------------------

MASKS = {"box": box_mask, "free_form": free_form_mask}


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("size", [(28, 28), (64, 64), (9, 14)])
def test_masks_are_binary_non_empty_and_not_full(kind, size):
    for seed in range(40):
        mask = MASKS[kind](*size, gen(seed))
        assert mask.shape == (1, *size) and mask.dtype == torch.float32
        assert ((mask == 0) | (mask == 1)).all()
        assert 0 < mask.sum() < mask.numel()


@pytest.mark.parametrize("kind", list(MASKS))
def test_masks_follow_the_generator(kind):
    first, again = MASKS[kind](28, 28, gen(5)), MASKS[kind](28, 28, gen(5))
    assert torch.equal(first, again)
    others = [MASKS[kind](28, 28, gen(seed)) for seed in range(6, 10)]
    assert not any(torch.equal(first, other) for other in others)


def test_box_sides_are_the_configured_fractions():
    for seed in range(30):
        mask = box_mask(40, 20, gen(seed), box_min=0.25, box_max=0.5)[0]
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        height, width = len(rows), len(cols)
        assert 10 <= height <= 20 and 5 <= width <= 10
        assert mask.sum() == height * width  # one solid rectangle
        assert rows.max() - rows.min() + 1 == height and cols.max() - cols.min() + 1 == width


def test_free_form_never_covers_everything_even_with_huge_brushes():
    for seed in range(30):
        mask = free_form_mask(8, 8, gen(seed), strokes=8, vertices=10, width_min=0.5, width_max=0.5, length=1.0)
        assert 0 < mask.sum() < 64


def test_inpainting_source_keeps_known_pixels_and_fills_the_hole():
    x = signed_noise(3, 28, 28)
    for mask_kind in ("box", "free_form", "mixed"):
        config = DegradationConfig(kind="inpainting", mask=mask_kind, fill=0.5)
        out = degrade(x, config, gen(1))
        mask, source = out["mask"], out["source"]
        assert mask.shape == (1, 28, 28) and source.shape == (3, 28, 28)
        hole = mask.bool().expand(3, -1, -1)
        assert torch.equal(source[~hole], x[~hole]) and (source[hole] == 0.5).all()


def test_mixed_masks_draw_both_kinds():
    config = DegradationConfig(kind="inpainting", mask="mixed")
    masks = [degrade(torch.zeros(1, 28, 28), config, gen(seed))["mask"][0] for seed in range(20)]
    rectangles = [m.sum() == m.any(0).sum() * m.any(1).sum() for m in masks]
    assert 0 < sum(rectangles) < len(masks)


# --- paired dataset ----------------------------------------------------------------

def constant_dataset(count: int = 6, size: int = 16) -> ArrayImageDataset:
    """Identical gray images with labels, so differences come from the degradation only."""
    return ArrayImageDataset(np.full((count, size, size), 128, np.uint8), np.arange(count) % 3)


@pytest.mark.parametrize("task", ["inpainting", "denoising"])
def test_deterministic_pairs_repeat_and_differ_by_index(task):
    config = DegradationConfig(kind=task)
    paired = PairedDataset(constant_dataset(), config, seed=7, deterministic=True)
    first, again = paired[2], PairedDataset(constant_dataset(), config, seed=7, deterministic=True)[2]
    assert set(first) == ({"image", "class_label", "source", "mask"} if task == "inpainting"
                          else {"image", "class_label", "source"})
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(paired[3]["source"], first["source"])
    other_seed = PairedDataset(constant_dataset(), config, seed=8, deterministic=True)[2]
    assert not torch.equal(other_seed["source"], first["source"])


def test_training_pairs_are_fresh_draws_from_the_global_rng():
    paired = PairedDataset(constant_dataset(), DegradationConfig(kind="denoising"), seed=7, deterministic=False)
    torch.manual_seed(3)
    first, second = paired[0]["source"], paired[0]["source"]
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    assert torch.equal(paired[0]["source"], first)


def test_pair_seed_is_pinned():
    # SeedSequence mixing is specified by numpy; a change here would change every evaluation pair
    assert pair_seed(0, 0) == pair_seed(0, 0) != pair_seed(0, 1) != pair_seed(1, 0)
    assert pair_seed(-1, 3) == pair_seed(2**64 - 1, 3)
    assert pair_seed(0, 1) == int(np.random.SeedSequence([0, 1]).generate_state(1, np.uint64)[0])


# --- config ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    ({"kind": "colorization"}, "kind"), ({"scale": 1}, "scale"), ({"scale": True}, "scale"),
    ({"upsample": "area"}, "upsample"), ({"mask": "circle"}, "mask"),
    ({"box_min": 0.6, "box_max": 0.4}, "box_max"), ({"box_min": 0.0}, "box_min"), ({"box_max": 1.0}, "box_max"),
    ({"strokes": 0}, "strokes"), ({"vertices": 0}, "vertices"), ({"stroke_width_max": 0.7}, "stroke_width_max"),
    ({"stroke_width_min": 0.0}, "stroke_width_min"), ({"stroke_length": 1.5}, "stroke_length"),
    ({"fill": 2.0}, "fill"), ({"noise_std": -0.1}, "noise_std"), ({"noise_std": float("nan")}, "noise_std"),
    ({"blur_sigma": 0.0}, "blur_sigma"),
])
def test_bad_degradation_value_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        DegradationConfig(**overrides)
    assert one_line(err).startswith(f"data.degradation.{key}: ")


def test_data_config_accepts_a_mapping_and_checks_the_image_size():
    config = DataConfig(degradation={"kind": "inpainting", "mask": "box"})
    assert config.degradation == DegradationConfig(kind="inpainting", mask="box")
    with pytest.raises(ConfigError, match=r"^data\.degradation\.colour: unknown key"):
        DataConfig(degradation={"colour": 1})
    with pytest.raises(ConfigError, match=r"^data\.degradation\.scale: "):
        DataConfig(image_size=28, degradation={"scale": 16})
    with pytest.raises(ConfigError, match=r"^data\.degradation\.blur_sigma: "):
        DataConfig(image_size=8, degradation={"kind": "deblurring", "blur_sigma": 3.0})
    with pytest.raises(ConfigError, match=r"^data\.degradation: "):
        DataConfig(degradation="inpainting")


# --- datamodule --------------------------------------------------------------------

def test_datamodule_yields_paired_batches():
    config = DataConfig(batch_size=8, val_size=16, limit_train=16, hflip=True,
                        degradation=DegradationConfig(kind="inpainting"))
    module = ImageDataModule(config, seed=0)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == batch["source"].shape == (8, 1, 28, 28)
    assert batch["mask"].shape == (8, 1, 28, 28) and batch["class_label"].shape == (8,)
    known = batch["mask"] == 0  # the flip happened before the degradation: source matches image there
    assert torch.equal(batch["source"][known], batch["image"][known])
    val_first, val_again = next(iter(module.val_dataloader())), next(iter(module.val_dataloader()))
    assert torch.equal(val_first["mask"], val_again["mask"])
    assert torch.equal(val_first["source"], val_again["source"])


# --- skimage photos ----------------------------------------------------------------

@pytest.fixture(scope="module")
def photos() -> dict:
    """The downscaled photos, loaded once (about 0.5 s: the PNG/JPEG decoders start)."""
    return skimage_photos()


def test_skimage_splits_use_disjoint_photos(photos):
    splits = datasets_module.SKIMAGE_SPLITS
    assert set(splits["train"]).isdisjoint(splits["test"])
    assert set(photos) == set(splits["train"]) | set(splits["test"])
    for train_name in splits["train"]:
        for test_name in splits["test"]:  # different content too (skimage.data.cat is chelsea)
            a, b = photos[train_name], photos[test_name]
            assert a.shape != b.shape or not np.array_equal(a, b)
    for photo in photos.values():
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3


def test_skimage_crops_are_rgb_deterministic_and_prefix_stable(photos):
    train = build_skimage_photos(None, "train", 32, 3, count=24)
    again = build_skimage_photos(None, "train", 32, 3, count=12)
    test = build_skimage_photos(None, "test", 32, 3, count=12)
    assert len(train) == 24 and train.num_classes is None and set(train[0]) == {"image"}
    assert torch.equal(train.images[:12], again.images) and not torch.equal(train.images[:12], test.images)
    images = torch.stack([train[i]["image"] for i in range(24)])
    assert images.shape == (24, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    levels = (images + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # uint8-derived
    assert build_skimage_photos(None, "test", 16, 1, count=2)[0]["image"].shape == (1, 16, 16)


def test_crop_photos_cuts_windows_of_each_photo_in_turn():
    photos = []
    for index, (height, width) in enumerate([(10, 12), (9, 15)]):
        rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        photos.append(np.stack([np.full_like(rows, index), rows, cols], -1).astype(np.uint8))
    crops = crop_photos(photos, 40, 6, seed=0).astype(int)  # (N, 6, 6, [photo, row, col])
    flips = 0
    for k, crop in enumerate(crops):
        assert (crop[..., 0] == k % 2).all()
        assert (np.diff(crop[..., 1], axis=0) == 1).all() and (np.diff(crop[..., 1], axis=1) == 0).all()
        steps = np.diff(crop[..., 2], axis=1)
        assert (steps == 1).all() or (steps == -1).all()
        flips += int((steps == -1).all())
    assert 5 < flips < 35
    np.testing.assert_array_equal(crop_photos(photos, 40, 6, seed=0), crops)


def test_skimage_image_size_and_missing_package_errors(photos, monkeypatch):
    smallest = min(min(p.shape[:2]) for p in photos.values())
    with pytest.raises(ConfigError, match=r"^data\.image_size: ") as err:
        build_skimage_photos(None, "train", smallest + 1, 3, count=1)
    assert str(smallest) in one_line(err)
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # import skimage.data now fails
    with pytest.raises(ConfigError, match="pip install scikit-image") as err:
        datasets_module._skimage_data()
    assert one_line(err).startswith("data.name: ")


def test_datamodule_on_skimage_photos_with_super_resolution(photos):
    config = DataConfig(name="skimage-photos", image_size=32, channels=3, batch_size=4, val_size=8,
                        limit_train=8, degradation=DegradationConfig(scale=4))
    module = ImageDataModule(config, seed=0)
    assert module.num_classes is None
    module.setup("fit")
    batch = next(iter(module.val_dataloader()))
    assert set(batch) == {"image", "source"} and batch["source"].shape == (4, 3, 32, 32)
    torch.testing.assert_close(batch["source"], upsample(low_resolution(batch["image"], 4), 32, "bicubic"))

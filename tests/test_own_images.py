"""A folder of one's own images: what is read from the files, captions, crops, paired folders, bad files.

`dforge train data.name=folder data.root=DIR` must train with nothing else: the class count, channels,
image size and validation split come from the files (data/folder.py, data/datamodule.py resolve_folder,
tasks/parts.py resolve_from_data), never from the Fashion-MNIST preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusionforge.cli.main import main
from diffusionforge.conditioning.config import TextConditionerConfig
from diffusionforge.config.loader import load_config
from diffusionforge.data.config import DataConfig
from diffusionforge.data.datamodule import ImageDataModule, RandomHFlip
from diffusionforge.data.folder import ImageFolderDataset, PairedFolderDataset
from diffusionforge.errors import ConfigError, DataError
from diffusionforge.tasks.parts import resolve_from_data

QUICK = ["trainer.max_steps=3", "trainer.time_budget=null", "optim.schedule=steps", "optim.warmup_steps=1"]


def write(path: Path, size=(20, 16), mode="RGB", seed=0, fmt=None) -> np.ndarray:
    """A random image of ``size`` (width, height) in ``mode`` at ``path``; its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    shape = (height, width) if mode == "L" else (height, width, 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path, format=fmt)
    return pixels


def class_folder(root: Path, classes=("apple", "banana", "cherry"), per_class=4, mode="RGB",
                 sizes=((40, 36), (37, 45), (50, 50), (64, 38))) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write(root / name / f"{i}.png", sizes[i % len(sizes)], mode, seed=10 * c + i)
    return root


def folder_module(root: Path, overrides=(), preset="fashion-ddpm", seed=0):
    """(config after resolve_from_data, datamodule) as `dforge train` builds them."""
    config = load_config(preset, ["data.name=folder" if "paired" not in str(overrides) else "data.name=paired-folder",
                                  f"data.root={root}", *overrides])
    module = ImageDataModule(config.data, seed=seed)
    module.setup("fit")
    return resolve_from_data(config, module), module


# --- what is read from the files --------------------------------------------------------------------

def test_rgb_class_folders_resolve_classes_channels_size_and_split(tmp_path, capsys):
    config, module = folder_module(class_folder(tmp_path / "photos"))
    data = config.data
    assert data.channels == 3 and data.image_size == 32  # shorter sides >= 36 -> 32 (a multiple of 8)
    assert data.val_size == 1 and data.class_names == ["apple", "banana", "cherry"]
    assert data.batch_size == 11  # the preset's 32 does not fit 11 training images
    assert config.model.conditioning.class_label.num_classes == 3
    line = capsys.readouterr().err
    assert "3 classes (apple, banana, cherry)" in line and "data.image_size=32" in line
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (11, 3, 32, 32) and batch["class_label"].max() <= 2
    assert len(module.val_set) == 1


def test_split_is_proportional_and_explicit_values_win(tmp_path):
    root = class_folder(tmp_path / "many", per_class=40, sizes=((30, 30),))
    config, module = folder_module(root)
    assert config.data.val_size == 6 and len(module.train_set) == 114  # 5% of 120
    assert config.data.image_size == 24 and config.data.batch_size == 32  # 30 -> 24; the batch fits
    config, module = folder_module(root, ["data.val_size=8", "data.image_size=16", "data.channels=1"])
    assert (config.data.val_size, config.data.image_size, config.data.channels) == (8, 16, 1)
    assert module.train_set[0]["image"].shape == (1, 16, 16)


def test_preset_data_shape_is_not_carried_over_to_a_folder():
    config = load_config("fashion-ddpm", ["data.name=folder", "data.root=/x"])
    assert (config.data.image_size, config.data.channels, config.data.val_size) == (None, None, None)
    assert load_config("fashion-ddpm").data.val_size == 256  # the preset itself is unchanged
    assert load_config("fashion-ddpm", ["data.name=folder", "data.root=/x", "data.val_size=5"]).data.val_size == 5
    assert DataConfig().image_size == 28 and DataConfig(name="folder", root="/x").image_size is None


def test_grey_flat_folder_is_grey_and_unconditional(tmp_path, capsys):
    for i in range(10):
        write(tmp_path / "flat" / f"{i:02d}.png", (23, 19), "L", seed=i)
    config, module = folder_module(tmp_path / "flat")
    assert config.data.channels == 1 and config.data.image_size == 16 and config.data.class_names is None
    assert config.model.conditioning.class_label is None
    assert "no class sub-folders" in capsys.readouterr().err
    assert set(module.train_set[0]) == {"image"} and module.train_set[0]["image"].shape == (1, 16, 16)


def test_mixed_grey_and_colour_is_rgb(tmp_path):
    write(tmp_path / "a" / "grey.png", (16, 16), "L")
    write(tmp_path / "a" / "colour.jpg", (16, 16), "RGB")
    write(tmp_path / "b" / "grey.png", (16, 16), "L")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.facts.channels == 3 and dataset[0]["image"].shape == (3, 16, 16)
    assert torch.equal(dataset[1]["image"][0], dataset[1]["image"][2])  # grey repeated


def test_three_step_training_on_rgb_class_folders_with_nothing_else(tmp_path):
    from safetensors import safe_open

    root = class_folder(tmp_path / "photos")
    run = tmp_path / "run"
    code = main(["train", "data.name=folder", f"data.root={root}", *QUICK, f"run_dir={run}", "--no-progress"])
    assert code == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["data"]["image_size"] == 32 and recorded["data"]["channels"] == 3
    assert recorded["data"]["class_names"] == ["apple", "banana", "cherry"] and recorded["data"]["val_size"] == 1
    assert recorded["model"]["conditioning"]["class_label"]["num_classes"] == 3
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    first_conv = [shape for key, shape in shapes.items() if len(shape) == 4 and shape[1] == 3]
    assert first_conv, "no 3-channel input convolution: not trained as RGB"
    grid = Image.open(run / "samples" / "final.png")
    assert grid.mode == "RGB"


# --- captions ---------------------------------------------------------------------------------------

def test_captions_from_jsonl_csv_and_txt_reach_the_batches(tmp_path):
    jsonl = tmp_path / "jsonl"
    for i in range(4):
        write(jsonl / f"{i}.png", seed=i)
    (jsonl / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"photo {i}"})
                                                    for i in range(4)))
    (jsonl / "2.txt").write_text("a sidecar wins\n")
    csv_root = tmp_path / "csv"
    for i in range(3):
        write(csv_root / "cats" / f"{i}.png", seed=i)
    (csv_root / "metadata.csv").write_text("file_name,text\n" + "".join(f"cats/{i}.png,\"cat, number {i}\"\n"
                                                                        for i in range(3)))
    module = ImageDataModule(DataConfig(name="folder", root=str(jsonl), batch_size=4, val_size=0))
    batch = next(iter(module.train_dataloader()))
    key = TextConditionerConfig().input_key  # what the text conditioner reads
    assert sorted(batch[key]) == ["a sidecar wins", "photo 0", "photo 1", "photo 3"]
    for caption, image in zip(batch[key], batch["image"]):  # each caption stays with its image
        index = ["photo 0", "photo 1", "a sidecar wins", "photo 3"].index(caption)
        assert torch.equal(image, module.source("train")[index]["image"])
    assert ImageFolderDataset(jsonl).captions == ["photo 0", "photo 1", "a sidecar wins", "photo 3"]
    csv_set = ImageFolderDataset(csv_root)
    assert csv_set.captions == ["cat, number 0", "cat, number 1", "cat, number 2"] and csv_set.num_classes == 1


def test_caption_errors_name_the_file_or_skip(tmp_path, capsys):
    for i in range(3):
        write(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "0.txt").write_text("only the first has a caption")
    with pytest.raises(DataError, match=r"1\.png: no caption"):
        ImageFolderDataset(tmp_path)
    kept = ImageFolderDataset(tmp_path, skip_bad_files=True)
    assert len(kept) == 1 and len(kept.skipped) == 2
    (tmp_path / "0.txt").unlink()
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(DataError, match="gone.png: named in .*metadata.jsonl but not found"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file": "0.png"}\n')
    with pytest.raises(DataError, match="metadata.jsonl: line 1 needs 'file_name' and 'text'"):
        ImageFolderDataset(tmp_path)


# --- sizes, crops, flips ----------------------------------------------------------------------------

def test_crop_modes(tmp_path):
    pixels = write(tmp_path / "wide.png", (48, 16), "L")
    center = ImageFolderDataset(tmp_path, 16, 1, crop="center")[0]["image"]
    expected = torch.from_numpy(pixels[:, 16:32].astype(np.float32)) / 127.5 - 1
    assert torch.allclose(center[0], expected)
    torch.manual_seed(0)
    crops = {tuple(ImageFolderDataset(tmp_path, 16, 1, crop="random")[0]["image"][0, 0, :3].tolist())
             for _ in range(12)}
    assert len(crops) > 1  # random positions along the long side
    stretched = ImageFolderDataset(tmp_path, 8, 1, crop="stretch")[0]["image"]
    assert stretched.shape == (1, 8, 8)
    module = ImageDataModule(DataConfig(name="folder", root=str(tmp_path.parent / tmp_path.name), batch_size=1,
                                        val_size=0, crop="random"))
    module.setup("fit")
    assert module.config.image_size == 16


def test_odd_sizes_resize_to_the_option(tmp_path):
    for i, size in enumerate(((13, 29), (31, 17), (100, 9))):
        write(tmp_path / f"{i}.png", size, seed=i)
    dataset = ImageFolderDataset(tmp_path, image_size=12)
    assert dataset.facts.image_size == 8 and dataset.facts.smallest_side == 9
    assert all(dataset[i]["image"].shape == (3, 12, 12) for i in range(3))


# --- paired folders ---------------------------------------------------------------------------------

def paired_folder(root: Path, count=6, mask=True, size=(30, 24)) -> Path:
    for name in ("source", "mask") if mask else ("source",):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        target = write(root / "target" / f"{i:02d}.png", size, seed=i)
        Image.fromarray(255 - target).save(root / "source" / f"{i:02d}.png")  # the source: the negative
        if mask:
            hole = np.zeros(target.shape[:2], np.uint8)
            hole[:, : size[0] // 2] = 255
            Image.fromarray(hole).save(root / "mask" / f"{i:02d}.png")
    return root


def test_paired_folder_gives_aligned_pairs(tmp_path):
    root = paired_folder(tmp_path / "pairs")
    dataset = PairedFolderDataset(root, crop="random")
    assert dataset.facts.image_size == 24 and dataset.facts.channels == 3 and len(dataset) == 6
    torch.manual_seed(0)
    for i in range(len(dataset)):
        item = RandomHFlip(dataset)[i]
        assert set(item) == {"source", "image", "mask"}
        assert torch.allclose(item["source"], -item["image"], atol=1e-5)  # negative: the same crop and flip
        assert item["mask"].shape == (1, 24, 24) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    config, module = folder_module(root, ["data.name=paired-folder", "task=bridge"], preset="photo-lbm-denoise")
    assert config.data.degradation is None and config.data.name == "paired-folder"
    batch = next(iter(module.train_dataloader()))
    assert batch["source"].shape == batch["image"].shape == (5, 3, 24, 24) and batch["mask"].shape == (5, 1, 24, 24)


def test_paired_folder_errors_name_the_file_or_skip(tmp_path):
    root = paired_folder(tmp_path / "pairs", mask=False)
    write(root / "target" / "99.png", seed=99)  # no source
    with pytest.raises(DataError, match=r"99\.png: no source of the same name"):
        PairedFolderDataset(root)
    (root / "target" / "99.png").unlink()
    write(root / "source" / "03.png", (31, 24), seed=3)  # a size that differs from its target
    with pytest.raises(DataError, match=r"03\.png: mismatched pair sizes"):
        PairedFolderDataset(root)
    skipping = PairedFolderDataset(root, skip_bad_files=True)
    assert len(skipping) == 5 and len(skipping.skipped) == 1
    (tmp_path / "half" / "source").mkdir(parents=True)
    with pytest.raises(DataError, match="half/target: folder not found"):
        PairedFolderDataset(tmp_path / "half")


# --- bad files --------------------------------------------------------------------------------------

def test_truncated_file_errors_or_is_skipped_with_a_count(tmp_path, capsys):
    root = class_folder(tmp_path / "photos", per_class=3)
    whole = (root / "banana" / "1.png").read_bytes()
    (root / "banana" / "1.png").write_bytes(whole[: len(whole) // 2])
    (root / "cherry" / "0.png").write_bytes(b"not an image at all")
    write(root / "cherry" / "cut.jpg", (40, 40), fmt="JPEG")
    whole = (root / "cherry" / "cut.jpg").read_bytes()
    (root / "cherry" / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # passes verify(), fails to decode
    with pytest.raises(DataError, match=r"banana/1\.png: cannot decode image"):
        folder_module(root)
    config, module = folder_module(root, ["data.skip_bad_files=true"])
    assert len(module.source("train")) == 7 and config.data.class_names == ["apple", "banana", "cherry"]
    assert "skipped 3 bad file(s)" in capsys.readouterr().err
    assert all(module.source("train")[i]["image"].shape == (3, 32, 32) for i in range(7))


def test_missing_folder_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere: image folder not found"):
        folder_module(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.root: required"):
        ImageDataModule(DataConfig(name="folder"))


def test_bridge_trains_on_a_paired_folder(tmp_path):
    root = paired_folder(tmp_path / "pairs", count=8, mask=False, size=(20, 17))
    run = tmp_path / "run"
    code = main(["train", "photo-lbm-denoise", "data.name=paired-folder", f"data.root={root}", "trainer.max_steps=2",
                 "trainer.max_time=null", "optim.warmup_steps=1", f"run_dir={run}", "--no-progress"])
    assert code == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert recorded["name"] == "paired-folder" and recorded["degradation"] is None
    assert (recorded["image_size"], recorded["channels"], recorded["val_size"]) == (16, 3, 1)


def test_bridge_trains_on_a_captioned_folder(tmp_path):
    """A bridge run (degradations made on the fly) on a folder with captions: the captions (lists of strings)
    travel in the batches and its grids (they crashed the grid's move to the device)."""
    root = tmp_path / "captioned"
    for i in range(6):
        write(root / f"{i}.png", (16, 16), seed=i)
        (root / f"{i}.txt").write_text(f"a photo of thing {i}")
    run = tmp_path / "run"
    assert main(["train", "photo-lbm-denoise", "data.name=folder", f"data.root={root}", "trainer.max_steps=1",
                 "trainer.max_time=null", "optim.warmup_steps=0", f"run_dir={run}", "--no-progress"]) == 0
    assert Image.open(run / "samples" / "final.png").mode == "RGB"


def test_text_conditioning_needs_a_captioned_folder(tmp_path):
    text = ["model.conditioning.class_label=null", "model.conditioning.text.encoder=clip"]
    for i in range(4):
        write(tmp_path / "plain" / f"{i}.png", seed=i)
    with pytest.raises(ConfigError, match="model.conditioning.text: the folder has no captions"):
        folder_module(tmp_path / "plain", text, preset="tiny")
    for i in range(4):
        (tmp_path / "plain" / f"{i}.txt").write_text(f"picture {i}")
    config, module = folder_module(tmp_path / "plain", text, preset="tiny")
    assert module.has_captions and config.model.conditioning.text is not None
    with pytest.raises(ConfigError, match="input_key: a folder's captions arrive as 'caption'"):
        folder_module(tmp_path / "plain", [*text, "model.conditioning.text.input_key=prompt"], preset="tiny")


def test_translate_a_paired_folder_run(tmp_path, capsys):
    root = paired_folder(tmp_path / "pairs", count=8, mask=False, size=(16, 16))
    run = tmp_path / "run"
    assert main(["train", "photo-lbm-denoise", "data.name=paired-folder", f"data.root={root}", "trainer.max_steps=1",
                 "trainer.max_time=null", "optim.warmup_steps=0", f"run_dir={run}", "--no-progress"]) == 0
    assert main(["translate", str(run), str(root / "source" / "00.png"), "--out", str(tmp_path / "t.png")]) == 0
    assert Image.open(tmp_path / "t.png").size[1] == 16
    write(tmp_path / "big.png", (20, 16))
    assert main(["translate", str(run), str(tmp_path / "big.png"), "--out", str(tmp_path / "u.png")]) == 2
    assert "big.png: is 20x16; this run translates 16x16 images" in capsys.readouterr().err


def test_a_captioned_folder_trains_a_text_model_and_samples_from_a_prompt(tmp_path):
    """Captions from the folder condition the model; its grids show a row per validation caption."""
    pytest.importorskip("transformers")
    root = tmp_path / "captioned"
    for i in range(6):
        write(root / f"{i}.png", (24, 24), seed=i)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing {i}"})
                                                    for i in range(6)))
    run = tmp_path / "run"
    text = ["model.conditioning.class_label=null", "model.conditioning.text.encoder=minilm",
            "model.conditioning.text.max_length=8", "model.unet.attention_resolutions=[2]"]
    code = main(["train", "tiny", "data.name=folder", f"data.root={root}", *text, *QUICK,
                 "sample.per_class=2", f"run_dir={run}", "--no-progress"])
    assert code == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["model"]["conditioning"]["class_label"] is None and recorded["data"]["channels"] == 3
    grid = Image.open(run / "samples" / "final.png")  # one row of 2 per validation caption (val_size 1)
    assert grid.mode == "RGB" and grid.size[0] < 3 * grid.size[1] + 10
    out = tmp_path / "prompt.png"
    assert main(["sample", str(run), "--prompt", "a photo of thing 1", "--num", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).mode == "RGB"

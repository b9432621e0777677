"""Tests of diffusionforge.data: idx files, folders, embedded data, datamodule.

Only the embedded files and files written into ``tmp_path`` are read.
"""

import gzip
import hashlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionforge.data import datasets as datasets_module
from diffusionforge.data.datamodule import DataConfig, ImageDataModule, split_indices
from diffusionforge.data.datasets import ArrayImageDataset, build_dataset
from diffusionforge.data.embedded import EMBEDDED_DIR, EMBEDDED_FILES, load_embedded
from diffusionforge.data.folder import ImageFolderDataset
from diffusionforge.data.idx import read_idx, write_idx
from diffusionforge.errors import ConfigError, DataError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def idx_root(tmp_path):
    """A tiny MNIST-style folder: 40 train and 20 test images, train gz, test raw."""
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    for prefix, n, gz in (("train", 40, True), ("t10k", 20, False)):
        suffix = ".gz" if gz else ""
        images = rng.integers(0, 256, (n, 28, 28), np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10, gz)
    return root


def make_images(folder, count, size=(20, 12), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, np.uint8), mode).save(folder / f"img{i}.png")


# --- idx -------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("array", [
    np.arange(2 * 5 * 7, dtype=np.uint8).reshape(2, 5, 7),
    np.array([3, 1, 4, 1, 5], dtype=np.uint8),
    np.array([-70000, 2, 70000], dtype=np.int32),
    np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    np.array([[-3, 200]], dtype=np.int16),
])
def test_read_idx_round_trips_write_idx(tmp_path, array, gz):
    path = write_idx(tmp_path / "a.idx", array, gzip=gz)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=") and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # writable, not a view of the file bytes


def test_idx_header_is_big_endian(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(258, np.uint8), gzip=False)
    assert path.read_bytes()[:8] == bytes([0, 0, 8, 1, 0, 0, 1, 2])


def test_gzip_detected_by_magic_not_extension(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    compressed = write_idx(tmp_path / "no-extension", array, gzip=True)
    raw = write_idx(tmp_path / "looks-compressed.gz", array, gzip=False)
    np.testing.assert_array_equal(read_idx(compressed), array)
    np.testing.assert_array_equal(read_idx(raw), array)


def test_write_idx_is_deterministic(tmp_path):
    array = np.arange(100, dtype=np.uint8)
    assert write_idx(tmp_path / "a", array).read_bytes() == write_idx(tmp_path / "b", array).read_bytes()


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_payload_is_a_data_error(tmp_path, gz):
    path = tmp_path / "images"
    payload = bytes([0, 0, 8, 3]) + np.array([60000, 28, 28], ">u4").tobytes() + bytes(1000)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(DataError) as err:
        read_idx(path)
    expected = "truncated idx file: header says 60000x28x28 = 47040000 bytes, found 1000"
    assert one_line(err) == f"{path}: {expected}"


def test_truncated_gzip_stream_is_a_data_error(tmp_path):
    full = write_idx(tmp_path / "full.gz", np.arange(5000, dtype=np.int32)).read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="truncated gzip stream") as err:
        read_idx(cut)
    assert str(cut) in one_line(err)


def test_trailing_bytes_and_short_header_are_data_errors(tmp_path):
    path = write_idx(tmp_path / "a", np.zeros(4, np.uint8), gzip=False)
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="truncated idx file: header"):
        read_idx(path)


@pytest.mark.parametrize("head", [
    b"\x1f\x8b\x08\x08", b"PK\x03\x04", bytes([0, 0, 0x42, 1]), bytes([0, 0, 8, 0]),
])
def test_wrong_magic_is_a_data_error(tmp_path, head):
    path = tmp_path / "bad"
    path.write_bytes(gzip.compress(head + bytes(8)) if head.startswith(b"\x1f") else head + bytes(8))
    with pytest.raises(DataError, match=r"not an idx file \(magic 0x") as err:
        read_idx(path, ndim=3)
    assert one_line(err).startswith(f"{path}: ") and "expected 0x00000803" in str(err.value)


def test_wrong_dimension_count_and_missing_file(tmp_path):
    path = write_idx(tmp_path / "labels.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="1 dimension.*expected 3"):
        read_idx(path, ndim=3)
    with pytest.raises(DataError, match="file not found") as err:
        read_idx(tmp_path / "absent.gz")
    assert str(tmp_path / "absent.gz") in one_line(err)


# --- embedded data -----------------------------------------------------------

def test_embedded_train_subset_is_class_balanced():
    images, labels = load_embedded("train")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)


def test_embedded_test_split_is_full():
    images, labels = load_embedded("test")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)


def test_embedded_sha256_match_readme():
    readme = (EMBEDDED_DIR / "README.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"\| `([^`]+\.gz)` \| `([0-9a-f]{64})` \|", readme))
    assert set(listed) == set(EMBEDDED_FILES.values())
    for name, digest in listed.items():
        assert hashlib.sha256((EMBEDDED_DIR / name).read_bytes()).hexdigest() == digest, name


# --- array datasets ----------------------------------------------------------

def test_embedded_items_in_range_with_shape():
    dataset = build_dataset("fashion-mnist-embedded", "test")
    item = dataset[3]
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert item["class_label"].dtype == torch.long and item["class_label"].ndim == 0
    assert dataset.num_classes == 10
    images = torch.stack([dataset[i]["image"] for i in range(0, 10_000, 97)])
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() == -1 and images.max() == 1


def test_array_dataset_pads_resizes_and_converts_channels():
    images = np.full((2, 28, 28), 255, np.uint8)
    padded = ArrayImageDataset(images, np.array([0, 1]), image_size=32)[0]["image"]
    assert padded.shape == (1, 32, 32)
    assert (padded[:, 2:30, 2:30] == 1).all()
    assert padded[:, :2].eq(-1).all() and padded[:, :, 30:].eq(-1).all()
    small = ArrayImageDataset(images, None, image_size=16, channels=3)[1]
    assert small["image"].shape == (3, 16, 16) and "class_label" not in small
    rgb = np.zeros((1, 10, 10, 3), np.uint8)
    rgb[..., 1] = 255
    gray = ArrayImageDataset(rgb, channels=1)[0]["image"]
    assert gray.shape == (1, 10, 10) and torch.allclose(gray, torch.tensor(150 / 127.5 - 1))


# --- idx sources -------------------------------------------------------------

def test_fashion_mnist_from_root(idx_root):
    train = build_dataset("fashion-mnist", "train", root=str(idx_root))
    test = build_dataset("fashion-mnist", "test", root=str(idx_root), image_size=32, channels=3)
    assert len(train) == 40 and len(test) == 20
    assert test[0]["image"].shape == (3, 32, 32) and int(test[13]["class_label"]) == 3


def test_missing_root_names_the_path(tmp_path):
    for name in ("fashion-mnist", "mnist", "folder"):
        with pytest.raises(DataError) as err:
            build_dataset(name, "train", root=str(tmp_path / "nowhere"))
        assert str(tmp_path / "nowhere") in one_line(err)


def test_missing_files_names_the_files(idx_root):
    (idx_root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        build_dataset("fashion-mnist", "test", root=str(idx_root))
    assert one_line(err).startswith(f"{idx_root}: missing t10k-labels-idx1-ubyte")
    assert "t10k-images-idx3-ubyte" in str(err.value)


def test_mismatched_label_count_is_a_data_error(idx_root):
    write_idx(idx_root / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8), gzip=False)
    with pytest.raises(DataError, match="20 images but labels of shape"):
        build_dataset("mnist", "test", root=str(idx_root))


def test_fashion_mnist_without_root_or_debian_files_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"^data\.root: "):
        build_dataset("fashion-mnist", "train")
    with pytest.raises(ConfigError, match=r"^data\.root: "):
        build_dataset("mnist", "train")


def test_mnist_train_falls_back_to_npz(idx_root):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (idx_root / name).unlink()
    with pytest.raises(DataError, match="mnist_train_10k.npz"):
        build_dataset("mnist", "train", root=str(idx_root))
    x = np.full((30, 28, 28), 7, np.uint8)
    np.savez(idx_root / "mnist_train_10k.npz", x=x, y=np.arange(30, dtype=np.uint8) % 10)
    train = build_dataset("mnist", "train", root=str(idx_root))
    assert len(train) == 30 and int(train[12]["class_label"]) == 2
    assert len(build_dataset("mnist", "test", root=str(idx_root))) == 20


# --- image folders -----------------------------------------------------------

def test_folder_with_class_subfolders(tmp_path):
    for name, count in (("zebra", 2), ("cat", 3)):
        make_images(tmp_path / name, count)
    (tmp_path / "stray.png").write_bytes(b"")  # loose files are ignored when classes exist
    dataset = ImageFolderDataset(tmp_path, image_size=8, channels=3)
    assert dataset.classes == ["cat", "zebra"] and dataset.num_classes == 2 and len(dataset) == 5
    assert [int(dataset[i]["class_label"]) for i in range(5)] == [0, 0, 0, 1, 1]
    image = dataset[4]["image"]
    assert image.shape == (3, 8, 8) and image.min() >= -1 and image.max() <= 1


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    make_images(tmp_path, 3, size=(9, 30), mode="L")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, image_size=16, channels=1)
    assert dataset.num_classes is None and len(dataset) == 3
    item = dataset[0]
    assert set(item) == {"image"} and item["image"].shape == (1, 16, 16)
    rgb = ImageFolderDataset(tmp_path, image_size=9, channels=3)[2]["image"]
    assert rgb.shape == (3, 9, 9) and torch.equal(rgb[0], rgb[2])


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "absent", 8, 1)
    with pytest.raises(DataError, match="no images") as err:
        ImageFolderDataset(tmp_path, 8, 1)
    assert str(tmp_path) in one_line(err)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="class folder has no images"):
        ImageFolderDataset(tmp_path, 8, 1)
    (tmp_path / "empty_class" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: cannot decode image"):
        ImageFolderDataset(tmp_path, 8, 1)[0]


# --- datamodule --------------------------------------------------------------

def embedded_module(seed=0, **overrides):
    config = DataConfig(**{"batch_size": 16, "val_size": 50, **overrides})
    module = ImageDataModule(config, seed=seed)
    module.setup("fit")
    return module


def test_split_is_deterministic_and_disjoint():
    train, val = split_indices(1000, 50, seed=3)
    assert (train, val) == split_indices(1000, 50, seed=3)
    assert val != split_indices(1000, 50, seed=4)[1]
    assert len(val) == 50 and set(train).isdisjoint(val) and sorted(train + val) == list(range(1000))


def test_datamodule_split_follows_seed():
    first, again, other = embedded_module(0), embedded_module(0), embedded_module(1)
    assert first.val_set.indices == again.val_set.indices != other.val_set.indices
    assert set(first.train_set.indices).isdisjoint(first.val_set.indices)
    assert len(first.train_set) == 9950 and len(first.val_set) == 50 and first.num_classes == 10
    limited = embedded_module(0, limit_train=64)
    assert limited.val_set.indices == first.val_set.indices and len(limited.train_set) == 64


def test_datamodule_loaders():
    module = embedded_module(limit_train=40, hflip=True)
    batches = list(module.train_dataloader())
    assert len(batches) == 2  # 40 images, batch 16, last partial batch dropped
    assert batches[0]["image"].shape == (16, 1, 28, 28) and batches[0]["class_label"].shape == (16,)
    val = next(iter(module.val_dataloader()))
    assert val["image"].shape == (16, 1, 28, 28)
    module.setup("test")
    assert len(module.test_dataloader().dataset) == 10_000


def test_datamodule_on_folder(tmp_path):
    for name in ("a", "b", "c"):
        make_images(tmp_path / name, 4)
    module = ImageDataModule(DataConfig(name="folder", root=str(tmp_path), image_size=8, channels=3,
                                        batch_size=4, val_size=2))
    assert module.num_classes == 3
    module.setup("fit")
    assert next(iter(module.train_dataloader()))["image"].shape == (4, 3, 8, 8)
    with pytest.raises(ConfigError, match="^data.name: folder has no test split"):
        module.test_dataloader()


def test_datamodule_missing_root_is_a_data_error(tmp_path):
    module = ImageDataModule(DataConfig(name="fashion-mnist", root=str(tmp_path / "gone")))
    with pytest.raises(DataError) as err:
        module.setup("fit")
    assert str(tmp_path / "gone") in one_line(err) and "train-images-idx3-ubyte" in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("batch_size", 0), ("image_size", 4), ("channels", 2), ("num_workers", -1), ("val_size", -1),
    ("limit_train", 0), ("name", "cifar"), ("hflip", "yes"), ("root", "/somewhere"),
])
def test_bad_config_value_names_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        DataConfig(**{key: value})
    assert one_line(err).startswith(f"data.{key}: ")


def test_sizes_that_leave_no_data_are_config_errors():
    with pytest.raises(ConfigError, match="^data.val_size: "):
        embedded_module(val_size=10_000)
    with pytest.raises(ConfigError, match="^data.batch_size: "):
        embedded_module(limit_train=10)

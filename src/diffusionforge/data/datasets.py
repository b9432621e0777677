"""Image datasets as torch ``Dataset``s, and the registry of named sources.

Every item is a dict: ``{"image": float (C, H, W) in [-1, 1],
"class_label": long ()}``; unlabelled sources leave out ``class_label``.

| name                     | ``root``                                  | splits       |
|--------------------------|-------------------------------------------|--------------|
| ``fashion-mnist-embedded``| ignored: the files inside the package    | train (10k), test |
| ``fashion-mnist``        | folder with the four idx files (raw/.gz); | train, test  |
|                          | None = ``/usr/share/datasets/fashion-mnist``|            |
| ``mnist``                | idx files, or ``mnist_train_10k.npz``     | train, test  |
|                          | (arrays x, y) for train                   |              |
| ``folder``               | image folder (see ``folder.py``)          | train        |
| ``paired-folder``        | source/, target/, mask/ (``folder.py``)   | train        |
| ``skimage-photos``       | ignored: scikit-image's bundled photos    | train (10k), test (1k) |

``skimage-photos`` (unlabelled RGB, needs ``pip install scikit-image``) cuts
square crops of side ``image_size`` from the sample photos shipped inside
scikit-image (no download), each first halved in size by 2 x 2 averaging.
Train and test come from disjoint photos (``SKIMAGE_SPLITS``): train from
astronaut, coffee, rocket, immunohistochemistry, hubble_deep_field and
retina; test from chelsea (the same photo as ``skimage.data.cat``) and the
left view of stereo_motorcycle. Crops go to the split's photos in turn;
positions and horizontal flips are drawn from a fixed seed, so both splits
are the same on every machine.

Idx data are decoded once into one uint8 array; per item only the float
conversion ``x = u / 127.5 - 1`` runs.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffusionforge.data.embedded import NUM_CLASSES, load_embedded
from diffusionforge.data.folder import ImageFolderDataset, PairedFolderDataset, uint8_to_signed
from diffusionforge.data.idx import read_idx
from diffusionforge.errors import ConfigError, DataError

Split = Literal["train", "test"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {  # split -> (images, labels), each stored raw or with a .gz suffix
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_NPZ = "mnist_train_10k.npz"  # arrays x (N, 28, 28) uint8, y (N,); stands in for train idx
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's RGB -> L
SKIMAGE_PHOTOS: dict[str, Callable[[ModuleType], np.ndarray]] = {  # name -> uint8 (H, W, 3) from skimage.data
    "astronaut": lambda data: data.astronaut(),
    "coffee": lambda data: data.coffee(),
    "rocket": lambda data: data.rocket(),
    "immunohistochemistry": lambda data: data.immunohistochemistry(),
    "hubble_deep_field": lambda data: data.hubble_deep_field(),
    "retina": lambda data: data.retina(),
    "chelsea": lambda data: data.chelsea(),  # skimage.data.cat is this photo too
    "motorcycle_left": lambda data: data.stereo_motorcycle()[0],
}  # all shipped inside the scikit-image package: none needs pooch or a network
SKIMAGE_SPLITS: dict[Split, tuple[str, ...]] = {  # disjoint photos per split
    "train": ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"),
    "test": ("chelsea", "motorcycle_left"),
}
SKIMAGE_CROPS = {"train": 10_000, "test": 1_000}  # crops per split
SKIMAGE_SEED = 0  # fixes crop positions and flips
SKIMAGE_DOWNSCALE = 2  # photos are averaged over 2 x 2 blocks before cropping


def fit_to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, size, size): zero-pad when smaller, else crop + resize."""
    height, width = images.shape[-2:]
    if height == width == size:
        return images
    if height <= size and width <= size:
        top, left = (size - height) // 2, (size - width) // 2
        return F.pad(images, (left, size - width - left, top, size - height - top))
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[..., top:top + side, left:left + side].float()
    resized = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} -> (N, channels, H, W)."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {have} channels to {channels}")


class ArrayImageDataset(Dataset):
    """In-memory uint8 images (and optional labels) as dicts of tensors.

    Args:
        images: uint8 (N, H, W) or (N, H, W, C).
        labels: integer (N,) class labels, or None for unlabelled data.
        image_size: output side; smaller images are zero-padded (centered),
            larger ones center-cropped and resized. None keeps the size.
        channels: 1 or 3 to convert (gray is repeated, RGB -> luma), None keeps C.
        num_classes: number of classes; None = max label + 1.
    """

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray] = None,
                 image_size: Optional[int] = None, channels: Optional[int] = None,
                 num_classes: Optional[int] = None) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 (N, H, W) or (N, H, W, C), got {images.dtype} {images.shape}")
        if images.ndim == 3:
            images = images[..., None]
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W)
        if channels is not None:
            tensor = match_channels(tensor, channels)
        self.images = fit_to_size(tensor, image_size) if image_size else tensor
        self.labels = self.num_classes = None
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(images),):
                raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
            self.labels = torch.from_numpy(labels.astype(np.int64))
            self.num_classes = num_classes or (int(labels.max()) + 1 if len(labels) else 0)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"image": uint8_to_signed(self.images[index])}  # (C, H, W)
        if self.labels is not None:
            item["class_label"] = self.labels[index]
        return item


def _expected(split: Split) -> str:
    return " and ".join(IDX_FILES[split]) + " (raw or .gz)"


def _find(root: Path, stem: str) -> Optional[Path]:
    return next((root / n for n in (stem + ".gz", stem) if (root / n).is_file()), None)


def _require_folder(root: Path, expected: str) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (expected {expected})")
    return root


def check_labelled(images: np.ndarray, labels: np.ndarray, source: str, num_classes: int) -> None:
    """DataError unless images are uint8 and labels match them in count and range."""
    if images.dtype != np.uint8:
        raise DataError(f"{source}: expected uint8 images, got {images.dtype}")
    if labels.shape != (len(images),):
        raise DataError(f"{source}: {len(images)} images but labels of shape {labels.shape}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise DataError(f"{source}: labels outside 0..{num_classes - 1}")


def load_idx_split(root: Path, split: Split, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W), labels (N,)) of ``split`` from the idx files in ``root``."""
    _require_folder(root, _expected(split))
    paths = [_find(root, stem) for stem in IDX_FILES[split]]
    if None in paths:
        missing = [s for s, p in zip(IDX_FILES[split], paths) if p is None]
        raise DataError(f"{root}: missing {', '.join(missing)} (expected {_expected(split)})")
    images, labels = read_idx(paths[0], ndim=3), read_idx(paths[1], ndim=1)
    check_labelled(images, labels, f"{paths[0]} + {paths[1].name}", num_classes)
    return images, labels


def load_npz(path: Path, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from an npz file with arrays ``x`` (N, H, W) uint8 and ``y`` (N,)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not {"x", "y"} <= set(archive.files):
                found = ", ".join(archive.files) or "none"
                raise DataError(f"{path}: expected arrays x and y, found {found}")
            images, labels = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read npz file ({err.__class__.__name__})") from None
    if images.ndim != 3:
        raise DataError(f"{path}: x must be (N, H, W), got shape {images.shape}")
    check_labelled(images, labels, str(path), num_classes)
    return images, labels


def _root_or_config_error(root: Optional[str], name: str) -> Path:
    if root is None:
        raise ConfigError(f"data.root: required for data.name={name} (a folder with the dataset files)")
    return Path(root)


def build_fashion_mnist(root: Optional[str], split: Split, image_size: int, channels: int) -> Dataset:
    """Full Fashion-MNIST from ``root`` or, when None, the Debian package location."""
    if root is None and not DEBIAN_FASHION_MNIST.is_dir():
        raise ConfigError(
            f"data.root: not set and {DEBIAN_FASHION_MNIST} does not exist; set data.root to a folder "
            f"with {_expected('train')}, {_expected('test')}, or use data.name=fashion-mnist-embedded"
        )
    images, labels = load_idx_split(Path(root) if root else DEBIAN_FASHION_MNIST, split)
    return ArrayImageDataset(images, labels, image_size, channels, num_classes=NUM_CLASSES)


def build_fashion_mnist_embedded(root: Optional[str], split: Split, image_size: int,
                                 channels: int) -> Dataset:
    """The Fashion-MNIST files inside the package; ``root`` is not used."""
    images, labels = load_embedded(split)
    return ArrayImageDataset(images, labels, image_size, channels, num_classes=NUM_CLASSES)


def build_mnist(root: Optional[str], split: Split, image_size: int, channels: int) -> Dataset:
    """MNIST idx files in ``root``; train falls back to ``mnist_train_10k.npz``."""
    folder = _require_folder(_root_or_config_error(root, "mnist"), f"{_expected(split)}")
    if split == "train" and _find(folder, IDX_FILES["train"][0]) is None:
        if not (folder / MNIST_NPZ).is_file():
            raise DataError(f"{folder}: missing {IDX_FILES['train'][0]} "
                            f"(expected {_expected('train')}, or {MNIST_NPZ})")
        images, labels = load_npz(folder / MNIST_NPZ)
    else:
        images, labels = load_idx_split(folder, split)
    return ArrayImageDataset(images, labels, image_size, channels, num_classes=NUM_CLASSES)


def build_folder(root: Optional[str], split: Split, image_size: Optional[int],
                 channels: Optional[int]) -> Optional[Dataset]:
    """An image folder; it has a train split only (None for test). None size / channels: from the files."""
    folder = _root_or_config_error(root, "folder")
    return ImageFolderDataset(folder, image_size, channels) if split == "train" else None


def build_paired_folder(root: Optional[str], split: Split, image_size: Optional[int],
                        channels: Optional[int]) -> Optional[Dataset]:
    """A paired folder (source/, target/, mask/); it has a train split only (None for test)."""
    folder = _root_or_config_error(root, "paired-folder")
    return PairedFolderDataset(folder, image_size, channels) if split == "train" else None


def _skimage_data() -> ModuleType:
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("data.name: skimage-photos needs scikit-image (pip install scikit-image)") from None
    return skimage.data


@functools.lru_cache(maxsize=1)
def skimage_photos() -> dict[str, np.ndarray]:
    """Every photo of ``SKIMAGE_PHOTOS`` as read-only uint8 (H // 2, W // 2, 3): 2 x 2 block means."""
    data, photos = _skimage_data(), {}
    for name, load in SKIMAGE_PHOTOS.items():
        image = torch.from_numpy(np.ascontiguousarray(load(data)[..., :3])).permute(2, 0, 1).float()
        small = F.avg_pool2d(image, SKIMAGE_DOWNSCALE)  # (3, H // 2, W // 2)
        photos[name] = small.round_().to(torch.uint8).permute(1, 2, 0).numpy()
        photos[name].flags.writeable = False  # cached: shared by every caller
    return photos


def crop_photos(photos: list[np.ndarray], count: int, size: int, seed: int) -> np.ndarray:
    """uint8 (count, size, size, 3): crop k from photo k mod len(photos), random position and flip.

    The draws for crop k do not depend on ``count``, so fewer crops are a
    prefix of more.
    """
    draws = np.random.default_rng(seed).random((count, 3))  # (count, [top, left, flip])
    crops = np.empty((count, size, size, 3), np.uint8)
    for k, (u_top, u_left, u_flip) in enumerate(draws):
        photo = photos[k % len(photos)]
        top = int(u_top * (photo.shape[0] - size + 1))
        left = int(u_left * (photo.shape[1] - size + 1))
        crop = photo[top:top + size, left:left + size]
        crops[k] = crop[:, ::-1] if u_flip < 0.5 else crop
    return crops


def build_skimage_photos(root: Optional[str], split: Split, image_size: int, channels: int,
                         count: Optional[int] = None) -> Dataset:
    """Crops of scikit-image's sample photos; ``root`` is not used, ``count`` overrides SKIMAGE_CROPS."""
    photos = skimage_photos()
    smallest = min(min(photo.shape[:2]) for photo in photos.values())
    if image_size > smallest:
        raise ConfigError(f"data.image_size: {image_size} exceeds {smallest}, the shortest side of the "
                          "downscaled skimage-photos")
    count = SKIMAGE_CROPS[split] if count is None else count
    split_seed = SKIMAGE_SEED + list(SKIMAGE_SPLITS).index(split)
    crops = crop_photos([photos[name] for name in SKIMAGE_SPLITS[split]], count, image_size, split_seed)
    return ArrayImageDataset(crops, None, channels=channels)


DatasetBuilder = Callable[[Optional[str], Split, int, int], Optional[Dataset]]
DATASETS: dict[str, DatasetBuilder] = {
    "fashion-mnist-embedded": build_fashion_mnist_embedded,
    "fashion-mnist": build_fashion_mnist,
    "mnist": build_mnist,
    "folder": build_folder,
    "paired-folder": build_paired_folder,
    "skimage-photos": build_skimage_photos,
}


def build_dataset(name: str, split: Split, *, root: Optional[str] = None,
                  image_size: int = 28, channels: int = 1) -> Optional[Dataset]:
    """The ``split`` of the named source, or None when the source has no such split."""
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return DATASETS[name](root, split, image_size, channels)

"""Images from a folder on disk, one file per image, decoded with PIL.

Layouts (``class_subfolders=None`` picks the first that matches):

| layout                       | labels                                  |
|------------------------------|-----------------------------------------|
| ``root/<class>/<image>.png`` | sorted sub-folder names -> 0..K-1       |
| ``root/<image>.png``         | none (items have no ``class_label``)    |

With class sub-folders, images lying directly in ``root`` are ignored. Each
image is converted to ``L`` (channels=1) or ``RGB`` (channels=3),
center-cropped to a square and resized to ``image_size`` (bicubic), then
scaled to [-1, 1]: ``x = u / 127.5 - 1`` for 8-bit values ``u``. Every
file is checked when the dataset is made (PIL's ``verify``: the header, and
for PNG and WebP the whole file), so a file that is not an image, or a
truncated PNG, is refused before training starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from diffusionforge.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
PIL_MODES = {1: "L", 3: "RGB"}
UINT8_HALF_RANGE = 127.5  # maps 8-bit values 0..255 onto [-1, 1]


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., C, H, W) in 0..255 -> float32 in [-1, 1]."""
    return images.float().div_(UINT8_HALF_RANGE).sub_(1.0)


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension), sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and _is_visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and _is_visible(p))


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Crop the largest centered square, then resize it to ``size`` x ``size``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), Image.Resampling.BICUBIC)


def check_header(path: Path) -> None:
    """DataError unless PIL's ``verify`` accepts ``path`` (without decoding the pixels)."""
    try:
        with Image.open(path) as image:
            image.verify()  # PNG: every chunk's CRC, so a truncated file fails here
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode image ({err.__class__.__name__})") from None


class ImageFolderDataset(Dataset):
    """Images in ``root`` (optionally in class sub-folders) as dicts of tensors.

    Items: ``{"image": float (C, H, W) in [-1, 1], "class_label": long ()}``;
    no ``class_label`` when the folder is unlabelled.

    Args:
        root: the folder.
        image_size: side of the square output images.
        channels: 1 (grayscale) or 3 (RGB).
        class_subfolders: True = each sub-folder is a class; False = images
            directly in ``root``, unlabelled; None = True iff ``root`` has
            sub-folders.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        image_size: int,
        channels: int,
        class_subfolders: Optional[bool] = None,
    ) -> None:
        if channels not in PIL_MODES:
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found")
        folders = _class_folders(self.root)
        labelled = bool(folders) if class_subfolders is None else class_subfolders
        self.classes: Optional[list[str]] = [f.name for f in folders] if labelled else None
        self.files, self.labels = self._scan(folders if labelled else None)
        for path in self.files:
            check_header(path)

    def _scan(self, folders: Optional[list[Path]]) -> tuple[list[Path], Optional[list[int]]]:
        """(image files, labels or None); DataError when there is nothing to load."""
        if folders is None:
            files = list_images(self.root)
            if not files:
                raise DataError(f"{self.root}: no images ({'/'.join(sorted(IMAGE_EXTENSIONS))})")
            return files, None
        if not folders:
            raise DataError(f"{self.root}: no class sub-folders (class_subfolders=True)")
        files, labels = [], []
        for label, folder in enumerate(folders):
            found = list_images(folder)
            if not found:
                raise DataError(f"{folder}: class folder has no images")
            files += found
            labels += [label] * len(found)
        return files, labels

    @property
    def num_classes(self) -> Optional[int]:
        """Number of class sub-folders, None when unlabelled."""
        return None if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int) -> np.ndarray:
        """Decoded, cropped and resized image ``index`` as uint8 (H, W, C)."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert(PIL_MODES[self.channels])
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: cannot decode image ({err.__class__.__name__})") from None
        pixels = np.asarray(center_crop_resize(image, self.image_size), dtype=np.uint8)
        return pixels.reshape(self.image_size, self.image_size, self.channels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(self.load_image(index).copy()).permute(2, 0, 1)  # (C, H, W)
        item = {"image": uint8_to_signed(pixels)}
        if self.labels is not None:
            item["class_label"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item

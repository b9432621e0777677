"""Image grids and PNG files.

Images in the public API are float tensors in [-1, 1], ``(B, C, H, W)``;
files on disk are 8-bit PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from ..errors import DataError

FILE_MODES = {1: ("L", "1"), 3: ("RGB",)}  # PIL modes an input image file may have, by channel count
CHANNEL_NAMES = {1: "grayscale", 3: "RGB"}
from .atomic import atomic_path


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "b c h w -> b h w c").cpu().numpy()


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (B, C, H, W) images row by row into one (H', W', C) uint8 array."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    tiles = to_uint8(images)
    grid = np.zeros((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top:top + h, left:left + w] = tile
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write (H, W, C) uint8 to a PNG atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode_array = array[..., 0] if array.shape[-1] == 1 else array
    with atomic_path(path) as tmp:
        Image.fromarray(mode_array).save(tmp, format="PNG")
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    return save_png(make_grid(images, nrow), path)


def load_image(path: str | Path, channels: int, size: tuple[int, int] | None = None, *,
               any_mode: bool = False) -> Tensor:
    """Read an image file -> (1, C, H, W) in [-1, 1], optionally resized to (H, W).

    The file must have the run's mode (``FILE_MODES``): L or 1 for channels=1, RGB for 3;
    ``any_mode`` converts any mode instead (masks drawn in RGB, say).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here
            mode = opened.mode
            image = opened.convert(FILE_MODES[channels][0])
    except OSError as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    if not any_mode and mode not in FILE_MODES[channels]:  # an RGB file for a grayscale run is a mistake, not a conversion
        raise DataError(f"{path}: is a mode {mode} image; this run takes {CHANNEL_NAMES[channels]} images "
                        f"(mode {' or '.join(FILE_MODES[channels])})")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32).reshape(image.size[1], image.size[0], channels)
    return rearrange(torch.from_numpy(array / 127.5 - 1.0), "h w c -> 1 c h w")

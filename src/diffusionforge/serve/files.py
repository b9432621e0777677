"""The files a request reads and writes: result PNGs with their settings, and uploads in the run's mode.

The page hands the library the same inputs the CLI does, PNG files: an
upload (any mode the browser sends, often RGBA) is converted to the run's
mode (L or RGB) and written to the server's scratch folder; the mask drawn in
the image editor (its layers' painted pixels) is written white-on-black, as
`dforge translate --mask` reads it. A result is written with the request's
settings in PNG text chunks (``tEXt``; ``parameters`` holds the equivalent
command, as Stable Diffusion front-ends do), so a downloaded file says how it
was made.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import DataError

RUN_MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode the run's images are read in
PARAMETERS_KEY = "parameters"   # the tEXt key holding the equivalent `dforge` command


def scratch_file(folder: Path, stem: str) -> Path:
    """A new file name in ``folder`` (requests never share one)."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}-{uuid.uuid4().hex[:10]}.png"


def write_png(array: np.ndarray, path: Path, text: Optional[Mapping[str, object]] = None) -> Path:
    """(H, W, C) uint8 -> ``path``, with ``text`` as PNG text chunks (tEXt; iTXt where not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    Image.fromarray(plain(array)).save(path, format="PNG", pnginfo=info)
    return path


def plain(array: np.ndarray) -> np.ndarray:
    """(H, W, 1) -> (H, W): a grey image as the browser components take it ((H, W, 3) unchanged)."""
    return array[..., 0] if array.shape[-1] == 1 else array


def png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (what ``write_png`` stored)."""
    with Image.open(path) as image:
        image.load()
        return dict(image.text)


def to_image(value) -> Optional[Image.Image]:
    """An upload as a PIL image: a path, a numpy array or an image (None stays None)."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    try:
        with Image.open(value) as image:
            image.load()
            return image
    except OSError as err:
        raise DataError(f"cannot read the uploaded image ({err.__class__.__name__})") from None


def flatten(image: Image.Image) -> Image.Image:
    """Transparent pixels over white (the editor's empty canvas), as an RGB image."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image


def run_image_file(value, channels: int, folder: Path, stem: str) -> Optional[Path]:
    """An upload converted to the run's mode and written as PNG (its size kept: the library checks it)."""
    image = to_image(value)
    if image is None:
        return None
    path = scratch_file(folder, stem)
    flatten(image).convert(RUN_MODES[channels]).save(path, format="PNG")
    return path


def mask_file(layers, size: tuple[int, int], folder: Path) -> Optional[Path]:
    """The pixels painted on any editor layer (alpha > 0) as a white-on-black PNG of ``size`` (W, H);
    None when nothing is painted."""
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers or []:
        image = to_image(layer)
        if image is None:
            continue
        if image.size != size:
            image = image.resize(size, Image.NEAREST)
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        painted |= alpha > 0
    if not painted.any():
        return None
    path = scratch_file(folder, "mask")
    Image.fromarray((painted * 255).astype(np.uint8)).save(path, format="PNG")
    return path

"""PororoSV and FlintstonesSV stories in the HDF5 layout of AR-LDM's data scripts.

AR-LDM (Pan et al. 2024, github.com/xichenpan/ARLDM) converts both datasets
with ``data_script/pororo_hdf5.py`` / ``flintstones_hdf5.py`` into one HDF5
file; ``StoryHDF5Dataset`` reads that file (needs ``pip install h5py``, the
``stories`` extra).

| HDF5 path               | content                                               |
|-------------------------|-------------------------------------------------------|
| ``<split>/image0..4``   | one variable-length uint8 array per story: encoded    |
|                         | image bytes (ARLDM writes PNG with ``cv2.imencode``)  |
| ``<split>/text``        | one UTF-8 string per story: the 5 captions joined by  |
|                         | ``|``                                                 |

``<split>`` is ``train``, ``val`` or ``test``. ``image0`` is the story's first
frame (the given reference frame in AR-LDM's continuation task). An encoded
image may hold a vertical strip of square video frames (Flintstones: 5
frames of 128 x 128 stacked to 640 x 128; Pororo: a multiple of 128 rows);
when the height is a multiple (> 1) of the width, one square frame of the
strip is kept (``strip_frame``: first, middle, or random via torch's global
generator, as ARLDM's ``random.randint``). The frame is then center-cropped
to a square, resized to ``image_size`` (bicubic) and scaled to [-1, 1].

Channel order: ARLDM's scripts hand RGB arrays to ``cv2.imencode``, which
takes them for BGR, so the stored PNGs have red and blue swapped (its loader
undoes this with ``cv2.imdecode``). ``encoded_order="bgr"`` (the default)
reverses the channels after PIL decodes them; use ``"rgb"`` for files
written with correctly ordered images.

Items: ``{"frames": float (F, 3, image_size, image_size) in [-1, 1],
"captions": list of F str}``, the keys ``StoryDataset`` uses (no labels);
batch them with ``stories.collate_stories``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from diffusionforge.data.folder import center_crop_resize, uint8_to_signed
from diffusionforge.errors import ConfigError, DataError

HDF5Split = Literal["train", "val", "test"]
StripFrame = Literal["first", "middle", "random"]
EncodedOrder = Literal["bgr", "rgb"]
HDF5_SPLITS = ("train", "val", "test")
CAPTION_SEPARATOR = "|"  # joins the captions of one story in <split>/text
TEXT_DATASET = "text"


def import_h5py() -> Any:
    """The h5py module, or a one-line ConfigError saying how to install it."""
    try:
        import h5py
    except ImportError:
        raise ConfigError("story HDF5 files need h5py (pip install h5py, or pip install "
                          "diffusionforge[stories])") from None
    return h5py


def image_names(frames: int) -> list[str]:
    """Dataset names of the frames in a split group: image0 ... image{frames - 1}."""
    return [f"image{t}" for t in range(frames)]


def strip_tile(image: Image.Image, strip_frame: StripFrame) -> Image.Image:
    """One square frame of a vertical strip (height a multiple > 1 of the width), else ``image``."""
    width, height = image.size
    if height <= width or height % width:
        return image
    count = height // width
    if strip_frame == "first":
        tile = 0
    elif strip_frame == "middle":
        tile = count // 2
    else:
        tile = int(torch.randint(count, ()))
    return image.crop((0, tile * width, width, (tile + 1) * width))


class StoryHDF5Dataset(Dataset):
    """The ``split`` of an ARLDM-layout PororoSV / FlintstonesSV HDF5 file.

    Args:
        path: the HDF5 file.
        split: group to read, train, val or test.
        image_size: side of the square output frames.
        frames: frames per story, read from image0 ... image{frames - 1} (5 in
            both datasets).
        strip_frame: which square of a vertical frame strip to keep.
        encoded_order: channel order of the stored bytes (see module doc).
    """

    def __init__(self, path: Union[str, os.PathLike], split: HDF5Split, image_size: int, frames: int = 5,
                 *, strip_frame: StripFrame = "first", encoded_order: EncodedOrder = "bgr") -> None:
        if split not in HDF5_SPLITS:
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if strip_frame not in ("first", "middle", "random") or encoded_order not in ("bgr", "rgb"):
            raise ValueError(f"bad strip_frame {strip_frame!r} or encoded_order {encoded_order!r}")
        if frames < 1 or image_size < 1:
            raise ValueError(f"frames and image_size must be >= 1, got {frames}, {image_size}")
        self.path, self.split, self.image_size, self.frames = Path(path), split, image_size, frames
        self.strip_frame, self.encoded_order = strip_frame, encoded_order
        self._group = None  # opened on first access in each process (h5py handles do not fork)
        self._length = self._check_layout()

    def _open_group(self) -> Any:
        h5py = import_h5py()
        if not self.path.is_file():
            raise DataError(f"{self.path}: story HDF5 file not found")
        try:
            handle = h5py.File(self.path, "r")
        except OSError as err:
            raise DataError(f"{self.path}: cannot open as HDF5 ({err.__class__.__name__})") from None
        if self.split not in handle:
            found = ", ".join(sorted(handle.keys())) or "none"
            handle.close()
            raise DataError(f"{self.path}: no split group '{self.split}' (found {found})")
        return handle[self.split]

    def _check_layout(self) -> int:
        """Number of stories; DataError when a dataset is missing or lengths differ."""
        group = self._open_group()
        try:
            for name in image_names(self.frames) + [TEXT_DATASET]:
                if name not in group:
                    raise DataError(f"{self.path}: split '{self.split}' has no dataset '{name}' "
                                    f"(expected image0..image{self.frames - 1} and text)")
            lengths = {len(group[name]) for name in image_names(self.frames) + [TEXT_DATASET]}
            if len(lengths) != 1:
                raise DataError(f"{self.path}: split '{self.split}' datasets differ in length "
                                f"{sorted(lengths)}")
            return lengths.pop()
        finally:
            group.file.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None}  # workers reopen the file

    def __len__(self) -> int:
        return self._length

    def _where(self, index: int) -> str:
        return f"{self.path}: {self.split} story {index}"

    def captions(self, index: int) -> list[str]:
        """The first ``frames`` captions of story ``index``."""
        text = self._h5()[TEXT_DATASET][index]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        captions = text.split(CAPTION_SEPARATOR)
        if len(captions) < self.frames:
            raise DataError(f"{self._where(index)}: {len(captions)} captions in text, expected {self.frames}")
        return captions[:self.frames]

    def load_frame(self, index: int, name: str) -> np.ndarray:
        """uint8 (image_size, image_size, 3) RGB of dataset ``name`` for story ``index``."""
        encoded = np.asarray(self._h5()[name][index], dtype=np.uint8)
        try:
            with Image.open(io.BytesIO(encoded.tobytes())) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{self._where(index)}: {name} does not decode "
                            f"({err.__class__.__name__})") from None
        square = center_crop_resize(strip_tile(image, self.strip_frame), self.image_size)
        pixels = np.asarray(square, dtype=np.uint8)
        return pixels[..., ::-1] if self.encoded_order == "bgr" else pixels

    def _h5(self) -> Any:
        if self._group is None:
            self._group = self._open_group()
        return self._group

    def close(self) -> None:
        """Close the file if this process opened it (it reopens on the next access)."""
        if self._group is not None:
            self._group.file.close()
            self._group = None

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"story {index} out of range for {len(self)} stories")
        index %= len(self)
        frames = np.stack([self.load_frame(index, name) for name in image_names(self.frames)])  # (F, H, W, 3)
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (F, 3, H, W)
        return {"frames": uint8_to_signed(pixels), "captions": self.captions(index)}

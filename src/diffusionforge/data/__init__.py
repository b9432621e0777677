"""Data: idx files, image folders, the embedded Fashion-MNIST default, the datamodule.

| module          | concept                                                     |
|-----------------|-------------------------------------------------------------|
| ``idx``         | ``read_idx`` / ``write_idx`` for (gzip) idx files             |
| ``folder``      | ``ImageFolderDataset``: PNG/JPG files, optional class folders |
| ``embedded``    | the Fashion-MNIST subset shipped inside the package           |
| ``datasets``    | ``ArrayImageDataset`` and the ``DATASETS`` registry            |
| ``degradations``| ``DegradationConfig``, ``PairedDataset``: (source, target)    |
|                 | pairs for image-to-image (SR, inpainting, denoise, deblur)    |
| ``stories``     | ``StoryDataset``: multi-frame stories of one Fashion-MNIST /  |
|                 | MNIST instance with grammar captions (AR-LDM)                 |
| ``story_hdf5``  | ``StoryHDF5Dataset``: PororoSV / FlintstonesSV in ARLDM's HDF5 |
| ``datamodule``  | ``DataConfig`` and the Lightning ``ImageDataModule``          |

Items are dicts ``{"image": float (C, H, W) in [-1, 1], "class_label": long ()}``.
``DataConfig`` and ``ImageDataModule`` are imported on first use, so reading
data does not pay for importing Lightning.
"""

import importlib
from typing import Any

from diffusionforge.data.datasets import DATASETS, ArrayImageDataset, build_dataset
from diffusionforge.data.embedded import load_embedded
from diffusionforge.data.folder import ImageFolderDataset
from diffusionforge.data.idx import read_idx, write_idx

__all__ = [
    "DATASETS",
    "ArrayImageDataset",
    "DataConfig",
    "ImageDataModule",
    "ImageFolderDataset",
    "build_dataset",
    "load_embedded",
    "read_idx",
    "write_idx",
]

_LAZY = {"DataConfig": "diffusionforge.data.datamodule", "ImageDataModule": "diffusionforge.data.datamodule"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Data: idx files, image folders, the embedded Fashion-MNIST default, the datamodule.

| module          | concept                                                     |
|-----------------|-------------------------------------------------------------|
| ``config``      | ``DataConfig``, ``DegradationConfig``, ``StoryConfig``:       |
|                 | the ``data`` settings and their checks (no torch)            |
| ``idx``         | ``read_idx`` / ``write_idx`` for (gzip) idx files             |
| ``folder``      | ``ImageFolderDataset``: PNG/JPG files, optional class folders,|
|                 | captions (metadata.jsonl/csv, name.txt); ``PairedFolderDataset``|
|                 | (source/, target/, mask/); size and channels read from files  |
| ``embedded``    | the Fashion-MNIST subset shipped inside the package           |
| ``datasets``    | ``ArrayImageDataset`` and the ``DATASETS`` registry            |
| ``degradations``| ``PairedDataset``: (source, target) pairs for image-to-image  |
|                 | (SR, inpainting, denoise, deblur)                             |
| ``stories``     | ``StoryDataset``: multi-frame stories of one Fashion-MNIST /  |
|                 | MNIST instance with grammar captions (AR-LDM)                 |
| ``story_hdf5``  | ``StoryHDF5Dataset``: PororoSV / FlintstonesSV in ARLDM's HDF5 |
| ``shards``      | ``ShardStream``: webdataset tar shards (``data.name=shards``),|
|                 | split across ranks / workers, resumable mid-epoch             |
| ``shard_plan``  | which sample each rank / worker reads; the epoch position     |
| ``shard_writer``| ``write_shards``: ``dforge shard`` (any dataset -> shards)     |
| ``datamodule``  | the Lightning ``ImageDataModule``                             |

Items are dicts ``{"image": float (C, H, W) in [-1, 1], "class_label": long ()}``.
Every name here is imported on first use, so reading the config does not
import torch and reading data does not import Lightning.
"""

from diffusionforge.utils.lazy import lazy_attributes

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

__getattr__, __dir__ = lazy_attributes(__name__, {
    "DATASETS": ".datasets",
    "ArrayImageDataset": ".datasets",
    "DataConfig": ".config",
    "ImageDataModule": ".datamodule",
    "ImageFolderDataset": ".folder",
    "build_dataset": ".datasets",
    "load_embedded": ".embedded",
    "read_idx": ".idx",
    "write_idx": ".idx",
})

"""``dforge shard``: write a dataset the package reads as webdataset tar shards plus ``index.json``.

The dataset is the one a config's ``data`` section names (``ImageDataModule``):
a built-in set, an image folder with its classes and captions, a paired
folder with its sources and masks. Splits (``--split``):

| split   | what is written                                                        |
|---------|------------------------------------------------------------------------|
| ``train``| every training image of the source (``data.limit_train`` cuts it); a   |
|         | run on the shards holds out ``data.val_size`` of them                  |
| ``val`` | the validation images a run of the config would hold out               |
| ``all`` | the run's split: its training images under ``train/`` (without the     |
|         | validation ones) and its validation images under ``val/``              |

Each split is written in an order drawn with the config's seed (the key of
a sample stays its index in the source), so that every shard is a random
draw and the first samples of the stream are a fair validation hold-out
(``shards.py``). The images are stored as they reach the model (resized,
centre-cropped, 8-bit PNG: lossless); synthetic degradations
(``data.degradation``) and flips are not stored, a run on the shards applies
them afresh. Shard layout and entries: ``shards.py``.
"""

from __future__ import annotations

import os
import tarfile
import sys
from pathlib import Path
from typing import Literal, Optional

import torch
from torch.utils.data import Dataset, Subset

from diffusionforge.data.captions import caption_names
from diffusionforge.data.shards import FIELDS, INDEX_FILE, ShardIndex, encode_item
from diffusionforge.errors import ConfigError, DataError

ShardSplit = Literal["train", "val", "all"]
SHARD_NAME = "shard-{:06d}.tar"
DEFAULT_SHARD_SIZE = 1000  # samples per shard


def split_datasets(datamodule, split: ShardSplit) -> dict[str, Dataset]:
    """The datasets to write, by shard split name, from an ImageDataModule."""
    c = datamodule.config
    if c.story is not None or c.name == "shards":
        raise ConfigError(f"data.{'story' if c.story is not None else 'name'}: `dforge shard` writes image "
                          "datasets (not stories, not shards)")
    if split == "train":
        full = datamodule.source("train")
        return {"train": Subset(full, range(min(len(full), c.limit_train or len(full))))}
    train, val = datamodule.plain_splits()
    return {"val": val} if split == "val" else {"train": train, "val": val}


def class_names(datamodule) -> Optional[list[str]]:
    """A folder's class names, or the caption names of a built-in labelled set, else None."""
    if datamodule.class_names is not None:
        return list(datamodule.class_names)
    if datamodule.num_classes is None:
        return None
    try:
        return list(caption_names(datamodule.config.name))
    except ConfigError:
        return None


def write_split(dataset: Dataset, out: Path, split: str, shard_size: int, seed: int) -> tuple[list[dict], set]:
    """Write ``dataset`` in a seeded random order as ``out/split/shard-*.tar``; (shard list, item keys)."""
    import webdataset

    (out / split).mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    shards, keys = [], set()
    for first in range(0, len(order), shard_size):
        name = f"{split}/{SHARD_NAME.format(first // shard_size)}"
        chunk = order[first:first + shard_size]
        with webdataset.TarWriter(str(out / name), encoder=False, format=tarfile.USTAR_FORMAT) as writer:  # no PAX headers
            for index in chunk:
                item = dataset[index]
                keys |= set(item)
                writer.write(encode_item(f"{index:09d}", item))
        shards.append({"file": name, "count": len(chunk)})
    return shards, keys


def write_shards(datamodule, out: Path, split: ShardSplit = "train", shard_size: int = DEFAULT_SHARD_SIZE,
                 seed: int = 0, made_from: str = "") -> ShardIndex:
    """Write the ``split`` of ``datamodule``'s data into ``out`` (which must not hold shards yet)."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size: must be >= 1, got {shard_size}")
    if (out / INDEX_FILE).exists() or any(out.glob("*/shard-*.tar")):
        raise DataError(f"{out}: already holds shards; choose another --out or remove them")
    datasets = split_datasets(datamodule, split)
    splits, keys = {}, set()
    for name, dataset in datasets.items():
        if not len(dataset):
            raise DataError(f"{name} split of {made_from or 'the data'} is empty")
        splits[name], found = write_split(dataset, out, name, shard_size, seed)
        keys |= found
        print(f"{name}: {len(dataset)} samples in {len(splits[name])} shards", file=sys.stderr)
    c = datamodule.config
    index = ShardIndex(image_size=c.image_size, channels=c.channels, splits=splits,
                       fields=[key for key in FIELDS if key in keys], class_names=class_names(datamodule),
                       num_classes=datamodule.num_classes, made_from=made_from)
    temporary = out / f".{INDEX_FILE}.tmp"
    temporary.write_text(index.to_json() + "\n", encoding="utf-8")
    os.replace(temporary, out / INDEX_FILE)  # last: a folder with an index is complete
    return index

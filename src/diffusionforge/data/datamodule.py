"""``DataConfig`` and the ``ImageDataModule`` that turns it into data loaders.

Splits built by ``setup`` (``seed`` fixes them):

| split | content                                                            |
|-------|--------------------------------------------------------------------|
| val   | ``val_size`` images of the source's train split, drawn with a      |
|       | ``torch.randperm`` seeded by ``seed``                              |
| train | the rest of the train split in its original order, cut to the      |
|       | first ``limit_train`` when set; random horizontal flips if ``hflip``|
| test  | the source's test split (none for ``folder``)                      |

The validation split does not depend on ``limit_train``, so quick runs and
full runs are validated on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from diffusionforge.data.captions import Captioned, caption_names, check_template
from diffusionforge.data.datasets import build_dataset
from diffusionforge.errors import ConfigError

DatasetName = Literal["fashion-mnist-embedded", "fashion-mnist", "mnist", "folder"]
MIN_IMAGE_SIZE = 8  # smallest side the backbones downsample sensibly


@dataclass
class DataConfig:
    """Which images to train on and how to batch them (YAML section ``data``)."""

    name: DatasetName = "fashion-mnist-embedded"  # source, see datasets.DATASETS
    root: Optional[str] = None  # folder with the dataset files; None = embedded / Debian location
    image_size: int = 28  # images are resized (folder) or zero-padded (idx, if larger) to this
    channels: int = 1  # 1 = grayscale, 3 = RGB (gray sources are repeated)
    batch_size: int = 128  # images per training step (per device)
    num_workers: int = 0  # DataLoader worker processes; 0 loads in the main process
    val_size: int = 100  # images held out from the train split for validation (loss + sample grids)
    limit_train: Optional[int] = None  # use only the first N training images (tests / quick runs)
    hflip: bool = False  # random horizontal flip augmentation (train split only)
    caption_template: Optional[str] = None  # e.g. "a photo of {}": adds batch["caption"] from class names

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming ``data.<field>`` for the first bad value."""
        if self.name not in get_args(DatasetName):
            raise ConfigError(f"data.name: {self.name!r} is not one of {', '.join(get_args(DatasetName))}")
        if self.name == "fashion-mnist-embedded" and self.root is not None:
            raise ConfigError("data.root: not used by data.name=fashion-mnist-embedded; "
                              "set data.name=fashion-mnist (or mnist, folder) to read it")
        minimums = {"image_size": MIN_IMAGE_SIZE, "batch_size": 1, "num_workers": 0, "val_size": 0}
        for key, minimum in minimums.items():
            value = getattr(self, key)
            if not _is_int(value) or value < minimum:
                raise ConfigError(f"data.{key}: must be an integer >= {minimum}, got {value!r}")
        if self.channels not in (1, 3) or not _is_int(self.channels):
            raise ConfigError(f"data.channels: must be 1 or 3, got {self.channels!r}")
        if self.limit_train is not None and (not _is_int(self.limit_train) or self.limit_train < 1):
            raise ConfigError(f"data.limit_train: must be None or an integer >= 1, got {self.limit_train!r}")
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"data.hflip: must be true or false, got {self.hflip!r}")
        check_template(self.caption_template)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RandomHFlip(Dataset):
    """Wraps a dataset; flips ``item["image"]`` (C, H, W) along W with probability 1/2."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[index])
        if torch.rand(()) < 0.5:
            item["image"] = item["image"].flip(-1)
        return item


def split_indices(size: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of a ``size``-item split: val drawn with ``seed``, both sorted."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    val = sorted(order[:val_size].tolist())
    held_out = set(val)
    return [i for i in range(size) if i not in held_out], val


class ImageDataModule(L.LightningDataModule):
    """Train / val / test loaders of the dataset a ``DataConfig`` names."""

    def __init__(self, config: DataConfig, seed: int = 0) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.seed = seed
        self._source: dict[str, Optional[Dataset]] = {}
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def source(self, split: Literal["train", "test"]) -> Optional[Dataset]:
        """The full ``split`` of the source (loaded once), None if it has none."""
        if split not in self._source:
            c = self.config
            dataset = build_dataset(c.name, split, root=c.root, image_size=c.image_size,
                                    channels=c.channels)
            if dataset is not None and c.caption_template is not None:
                dataset = Captioned(dataset, c.caption_template, caption_names(c.name))
            self._source[split] = dataset
        return self._source[split]

    @property
    def num_classes(self) -> Optional[int]:
        """10 for the MNIST family, the number of class sub-folders for folder, None if unlabelled."""
        return getattr(self.source("train"), "num_classes", None)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._setup_train_val()
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self.source("test")

    def _setup_train_val(self) -> None:
        c, full = self.config, self.source("train")
        if c.val_size >= len(full):
            raise ConfigError(f"data.val_size: {c.val_size} leaves no training images of {len(full)}")
        train, val = split_indices(len(full), c.val_size, self.seed)
        train = train[: c.limit_train] if c.limit_train is not None else train
        if len(train) < c.batch_size:
            raise ConfigError(
                f"data.batch_size: {c.batch_size} exceeds the {len(train)} training images "
                "(the last incomplete batch is dropped, so no batch would remain)"
            )
        train_set = Subset(full, train)
        self.train_set = RandomHFlip(train_set) if c.hflip else train_set
        self.val_set = Subset(full, val)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=train, drop_last=train,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        if self.test_set is None:
            raise ConfigError(f"data.name: {self.config.name} has no test split")
        return self._loader(self.test_set, train=False)

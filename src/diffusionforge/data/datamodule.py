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

Image-to-image pairs (``data.degradation``, see ``degradations.py``): when
set, every split is wrapped in a ``PairedDataset`` that adds
``batch["source"]`` (B, C, H, W), the degraded image, and for inpainting
``batch["mask"]`` (B, 1, H, W) (1 = hole); ``batch["image"]`` stays the clean
target. Training pairs are drawn afresh on every access (after the flip, so
image, source and mask are flipped together); val and test pairs are fixed
by (``seed``, index).

| ``data.degradation`` key | meaning (default)                                          |
|--------------------------|------------------------------------------------------------|
| ``task``                 | super_resolution (default), inpainting, denoising, deblurring |
| ``scale``, ``upsample``  | SR: area-downsample by scale (4), back up by bicubic /     |
|                          | bilinear / nearest (bicubic)                               |
| ``mask``                 | inpainting: box, free_form or mixed (mixed)                |
| ``box_min``, ``box_max`` | box sides as fractions of the image side (0.25, 0.5)       |
| ``strokes``, ``vertices``| free-form: up to 4 strokes of up to 6 segments             |
| ``stroke_width_min``,    | free-form brush width (0.08 to 0.2) and longest segment    |
| ``stroke_width_max``,    | (0.4), fractions of the shorter image side                 |
| ``stroke_length``        |                                                            |
| ``fill``                 | value written into the hole of the source (0.0)            |
| ``noise_std``            | denoising: Gaussian std in [-1, 1] units (0.2)             |
| ``blur_sigma``           | deblurring: Gaussian std in pixels (1.5)                   |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal, Optional, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from diffusionforge.data.captions import Captioned, caption_names, check_template
from diffusionforge.data.datasets import build_dataset
from diffusionforge.data.degradations import DegradationConfig, PairedDataset, check_image_size
from diffusionforge.data.stories import StoryConfig, StoryDataset, collate_stories
from diffusionforge.errors import ConfigError

DatasetName = Literal["fashion-mnist-embedded", "fashion-mnist", "mnist", "folder", "skimage-photos"]
BUILT_IN = ("fashion-mnist-embedded", "skimage-photos")  # sources that ship their images (no data.root)
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
    degradation: Optional[DegradationConfig] = None  # image-to-image pairs: adds batch["source"] (+ "mask")
    story: Optional[StoryConfig] = None  # stories (task=story): batches of frames + captions, see stories.py

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming ``data.<field>`` for the first bad value."""
        if self.name not in get_args(DatasetName):
            raise ConfigError(f"data.name: {self.name!r} is not one of {', '.join(get_args(DatasetName))}")
        if self.name in BUILT_IN and self.root is not None:
            raise ConfigError(f"data.root: not used by data.name={self.name}; "
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
        self.degradation = _as_section(self.degradation, DegradationConfig, "degradation")
        if self.degradation is not None:
            check_image_size(self.degradation, self.image_size)
        self.story = _as_section(self.story, StoryConfig, "story")
        if self.story is not None:
            self._check_story()

    def _check_story(self) -> None:
        """Story frames are the images: the canvas fixes image_size, stories are grey, no pairs or templates.

        HDF5 stories (PororoSV / FlintstonesSV) are RGB frames resized to image_size.
        """
        story = self.story
        if story.source == "hdf5":
            if self.channels != 3:
                raise ConfigError(f"data.channels: HDF5 stories are RGB (3 channels), got {self.channels}")
        elif self.image_size != story.canvas:
            raise ConfigError(f"data.image_size: must equal data.story.canvas ({story.canvas}) for stories, "
                              f"got {self.image_size}")
        elif self.channels != 1:
            raise ConfigError(f"data.channels: stories are grey (1 channel), got {self.channels}")
        for key in ("degradation", "caption_template", "limit_train"):
            if getattr(self, key) is not None:
                raise ConfigError(f"data.{key}: not used with data.story (stories carry their own captions; "
                                  "size the splits with data.story.train_stories etc.)")
        if self.batch_size > story.train_stories:
            raise ConfigError(f"data.batch_size: {self.batch_size} exceeds data.story.train_stories "
                              f"({story.train_stories}); no full batch would remain")


def _as_section(value: object, cls: type, key: str):
    """None, a validated ``cls`` instance, or one built from a mapping of its fields (section ``data.<key>``)."""
    if value is None:
        return None
    if isinstance(value, cls):
        value.validate()
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"data.{key}: must be a mapping of {key} keys or null, got {value!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ConfigError(f"data.{key}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    return cls(**dict(value))


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
        """10 for the MNIST family, the number of class sub-folders for folder, None if unlabelled or stories."""
        if self.config.story is not None:
            return None  # stories are conditioned by their captions
        return getattr(self.source("train"), "num_classes", None)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.config.story is not None:
            self._setup_stories(stage)
            return
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._setup_train_val()
        if stage in (None, "test") and self.test_set is None:
            test = self.source("test")
            self.test_set = None if test is None else self.paired(test, deterministic=True)

    def paired(self, dataset: Dataset, deterministic: bool) -> Dataset:
        """``dataset`` wrapped in a PairedDataset when data.degradation is set, else itself."""
        degradation = self.config.degradation
        if degradation is None:
            return dataset
        return PairedDataset(dataset, degradation, seed=self.seed, deterministic=deterministic)

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
        train_set = RandomHFlip(train_set) if c.hflip else train_set  # flip x before degrading it
        self.train_set = self.paired(train_set, deterministic=False)
        self.val_set = self.paired(Subset(full, val), deterministic=True)

    def _setup_stories(self, stage: Optional[str]) -> None:
        """StoryDataset splits (their own seeded draw: data.story.seed), or the HDF5 file's splits."""
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set = self.stories("train")
            self.val_set = self.stories("val")
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self.stories("test")

    def stories(self, split: Literal["train", "val", "test"]) -> Dataset:
        """One split of data.story: made stories, or an HDF5 file's (a random frame of a strip in training)."""
        story = self.config.story
        if story.source != "hdf5":
            return StoryDataset(story, split)
        from diffusionforge.data.story_hdf5 import StoryHDF5Dataset

        return StoryHDF5Dataset(story.root, split, image_size=self.config.image_size, frames=story.frames,
                                strip_frame="random" if split == "train" else "middle")

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.config.num_workers
        collate = collate_stories if self.config.story is not None else None
        return DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=train, drop_last=train,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
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

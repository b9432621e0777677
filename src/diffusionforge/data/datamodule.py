"""The ``ImageDataModule`` that turns a ``DataConfig`` (``config.py``) into data loaders.

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

One's own images (``data.name=folder`` / ``paired-folder``, ``folder.py``):
the datamodule reads the files once when it is made and resolves what the
config leaves to the data (``resolve_folder``): ``image_size`` and
``channels`` (None = from the files), ``val_size`` (None = 5%, at least 1),
``batch_size`` (lowered to the training images when the folder is smaller)
and ``class_names`` (the class sub-folders). ``self.config`` is the resolved
copy, which ``tasks.parts.resolve_from_data`` puts into the run's config;
one line on stderr says what was read. Random crops (``crop=random``) apply
to the train split only; val is center-cropped.

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

from typing import Literal, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

import dataclasses
import sys

from diffusionforge.data.captions import Captioned, caption_names
from diffusionforge.data.config import DataConfig
from diffusionforge.data.folder import FLIPPED_KEYS, ImageFolderDataset, PairedFolderDataset, auto_val_size
from diffusionforge.data.datasets import build_dataset
from diffusionforge.data.degradations import PairedDataset
from diffusionforge.data.epoch_order import EpochOrder
from diffusionforge.data.stories import StoryDataset, collate_stories
from diffusionforge.errors import ConfigError


class RandomHFlip(Dataset):
    """Wraps a dataset; flips ``item["image"]`` (C, H, W) along W with probability 1/2 (with its
    ``source`` and ``mask`` when a paired folder gives them)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[index])
        if torch.rand(()) < 0.5:
            for key in FLIPPED_KEYS:
                if key in item:
                    item[key] = item[key].flip(-1)
        return item


def resolve_folder(config: DataConfig, dataset) -> tuple[DataConfig, str]:
    """``config`` with what a folder dataset implies filled in, and one line saying what was read."""
    facts = dataset.facts
    image_size = config.image_size if config.image_size is not None else facts.image_size
    channels = config.channels if config.channels is not None else facts.channels
    val_size = config.val_size if config.val_size is not None else auto_val_size(facts.count)
    train = facts.count - val_size
    if config.limit_train is not None:
        train = min(train, config.limit_train)
    batch_size = min(config.batch_size, train) if train >= 1 else config.batch_size
    names = list(dataset.classes) if dataset.classes is not None else None
    resolved = dataclasses.replace(config, image_size=image_size, channels=channels, val_size=val_size,
                                   batch_size=batch_size, class_names=names)
    size_note = (f"data.image_size={image_size}" + ("" if config.image_size is not None else
                 f" (shorter sides >= {facts.smallest_side} px)"))
    parts = [f"{facts.count} {'pairs' if config.name == 'paired-folder' else 'images'}",
             f"{len(names)} classes ({', '.join(names)})" if names else "no class folders (unconditional)",
             f"data.channels={channels} ({'RGB' if channels == 3 else 'grey'})", size_note,
             f"data.val_size={val_size}"]
    if batch_size != config.batch_size:
        parts.append(f"data.batch_size={batch_size} (was {config.batch_size}; {train} training images)")
    if dataset.captions is not None:
        parts.append("captions")
    if len(facts.skipped):
        parts.append(facts.skipped.summary())
    return resolved, f"data: {config.root}: " + ", ".join(parts)



def split_indices(size: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of a ``size``-item split: val drawn with ``seed``, both sorted."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    val = sorted(order[:val_size].tolist())
    held_out = set(val)
    return [i for i in range(size) if i not in held_out], val


def _recropped(dataset: Dataset, crop: str) -> Dataset:
    """A folder dataset (perhaps Captioned) with another crop mode."""
    if isinstance(dataset, Captioned):
        return Captioned(_recropped(dataset.dataset, crop), dataset.template, dataset.names)
    return dataset.resized(dataset.image_size, dataset.channels, crop)


class ImageDataModule(L.LightningDataModule):
    """Train / val / test loaders of the dataset a ``DataConfig`` names."""

    def __init__(self, config: DataConfig, seed: int = 0) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.seed = seed
        self._source: dict[str, Optional[Dataset]] = {}
        self._eval_source: Optional[Dataset] = None  # a folder's train split, center-cropped (val)
        self.data_note: Optional[str] = None  # the line that says what a folder gave
        self.latent_cache = None  # data.cache: the LatentCache the training split is read from
        self.shards = None  # data.name=shards: the ShardSet of data.root (shards.py)
        self._shard_position: Optional[dict] = None  # a checkpoint's data position, until the stream exists
        self._resumed: Optional[tuple[int, int]] = None  # (epoch, images of its order done) of a resumed fit
        if config.name == "shards":
            self._read_shards()
        elif config.from_folder:
            self._read_folder()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _read_folder(self) -> None:
        """Scan the folder once; resolve self.config from it; print the line saying what it gave."""
        c = self.config
        if c.root is None:
            raise ConfigError(f"data.root: required for data.name={c.name} (the folder of images)")
        if c.name == "paired-folder":
            dataset = PairedFolderDataset(c.root, c.image_size, c.channels, c.crop, c.skip_bad_files)
        else:
            dataset = ImageFolderDataset(c.root, c.image_size, c.channels, crop=c.crop,
                                         skip_bad_files=c.skip_bad_files)
        self.config, self.data_note = resolve_folder(c, dataset)
        c = self.config
        train = dataset.resized(c.image_size, c.channels)
        if c.caption_template is not None:
            if dataset.classes is None:
                raise ConfigError("data.caption_template: the folder has no class sub-folders to name")
            train = Captioned(train, c.caption_template, [name.replace("_", " ") for name in dataset.classes])
        self._source["train"], self._source["test"] = train, None
        self._eval_source = train if c.crop != "random" else _recropped(train, "center")
        print(self.data_note, file=sys.stderr)

    def _read_shards(self) -> None:
        """Read the shards' index and validation samples; resolve self.config from the index."""
        from diffusionforge.data.shards import ShardSet

        self.shards = ShardSet(self.config, self.seed)
        self.config, self.data_note = self.shards.config, self.shards.note
        print(self.data_note, file=sys.stderr)

    @property
    def has_captions(self) -> bool:
        """Whether a folder's files (or the shards) carry captions (metadata.jsonl / .csv, name.txt): item["caption"]."""
        if self.shards is not None:
            return "caption" in self.shards.index.fields
        return getattr(self._source.get("train"), "captions", None) is not None

    @property
    def class_names(self) -> Optional[list[str]]:
        """The class names of a folder run (its class sub-folders), None otherwise."""
        return self.config.class_names

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
        if self.shards is not None:
            return self.shards.index.num_classes
        return getattr(self.source("train"), "num_classes", None)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.config.story is not None:
            self._setup_stories(stage)
            return
        if stage in (None, "fit", "validate") and self.train_set is None and self.shards is not None:
            self.train_set = self.shards.stream(rank=0, world_size=1)  # placed on its rank by train_dataloader
            self.val_set = self.paired(self.shards.val, deterministic=True)
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
        train_set = Subset(full, train) if c.cache is None else self.cached(train, len(full))
        train_set = RandomHFlip(train_set) if c.hflip else train_set  # flip x before degrading it
        self.train_set = self.paired(train_set, deterministic=False)
        self.val_set = self.paired(Subset(self._eval_source or full, val), deterministic=True)

    def cached(self, train: list[int], source_count: int) -> Dataset:
        """data.cache: the training split's items read from the latent cache (latent_cache.py), which must
        have been made from this dataset; the validation split stays images."""
        from diffusionforge.data.latent_cache import LatentCache, dataset_facts

        self.latent_cache = LatentCache(self.config.cache)
        self.latent_cache.check("dataset", self.latent_cache.index.dataset, dataset_facts(self.config, source_count))
        return self.latent_cache.subset(train)

    def plain_splits(self) -> tuple[Dataset, Dataset]:
        """(train, val) of the source as a run splits it, before flips and pairs (``dforge shard --split all``);
        a folder's images centre-cropped."""
        c, full = self.config, self.source("train")
        train, val = split_indices(len(full), c.val_size, self.seed)
        full = self._eval_source or full
        return Subset(full, train[: c.limit_train] if c.limit_train is not None else train), Subset(full, val)

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
        """Training: a new order per epoch seeded by (seed, epoch), dealt out to this process, picking a resumed
        epoch up where it stopped (``epoch_order.py``); evaluation: the dataset's order."""
        workers = self.config.num_workers
        collate = collate_stories if self.config.story is not None else None
        sampler = None
        if train:
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            sampler = EpochOrder(len(dataset), self.seed, rank, world)
            if self._resumed is not None:
                sampler.resume(*self._resumed)
        return DataLoader(
            dataset, batch_size=self.config.batch_size, sampler=sampler, drop_last=train,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
        )

    def resume_epoch(self, epoch: int, done: int) -> None:
        """A resumed fit: the first ``done`` images of ``epoch``'s training order were trained on already
        (``epoch_position.EpochPosition``); a shard stream keeps its own position instead."""
        self._resumed = (epoch, done)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if self.shards is not None:
            return self._shard_loader()
        return self._loader(self.train_set, train=True)

    def _shard_loader(self) -> DataLoader:
        """The stream of this rank, continuing a checkpoint's position; a new epoch at every iter()."""
        from diffusionforge.data.shards import ShardLoader

        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.train_set = self.shards.stream(rank, world_size)
        if self._shard_position is not None:
            self.train_set.resume(self._shard_position)
        workers = self.config.num_workers
        return ShardLoader(self.train_set, epoch=lambda: trainer.current_epoch if trainer is not None else 0,
                           batch_size=self.config.batch_size, num_workers=workers,
                           pin_memory=torch.cuda.is_available())  # workers restart each epoch: no persistent_workers

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Count the training batches a shard stream has given the trainer (its position in the epoch)."""
        if self.shards is not None and self.trainer is not None and self.trainer.training:
            self.train_set.advance()
        return batch

    def state_dict(self) -> dict:
        """data.name=shards: the stream's position in its epoch (in the Lightning checkpoint)."""
        if self.shards is None or self.train_set is None:
            return {}
        return {"shards": self.train_set.position()}

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed run's shard stream continues from the checkpoint's position."""
        if self.shards is not None and "shards" in state_dict:
            self._shard_position = state_dict["shards"]

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

"""Training from tar shards through webdataset (``data.name=shards data.root=DIR``).

``dforge shard SRC --out DIR`` (``shard_writer.py``) writes any dataset the
package reads as POSIX tar shards plus ``index.json``:

```
DIR/index.json                 sizes, channels, class names, which fields exist, samples per shard
DIR/train/shard-000000.tar     000000017.png  000000017.cls  000000017.json  (000000017.source.png, .mask.png)
DIR/val/shard-000000.tar       (--split all / val)
```

One sample per key: the image as a PNG (lossless, L or RGB), ``.cls`` the
class label as decimal text, ``.json`` ``{"caption": ...}``; a paired
folder's ``source`` as ``.source.png`` and its ``mask`` (white = hole) as
``.mask.png``. The key is the sample's index in the dataset it came from.

``data.root`` is a folder or any URL webdataset's ``gopen`` opens
(``http(s)://``, ``gs://``, ``ais://``, ``hf://``, ...); the index is
``ROOT/index.json`` and shard ``i`` is ``ROOT/<file in the index>``.
webdataset opens the URLs and splits the tar streams into samples; which
shard and sample each rank and worker reads, the per-epoch shuffle and the
position in the epoch are ``shard_plan.py`` (webdataset's own shuffle buffer
and ``split_by_node`` are neither resumable nor equal across ranks).

``ShardStream`` is the training split: an ``IterableDataset`` that a
DataLoader with W workers reads, each worker its own part of the plan;
``start_epoch`` picks the epoch's order, ``advance`` counts the batches the
trainer took and ``position`` / ``resume`` are what
``ImageDataModule.state_dict`` / ``load_state_dict`` keep in the checkpoint:
a resumed run delivers the rest of the epoch, each sample once. The
validation split (the ``val/`` shards, else the first ``data.val_size``
samples of the training shards, which ``dforge shard`` wrote in random
order) is read once into memory (``ShardSamples``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import tarfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from diffusionforge.data.captions import make_captions
from diffusionforge.data.config import DataConfig, DegradationConfig
from diffusionforge.data.degradations import PairedDataset, degrade
from diffusionforge.data.folder import FLIPPED_KEYS, PIL_MODES, auto_val_size, crop_box, fit_image, to_tensor
from diffusionforge.data.shard_plan import Ranges, Split, epoch_order, merge_ranges, open_positions
from diffusionforge.errors import ConfigError, DataError

INDEX_FILE = "index.json"
FORMAT = "diffusionforge-shards"  # index.json "format"
VERSION = 1
SPLITS = ("train", "val")
FIELDS = {"class_label": "cls", "caption": "json", "source": "source.png", "mask": "mask.png"}  # item key -> entry
RawSample = dict  # one key's tar entries: {"__key__": str, "png": bytes, "cls": bytes, ...}


@dataclass
class ShardIndex:
    """``index.json``: what the shards hold and how many samples each shard has."""

    image_size: int
    channels: int
    splits: dict[str, list[dict]]  # split -> [{"file": "train/shard-000000.tar", "count": 1000}, ...]
    fields: list[str]  # item keys besides "image" that every sample has (FIELDS)
    class_names: Optional[list[str]] = None  # the names captions are made from, when labelled
    num_classes: Optional[int] = None
    made_from: str = ""  # the dataset the shards were written from

    def counts(self, split: str) -> list[int]:
        return [int(shard["count"]) for shard in self.splits.get(split, [])]

    def urls(self, root: str, split: str) -> list[str]:
        return [join_url(root, shard["file"]) for shard in self.splits.get(split, [])]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "ShardIndex":
        try:
            record = json.loads(text)
            if record.pop("format", None) != FORMAT or record.pop("version", None) != VERSION:
                raise ValueError(f"not a {FORMAT} version {VERSION} index")
            index = cls(**record)
            if not all(isinstance(s["file"], str) and int(s["count"]) >= 0 for v in index.splits.values()
                       for s in v) or set(index.splits) - set(SPLITS):
                raise ValueError("bad shard list")
            if index.channels not in PIL_MODES or set(index.fields) - set(FIELDS):
                raise ValueError("bad channels or fields")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise DataError(f"{where}: not a shard index ({str(err).splitlines()[0]})") from None
        return index


def join_url(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def is_local(root: str) -> bool:
    return "://" not in root and not root.startswith("pipe:")


def open_url(url: str):
    """A binary stream of ``url`` through webdataset's gopen (files, pipes, http, gs, ...); DataError."""
    import webdataset

    try:
        return webdataset.gopen(url, "rb")
    except (OSError, ValueError) as err:
        raise DataError(f"{url}: cannot open ({err.__class__.__name__})") from None


def read_index(root: str) -> ShardIndex:
    """The index of the shards at ``root``; a one-line DataError when there is none."""
    url = join_url(root, INDEX_FILE)
    if is_local(root):
        if not Path(root).is_dir():
            raise DataError(f"{root}: shard folder not found")
        if not Path(url).is_file():
            raise DataError(f"{root}: no {INDEX_FILE}, not a shard folder (write one with "
                            f"`dforge shard SRC --out {root}`)")
    try:
        with closing(open_url(url)) as stream:
            text = stream.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{url}: cannot read ({err.__class__.__name__})") from None
    return ShardIndex.from_json(text, url)


def read_shard(url: str) -> Iterator[RawSample]:
    """The samples of one tar shard in file order (webdataset's tar reader and key grouping)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        with closing(open_url(url)) as stream:
            yield from group_by_keys({**entry, "__url__": url} for entry in tar_file_iterator(stream))
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else "truncated"
        raise DataError(f"{url}: corrupted shard ({err.__class__.__name__}: {reason})") from None


def read_positions(urls: list[str], order, positions: np.ndarray) -> Iterator[tuple[RawSample, str]]:
    """(raw sample, its shard's url) at each epoch position of ``positions``, in that order.

    Reads only the shards holding one of them, each front to back and no
    further than its last wanted sample; holds at most a shuffle block of
    raw samples (a position's sample lies in its own block of the stream).
    """
    wanted = order.sigma[positions].tolist()  # stream indices in delivery order
    needed = np.sort(order.sigma[positions])
    needed_set, buffer, next_out = set(wanted), {}, 0
    for j, shard in enumerate(order.shard_order.tolist()):
        lo, hi = int(order.starts[j]), int(order.starts[j + 1])
        first, end = np.searchsorted(needed, [lo, hi])
        if first == end:
            continue
        url, last, t = urls[shard], int(needed[end - 1]), lo - 1
        with closing(read_shard(url)) as samples:
            for t, raw in zip(range(lo, hi), samples):
                if t in needed_set:
                    buffer[t] = raw
                while next_out < len(wanted) and wanted[next_out] in buffer:
                    yield buffer.pop(wanted[next_out]), url
                    next_out += 1
                if t >= last:
                    break
        if t < last:
            raise DataError(f"{url}: ends after {t - lo + 1} samples; {INDEX_FILE} says {hi - lo}")


def read_first(urls: list[str], count: int) -> list[tuple[RawSample, str]]:
    """The first ``count`` raw samples of the shards in index order."""
    samples: list[tuple[RawSample, str]] = []
    for url in urls:
        if len(samples) >= count:
            break
        with closing(read_shard(url)) as stream:
            for raw in stream:
                samples.append((raw, url))
                if len(samples) >= count:
                    break
    return samples


# --- samples <-> items --------------------------------------------------------


def to_png(image: torch.Tensor) -> bytes:
    """float (C, H, W) in [-1, 1] -> PNG bytes (8 bits, L or RGB): lossless for 8-bit sources."""
    pixels = image.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_item(key: str, item: dict) -> RawSample:
    """An item (``image`` and any of FIELDS) as the tar entries of one sample."""
    sample = {"__key__": key, "png": to_png(item["image"])}
    if "class_label" in item:
        sample["cls"] = str(int(item["class_label"])).encode()
    if "caption" in item:
        sample["json"] = json.dumps({"caption": item["caption"]}).encode()
    if "source" in item:
        sample["source.png"] = to_png(item["source"])
    if "mask" in item:
        sample["mask.png"] = to_png(item["mask"] * 2 - 1)
    return sample


@dataclass
class Decoder:
    """Raw sample -> item: PNGs to (C, H, W) in [-1, 1] (centre-cropped and resized when
    ``image_size`` differs from the shards'), labels, captions; training adds flips and degradations."""

    channels: int
    image_size: int
    hflip: bool = False  # flip image, source and mask together with probability 1/2
    degradation: Optional[DegradationConfig] = None  # training pairs drawn afresh (degradations.py)
    caption_template: Optional[str] = None  # captions from class_names instead of the stored ones
    class_names: tuple[str, ...] = ()

    def image(self, data: bytes, mode: str, where: str) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert(mode)
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"{where}: cannot decode image ({err.__class__.__name__})") from None
        return fit_image(image, self.image_size, crop_box(*image.size, "center"))

    def __call__(self, raw: RawSample, url: str) -> dict:
        where = f"{url}: {raw.get('__key__')}"
        if "png" not in raw:
            raise DataError(f"{where}: sample has no .png image")
        mode = PIL_MODES[self.channels]
        item = {"image": to_tensor(self.image(raw["png"], mode, where), self.channels)}
        try:
            if "cls" in raw:
                item["class_label"] = torch.tensor(int(raw["cls"]), dtype=torch.long)
            if "json" in raw:
                item.update(json.loads(raw["json"]))
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(f"{where}: bad .cls or .json entry ({err.__class__.__name__})") from None
        if self.caption_template is not None and "class_label" in item:
            item["caption"] = make_captions(self.caption_template, self.class_names, [item["class_label"]])[0]
        if "source.png" in raw:
            item["source"] = to_tensor(self.image(raw["source.png"], mode, where), self.channels)
        if "mask.png" in raw:
            mask = np.asarray(self.image(raw["mask.png"], "L", where), dtype=np.uint8)
            item["mask"] = torch.from_numpy(mask > 127).float()[None]  # (1, H, W), 1 = hole
        return self.augment(item)

    def augment(self, item: dict) -> dict:
        if self.hflip and torch.rand(()) < 0.5:
            item.update({key: item[key].flip(-1) for key in FLIPPED_KEYS if key in item})
        if self.degradation is not None:
            generator = PairedDataset(None, self.degradation, seed=0, deterministic=False).generator(0)
            item.update(degrade(item["image"], self.degradation, generator))
        return item


class ShardSamples(Dataset):
    """Raw samples held in memory, decoded on access (the validation split)."""

    def __init__(self, samples: list[tuple[RawSample, str]], decode: Decoder) -> None:
        self.samples, self.decode = samples, decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.decode(*self.samples[index])


class ShardStream(IterableDataset):
    """The training split of a set of shards, dealt to ranks and workers by ``shard_plan``.

    Args:
        urls, counts: the shards and their samples, in index order (sample ids follow it).
        decode: raw sample -> item.
        split: world size, workers, batch size, drop_last.
        rank: this process's rank.
        seed: with the epoch, fixes the epoch's order.
        lo, hi: the sample ids [lo, hi) that are this split (the rest is held out or cut).
    """

    def __init__(self, urls: list[str], counts: list[int], decode: Callable[[RawSample, str], dict],
                 split: Split, rank: int = 0, seed: int = 0, lo: int = 0, hi: Optional[int] = None,
                 shuffle: bool = True) -> None:
        self.urls, self.counts, self.decode = list(urls), list(counts), decode
        self.split, self.rank, self.seed, self.shuffle = split, rank, seed, shuffle
        self.lo, self.hi = lo, sum(counts) if hi is None else hi
        self.epoch, self.consumed, self.taken = 0, [], 0  # consumed: before this iteration; taken: batches since

    def order(self):
        return epoch_order(self.counts, self.seed, self.epoch, self.shuffle)

    def open_positions(self) -> np.ndarray:
        """The positions of this epoch that no rank has delivered yet (before this iteration)."""
        return open_positions(self.order(), self.lo, self.hi, self.consumed)

    def batches_per_epoch(self) -> int:
        """Batches each rank delivers in a whole epoch."""
        return -(-len(self.split.rank_positions(open_positions(self.order(), self.lo, self.hi, []), self.rank))
                 // self.split.batch_size)

    def start_epoch(self, epoch: int) -> None:
        """Begin iterating ``epoch``: from its start, or where the same epoch stands (after ``resume``)."""
        if epoch == self.epoch:
            self.consumed = self.position()["consumed"]
        else:
            self.epoch, self.consumed = epoch, []
        self.taken = 0

    def advance(self, batches: int = 1) -> None:
        """Count batches the trainer has taken from this iteration (the same number on every rank)."""
        self.taken += batches

    def position(self) -> dict:
        """Where the epoch stands: {"epoch", "samples", "consumed": ranges of epoch positions delivered}."""
        taken = self.split.consumed_after(self.open_positions(), self.taken) if self.taken else []
        return {"epoch": self.epoch, "samples": sum(self.counts), "consumed": merge_ranges(self.consumed, taken)}

    def resume(self, position: dict) -> None:
        """Continue from ``position`` (of ``position()``, perhaps with another world size or workers)."""
        if position.get("samples") != sum(self.counts):
            print(f"data: the checkpoint's data position is of {position.get('samples')} samples, the shards "
                  f"have {sum(self.counts)}: epoch {position.get('epoch')} starts afresh", file=sys.stderr)
            self.epoch, self.consumed = int(position.get("epoch", 0)), []
        else:
            self.epoch, self.consumed = int(position["epoch"]), merge_ranges(position["consumed"])
        self.taken = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.split.num_workers:
            raise ValueError(f"ShardStream planned for {self.split.num_workers} workers, read by {workers}")
        positions = self.split.worker_positions(self.open_positions(), self.rank, worker)
        for raw, url in read_positions(self.urls, self.order(), positions):
            yield self.decode(raw, url)


class ShardLoader(DataLoader):
    """The DataLoader of a ``ShardStream``: each ``iter()`` starts the stream's epoch (``epoch()``)."""

    def __init__(self, dataset: ShardStream, epoch: Callable[[], int], **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch = epoch

    def __iter__(self):
        self.dataset.start_epoch(self.epoch())
        return super().__iter__()


# --- the datamodule's side ----------------------------------------------------


class ShardSet:
    """The shards of ``data.root``: the resolved data config, the validation samples, the training stream."""

    def __init__(self, config: DataConfig, seed: int) -> None:
        if config.root is None:
            raise ConfigError("data.root: required for data.name=shards (a `dforge shard` folder or URL)")
        self.index = index = read_index(config.root)
        self.seed, counts = seed, index.counts("train")
        if not sum(counts):
            raise DataError(f"{config.root}: no training samples in {INDEX_FILE}")
        has_val = bool(sum(index.counts("val")))
        val_size = config.val_size if config.val_size is not None else (
            sum(index.counts("val")) if has_val else auto_val_size(sum(counts)))
        self.held_out = 0 if has_val else val_size  # the first val_size training samples validate
        train = sum(counts) - self.held_out
        if train < 1:
            raise ConfigError(f"data.val_size: {val_size} leaves no training samples of {sum(counts)}")
        train = min(train, config.limit_train or train)
        self.config = dataclasses.replace(
            config, image_size=config.image_size or index.image_size, channels=config.channels or index.channels,
            val_size=val_size, batch_size=min(config.batch_size, train), class_names=index.class_names)
        self.train_count = train
        c = self.config
        self.val = ShardSamples(read_first(index.urls(c.root, "val" if has_val else "train"), val_size),
                                self.decoder(train=False))
        if len(self.val) < val_size:
            raise ConfigError(f"data.val_size: {val_size} exceeds the {len(self.val)} validation samples")
        self.note = (f"data: {c.root}: {sum(counts)} samples in {len(counts)} shards, "
                     + (f"{len(index.class_names or ())} classes" if index.num_classes else "unlabelled")
                     + f", data.channels={c.channels}, data.image_size={c.image_size}, data.val_size={val_size}"
                     + (" (val shards)" if has_val else " (held out)")
                     + "".join(f", {key}s" for key in index.fields if key not in ("class_label",)))

    def decoder(self, train: bool) -> Decoder:
        c = self.config
        names = tuple(name.replace("_", " ") for name in self.index.class_names or ())
        if c.caption_template is not None and not names:
            raise ConfigError("data.caption_template: the shards have no class names to caption")
        return Decoder(c.channels, c.image_size, hflip=c.hflip and train, degradation=None,
                       caption_template=c.caption_template, class_names=names)

    def stream(self, rank: int, world_size: int) -> ShardStream:
        """The training stream of ``rank`` of ``world_size`` (workers and batch size from the config)."""
        c = self.config
        decode = dataclasses.replace(self.decoder(train=True), degradation=c.degradation)
        split = Split(world_size, max(1, c.num_workers), c.batch_size, drop_last=True)
        stream = ShardStream(self.index.urls(c.root, "train"), self.index.counts("train"), decode, split,
                             rank=rank, seed=self.seed, lo=self.held_out, hi=self.held_out + self.train_count)
        if stream.batches_per_epoch() < 1:
            raise ConfigError(f"data.batch_size: {c.batch_size} x {world_size} rank(s) exceeds the "
                              f"{self.train_count} training samples (no whole batch per rank)")
        return stream

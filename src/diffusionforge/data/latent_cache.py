"""A latent cache: the training images of a dataset encoded once by a frozen first stage and text encoder.

Latent diffusion (Rombach et al. 2022, Sec. 3) never trains its autoencoder
or text encoder, so their outputs for a training image are fixed: ``dforge
cache RUN_OR_CONFIG --out DIR`` (``caching.py``) computes them once and
``data.cache=DIR`` trains from them, the VAE encoder and the text encoder
skipped at every step. The posterior ``q(z | x) = N(mean, diag(std^2))`` is
stored, not a sample, so each step still draws ``z = mean + std * eps``
(``LatentFirstStage.from_posterior``), and the empty caption's encoding is
stored beside the captions', so classifier-free-guidance dropout still works.

Layout of ``DIR``
-----------------
=======================  ======================================================================
``index.json``           what made it (``Index``): the first stage's weights digest and source,
                         the latent scale, each text encoder, the dataset, the item count
``latents.safetensors``  ``mean``, ``std``: ``(N, c, h, w)`` float32, unscaled latents;
                         ``index``: ``(N,)`` int64, each item's position in the training source;
                         any per-item tensor a conditioner reads as is (``class_label``: ``(N,)``)
``text.safetensors``     per caption key ``k``: ``k.hidden`` ``(K, L, D)`` and ``k.mask`` ``(K, L)``
                         bool of the K distinct captions, row 0 the empty caption;
                         ``k.row``: ``(N,)`` int64, each item's caption row
=======================  ======================================================================

An item of the cache is ``{"latent_mean": (c, h, w), "latent_std": (c, h, w), <tensor keys>,
<caption key>: cached_captions(h, m, h_null, m_null)}``; ``GenerativeModel`` samples the first two,
``TextConditioner`` takes the mapping in place of captions and makes from the stored ``h``, ``m``
what it makes from its encoder's: the cross-attention tokens with their mask, the tokens without one
(``sd_padding``) or the mean-pooled vector (``output=vector``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from diffusionforge.conditioning.text import cached_captions
from diffusionforge.data.config import DataConfig
from diffusionforge.errors import ConfigError
from diffusionforge.utils.atomic import write_folder_atomically

__all__ = ["FORMAT", "INDEX_FILE", "LATENTS_INDEX", "LATENT_MEAN", "LATENT_STD", "Index", "LatentCache",
           "LatentCacheDataset", "MappedTensors", "dataset_facts", "write_cache"]

FORMAT = "diffusionforge-latent-cache"  # index.json "format"
VERSION = 1
INDEX_FILE, LATENTS_FILE, TEXT_FILE = "index.json", "latents.safetensors", "text.safetensors"
LATENT_MEAN, LATENT_STD = "latent_mean", "latent_std"  # batch keys of the stored posterior
NULL_ROW = 0  # the empty caption's row in every caption table
LATENTS_INDEX = "index"  # latents.safetensors: each item's position in the training source


@dataclass
class Index:
    """``index.json``: what produced a cache, compared with a run that trains from it."""

    count: int  # N, cached items
    dataset: dict[str, Any]  # name, root, image_size, channels, caption_template, source_count
    first_stage: dict[str, Any]  # sha256 of the autoencoder's weights, source (run / folder), embed_dim, f
    latent_scale: float  # s of the first stage that made it (the default scale of runs trained from it)
    text: dict[str, dict[str, Any]] = field(default_factory=dict)  # caption key -> encoder, path, max_length, sha256
    tensors: list[str] = field(default_factory=list)  # per-item tensors stored as is (class_label)
    made_from: str = ""  # the RUN_OR_CONFIG argument of `dforge cache`
    seconds: float = 0.0  # how long encoding took
    format: str = FORMAT
    version: int = VERSION


class MappedTensors(Mapping):
    """The tensors of a safetensors file, memory-mapped and read on access: ``m[key]`` a whole tensor,
    ``m.row(key, i)`` row ``i`` of it (a copy of that row only). Each process opens the file for itself, so
    DataLoader workers share the page cache, not a copy of the data."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: Any = None
        self._pid: Optional[int] = None
        self._keys = tuple(self._file().keys())

    def _file(self):
        if self._handle is None or self._pid != os.getpid():
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ConfigError(f"data.cache: {self.path}: not a readable safetensors file ({err})") from None
            self._pid = os.getpid()
        return self._handle

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file().get_tensor(key)

    def row(self, key: str, i: int) -> Tensor:
        return self._file().get_slice(key)[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __getstate__(self) -> dict:  # a worker started by spawn opens the file itself
        return {**self.__dict__, "_handle": None, "_pid": None}


class LatentCache:
    """The cache in ``directory``: its per-item tensors memory-mapped (``MappedTensors``: a cache larger than
    memory trains), the caption tables in memory; a missing or foreign folder is a one-line error."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        self.latents = MappedTensors(self.directory / LATENTS_FILE)
        missing = [key for key in (LATENTS_INDEX, "mean", "std", *self.index.tensors) if key not in self.latents]
        if missing:
            raise ConfigError(f"data.cache: {self.latents.path}: no tensor {missing[0]!r} (not made by dforge cache)")
        self.text = _load(self.directory / TEXT_FILE) if self.index.text else {}
        self.rows = {int(i): row for row, i in enumerate(self.latents[LATENTS_INDEX].tolist())}  # source index -> row

    def check(self, what: str, recorded: dict[str, Any], current: dict[str, Any]) -> None:
        """ConfigError naming the first field of ``what`` where the cache's record and the run differ."""
        for key in sorted(set(recorded) | set(current)):
            if recorded.get(key) != current.get(key):
                raise ConfigError(f"data.cache: {self.directory} was made with another {what}: {key} "
                                  f"{recorded.get(key)!r} there, {current.get(key)!r} in this run")

    def subset(self, indices: Sequence[int]) -> LatentCacheDataset:
        """The items of the training source's ``indices`` (the run's training split), in that order."""
        missing = [i for i in indices if i not in self.rows]
        if missing:
            raise ConfigError(f"data.cache: {self.directory} lacks {len(missing)} of the {len(indices)} training "
                              f"images (e.g. #{missing[0]}): it was made with another data.val_size, "
                              "data.limit_train or seed; cache this run's config")
        return LatentCacheDataset(self, [self.rows[i] for i in indices])


class LatentCacheDataset(Dataset):
    """Rows of a ``LatentCache`` as training items (module docstring)."""

    def __init__(self, cache: LatentCache, rows: list[int]):
        self.cache, self.rows = cache, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, latents, text = self.rows[i], self.cache.latents, self.cache.text
        item: dict[str, Any] = {LATENT_MEAN: latents.row("mean", row), LATENT_STD: latents.row("std", row)}
        item.update({key: latents.row(key, row) for key in self.cache.index.tensors})
        for key in self.cache.index.text:
            hidden, mask, caption = text[f"{key}.hidden"], text[f"{key}.mask"], int(text[f"{key}.row"][row])
            item[key] = cached_captions(hidden[caption], mask[caption], hidden[NULL_ROW], mask[NULL_ROW])
        return item


def dataset_facts(config: DataConfig, source_count: int) -> dict[str, Any]:
    """What a cache records of its dataset (and a run trained from it must share): ``Index.dataset``."""
    root = None if config.root is None else str(Path(config.root).resolve())
    return {"name": config.name, "root": root, "image_size": config.image_size, "channels": config.channels,
            "caption_template": config.caption_template, "source_count": source_count}


def read_index(directory: Path) -> Index:
    """The ``Index`` of a cache folder; ConfigError (one line) when it is missing or not a cache."""
    if not directory.is_dir():
        raise ConfigError(f"data.cache: {directory}: no such folder (make it with `dforge cache RUN --out DIR`)")
    path = directory / INDEX_FILE
    try:
        fields = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.cache: {directory}: not a latent cache (no {INDEX_FILE}; "
                          "`dforge cache` writes it last)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.cache: {path}: cannot read it ({err.__class__.__name__})") from None
    if not isinstance(fields, dict) or fields.get("format") != FORMAT or fields.get("version") != VERSION:
        raise ConfigError(f"data.cache: {path}: not a version-{VERSION} {FORMAT} index")
    try:
        return Index(**fields)
    except TypeError as err:
        raise ConfigError(f"data.cache: {path}: unexpected fields ({err})") from None


def _load(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"data.cache: {path}: not a readable safetensors file ({err})") from None


def write_cache(directory: Path, index: Index, latents: dict[str, Tensor], text: dict[str, Tensor]) -> Path:
    """Write the cache folder atomically (a temporary folder renamed onto ``directory``)."""
    def write(folder: Path) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for name, tensors in ((LATENTS_FILE, latents), (TEXT_FILE, text)):
            if tensors:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
                os.chmod(folder / name, 0o666 & ~umask)  # safetensors creates 0600; a cache is meant to be shared
        (folder / INDEX_FILE).write_text(json.dumps(asdict(index), indent=2, sort_keys=True) + "\n")

    return write_folder_atomically(directory, write)

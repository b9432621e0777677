"""Images from a folder on disk, one file per image, decoded with PIL.

Layouts of ``data.name=folder`` (``class_subfolders=None`` picks the first that matches):

| layout                       | labels                                  |
|------------------------------|-----------------------------------------|
| ``root/<class>/<image>.png`` | sorted sub-folder names -> 0..K-1       |
| ``root/<image>.png``         | none (items have no ``class_label``)    |

With class sub-folders, images lying directly in ``root`` are ignored.

Captions (``item["caption"]``, the text conditioner's default input key),
when the folder has any:

- ``root/metadata.jsonl`` (one JSON object a line) or ``root/metadata.csv``
  with the columns ``file_name`` (relative to ``root``, e.g. ``cat/1.png``)
  and ``text``: the Hugging Face ``imagefolder`` convention;
- ``name.txt`` beside ``name.png`` (wins over the metadata).

Then every image needs a caption; a metadata row naming a missing file, or
an image without a caption, is an error naming the file.

``data.name=paired-folder`` (``PairedFolderDataset``, image-to-image): ``root/source/``,
``root/target/`` and optionally ``root/mask/`` (white = hole), matched by
file name without extension; items ``{"source", "image" (the target),
"mask"}`` as ``degradations.PairedDataset`` makes them.

Each image is converted to ``L`` (channels=1) or ``RGB`` (channels=3),
brought to ``image_size`` squares (``crop``: ``center`` = the largest
centered square resized, ``random`` = the shorter side resized, then a
random square, ``stretch`` = the whole image resized), then scaled to
[-1, 1]: ``x = u / 127.5 - 1`` for 8-bit values ``u``.

Every file is opened when the dataset is made (PIL's ``verify``: the header,
and for PNG and WebP the whole file), so a file that is not an image, or a
truncated PNG, is refused before training starts with a one-line error
naming it (a JPEG cut short fails when it is loaded, also one line);
``skip_bad_files=True`` decodes every file once and leaves the bad ones (and
unmatched pairs, uncaptioned images) out, counted in ``skipped``.
``inspect_folder`` reads the image size, channels and validation split a
folder implies (``datamodule.ImageDataModule`` resolves ``data.image_size``,
``data.channels`` and ``data.val_size`` left unset with it).
"""

from __future__ import annotations

import copy
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from diffusionforge.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
PIL_MODES = {1: "L", 3: "RGB"}
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # all else is colour
UINT8_HALF_RANGE = 127.5  # maps 8-bit values 0..255 onto [-1, 1]
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder captions
CAPTION_KEY = "caption"  # item key of a caption (conditioning.TextConfig.input_key's default)
FLIPPED_KEYS = ("image", "source", "mask")  # the image-shaped keys of an item, flipped together
PAIR_FOLDERS = ("source", "target", "mask")
SIZE_STEP = 8  # a size read from the files is rounded down to a multiple of this (3 halvings)
MAX_AUTO_SIZE = 64  # ... and capped at this (set data.image_size for more)
VAL_FRACTION = 0.05  # share of a folder held out for validation when data.val_size is unset
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., C, H, W) in 0..255 -> float32 in [-1, 1]."""
    return images.float().div_(UINT8_HALF_RANGE).sub_(1.0)


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension), sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and _is_visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and _is_visible(p))


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Crop the largest centered square, then resize it to ``size`` x ``size``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), Image.Resampling.BICUBIC)


def crop_box(width: int, height: int, crop: str, generator: Optional[torch.Generator] = None) -> tuple:
    """The (left, top, right, bottom) box of a ``width`` x ``height`` image that becomes the square."""
    if crop == "stretch":
        return (0, 0, width, height)
    side = min(width, height)
    if crop == "random":
        left = int(torch.randint(width - side + 1, (), generator=generator))
        top = int(torch.randint(height - side + 1, (), generator=generator))
    else:
        left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def fit_image(image: Image.Image, size: int, box: tuple, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """``image`` cropped to ``box`` and resized to ``size`` x ``size``."""
    if box != (0, 0, *image.size):
        image = image.crop(box)
    return image if image.size == (size, size) else image.resize((size, size), resample)


def check_header(path: Path) -> None:
    """DataError unless PIL's ``verify`` accepts ``path`` (without decoding the pixels)."""
    read_header(path)


def read_header(path: Path, decode: bool = False) -> tuple[tuple[int, int], str]:
    """((width, height), PIL mode) of ``path`` after PIL's ``verify``; DataError naming the file.

    ``decode``: also decode the pixels (a JPEG cut short passes ``verify`` but not this).
    """
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
            image.verify()  # PNG: every chunk's CRC, so a truncated file fails here
        if decode:
            with Image.open(path) as image:
                image.load()
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode image ({err.__class__.__name__})") from None
    return size, mode


def open_image(path: Path, mode: str) -> Image.Image:
    """The decoded image converted to ``mode``; DataError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode image ({err.__class__.__name__})") from None


def to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """A PIL image (L or RGB) -> float (C, H, W) in [-1, 1]."""
    pixels = np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], channels)
    return uint8_to_signed(torch.from_numpy(pixels.copy()).permute(2, 0, 1))


# --- the files of a folder ---------------------------------------------------------------------------


@dataclass
class Skipped:
    """Files left out under ``skip_bad_files``, each with the reason."""

    items: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: Path, reason: str, skip: bool) -> None:
        if not skip:
            raise DataError(f"{path}: {reason}")
        self.items.append((path, reason))

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        path, reason = self.items[0]
        return f"skipped {len(self.items)} bad file(s) (first: {path}: {reason})"


def _headers(files: list[Path], skipped: Skipped, skip: bool) -> dict[Path, tuple[tuple[int, int], str]]:
    """path -> (size, mode) of every readable file; unreadable ones raise or go to ``skipped``."""
    headers = {}
    for path in files:
        try:
            headers[path] = read_header(path, decode=skip)  # skipping: a bad file must not stop training later
        except DataError as err:
            if not skip:
                raise
            skipped.items.append((path, str(err).split(": ", 1)[-1]))
    return headers


def read_metadata(root: Path) -> Optional[dict[str, str]]:
    """file_name (relative to root, '/'-separated) -> text from metadata.jsonl / .csv, None if neither."""
    for name in METADATA_FILES:
        path = root / name
        if path.is_file():
            return _read_jsonl(path) if name.endswith(".jsonl") else _read_csv(path)
    return None


def _row(path: Path, where: str, row: object) -> tuple[str, str]:
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or "text" not in row:
        raise DataError(f"{path}: {where} needs 'file_name' and 'text'")
    text = row["text"]
    if not isinstance(text, str):
        raise DataError(f"{path}: {where}: 'text' must be a string, got {text!r}")
    return Path(row["file_name"]).as_posix(), text


def _read_jsonl(path: Path) -> dict[str, str]:
    captions = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err.__class__.__name__})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {number} is not JSON") from None
        name, text = _row(path, f"line {number}", row)
        captions[name] = text
    return captions


def _read_csv(path: Path) -> dict[str, str]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read ({err.__class__.__name__})") from None
    return dict(_row(path, f"row {number}", row) for number, row in enumerate(rows, 2))


def read_captions(root: Path, files: list[Path], skipped: Skipped, skip: bool) -> tuple[list[Path], Optional[list[str]]]:
    """(files that have a caption, their captions), or (files, None) when the folder has no captions."""
    metadata = read_metadata(root)
    sidecars = {path: path.with_suffix(".txt") for path in files}
    if metadata is None and not any(txt.is_file() for txt in sidecars.values()):
        return files, None
    metadata = metadata or {}
    relative = {path.relative_to(root).as_posix(): path for path in files}
    for name in metadata:
        if name not in relative and not (root / name).is_file():
            skipped.add(root / name, f"named in {root / next(n for n in METADATA_FILES if (root / n).is_file())} "
                                     "but not found", skip)
    kept, captions = [], []
    for path in files:
        txt = sidecars[path]
        if txt.is_file():
            try:
                text = txt.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                skipped.add(txt, f"cannot read caption ({err.__class__.__name__})", skip)
                continue
        elif path.relative_to(root).as_posix() in metadata:
            text = metadata[path.relative_to(root).as_posix()]
        else:
            skipped.add(path, f"no caption (the folder has captions: add {txt.name} or a metadata row)", skip)
            continue
        kept.append(path)
        captions.append(text)
    return kept, captions


def _colour(mode: str) -> bool:
    return mode not in GREY_MODES


def auto_size(sides: list[int]) -> int:
    """Image side implied by the files' shorter sides: the smallest, down to a multiple of SIZE_STEP, capped."""
    from diffusionforge.data.config import MIN_IMAGE_SIZE

    return max(MIN_IMAGE_SIZE, min(MAX_AUTO_SIZE, min(sides) // SIZE_STEP * SIZE_STEP))


def auto_val_size(count: int) -> int:
    """Validation images of a ``count``-image folder: VAL_FRACTION of it, at least 1."""
    return max(1, round(VAL_FRACTION * count))


@dataclass
class FolderFacts:
    """What a folder's files imply: channels, image size, count, and what was skipped."""

    count: int
    channels: int  # 3 when any file is in colour
    image_size: int  # auto_size of the shorter sides
    smallest_side: int
    skipped: Skipped


# --- datasets ----------------------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """Images in ``root`` (optionally in class sub-folders) as dicts of tensors.

    Items: ``{"image": float (C, H, W) in [-1, 1], "class_label": long (), "caption": str}``;
    no ``class_label`` when the folder is unlabelled, no ``caption`` when it has no captions.

    Args:
        root: the folder.
        image_size: side of the square output images; None = ``facts.image_size``.
        channels: 1 (grayscale) or 3 (RGB); None = ``facts.channels``.
        class_subfolders: True = each sub-folder is a class; False = images
            directly in ``root``, unlabelled; None = True iff ``root`` has
            sub-folders.
        crop: center, random or stretch (see the module doc).
        skip_bad_files: leave unreadable / uncaptioned files out (``skipped``) instead of raising.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        image_size: Optional[int] = None,
        channels: Optional[int] = None,
        class_subfolders: Optional[bool] = None,
        crop: str = "center",
        skip_bad_files: bool = False,
    ) -> None:
        if channels is not None and channels not in PIL_MODES:
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        self.crop = crop
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found")
        folders = _class_folders(self.root)
        labelled = bool(folders) if class_subfolders is None else class_subfolders
        self.classes: Optional[list[str]] = [f.name for f in folders] if labelled else None
        files, labels = self._scan(folders if labelled else None)
        self.skipped = Skipped()
        headers = _headers(files, self.skipped, skip_bad_files)
        keep = [i for i, path in enumerate(files) if path in headers]
        files = [files[i] for i in keep]
        labels = None if labels is None else [labels[i] for i in keep]
        captioned, self.captions = read_captions(self.root, files, self.skipped, skip_bad_files)
        if len(captioned) != len(files):
            kept = set(captioned)
            labels = None if labels is None else [lab for path, lab in zip(files, labels) if path in kept]
        self.files, self.labels = captioned, labels
        if not self.files:
            raise DataError(f"{self.root}: no readable images ({len(self.skipped)} skipped)")
        sides = [min(headers[path][0]) for path in self.files]
        self.facts = FolderFacts(count=len(self.files),
                                 channels=3 if any(_colour(headers[p][1]) for p in self.files) else 1,
                                 image_size=auto_size(sides), smallest_side=min(sides), skipped=self.skipped)
        self.image_size = image_size if image_size is not None else self.facts.image_size
        self.channels = channels if channels is not None else self.facts.channels

    def _scan(self, folders: Optional[list[Path]]) -> tuple[list[Path], Optional[list[int]]]:
        """(image files, labels or None); DataError when there is nothing to load."""
        if folders is None:
            files = list_images(self.root)
            if not files:
                raise DataError(f"{self.root}: no images ({'/'.join(sorted(IMAGE_EXTENSIONS))})")
            return files, None
        if not folders:
            raise DataError(f"{self.root}: no class sub-folders (class_subfolders=True)")
        files, labels = [], []
        for label, folder in enumerate(folders):
            found = list_images(folder)
            if not found:
                raise DataError(f"{folder}: class folder has no images")
            files += found
            labels += [label] * len(found)
        return files, labels

    def resized(self, image_size: int, channels: int, crop: Optional[str] = None) -> "ImageFolderDataset":
        """The same files at another size / channels / crop (no second scan)."""
        other = copy.copy(self)
        other.image_size, other.channels = image_size, channels
        other.crop = self.crop if crop is None else crop
        return other

    @property
    def num_classes(self) -> Optional[int]:
        """Number of class sub-folders, None when unlabelled."""
        return None if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int) -> np.ndarray:
        """Decoded, cropped and resized image ``index`` as uint8 (H, W, C)."""
        image = open_image(self.files[index], PIL_MODES[self.channels])
        pixels = np.asarray(fit_image(image, self.image_size, crop_box(*image.size, self.crop)), dtype=np.uint8)
        return pixels.reshape(self.image_size, self.image_size, self.channels)

    def __getitem__(self, index: int) -> dict:
        pixels = torch.from_numpy(self.load_image(index).copy()).permute(2, 0, 1)  # (C, H, W)
        item = {"image": uint8_to_signed(pixels)}
        if self.labels is not None:
            item["class_label"] = torch.tensor(self.labels[index], dtype=torch.long)
        if self.captions is not None:
            item[CAPTION_KEY] = self.captions[index]
        return item


class PairedFolderDataset(Dataset):
    """(source, target[, mask]) images from ``root/source``, ``root/target``, ``root/mask``.

    Items: ``{"source": (C, H, W), "image": (C, H, W) the target, "mask": (1, H, W) 1 = hole}``
    (no ``mask`` without ``root/mask``). Files are matched by name without
    extension; a target without a source (or the reverse), a missing mask or
    a source and target of different sizes is an error naming the file, or
    with ``skip_bad_files`` a skipped pair. One crop box serves the whole pair.
    """

    def __init__(self, root: Union[str, os.PathLike], image_size: Optional[int] = None,
                 channels: Optional[int] = None, crop: str = "center", skip_bad_files: bool = False) -> None:
        self.root, self.crop, self.classes, self.captions = Path(root), crop, None, None
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found")
        for name in PAIR_FOLDERS[:2]:
            if not (self.root / name).is_dir():
                raise DataError(f"{self.root / name}: folder not found (a paired folder has source/, target/ "
                                "and optionally mask/)")
        self.skipped, skip = Skipped(), skip_bad_files
        found = {name: {p.stem: p for p in list_images(self.root / name)}
                 for name in PAIR_FOLDERS if (self.root / name).is_dir()}
        sources, targets, masks = found["source"], found["target"], found.get("mask")
        for stem in sorted(set(sources) - set(targets)):
            self.skipped.add(sources[stem], f"no target of the same name in {self.root / 'target'}", skip)
        pairs = []
        for stem in sorted(targets):
            if stem not in sources:
                self.skipped.add(targets[stem], f"no source of the same name in {self.root / 'source'}", skip)
            elif masks is not None and stem not in masks:
                self.skipped.add(targets[stem], f"no mask of the same name in {self.root / 'mask'}", skip)
            else:
                pairs.append((sources[stem], targets[stem], masks[stem] if masks is not None else None))
        headers = _headers([p for pair in pairs for p in pair if p is not None], self.skipped, skip)
        self.pairs, sides, colour = [], [], False
        for source, target, mask in pairs:
            if any(p is not None and p not in headers for p in (source, target, mask)):
                continue
            sizes = {headers[p][0] for p in (source, target, mask) if p is not None}
            if len(sizes) > 1:
                detail = " / ".join(f"{p.name} {headers[p][0][0]}x{headers[p][0][1]}"
                                    for p in (source, target, mask) if p is not None)
                self.skipped.add(target, f"mismatched pair sizes ({detail})", skip)
                continue
            self.pairs.append((source, target, mask))
            sides.append(min(headers[target][0]))
            colour = colour or _colour(headers[source][1]) or _colour(headers[target][1])
        if not self.pairs:
            raise DataError(f"{self.root}: no matched source/target pairs ({len(self.skipped)} skipped)")
        self.facts = FolderFacts(count=len(self.pairs), channels=3 if colour else 1, image_size=auto_size(sides),
                                 smallest_side=min(sides), skipped=self.skipped)
        self.image_size = image_size if image_size is not None else self.facts.image_size
        self.channels = channels if channels is not None else self.facts.channels

    resized = ImageFolderDataset.resized
    num_classes = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        source_path, target_path, mask_path = self.pairs[index]
        mode = PIL_MODES[self.channels]
        source, target = open_image(source_path, mode), open_image(target_path, mode)
        box = crop_box(*target.size, self.crop)
        item = {"source": to_tensor(fit_image(source, self.image_size, box), self.channels),
                "image": to_tensor(fit_image(target, self.image_size, box), self.channels)}
        if mask_path is not None:
            mask = fit_image(open_image(mask_path, "L"), self.image_size, box, Image.Resampling.NEAREST)
            item["mask"] = (torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()) > 127).float()[None]
        return item

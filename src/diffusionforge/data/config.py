"""Data settings, torch-free: ``DataConfig`` (YAML ``data``), ``DegradationConfig``
(``data.degradation``) and ``StoryConfig`` (``data.story``).

``config/schema.py`` composes them without importing torch or Lightning;
``datamodule.py``, ``degradations.py`` and ``stories.py`` build the datasets
from them and re-export them. ``validate`` (run by ``__post_init__``) raises a
one-line ``ConfigError`` naming ``data.<field>`` for the first bad value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal, Optional, get_args

from diffusionforge.errors import ConfigError
from diffusionforge.utils.checks import is_int, is_number

__all__ = ["BUILT_IN", "FOLDERS", "CropMode", "DataConfig", "DatasetName", "DegradationConfig", "MaskKind", "StoryConfig",
           "StorySource", "StorySplit", "DegradationKind", "UpsampleMode", "check_image_size", "check_template"]


# --- data.caption_template ----------------------------------------------------

def check_template(template: Optional[str]) -> None:
    if template is not None and template.count("{}") != 1:
        raise ConfigError(f"data.caption_template: needs exactly one '{{}}' for the class name, "
                          f"got {template!r}")


# --- data.degradation (degradations.py) ---------------------------------------

DegradationKind = Literal["super_resolution", "inpainting", "denoising", "deblurring"]
UpsampleMode = Literal["bicubic", "bilinear", "nearest"]
MaskKind = Literal["box", "free_form", "mixed"]
KEY = "data.degradation"  # YAML section, the prefix of every ConfigError message


@dataclass
class DegradationConfig:
    """How the source of each (source, target) pair is made (YAML section ``data.degradation``)."""

    kind: DegradationKind = "super_resolution"  # which degradation D makes the source y = D(x)
    scale: int = 4  # super_resolution: mean over scale x scale blocks, then upsample back to full size
    upsample: UpsampleMode = "bicubic"  # super_resolution: low-res -> full size (bicubic is clamped to [-1, 1])
    mask: MaskKind = "mixed"  # inpainting: box rectangles, free_form brush strokes, or either with prob 1/2
    box_min: float = 0.25  # box: shortest rectangle side, fraction of the image side
    box_max: float = 0.5  # box: longest rectangle side, fraction of the image side (< 1)
    strokes: int = 4  # free_form: each mask paints 1..strokes brush strokes
    vertices: int = 6  # free_form: each stroke is a polyline of 1..vertices straight segments
    stroke_width_min: float = 0.08  # free_form: thinnest brush, fraction of the shorter image side
    stroke_width_max: float = 0.2  # free_form: widest brush, fraction of the shorter image side (<= 0.5)
    stroke_length: float = 0.4  # free_form: longest segment, fraction of the shorter image side
    fill: float = 0.0  # inpainting: value in [-1, 1] written into the hole of the source
    noise_std: float = 0.2  # denoising: Gaussian noise std in [-1, 1] units; the source is clamped to [-1, 1]
    blur_sigma: float = 1.5  # deblurring: Gaussian std in pixels (kernel radius ceil(3 sigma), reflect padding)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming ``data.degradation.<field>`` for the first bad value."""
        for name, kind in (("kind", DegradationKind), ("upsample", UpsampleMode), ("mask", MaskKind)):
            if getattr(self, name) not in get_args(kind):
                raise ConfigError(f"{KEY}.{name}: {getattr(self, name)!r} is not one of "
                                  f"{', '.join(get_args(kind))}")
        for name, minimum in (("scale", 2), ("strokes", 1), ("vertices", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise ConfigError(f"{KEY}.{name}: must be an integer >= {minimum}, got {value!r}")
        _check_range("box_min", self.box_min, 0.0, 1.0, "0 < box_min < 1")
        _check_range("box_max", self.box_max, self.box_min, 1.0, f"box_min ({self.box_min}) <= box_max < 1",
                     low_open=False)
        _check_range("stroke_width_min", self.stroke_width_min, 0.0, 0.5, "0 < stroke_width_min <= 0.5",
                     high_open=False)
        _check_range("stroke_width_max", self.stroke_width_max, self.stroke_width_min, 0.5,
                     f"stroke_width_min ({self.stroke_width_min}) <= stroke_width_max <= 0.5",
                     low_open=False, high_open=False)
        _check_range("stroke_length", self.stroke_length, 0.0, 1.0, "0 < stroke_length <= 1", high_open=False)
        _check_range("fill", self.fill, -1.0, 1.0, "-1 <= fill <= 1", low_open=False, high_open=False)
        _check_range("noise_std", self.noise_std, 0.0, math.inf, "noise_std > 0")
        _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf, "blur_sigma > 0")


def _check_range(name: str, value: object, low: float, high: float, rule: str,
                 low_open: bool = True, high_open: bool = True) -> None:
    """ConfigError unless ``value`` is a number between low and high (ends open or closed); NaN fails."""
    number = is_number(value)
    above = number and (value > low if low_open else value >= low)
    below = number and (value < high if high_open else value <= high)
    if not (above and below):
        raise ConfigError(f"{KEY}.{name}: must be a number with {rule}, got {value!r}")


def check_image_size(config: DegradationConfig, image_size: int) -> None:
    """ConfigError when ``config.kind`` cannot run on ``image_size`` square images."""
    if config.kind == "super_resolution" and image_size // config.scale < 2:
        raise ConfigError(f"{KEY}.scale: {config.scale} leaves fewer than 2 low-resolution pixels "
                          f"per side of data.image_size={image_size}")
    radius = math.ceil(3 * config.blur_sigma)
    if config.kind == "deblurring" and radius >= image_size:
        raise ConfigError(f"{KEY}.blur_sigma: kernel radius ceil(3 sigma) = {radius} must be smaller "
                          f"than data.image_size={image_size}")


# --- data.story (stories.py) --------------------------------------------------

StorySource = Literal["fashion-mnist-embedded", "mnist", "hdf5"]  # hdf5: PororoSV / FlintstonesSV (story_hdf5.py)
StorySplit = Literal["train", "val", "test"]
SIZES = ("small", "normal", "large")
SIZE_SCALES = (0.6, 1.0, 1.4)  # item side / item_size for each of SIZES
MIN_TRAVEL = 4  # canvas pixels a large item leaves free, so its 3 columns / rows differ


@dataclass
class StoryConfig:
    """How stories are drawn (YAML section ``data.story``)."""

    source: StorySource = "fashion-mnist-embedded"  # real images the stories show
    root: Optional[str] = None  # MNIST folder (as data.root) for source=mnist; the .h5 file for source=hdf5
    frames: int = 4  # F, frames per story
    canvas: int = 32  # S, side of the black square canvas in pixels
    item_size: int = 16  # item side at normal size; small / large are 0.6x / 1.4x
    train_stories: int = 10_000  # stories in the train split
    val_stories: int = 500  # stories in the val split
    test_stories: int = 1_000  # stories in the test split
    val_instances: int = 1_000  # source train images held out for val stories only
    omit_identity_prob: float = 0.5  # P(a frame >= 1 says "it" instead of the class)
    flip_events: bool = True  # allow "it turns around" (horizontal mirror) events
    seed: int = 0  # fixes every story of every split

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming ``data.story.<field>`` for the first bad value."""
        if self.source not in get_args(StorySource):
            raise _error("source", f"{self.source!r} is not one of {', '.join(get_args(StorySource))}")
        if self.source == "mnist" and self.root is None:
            raise _error("root", "required for source=mnist (a folder with the MNIST idx files)")
        if self.source == "hdf5" and self.root is None:
            raise _error("root", "required for source=hdf5 (an ARLDM-layout PororoSV / FlintstonesSV file)")
        if self.source == "fashion-mnist-embedded" and self.root is not None:
            raise _error("root", f"not used by source={self.source}")
        minimums = {"frames": 1, "canvas": 8, "item_size": 4, "train_stories": 0, "val_stories": 0,
                    "test_stories": 0, "val_instances": 1, "seed": 0}
        for key, minimum in minimums.items():
            if not is_int(getattr(self, key)) or getattr(self, key) < minimum:
                raise _error(key, f"must be an integer >= {minimum}, got {getattr(self, key)!r}")
        sides = self.sides
        if not sides[0] < sides[1] < sides[2]:
            raise _error("item_size", f"small / normal / large sides {sides} px must differ and fit a "
                                      f"{self.canvas} px canvas with {MIN_TRAVEL} px to spare")
        prob = self.omit_identity_prob
        if not is_number(prob) or not 0 <= prob <= 1:
            raise _error("omit_identity_prob", f"must be a number in [0, 1], got {prob!r}")
        if not isinstance(self.flip_events, bool):
            raise _error("flip_events", f"must be true or false, got {self.flip_events!r}")

    @property
    def sides(self) -> tuple[int, ...]:
        """Item side in pixels for each of SIZES."""
        return tuple(min(round(self.item_size * scale), self.canvas - MIN_TRAVEL) for scale in SIZE_SCALES)

    def num_stories(self, split: StorySplit) -> int:
        return {"train": self.train_stories, "val": self.val_stories, "test": self.test_stories}[split]


def _error(key: str, message: str) -> ConfigError:
    return ConfigError(f"data.story.{key}: {message}")


# --- data (datamodule.py) -----------------------------------------------------

DatasetName = Literal["fashion-mnist-embedded", "fashion-mnist", "mnist", "folder", "paired-folder",
                      "skimage-photos", "shards"]  # shards: a `dforge shard` folder or URL (shards.py)
BUILT_IN = ("fashion-mnist-embedded", "skimage-photos")  # sources that ship their images (no data.root)
FOLDERS = ("folder", "paired-folder", "shards")  # one's own images: size, channels, val split and classes
#                                                  from the files (shards: from their index.json)
MIN_IMAGE_SIZE = 8  # smallest side the backbones downsample sensibly
LEGACY_DEFAULTS = {"image_size": 28, "channels": 1, "val_size": 100}  # what None means for the other sources
CropMode = Literal["center", "random", "stretch"]


@dataclass
class DataConfig:
    """Which images to train on and how to batch them (YAML section ``data``).

    ``image_size``, ``channels`` and ``val_size`` left at None are read from
    the files for ``folder`` / ``paired-folder`` (``folder.inspect_folder``)
    and are 28, 1 and 100 for the other sources; a run's config.yaml records
    the resolved values.
    """

    name: DatasetName = "fashion-mnist-embedded"  # source, see datasets.DATASETS
    root: Optional[str] = None  # folder with the dataset files; None = embedded / Debian location
    image_size: Optional[int] = None  # side of the square images; None = from a folder's files, else 28
    channels: Optional[int] = None  # 1 = grey, 3 = RGB; None = from a folder's files (any colour -> 3), else 1
    batch_size: int = 128  # images per training step (per device); a smaller folder lowers it (said in a line)
    num_workers: int = 0  # DataLoader worker processes; 0 loads in the main process
    val_size: Optional[int] = None  # images held out for validation; None = 5% of a folder (>= 1), else 100
    limit_train: Optional[int] = None  # use only the first N training images (tests / quick runs)
    hflip: bool = False  # random horizontal flip augmentation (train split only)
    crop: CropMode = "center"  # folders: shorter side resized to image_size, then a center / random square;
    #                            stretch = the whole image resized to the square (train split; val is center)
    skip_bad_files: bool = False  # folders: leave out unreadable / unmatched files (their count is printed)
    class_names: Optional[list[str]] = None  # folders: the class sub-folder names (recorded by `dforge train`)
    caption_template: Optional[str] = None  # e.g. "a photo of {}": adds batch["caption"] from class names
    degradation: Optional[DegradationConfig] = None  # image-to-image pairs: adds batch["source"] (+ "mask")
    story: Optional[StoryConfig] = None  # stories (task=story): batches of frames + captions, see stories.py
    cache: Optional[str] = None  # a `dforge cache` folder: train on its latents and text embeddings (latent_cache.py)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def from_folder(self) -> bool:
        return self.name in FOLDERS

    def validate(self) -> None:
        """ConfigError naming ``data.<field>`` for the first bad value."""
        if self.name not in get_args(DatasetName):
            raise ConfigError(f"data.name: {self.name!r} is not one of {', '.join(get_args(DatasetName))}")
        if self.name in BUILT_IN and self.root is not None:
            raise ConfigError(f"data.root: not used by data.name={self.name}; "
                              "set data.name=fashion-mnist (or mnist, folder) to read it")
        if not self.from_folder:
            for key, value in LEGACY_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        minimums = {"image_size": MIN_IMAGE_SIZE, "batch_size": 1, "num_workers": 0, "val_size": 0}
        for key, minimum in minimums.items():
            value = getattr(self, key)
            if value is None and key in LEGACY_DEFAULTS:
                continue  # a folder's, read from its files
            if not is_int(value) or value < minimum:
                raise ConfigError(f"data.{key}: must be an integer >= {minimum}, got {value!r}")
        if self.channels is not None and (self.channels not in (1, 3) or not is_int(self.channels)):
            raise ConfigError(f"data.channels: must be 1 or 3, got {self.channels!r}")
        if self.limit_train is not None and (not is_int(self.limit_train) or self.limit_train < 1):
            raise ConfigError(f"data.limit_train: must be None or an integer >= 1, got {self.limit_train!r}")
        for key in ("hflip", "skip_bad_files"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"data.{key}: must be true or false, got {getattr(self, key)!r}")
        if self.crop not in get_args(CropMode):
            raise ConfigError(f"data.crop: {self.crop!r} is not one of {', '.join(get_args(CropMode))}")
        if self.class_names is not None and (
                isinstance(self.class_names, str) or not all(isinstance(n, str) for n in self.class_names)):
            raise ConfigError(f"data.class_names: must be a list of names, got {self.class_names!r}")
        check_template(self.caption_template)
        self.degradation = _as_section(self.degradation, DegradationConfig, "degradation")
        if self.degradation is not None and self.name == "paired-folder":
            raise ConfigError("data.degradation: not used by data.name=paired-folder (its source/ folder "
                              "holds the sources); set data.degradation=null")
        if self.degradation is not None and self.image_size is not None:
            check_image_size(self.degradation, self.image_size)
        self.story = _as_section(self.story, StoryConfig, "story")
        if self.story is not None:
            self._check_story()
        if self.cache is not None:
            self._check_cache()

    def _check_cache(self) -> None:
        """A latent cache holds one fixed encoding per training image: nothing may change the image per epoch."""
        if not isinstance(self.cache, str) or not self.cache.strip():
            raise ConfigError(f"data.cache: must be the folder `dforge cache` wrote, got {self.cache!r}")
        changing = {"hflip": self.hflip, "degradation": self.degradation is not None, "story": self.story is not None,
                    "crop=random": self.crop == "random", "name=shards": self.name == "shards"}
        for key, used in changing.items():
            if used:
                raise ConfigError(f"data.{key}: not used with data.cache (a cache holds one fixed encoding "
                                  "of each training image of an indexed dataset)")

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

"""Stories made from real images: one item moves, resizes and turns across frames.

The story datasets of AR-LDM (Pan et al. 2024, "Synthesizing Coherent Story
with Auto-Regressive Latent Diffusion Models", WACV), PororoSV, FlintstonesSV
and VIST, cannot be fetched here (``story_hdf5.py`` reads them for users who
have them). ``StoryDataset`` builds stories of the same shape from real
images instead: each story shows *one* instance of the source split (the same
garment or handwriting in every frame) on a black ``canvas`` x ``canvas``
square, and a small grammar captions what happens to it. Later captions often
say "it" instead of the class, so only the story's history tells what to draw.

| symbol | meaning                                                          |
|--------|------------------------------------------------------------------|
| F      | ``frames`` per story                                             |
| S      | ``canvas``, side of the square frame in pixels                   |
| s      | item side: ``item_size`` x 0.6 / 1.0 / 1.4 (small / normal / large),|
|        | rounded, large capped at S - ``MIN_TRAVEL``                      |
| p      | position on a 3 x 3 grid, row-major: 0 = top left ... 8 = bottom right|

Placement: row / column 0, 1, 2 put the item's top / left edge at 0,
(S - s) // 2 and S - s, so every item lies fully inside the canvas.

Grammar (``<noun>`` is the class name without its article, e.g. ``sneaker``):

| frame / event | names the class                     | omits it (``it``)       |
|---------------|-------------------------------------|-------------------------|
| 0 (intro)     | ``a [small|large] <noun> <place>``   | never omitted           |
| move          | ``the <noun> moves to the <pos>``    | ``it moves to the <pos>``|
| resize (1 step)| ``the same <noun>, now smaller``    | ``it gets smaller``     |
| stay          | ``the <noun> stays <place>``         | ``it stays <place>``    |
| flip          | ``the <noun> turns around``          | ``it turns around``     |

``<pos>`` is one of ``POSITIONS`` ("top left" ... "bottom right");
``<place>`` is ``at the <pos>``, with "on" for left / right and "in" for
center. Resizing steps between adjacent sizes only (normal <-> small,
normal <-> large), so "smaller" / "larger" fixes the new size; "turns
around" mirrors the item horizontally. Each frame >= 1 draws one event
(``EVENT_WEIGHTS``; a move goes to one of the 8 other positions) and omits
the class with probability ``omit_identity_prob``.

Splits (items from different splits never share an instance):

| split | instances                                                           |
|-------|---------------------------------------------------------------------|
| train | the source's train split minus the ``val_instances`` held out        |
| val   | ``val_instances`` images of the source's train split, drawn with seed|
| test  | the source's test split                                             |

Plans (instance, events, positions, sizes, flips, naming) for all stories are
drawn at construction with ``numpy.random.default_rng(SeedSequence([seed,
*split bytes]))``, vectorised over stories; frames are rendered on access.
The same (config, split) always gives the same stories.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from diffusionforge.data.captions import caption_names
from diffusionforge.data.datasets import build_dataset
from diffusionforge.data.folder import uint8_to_signed
from diffusionforge.errors import ConfigError

StorySource = Literal["fashion-mnist-embedded", "mnist", "hdf5"]  # hdf5: PororoSV / FlintstonesSV (story_hdf5.py)
StorySplit = Literal["train", "val", "test"]
SOURCE_SPLIT: dict[str, Literal["train", "test"]] = {"train": "train", "val": "train", "test": "test"}
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # 3 x 3 grid, row-major
GRID = 3  # positions per row / column
SIZES = ("small", "normal", "large")
NORMAL = SIZES.index("normal")
SIZE_SCALES = (0.6, 1.0, 1.4)  # item side / item_size for each of SIZES
MIN_TRAVEL = 4  # canvas pixels a large item leaves free, so its 3 columns / rows differ
EVENTS = ("intro", "move", "resize", "stay", "flip")  # frame 0 is always intro
EVENT_WEIGHTS = {"move": 0.4, "resize": 0.25, "stay": 0.15, "flip": 0.2}  # events of frames >= 1
HOLDOUT_KEY = b"val-instances"  # seeds the draw of the instances held out for val
ARTICLES = ("a", "an", "the")


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
            if not _is_int(getattr(self, key)) or getattr(self, key) < minimum:
                raise _error(key, f"must be an integer >= {minimum}, got {getattr(self, key)!r}")
        sides = self.sides
        if not sides[0] < sides[1] < sides[2]:
            raise _error("item_size", f"small / normal / large sides {sides} px must differ and fit a "
                                      f"{self.canvas} px canvas with {MIN_TRAVEL} px to spare")
        prob = self.omit_identity_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StoryPlan:
    """Ground truth of N stories of F frames (arrays, one row per story)."""

    instance: np.ndarray  # (N,) index of the image in the source split
    event: np.ndarray  # (N, F) index into EVENTS
    position: np.ndarray  # (N, F) index into POSITIONS
    size: np.ndarray  # (N, F) index into SIZES
    flip: np.ndarray  # (N, F) bool, mirrored horizontally
    names_identity: np.ndarray  # (N, F) bool, the caption names the class


def split_seed(seed: int, key: bytes) -> np.random.SeedSequence:
    """SeedSequence of (seed, key bytes): one independent stream per split / purpose."""
    return np.random.SeedSequence([seed, *key])


def instance_pool(config: StoryConfig, split: StorySplit, source_size: int) -> np.ndarray:
    """Sorted indices of the source split that ``split``'s stories may show."""
    if split == "test":
        return np.arange(source_size)
    if config.val_instances >= source_size:
        raise _error("val_instances", f"{config.val_instances} leaves no train instances of {source_size}")
    order = np.random.default_rng(split_seed(config.seed, HOLDOUT_KEY)).permutation(source_size)
    chosen = order[:config.val_instances] if split == "val" else order[config.val_instances:]
    return np.sort(chosen)


def _event_choices(flip_events: bool) -> tuple[np.ndarray, np.ndarray]:
    """(event indices, probabilities) of the events frames >= 1 draw from."""
    names = [name for name in EVENT_WEIGHTS if flip_events or name != "flip"]
    weights = np.array([EVENT_WEIGHTS[name] for name in names])
    return np.array([EVENTS.index(name) for name in names]), weights / weights.sum()


def make_plan(config: StoryConfig, split: StorySplit, pool: np.ndarray, count: int) -> StoryPlan:
    """Draw ``count`` stories over the instances in ``pool``, vectorised over stories."""
    rng = np.random.default_rng(split_seed(config.seed, split.encode()))
    shape = (count, config.frames)
    event, position, size = (np.zeros(shape, np.int64) for _ in range(3))
    flip, names = np.zeros(shape, bool), np.ones(shape, bool)
    instance = pool[rng.integers(len(pool), size=count)] if len(pool) else np.zeros(0, np.int64)
    position[:, 0] = rng.integers(len(POSITIONS), size=count)
    size[:, 0] = rng.integers(len(SIZES), size=count)
    kinds, weights = _event_choices(config.flip_events)
    move, resize, flip_event = (EVENTS.index(name) for name in ("move", "resize", "flip"))
    for t in range(1, config.frames):
        drawn = rng.choice(kinds, size=count, p=weights)
        shift = rng.integers(1, len(POSITIONS), size=count)  # a move never stays put
        step = np.where(size[:, t - 1] == NORMAL, rng.choice([0, 2], size=count), NORMAL)
        names[:, t] = rng.random(count) >= config.omit_identity_prob
        event[:, t] = drawn
        moved = (position[:, t - 1] + shift) % len(POSITIONS)
        position[:, t] = np.where(drawn == move, moved, position[:, t - 1])
        size[:, t] = np.where(drawn == resize, step, size[:, t - 1])
        flip[:, t] = flip[:, t - 1] ^ (drawn == flip_event)
    return StoryPlan(instance, event, position, size, flip, names)


def noun_of(name: str) -> str:
    """Caption name without its article: "an ankle boot" -> "ankle boot"."""
    first, _, rest = name.partition(" ")
    return rest if first in ARTICLES and rest else name


def place(position: int) -> str:
    """Where the item is: "at the top left", "on the left", "in the center"."""
    name = POSITIONS[position]
    preposition = {"left": "on", "right": "on", "center": "in"}.get(name, "at")
    return f"{preposition} the {name}"


def intro_caption(noun: str, position: int, size: int) -> str:
    """Frame 0: "a sneaker at the top left", "a small ankle boot in the center"."""
    words = noun if size == NORMAL else f"{SIZES[size]} {noun}"
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {place(position)}"


def event_caption(event: int, noun: str, names_identity: bool, position: int, size: int,
                  previous_size: int) -> str:
    """Caption of a frame >= 1 after ``event`` (see the grammar table)."""
    subject = f"the {noun}" if names_identity else "it"
    kind = EVENTS[event]
    if kind == "move":
        return f"{subject} moves to the {POSITIONS[position]}"
    if kind == "stay":
        return f"{subject} stays {place(position)}"
    if kind == "flip":
        return f"{subject} turns around"
    if kind == "resize":
        change = "smaller" if size < previous_size else "larger"
        return f"the same {noun}, now {change}" if names_identity else f"it gets {change}"
    raise ValueError(f"no caption for event {kind!r} after frame 0")


def item_box(position: int, side: int, canvas: int) -> tuple[int, int]:
    """(top, left) of a ``side`` x ``side`` item at grid ``position`` on the canvas."""
    row, col = divmod(position, GRID)
    offsets = (0, (canvas - side) // 2, canvas - side)
    return offsets[row], offsets[col]


def resize_item(image: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (H, W) -> uint8 (side, side), bilinear with antialiasing."""
    if image.shape == (side, side):
        return image
    resized = F.interpolate(image[None, None].float(), size=(side, side), mode="bilinear",
                            antialias=True, align_corners=False)[0, 0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=4)
def source_arrays(source: StorySource, root: Optional[str],
                  split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, H, W), labels long (N,)) of a source split, loaded once."""
    dataset = build_dataset(source, split, root=root, channels=1)
    return dataset.images[:, 0], dataset.labels


class StoryDataset(Dataset):
    """Stories of one split; items are dicts of the frames and their ground truth.

    Item keys: ``frames`` float (F, 1, S, S) in [-1, 1]; ``captions`` list of F
    str; ``class_label``, ``position``, ``size``, ``event`` long (F,);
    ``flip``, ``names_identity`` bool (F,); ``instance`` long (), the image's
    index in the source split (train for train / val, test for test). Batch
    them with ``collate_stories``.
    """

    def __init__(self, config: StoryConfig, split: StorySplit) -> None:
        if split not in SOURCE_SPLIT:
            raise ValueError(f"split must be train, val or test, got {split!r}")
        config.validate()
        if config.source == "hdf5":
            raise ValueError("source=hdf5 stories are read by story_hdf5.StoryHDF5Dataset, not made")
        self.config, self.split = config, split
        self.images, self.labels = source_arrays(config.source, config.root, SOURCE_SPLIT[split])
        self.nouns = tuple(noun_of(name) for name in caption_names(config.source))
        pool = instance_pool(config, split, len(self.images))
        self.plan = make_plan(config, split, pool, config.num_stories(split))

    def __len__(self) -> int:
        return len(self.plan.instance)

    def captions(self, index: int) -> list[str]:
        """The F captions of story ``index`` (no rendering)."""
        p, noun = self.plan, self.nouns[int(self.labels[self.plan.instance[index]])]
        captions = [intro_caption(noun, int(p.position[index, 0]), int(p.size[index, 0]))]
        for t in range(1, self.config.frames):
            captions.append(event_caption(int(p.event[index, t]), noun, bool(p.names_identity[index, t]),
                                          int(p.position[index, t]), int(p.size[index, t]),
                                          int(p.size[index, t - 1])))
        return captions

    def render(self, index: int) -> torch.Tensor:
        """uint8 (F, 1, S, S): the story's instance drawn on a black canvas in each frame."""
        p, canvas = self.plan, self.config.canvas
        image = self.images[int(p.instance[index])]
        frames = torch.zeros(self.config.frames, 1, canvas, canvas, dtype=torch.uint8)
        resized: dict[int, torch.Tensor] = {}
        for t in range(self.config.frames):
            side = self.config.sides[int(p.size[index, t])]
            if side not in resized:
                resized[side] = resize_item(image, side)
            item = resized[side].flip(-1) if p.flip[index, t] else resized[side]
            top, left = item_box(int(p.position[index, t]), side, canvas)
            frames[t, 0, top:top + side, left:left + side] = item
        return frames

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"story {index} out of range for {len(self)} stories")
        index %= len(self)
        p, instance = self.plan, int(self.plan.instance[index])
        return {
            "frames": uint8_to_signed(self.render(index)),  # (F, 1, S, S)
            "captions": self.captions(index),
            "class_label": self.labels[instance].long().expand(self.config.frames).clone(),  # (F,)
            "position": torch.from_numpy(p.position[index].copy()),
            "size": torch.from_numpy(p.size[index].copy()),
            "event": torch.from_numpy(p.event[index].copy()),
            "flip": torch.from_numpy(p.flip[index].copy()),
            "names_identity": torch.from_numpy(p.names_identity[index].copy()),
            "instance": torch.tensor(instance, dtype=torch.long),
        }


def collate_stories(batch: list[dict]) -> dict:
    """Stack tensors to (B, ...); ``captions`` becomes a list of B lists of F str.

    (``default_collate`` would transpose the captions into F tuples of B str.)
    """
    tensors = default_collate([{k: v for k, v in item.items() if k != "captions"} for item in batch])
    return {**tensors, "captions": [list(item["captions"]) for item in batch]}

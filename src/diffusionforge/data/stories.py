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
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from diffusionforge.data.captions import caption_names
from diffusionforge.data.config import SIZES, StoryConfig, StorySource, StorySplit
from diffusionforge.data.datasets import build_dataset
from diffusionforge.data.folder import uint8_to_signed
from diffusionforge.errors import ConfigError

SOURCE_SPLIT: dict[str, Literal["train", "test"]] = {"train": "train", "val": "train", "test": "test"}
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # 3 x 3 grid, row-major
GRID = 3  # positions per row / column
NORMAL = SIZES.index("normal")
EVENTS = ("intro", "move", "resize", "stay", "flip")  # frame 0 is always intro
EVENT_WEIGHTS = {"move": 0.4, "resize": 0.25, "stay": 0.15, "flip": 0.2}  # events of frames >= 1
HOLDOUT_KEY = b"val-instances"  # seeds the draw of the instances held out for val
ARTICLES = ("a", "an", "the")


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
        raise ConfigError(f"data.story.val_instances: {config.val_instances} leaves no train instances "
                          f"of {source_size}")
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

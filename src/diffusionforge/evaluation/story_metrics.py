"""Score generated stories: is the right item drawn, where the caption says, and the same one?

A story frame (``data.stories``) shows one item on a black canvas, in one of
the 27 boxes that the 3 x 3 grid ``POSITIONS`` and the three ``SIZES`` allow.
``locate_items`` finds that box in any frame from its pixel mass alone;
``item_crops`` cuts it out and resizes it to 28 x 28, undoing the rendering,
so the shipped 28 x 28 classifier and feature network can judge the item.
``score_stories`` turns that into the numbers of a story model (AR-LDM, Pan
et al. 2024, WACV, judge their stories by character accuracy and FID; here
the ground truth of every frame is known, so location and identity are
checked too).

| symbol        | meaning                                                        |
|---------------|----------------------------------------------------------------|
| N, F          | stories, frames per story                                      |
| S             | canvas side in pixels (``StoryConfig.canvas``)                  |
| x             | frame (1, S, S) in [-1, 1], black background = -1              |
| m(x)          | mass ``sum (x + 1) / 2`` (pixels clamped to [0, 1] first)      |
| B_{p, s}      | box of grid position p and size s (``item_box``, ``sides``)    |
| frac_{p, s}   | ``m(x inside B_{p, s}) / m(x)``                                 |
| c(x)          | crop of the located box resized to 28 x 28                     |
| f(x)          | identity feature ``(h(c) + h(mirror c)) / 2``, L2-normalised,   |
|               | h = ``classifier.features``; mirroring is a story event, so f  |
|               | ignores it                                                     |
| f_{i, j}      | f of frame j of story i                                         |

Location: the smallest box with ``frac >= min_fraction`` (ties between
equal-area boxes: the higher fraction); if no box reaches it, the box of
highest fraction (ties: the smaller). Fractions within ``FRACTION_TIE`` of
each other count as tied, and remaining ties go to the box whose centre is
nearest the mass centroid: a large, narrow item (trousers) lies wholly inside
two overlapping large boxes, and only its centroid tells which one it was
drawn in. Empty frames (``m(x) <= EMPTY_MASS``) get the centre box at
normal size and fraction 0.

Scores of ``score_stories`` (plain floats, for ``metrics.json``):

| key                               | meaning                                              |
|-----------------------------------|------------------------------------------------------|
| ``caption_accuracy``              | classifier(c(x)) == the story's class, all frames     |
| ``position_accuracy``             | located p == reference p, frames of intro/move/stay   |
| ``size_accuracy``                 | located s == reference s, all frames                  |
| ``consistency_same``              | mean over j >= 1 of cos(f_{i, j}, f_{i, 0})           |
| ``consistency_other``             | cos(f_{i, j}, f_{k, 0}), k = i + 1 mod N               |
| ``consistency_gap``               | same - other                                          |
| ``consistency_same_class_other``  | cos(f_{i, j}, f_{k, 0}), k the next story (cyclic)    |
|                                   | of the same class; frames without one are skipped     |
| ``instance_gap``                  | same - same_class_other (on the frames that have one) |
| ``fid_frame_{j}``, ``fid``        | FID of c(generated) vs c(real), frame j / all frames  |
| ``num_stories``, ``frames``       | N, F                                                  |

The caption and consistency scores also come split as ``<key>_named`` and
``<key>_omitted``: frames whose caption names the class (frame 0 always
does) and frames that say "it". A key whose subset is empty (e.g. no
omitted frames, F = 1) is left out rather than reported as NaN.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.stories import EVENTS, NORMAL, POSITIONS, StoryConfig, item_box
from ..metrics.features import FeatureNetwork

CROP_SIZE = 28  # side of the crops the classifier and the feature networks take
EMPTY_MASS = 1e-3  # a frame of total mass m(x) at most this is empty (nothing drawn)
FRACTION_TIE = 1e-6  # box fractions closer than this are tied
CENTER = POSITIONS.index("center")  # position given to empty frames
LOCATED_EVENTS = ("intro", "move", "stay")  # events whose caption names the position
REFERENCE_KEYS = ("class_label", "position", "size", "event", "names_identity")
# How crops are resized to 28 x 28. The shipped classifier was trained on sharp 28 x 28 images and
# loses accuracy on upsampled ones: on real val frames (500 stories) it labels 66% of bilinear crops
# right (small / normal / large items 45 / 68 / 85%), 80% of nearest ones (69 / 82 / 89%), against
# 96% of the source images themselves. Compare generated scores with real-frame scores of the same mode.
CropMode = Literal["bilinear", "bicubic", "nearest"]


class ItemBoxes(NamedTuple):
    """The box located in each of N frames."""

    position: Tensor  # (N,) long, index into POSITIONS
    size: Tensor  # (N,) long, index into SIZES
    fraction: Tensor  # (N,) float, share of the frame's mass inside the box (0 for empty frames)


class Candidates(NamedTuple):
    """The 27 boxes B_{p, s}, ordered size-major: index = s * len(POSITIONS) + p."""

    masks: Tensor  # (27, S * S) float, 1 inside the box
    area: Tensor  # (27,) float, pixels in the box
    center: Tensor  # (27, 2) float, (row, column) of the box centre


def candidate_boxes(config: StoryConfig) -> Candidates:
    """Masks, areas and centres of every (position, size) box on the canvas."""
    canvas = config.canvas
    masks, areas, centers = [], [], []
    for side in config.sides:
        for position in range(len(POSITIONS)):
            top, left = item_box(position, side, canvas)
            mask = torch.zeros(canvas, canvas)
            mask[top:top + side, left:left + side] = 1.0
            masks.append(mask.flatten())
            areas.append(float(side * side))
            centers.append((top + side / 2, left + side / 2))
    return Candidates(torch.stack(masks), torch.tensor(areas), torch.tensor(centers))


def mass_centroid(mass: Tensor) -> Tensor:
    """mass: (N, S, S) >= 0 -> (N, 2) (row, column) of its centre of mass, in pixel units."""
    coords = torch.arange(mass.shape[-1], dtype=mass.dtype) + 0.5  # pixel centres
    total = mass.sum(dim=(1, 2)).clamp_min(EMPTY_MASS)
    rows = (mass.sum(2) * coords).sum(1) / total
    cols = (mass.sum(1) * coords).sum(1) / total
    return torch.stack([rows, cols], dim=1)


def choose_box(fraction: Tensor, candidates: Candidates, centroid: Tensor, min_fraction: float) -> Tensor:
    """Index of the chosen candidate per frame (rules in the module docstring).

    fraction: (N, 27); centroid: (N, 2) -> (N,) long.
    """
    area = candidates.area[None].expand_as(fraction)  # (N, 27)
    reached = fraction >= min_fraction
    any_reached = reached.any(dim=1, keepdim=True)
    # Reached: smallest area first, then the highest fraction. Otherwise: highest fraction, then smallest area.
    smallest = torch.where(reached, area, torch.inf).amin(dim=1, keepdim=True)
    pool = torch.where(any_reached, reached & (area == smallest), torch.ones_like(reached))
    best = torch.where(pool, fraction, -torch.inf).amax(dim=1, keepdim=True)
    pool &= fraction >= best - FRACTION_TIE
    smallest = torch.where(pool, area, torch.inf).amin(dim=1, keepdim=True)
    pool &= area == smallest
    distance = (candidates.center[None] - centroid[:, None]).square().sum(-1)  # (N, 27)
    return torch.where(pool, distance, torch.inf).argmin(dim=1)


def locate_items(frames: Tensor, config: StoryConfig, min_fraction: float = 0.9) -> ItemBoxes:
    """frames: (N, 1, S, S) in [-1, 1] -> the grid box each item was drawn in."""
    if frames.ndim != 4 or frames.shape[1:] != (1, config.canvas, config.canvas):
        raise ValueError(f"frames must be (N, 1, {config.canvas}, {config.canvas}), got {tuple(frames.shape)}")
    candidates = candidate_boxes(config)
    mass = ((frames.detach().float().cpu()[:, 0] + 1) / 2).clamp(0, 1)  # (N, S, S)
    total = mass.sum(dim=(1, 2))  # (N,)
    inside = mass.flatten(1) @ candidates.masks.T  # (N, 27)
    fraction = inside / total.clamp_min(EMPTY_MASS)[:, None]
    choice = choose_box(fraction, candidates, mass_centroid(mass), min_fraction)
    empty = total <= EMPTY_MASS
    size, position = choice.div(len(POSITIONS), rounding_mode="floor"), choice % len(POSITIONS)
    chosen_fraction = fraction.gather(1, choice[:, None])[:, 0]
    return ItemBoxes(position.masked_fill(empty, CENTER), size.masked_fill(empty, NORMAL),
                     chosen_fraction.masked_fill(empty, 0.0))


def resize_crops(cut: Tensor, size: int, mode: CropMode) -> Tensor:
    """cut: (n, 1, side, side) -> (n, 1, size, size), resampled with ``mode``."""
    options = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
    return F.interpolate(cut, size=(size, size), mode=mode, **options)


def item_crops(frames: Tensor, boxes: ItemBoxes, config: StoryConfig, size: int = CROP_SIZE,
               mode: CropMode = "bilinear") -> Tensor:
    """frames: (N, 1, S, S) -> (N, 1, size, size): each box cut out and resized with ``mode``.

    Bilinear with antialiasing undoes ``resize_item`` as far as it can; see
    ``CropMode`` for what that costs the classifier.
    """
    if mode not in get_args(CropMode):
        raise ValueError(f"crop mode must be one of {', '.join(get_args(CropMode))}, got {mode!r}")
    frames = frames.detach().float().cpu()
    crops = torch.empty(len(frames), 1, size, size)
    for size_index, side in enumerate(config.sides):
        chosen = (boxes.size == size_index).nonzero()[:, 0]
        if len(chosen) == 0:
            continue
        offsets = torch.tensor([item_box(int(p), side, config.canvas) for p in boxes.position[chosen]])
        span = torch.arange(side)
        rows = offsets[:, 0, None] + span  # (n, side)
        cols = offsets[:, 1, None] + span  # (n, side)
        cut = frames[chosen[:, None, None], 0, rows[:, :, None], cols[:, None, :]]  # (n, side, side)
        crops[chosen] = resize_crops(cut[:, None], size, mode)
    return crops


@torch.no_grad()
def classify_crops(classifier: nn.Module, crops: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """crops: (M, 1, 28, 28) -> (predicted class (M,), identity feature f (M, D) L2-normalised)."""
    device = next(classifier.parameters()).device
    labels, features = [], []
    for batch in crops.split(batch_size):
        batch = batch.to(device)
        labels.append(classifier(batch).argmax(-1).cpu())
        h = (classifier.features(batch) + classifier.features(batch.flip(-1))) / 2  # mirror-invariant
        features.append(F.normalize(h.float(), dim=-1).cpu())
    return torch.cat(labels), torch.cat(features)


def next_same_class(labels: Tensor) -> Tensor:
    """labels: (N,) -> (N,) index of the next story (cyclic) of the same class, -1 if it is the only one."""
    partner = torch.full_like(labels, -1)
    for label in labels.unique():
        members = (labels == label).nonzero()[:, 0]
        if len(members) > 1:
            partner[members] = members.roll(-1)
    return partner


def split_means(name: str, values: Tensor, keep: Tensor, named: Tensor) -> dict[str, float]:
    """``name``, ``name_named``, ``name_omitted``: means of ``values`` over ``keep`` (and by naming)."""
    scores = {}
    for suffix, subset in (("", keep), ("_named", keep & named), ("_omitted", keep & ~named)):
        if subset.any():
            scores[name + suffix] = values[subset].float().mean().item()
    return scores


def consistency_scores(features: Tensor, labels: Tensor, named: Tensor) -> dict[str, float]:
    """features: (N, F, D) identity features f; labels: (N,) story classes; named: (N, F) bool."""
    n, frames = features.shape[:2]
    later = features[:, 1:]  # (N, F - 1, D)
    anchors = features[:, 0]  # (N, D)
    named_later = named[:, 1:]
    everything = torch.ones_like(named_later)
    same = (later * anchors[:, None]).sum(-1)  # (N, F - 1)
    other = (later * anchors.roll(-1, dims=0)[:, None]).sum(-1)  # story i against story i + 1
    partner = next_same_class(labels)
    has_partner = (partner >= 0)[:, None].expand_as(same)
    same_class = (later * anchors[partner.clamp_min(0)][:, None]).sum(-1)
    scores = {}
    pairs: list[tuple[str, Tensor, Tensor]] = [
        ("consistency_same", same, everything), ("consistency_other", other, everything),
        ("consistency_gap", same - other, everything),
        ("consistency_same_class_other", same_class, has_partner),
        ("instance_gap", same - same_class, has_partner)]
    for name, values, keep in pairs:
        scores.update(split_means(name, values, keep, named_later))
    return scores


def crop_frames(frames: Tensor, config: StoryConfig, mode: CropMode) -> tuple[ItemBoxes, Tensor]:
    """frames: (M, 1, S, S) -> (located boxes, crops (M, 1, 28, 28))."""
    boxes = locate_items(frames, config)
    return boxes, item_crops(frames, boxes, config, mode=mode)


def crop_fid(generated: Tensor, real: Tensor, network: FeatureNetwork, batch_size: int) -> float:
    """FID between two sets of crops (M, 1, 28, 28) on ``network``, with fresh accumulators."""
    metrics = network.metrics(tuple(generated.shape[1:]))
    device = next(network.network.parameters()).device
    for images, is_real in ((real, True), (generated, False)):
        for batch in images.split(batch_size):
            metrics.update(batch.to(device), real=is_real)
    # FID alone: DistributionMetrics.compute would also run KID's 100 subsets, which cost
    # seconds per call on a CPU and are not reported here.
    return float(metrics.fid.compute())


def fid_scores(generated: Tensor, real: Tensor, network: FeatureNetwork, batch_size: int) -> dict[str, float]:
    """generated, real: (N, F, 1, 28, 28) crops -> ``fid_frame_{j}`` for each frame and pooled ``fid``."""
    scores = {f"fid_frame_{j}": crop_fid(generated[:, j], real[:, j], network, batch_size)
              for j in range(generated.shape[1])}
    scores["fid"] = crop_fid(generated.flatten(0, 1), real.flatten(0, 1), network, batch_size)
    return scores


def check_inputs(generated: Tensor, reference: dict, config: StoryConfig) -> tuple[int, int]:
    """(N, F) of ``generated`` (N, F, 1, S, S); ValueError on a shape that does not fit."""
    canvas = config.canvas
    if generated.ndim != 5 or generated.shape[2:] != (1, canvas, canvas):
        raise ValueError(f"generated must be (N, F, 1, {canvas}, {canvas}), got {tuple(generated.shape)}")
    n, frames = generated.shape[:2]
    if n < 2:
        raise ValueError("score_stories needs at least 2 stories (consistency compares stories)")
    for key in REFERENCE_KEYS:
        if tuple(reference[key].shape) != (n, frames):
            raise ValueError(f"reference[{key!r}] must be ({n}, {frames}), got {tuple(reference[key].shape)}")
    return n, frames


def score_stories(generated: Tensor, reference: dict, config: StoryConfig, classifier: nn.Module,
                  feature_network: Optional[FeatureNetwork] = None,
                  batch_size: int = 500, crop_mode: CropMode = "bilinear") -> dict[str, float]:
    """Scores of N generated stories against their ground truth (keys in the module docstring).

    generated: (N, F, 1, S, S) in [-1, 1]. reference: ``class_label``,
    ``position``, ``size``, ``event`` long (N, F) and ``names_identity`` bool
    (N, F), as ``collate_stories`` stacks them, plus ``real_frames`` (N, F, 1,
    S, S) or None. classifier: a 28 x 28 ``SmallClassifier`` in eval mode
    (``load_classifier``); it labels the crops and gives the features of f.
    The FID keys are present only when both ``feature_network`` and
    ``real_frames`` are given; real frames are located and cropped the same
    way as the generated ones. Nothing is drawn at random, so no seed is
    needed. ``crop_mode`` resizes all crops.
    """
    n, frames = check_inputs(generated, reference, config)
    ref = {key: torch.as_tensor(reference[key]).cpu() for key in REFERENCE_KEYS}
    boxes, crops = crop_frames(generated.flatten(0, 1), config, crop_mode)  # (N * F, 1, 28, 28)
    predicted, features = classify_crops(classifier, crops, batch_size)
    labels, named = ref["class_label"].flatten(), ref["names_identity"].bool()
    events = torch.tensor([EVENTS.index(name) for name in LOCATED_EVENTS])
    located = torch.isin(ref["event"].flatten(), events)
    everything = torch.ones(n * frames, dtype=torch.bool)
    scores: dict[str, float] = {"num_stories": n, "frames": frames}
    scores.update(split_means("caption_accuracy", predicted == labels, everything, named.flatten()))
    scores["position_accuracy"] = (boxes.position == ref["position"].flatten())[located].float().mean().item()
    scores["size_accuracy"] = (boxes.size == ref["size"].flatten()).float().mean().item()
    scores.update(consistency_scores(features.view(n, frames, -1), ref["class_label"][:, 0], named))
    real_frames = reference.get("real_frames")
    if feature_network is not None and real_frames is not None:
        _, real_crops = crop_frames(real_frames.flatten(0, 1), config, crop_mode)
        scores.update(fid_scores(crops.view(n, frames, *crops.shape[1:]),
                                 real_crops.view(n, frames, *crops.shape[1:]), feature_network,
                                 batch_size))
    return scores


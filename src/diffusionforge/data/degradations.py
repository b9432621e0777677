"""Degradations that turn a clean image x into the source y of an image-to-image pair.

Latent Bridge Matching (Chadebec et al. 2025, "LBM: Latent Bridge Matching
for Fast Image-to-Image Translation") learns to carry a source y to its
target x. For restoration tasks the pairs are made from real images by a
known degradation, y = D(x). Images are float (C, H, W) or (B, C, H, W) in
[-1, 1]; all randomness comes from the ``torch.Generator`` passed in.

| kind               | source y = D(x)                                              | also returned |
|--------------------|--------------------------------------------------------------|---------------|
| ``super_resolution``| up(down_s(x)): mean over s x s blocks (area, antialiased),  |               |
|                    | then back to (H, W): bicubic (clamped to [-1, 1]), bilinear  |               |
|                    | or nearest                                                   |               |
| ``inpainting``     | x where m = 0, ``fill`` where m = 1                          | mask m (1, H, W) |
| ``denoising``      | clamp(x + noise_std * eps, -1, 1), eps ~ N(0, I)             |               |
| ``deblurring``     | x * G_sigma: separable Gaussian, radius ceil(3 sigma),       |               |
|                    | reflect padding                                              |               |

Inpainting masks m (1 = hole to fill, 0 = known): ``box`` is one random
rectangle; ``free_form`` is 1..``strokes`` brush strokes, each a polyline
of straight segments painted with a round brush, as in DeepFill v2 (Yu et
al. 2019, "Free-Form Image Inpainting with Gated Convolution") and LaMa
(Suvorov et al. 2022); ``mixed`` picks either with probability 1/2. Every
mask has at least one hole pixel and at least one known pixel. With the
default sizes, box holes cover 6-25 % of the image (14 % on average) and
free-form holes 18 % on average (5-95th percentile 4-36 %), at any side.

``PairedDataset`` adds ``source`` (and ``mask``) to the items of an image
dataset: evaluation pairs are fixed by (seed, index), training pairs are
drawn afresh on every access.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffusionforge.data.config import DegradationConfig, UpsampleMode

MIN_BRUSH_RADIUS = 0.5  # pixels: the thinnest brush still paints the pixel it passes over
SEED_BITS = 64  # (seed, index) are mixed by numpy's SeedSequence into a 64-bit generator seed


# --- super-resolution and blur -----------------------------------------------

def _per_batch(images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a (B, C, H, W) function to (C, H, W) or (B, C, H, W) images."""
    if images.ndim == 3:
        return fn(images.unsqueeze(0)).squeeze(0)
    if images.ndim == 4:
        return fn(images)
    raise ValueError(f"images must be (C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}")


def low_resolution(images: torch.Tensor, scale: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., C, H // scale, W // scale) by area averaging.

    Each output pixel is the mean of a scale x scale block when H and W are
    multiples of ``scale`` (adaptive average pooling otherwise): the
    antialiased downsampling of super-resolution benchmarks.
    """
    height, width = images.shape[-2:]
    if scale < 1 or height // scale < 1 or width // scale < 1:
        raise ValueError(f"scale {scale} does not fit images of size {height}x{width}")
    return _per_batch(images, lambda x: F.interpolate(x, size=(height // scale, width // scale), mode="area"))


def upsample(images: torch.Tensor, size: Union[int, tuple[int, int]], mode: UpsampleMode) -> torch.Tensor:
    """(..., C, h, w) -> (..., C, H, W) with ``size`` = H = W or (H, W); bicubic clamped to [-1, 1]."""
    if mode not in get_args(UpsampleMode):
        raise ValueError(f"mode must be one of {', '.join(get_args(UpsampleMode))}, got {mode!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    corners = None if mode == "nearest" else False

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=size, mode=mode, align_corners=corners)

    out = _per_batch(images, resize)
    return out.clamp(-1.0, 1.0) if mode == "bicubic" else out  # bicubic overshoots at edges


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """(2r + 1,) normalised Gaussian weights, r = ceil(3 sigma)."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-offsets**2 / (2 * sigma**2))
    return (weights / weights.sum()).float()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., C, H, W) blurred by a separable Gaussian of std ``sigma`` px, reflect padding."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    kernel = gaussian_kernel(sigma).to(images)
    radius = kernel.numel() // 2
    height, width = images.shape[-2:]
    if radius >= min(height, width):
        raise ValueError(f"blur radius ceil(3 sigma) = {radius} needs images larger than {height}x{width}")

    def blur(x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        planes = F.pad(x.reshape(batch * channels, 1, height, width), (radius,) * 4, mode="reflect")
        planes = F.conv2d(planes, kernel.view(1, 1, 1, -1))  # along W
        planes = F.conv2d(planes, kernel.view(1, 1, -1, 1))  # along H
        return planes.view(batch, channels, height, width)

    return _per_batch(images, blur)


# --- inpainting masks ----------------------------------------------------------

def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _check_mask_size(height: int, width: int) -> None:
    if min(height, width) < 2:
        raise ValueError(f"masks need images of at least 2x2 pixels, got {height}x{width}")


def box_mask(height: int, width: int, generator: torch.Generator, *,
             box_min: float = DegradationConfig.box_min,
             box_max: float = DegradationConfig.box_max) -> torch.Tensor:
    """(1, H, W) float, 1 inside one random rectangle, 0 elsewhere.

    Each side is a uniform fraction in [box_min, box_max] of the image side,
    rounded and kept within 1..side - 1, so the hole is never empty and
    never the whole image; the position is uniform.
    """
    _check_mask_size(height, width)
    box_h, box_w = (min(max(round(_uniform(generator, box_min, box_max) * side), 1), side - 1)
                    for side in (height, width))
    top, left = _randint(generator, 0, height - box_h), _randint(generator, 0, width - box_w)
    mask = torch.zeros(1, height, width)
    mask[:, top:top + box_h, left:left + box_w] = 1.0
    return mask


def _segment_distance2(ys: torch.Tensor, xs: torch.Tensor, start: tuple[float, float],
                       end: tuple[float, float]) -> torch.Tensor:
    """(H, W) squared distance of each pixel centre to the segment start-end."""
    (y0, x0), (y1, x1) = start, end
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx
    t = ((ys - y0) * dy + (xs - x0) * dx) / length2 if length2 > 0 else torch.zeros_like(ys)
    t = t.clamp(0.0, 1.0)
    return (ys - y0 - t * dy) ** 2 + (xs - x0 - t * dx) ** 2


def _brush_stroke(ys: torch.Tensor, xs: torch.Tensor, generator: torch.Generator, *, vertices: int,
                  width_min: float, width_max: float, length: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """(bool (H, W) painted pixels, start pixel) of one random polyline stroke."""
    height, width = ys.shape
    side = min(height, width)
    start = (_randint(generator, 0, height - 1), _randint(generator, 0, width - 1))
    radius = max(_uniform(generator, width_min, width_max) * side / 2, MIN_BRUSH_RADIUS)
    painted = torch.zeros(height, width, dtype=torch.bool)
    point = (float(start[0]), float(start[1]))
    for _ in range(_randint(generator, 1, vertices)):
        angle = _uniform(generator, 0.0, 2 * math.pi)
        step = _uniform(generator, 0.0, length * side)
        end = (min(max(point[0] + step * math.sin(angle), 0.0), height - 1.0),
               min(max(point[1] + step * math.cos(angle), 0.0), width - 1.0))
        painted |= _segment_distance2(ys, xs, point, end) <= radius * radius
        point = end
    return painted, start


def free_form_mask(height: int, width: int, generator: torch.Generator, *,
                   strokes: int = DegradationConfig.strokes,
                   vertices: int = DegradationConfig.vertices,
                   width_min: float = DegradationConfig.stroke_width_min,
                   width_max: float = DegradationConfig.stroke_width_max,
                   length: float = DegradationConfig.stroke_length) -> torch.Tensor:
    """(1, H, W) float, 1 under 1..``strokes`` random brush strokes (DeepFill v2 / LaMa style).

    A stroke starts at a uniform random pixel and walks 1..``vertices``
    segments of uniform direction and length in [0, length * min(H, W)],
    end points clamped into the image; pixels within the brush radius
    (width / 2, width uniform in [width_min, width_max] * min(H, W), at
    least half a pixel) of the polyline are painted. The start pixel is
    always painted, so the hole is never empty; a stroke that would leave no
    known pixel is skipped, and if all are, the hole is the first start pixel.
    """
    _check_mask_size(height, width)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")  # (H, W) each
    hole = torch.zeros(height, width, dtype=torch.bool)
    first_start = None
    for _ in range(_randint(generator, 1, strokes)):
        painted, start = _brush_stroke(ys, xs, generator, vertices=vertices, width_min=width_min,
                                       width_max=width_max, length=length)
        first_start = start if first_start is None else first_start
        if not (hole | painted).all():
            hole |= painted
    if not hole.any():
        hole[first_start] = True
    return hole.float().unsqueeze(0)


def inpainting_mask(height: int, width: int, config: DegradationConfig,
                    generator: torch.Generator) -> torch.Tensor:
    """(1, H, W) float mask of the kind ``config.mask`` names (``mixed``: box or free-form, prob 1/2)."""
    kind = config.mask
    if kind == "mixed":
        kind = "box" if float(torch.rand((), generator=generator)) < 0.5 else "free_form"
    if kind == "box":
        return box_mask(height, width, generator, box_min=config.box_min, box_max=config.box_max)
    return free_form_mask(height, width, generator, strokes=config.strokes, vertices=config.vertices,
                          width_min=config.stroke_width_min, width_max=config.stroke_width_max,
                          length=config.stroke_length)


# --- degrade one image ---------------------------------------------------------

Degradation = Callable[[torch.Tensor, DegradationConfig, torch.Generator], dict[str, torch.Tensor]]


def _super_resolution(image: torch.Tensor, config: DegradationConfig,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
    small = low_resolution(image, config.scale)  # (C, H // s, W // s)
    return {"source": upsample(small, tuple(image.shape[-2:]), config.upsample)}


def _inpainting(image: torch.Tensor, config: DegradationConfig,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    mask = inpainting_mask(*image.shape[-2:], config, generator).to(image)  # (1, H, W)
    source = torch.where(mask.bool(), torch.full_like(image, config.fill), image)
    return {"source": source, "mask": mask}


def _denoising(image: torch.Tensor, config: DegradationConfig,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    noise = torch.randn(image.shape, generator=generator, device=generator.device).to(image)
    return {"source": (image + config.noise_std * noise).clamp(-1.0, 1.0)}


def _deblurring(image: torch.Tensor, config: DegradationConfig,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"source": gaussian_blur(image, config.blur_sigma)}


DEGRADATIONS: dict[str, Degradation] = {
    "super_resolution": _super_resolution,
    "inpainting": _inpainting,
    "denoising": _denoising,
    "deblurring": _deblurring,
}


def degrade(image: torch.Tensor, config: DegradationConfig,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``{"source": (C, H, W)}`` for ``image`` (C, H, W), plus ``"mask"`` (1, H, W) for inpainting."""
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    return DEGRADATIONS[config.kind](image, config, generator)


# --- paired dataset ------------------------------------------------------------

def pair_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed mixed from (seed, index) by numpy's SeedSequence, the same everywhere."""
    mask = (1 << SEED_BITS) - 1
    state = np.random.SeedSequence([seed & mask, index & mask]).generate_state(1, np.uint64)
    return int(state[0])


class PairedDataset(Dataset):
    """Adds the degraded ``source`` (and inpainting ``mask``) to each item of a dataset.

    Items of the wrapped dataset are dicts with ``"image"``: float (C, H, W)
    in [-1, 1], the target x. Each returned item is a new dict with all of
    the wrapped item's keys plus ``"source"`` (C, H, W) and, for inpainting,
    ``"mask"`` (1, H, W) (1 = hole).

    Args:
        dataset: the clean images.
        config: the degradation D making source y = D(x).
        seed: with ``deterministic``, item i is degraded with a generator
            seeded from (seed, i) (``pair_seed``); unused otherwise.
        deterministic: True (validation / test): the same pair on every call
            and every machine. False (training): a fresh degradation on every
            access, seeded from torch's global RNG, so Lightning's
            ``seed_everything(workers=True)`` and DataLoader worker seeding
            govern it.
    """

    def __init__(self, dataset: Dataset, config: DegradationConfig, seed: int, deterministic: bool) -> None:
        config.validate()
        self.dataset = dataset
        self.config = config
        self.seed = int(seed)
        self.deterministic = bool(deterministic)

    def __len__(self) -> int:
        return len(self.dataset)

    def generator(self, index: int) -> torch.Generator:
        """The CPU generator that degrades item ``index``."""
        if self.deterministic:
            seed = pair_seed(self.seed, int(index))
        else:
            seed = int(torch.randint(0, 2**63 - 1, ()))  # torch's global RNG
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[index])
        item.update(degrade(item["image"], self.config, self.generator(index)))
        return item

"""The Translate tab: a bridge run's translation of an uploaded or test image, as `dforge translate` makes it.

The editor's image and painted mask become the files the CLI reads
(``files.run_image_file``, ``files.mask_file``) and go through the CLI's
library calls (``tasks.bridge``: ``source_batch``, ``translate_image``), so a
wrong size or a missing mask is the same one-line error. "Before" is the
source as the network sees it (a low-resolution input brought up to size,
the hole filled), "after" the translation.

A test image is item ``index`` of the run's test split given as a user would
give it: the low-resolution image of a super-resolution run, the clean image
and the test pair's mask of an inpainting run, the degraded source otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConfigError, DataError
from .files import mask_file, plain, run_image_file, to_image
from .generate import Progress, step_reporter
from .models import ModelCache


@dataclass
class TranslateResult:
    before: np.ndarray  # (H, W) or (H, W, 3) uint8: the source the network translates
    after: np.ndarray   # the translation, the same shape


def editor_parts(value) -> tuple[Optional[object], list]:
    """(background image, painted layers) of a gr.ImageEditor value (a dict) or of a plain image."""
    if isinstance(value, dict):
        return value.get("background"), list(value.get("layers") or [])
    return value, []


def translate(cache: ModelCache, run: str, editor, steps: Optional[int], seed: int, class_label: Optional[int],
              scratch: Path, progress: Optional[Progress] = None) -> TranslateResult:
    """Translate the editor's image (its painted pixels: the hole of an inpainting run); ``progress`` moves
    after each step."""
    from ..tasks.bridge import source_batch, translate_image
    from ..utils.images import to_uint8

    run_dir, config = cache.locate(run, "translate")
    if steps is not None and int(steps) < 1:
        raise ConfigError(f"steps: must be >= 1, got {steps}")
    background, layers = editor_parts(editor)
    image = run_image_file(background, config.data.channels, scratch, "input")
    if image is None:
        raise DataError("no input image: upload one or pick a test image")
    mask = mask_file(layers, to_image(background).size, scratch)
    batch = source_batch(config, str(image), None if mask is None else str(mask))
    loaded = cache.get(run, "translate")
    steps = loaded.model.sample_steps if steps is None else int(steps)
    with loaded.lock:
        after = translate_image(loaded.model, batch, class_label, steps, int(seed),
                                callback=step_reporter(progress, steps, "bridge step"))
    before = batch[loaded.model.source_key]
    return TranslateResult(plain(to_uint8(before)[0]), plain(to_uint8(after)[0]))


def test_input(cache: ModelCache, run: str, index: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Test item ``index`` of the run as an upload: the image ((H, W) or (H, W, 3) uint8) and, for inpainting, the
    test pair's hole as an RGBA layer (painted = opaque white), else None."""
    from ..data.datamodule import ImageDataModule
    from ..data.degradations import low_resolution
    from ..utils.images import to_uint8

    _, config = cache.locate(run, "translate")
    datamodule = ImageDataModule(config.data, seed=config.seed)
    datamodule.setup("test")
    if datamodule.test_set is None:
        raise DataError(f"data.name: {config.data.name} has no test split; upload an image")
    if not 0 <= int(index) < len(datamodule.test_set):
        raise ConfigError(f"test image: must be in 0..{len(datamodule.test_set) - 1}, got {index}")
    item = datamodule.test_set[int(index)]
    degradation = config.data.degradation
    kind = None if degradation is None else degradation.kind
    if kind == "super_resolution":
        image = low_resolution(item["image"], degradation.scale)
    else:
        image = item["image"] if kind == "inpainting" else item[config.bridge.source_key]
    if kind != "inpainting":
        return plain(to_uint8(image[None])[0]), None
    hole = to_uint8(item["mask"][None] * 2 - 1)[0][..., 0]  # (H, W) 255 in the hole
    layer = np.zeros((*hole.shape, 4), np.uint8)
    layer[hole > 0] = 255
    return plain(to_uint8(image[None])[0]), layer

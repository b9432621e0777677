"""The Fashion-MNIST files that ship inside the package (the default dataset).

| split | images | content                                                      |
|-------|--------|--------------------------------------------------------------|
| train | 10,000 | 1,000 per class from the 60,000 training images, drawn with  |
|       |        | ``SUBSET_SEED`` by ``scripts/make_embedded_data.py``          |
| test  | 10,000 | the full official test split, files copied unchanged         |

Fashion-MNIST: Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST: a Novel Image
Dataset for Benchmarking Machine Learning Algorithms", Zalando Research,
MIT license. ``embedded/README.md`` lists the sha256 of each file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from diffusionforge.data.idx import read_idx

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
SUBSET_SEED = 20170825  # the Fashion-MNIST release date; fixes the 10k training subset
SUBSET_PER_CLASS = 1000  # training images kept per class
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
EMBEDDED_FILES = {
    ("train", "images"): "fashion-mnist-train10k-images-idx3-ubyte.gz",
    ("train", "labels"): "fashion-mnist-train10k-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}

Split = Literal["train", "test"]


def embedded_path(split: Split, kind: Literal["images", "labels"]) -> Path:
    """Path of one embedded file, e.g. ``embedded_path("test", "labels")``."""
    if (split, kind) not in EMBEDDED_FILES:
        raise ValueError(f"embedded data has splits train/test and kinds images/labels, got {split}/{kind}")
    return EMBEDDED_DIR / EMBEDDED_FILES[(split, kind)]


def load_embedded(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The embedded split as (images uint8 (N, 28, 28), labels uint8 (N,))."""
    images = read_idx(embedded_path(split, "images"), ndim=3)
    labels = read_idx(embedded_path(split, "labels"), ndim=1)
    return images, labels


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` items of each class, drawn without replacement.

    Classes are visited in increasing order with one ``numpy.random.default_rng(seed)``,
    so the result is fixed by (labels, per_class, seed).
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"class {label} has {len(members)} items, fewer than {per_class}")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))

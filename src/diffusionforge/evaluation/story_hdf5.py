"""Score a story run on a PororoSV / FlintstonesSV HDF5 test split: FID over all frames and per frame index.

A run with ``data.story.source=hdf5`` (ARLDM's HDF5 layout, ``data/story_hdf5.py``)
has no item labels, so the labelled story metrics of ``evaluation/story.py``
do not apply; what the AR-LDM line of work reports on these datasets is FID
against the real test frames. The first ``num`` stories of the file's
``test`` group are generated from their captions, frame by frame
(visualisation), or from their captions and real frame 0 (continuation), and
compared with the real test frames at the run's image size (the square frame
a run's datamodule reads for its test split: the middle of a video strip):

=======================  ========================================================
``fid``                  FID of all scored frames of the generated stories
                         against the same frames of the real stories
``kid_mean``, ``kid_std``  KID of the same pooled sets (subsets of up to 1000)
``fid_frame_<j>``        FID of frame j of each generated story against frame j
                         of each real story: how quality drifts along the story
=======================  ========================================================

Scored frames: all F in visualisation; frames 1..F-1 in continuation, where
frame 0 is the given real frame (ARLDM scores only the frames it generated).

Comparing with ARLDM: its ``main.py`` (``sample`` with ``calculate_fid``) reports
one FID over all generated test frames, on Inception-v3 pool3 features of
frames first resized to 64 x 64; ``fid`` here is that quantity (per frame index
it is our addition). The default feature network is ImageNet EfficientNet-Lite0,
the project's RGB default; ``--features inception`` uses Inception-v3, but the
frames are scored at the run's image size, so the numbers are near, not equal,
to ARLDM's table. No real-vs-real ceiling is computed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..data.stories import collate_stories
from ..errors import ConfigError
from ..metrics.distribution import DistributionMetrics
from ..metrics.features import CLASSIFIER_FEATURES, FEATURE_NAMES, FeatureNetwork, load_feature_network
from .protocol import git_commit
from .story import StoryGeneration

DEFAULT_FEATURES = "efficientnet"  # RGB frames: ImageNet features, as for image folders (evaluate.py)


@dataclass
class StoryFIDProtocol(StoryGeneration):
    scored_frames: list[int]   # frame indices scored: all, or 1..F-1 in continuation (frame 0 given)
    features: str              # feature network of FID / KID
    features_sha256: str
    image_size: int            # side of the generated and real frames scored
    reference_split: str       # the HDF5 file's test group (a video strip's middle frame)
    reference_size: int        # real frames in the pooled reference set
    package_version: str = __version__
    git_commit: str = ""


def choose_rgb_features(features: Optional[str]) -> str:
    """The feature network of RGB story frames: ``features`` if given, else EfficientNet-Lite0."""
    name = features or DEFAULT_FEATURES
    rgb = [n for n in FEATURE_NAMES if n not in CLASSIFIER_FEATURES]
    if name not in rgb:
        raise ConfigError(f"--features: PororoSV / FlintstonesSV frames are RGB; choose one of "
                          f"{', '.join(rgb)}, got {name}")
    return name


def hdf5_test_stories(config, num: int):
    """The HDF5 file's test split as the run's datamodule reads it; one-line errors without it or when
    ``num`` exceeds it."""
    from ..data.datamodule import ImageDataModule

    stories = ImageDataModule(config.data).stories("test")  # DataError naming the file without a test group
    if num > len(stories):
        raise ConfigError(f"--num {num}: {config.data.story.root} has {len(stories)} test stories; "
                          f"give --num {len(stories)} or fewer")
    return stories


class LastBatchFeatures(nn.Module):
    """A feature network that returns its last output again when given the same pixels again: each frame
    goes into its frame index's FID and into the pooled FID / KID, and is run through the network once."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self._last: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (input, output)
        if hasattr(network, "features"):  # FeatureAdapter calls ``features`` on [-1, 1] where it exists
            self.features = lambda images: self._run(network.features, images)

    def _run(self, function, images: torch.Tensor) -> torch.Tensor:
        if self._last is None or not torch.equal(self._last[0], images):
            self._last = (images, function(images))
        return self._last[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(self.network, images)


class FrameFID:
    """FID / KID accumulators: one per scored frame index and one over all scored frames."""

    def __init__(self, network: FeatureNetwork, image_shape: tuple[int, int, int], scored: list[int]):
        network = replace(network, network=LastBatchFeatures(network.network))
        self.scored = scored
        self.per_frame = {j: network.metrics(image_shape) for j in scored}
        self.pooled: DistributionMetrics = network.metrics(image_shape)

    def update(self, stories: torch.Tensor, real: bool) -> None:
        """stories: (B, F, C, H, W) in [-1, 1]."""
        for j in self.scored:  # the same batch twice in a row: LastBatchFeatures runs the network once
            self.per_frame[j].update(stories[:, j], real=real)
            self.pooled.update(stories[:, j], real=real)

    def compute(self, seed: int) -> dict[str, float]:
        pooled = self.pooled.compute(seed)
        scores = {"fid": pooled.fid, "kid_mean": pooled.kid_mean, "kid_std": pooled.kid_std}
        # FID alone per frame: KID's 100 subsets per frame cost seconds each on a CPU (story_metrics.crop_fid)
        scores.update({f"fid_frame_{j}": float(self.per_frame[j].fid.compute()) for j in self.scored})
        return scores


def evaluate_hdf5_story_run(model, config, num: int, request, seed: int = 0, features: Optional[str] = None,
                            batch_size: int = 125) -> dict:
    """metrics.json of a ``data.story.source=hdf5`` run: ``{"metrics", "timing", "protocol"}``."""
    story = config.data.story
    stories = hdf5_test_stories(config, num)
    network = load_feature_network(choose_rgb_features(features))
    scored = list(range(1 if model.story_mode == "continuation" else 0, story.frames))
    size = config.data.image_size
    scores = FrameFID(network, (3, size, size), scored)
    generator = torch.Generator(model.device).manual_seed(seed)
    seconds = 0.0
    try:
        for begin in tqdm(range(0, num, batch_size), desc="stories"):
            batch = collate_stories([stories[i] for i in range(begin, min(begin + batch_size, num))])
            real = batch["frames"]  # (B, F, 3, H, W)
            first = real[:, 0] if model.story_mode == "continuation" else None
            start = time.perf_counter()
            generated = model.generate(batch["captions"], request, first_frames=first,
                                       generator=generator).float().cpu()
            seconds += time.perf_counter() - start
            scores.update(real, real=True)
            scores.update(generated, real=False)
    finally:
        stories.close()
    protocol = StoryFIDProtocol(
        **StoryGeneration.of(model, config, num, request, seed), scored_frames=scored, features=network.name,
        features_sha256=network.sha256, image_size=size,
        reference_split=f"{story.root}:test (a strip's middle frame)", reference_size=num * len(scored),
        git_commit=git_commit())
    timing = {"sampling_seconds": round(seconds, 2), "seconds_per_story": round(seconds / num, 4)}
    return {"metrics": scores.compute(seed), "timing": timing, "protocol": asdict(protocol)}

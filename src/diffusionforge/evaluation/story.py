"""Score a story (AR-LDM) run on its test stories: FID per frame, caption accuracy, consistency.

The first ``num`` test stories (``data.story``: instances of the source's
test split, never seen in training) are generated from their captions, frame
by frame (visualisation), or from their captions and real frame 0
(continuation), and scored by ``story_metrics.score_stories``:

================================  ===============================================
``fid``, ``fid_frame_<j>``        FID of the generated item crops against the real
                                  ones, over all frames and per frame index
``caption_accuracy[_named|_omitted]``  the classifier labels the crop with the story's
                                  class; split by whether the frame's caption names
                                  the class (``_omitted``: it says "it", so only the
                                  history tells the class)
``position_accuracy``             the item is where the caption says (frames whose
                                  caption names a place)
``size_accuracy``                 the item has the story's size at that frame
``consistency_*``                 cosine similarity of frames j >= 1 to frame 0 of
                                  the same story, of another story, and of another
                                  story of the same class (``instance_gap``)
================================  ===============================================

The same scores of the *real* test stories (``real``) are the ceiling a
reader compares with: the crop locator, classifier and feature similarity are
imperfect instruments, and their value on real frames says how imperfect.

PororoSV / FlintstonesSV runs (``data.story.source=hdf5``) have no labels to
score against: ``story_hdf5.py`` scores them by FID on whole frames.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Subset

from ..data.stories import StoryDataset, collate_stories
from ..metrics.features import load_feature_network
from .protocol import git_commit
from .story_metrics import score_stories


CROP_MODE = "nearest"  # item crops enlarged to 28x28 by nearest neighbour: the classifier recognises
# 0.79 of real test crops this way, 0.65 with bilinear (small items lose most)


@dataclass
class StoryGeneration:
    """How the scored test stories were generated: the protocol fields every story evaluation records."""

    num_stories: int           # test stories generated and scored
    frames: int                # frames per story
    mode: str                  # visualisation | continuation (frame 0 real)
    history: bool              # the model attends to earlier (caption, frame) pairs
    sampler: str               # a samplers.names.SAMPLER_NAMES name
    steps: int
    eta: float
    spacing: str
    schedule: str              # sigma schedule of the sigma samplers: discrete | karras | exponential
    guidance: float
    seed: int
    weights: str               # ema | raw
    precision: str

    @classmethod
    def of(cls, model, config, num_stories: int, request, seed: int) -> dict:
        """The fields of a story run's evaluation, as keyword arguments of a protocol."""
        return asdict(cls(
            num_stories=num_stories, frames=config.data.story.frames, mode=model.story_mode,
            history=config.model.conditioning.story.history, sampler=request.sampler, steps=request.steps,
            eta=request.eta, spacing=request.spacing, schedule=request.schedule, guidance=request.guidance,
            seed=seed, weights="ema" if request.use_ema else "raw", precision=request.precision))


@dataclass
class StoryProtocol(StoryGeneration):
    classifier: str            # classifier of caption accuracy / consistency features / FID
    classifier_sha256: str
    crop_mode: str             # how item crops are enlarged to the classifier's 28x28
    reference_split: str       # e.g. fashion-mnist-embedded/test stories
    seconds_per_story: float   # wall time of generation per story
    git_commit: str = ""


def story_classifier_name(source: str) -> str:
    """The shipped classifier of a story source."""
    return "mnist" if source == "mnist" else "fashion-mnist"


def evaluate_story_run(model, config, num: int, request, seed: int = 0, batch_size: int = 125) -> dict:
    """metrics.json of a story run: ``{"metrics": {"model": ..., "real": ...}, "protocol": ...}``."""
    story = config.data.story
    stories = StoryDataset(story, "test")
    subset = Subset(stories, range(min(num, len(stories))))
    name = story_classifier_name(story.source)
    network = load_feature_network(name)
    classifier = network.network  # the FID feature network is the same shipped classifier
    generator = torch.Generator(model.device).manual_seed(seed)
    generated, real, reference = [], [], []
    start = time.perf_counter()
    for begin in range(0, len(subset), batch_size):
        batch = collate_stories([subset[i] for i in range(begin, min(begin + batch_size, len(subset)))])
        first = batch["frames"][:, 0] if model.story_mode == "continuation" else None
        generated.append(model.generate(batch["captions"], request, first_frames=first,
                                        generator=generator).float().cpu())
        real.append(batch["frames"])
        reference.append({k: batch[k] for k in ("class_label", "position", "size", "event", "names_identity")})
    seconds = time.perf_counter() - start
    generated, real = torch.cat(generated), torch.cat(real)
    truth = {k: torch.cat([r[k] for r in reference]) for k in reference[0]}
    truth["real_frames"] = real
    metrics = {
        "model": score_stories(generated, truth, story, classifier, network, crop_mode=CROP_MODE),
        "real": score_stories(real, truth, story, classifier, None, crop_mode=CROP_MODE),
    }
    protocol = StoryProtocol(
        **StoryGeneration.of(model, config, len(subset), request, seed),
        classifier=network.name, classifier_sha256=network.sha256,
        crop_mode=CROP_MODE,
        reference_split=f"{story.source}/test stories (data.story.seed={story.seed})",
        seconds_per_story=round(seconds / max(len(subset), 1), 4), git_commit=git_commit())
    return {"metrics": metrics, "protocol": asdict(protocol)}

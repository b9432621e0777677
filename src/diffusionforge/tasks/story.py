"""task=story: AR-LDM, autoregressive story generation frame by frame, used by `dforge story`.

`dforge train fashion-arldm` builds a ``StoryModel`` (latent diffusion whose
only conditioner is the story conditioner: each frame's caption and the
(caption, frame) history before it) on ``data.story`` stories. `dforge story`
generates a story from captions (and a first frame for continuation runs);
`dforge evaluate` scores the generated test stories beside the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..config.schema import ExperimentConfig
from ..errors import ConfigError, DataError
from ..models.generative import SampleRequest
from ..models.story import StoryModel
from ..processes.gaussian import GaussianDiffusion
from ..utils.images import load_image
from .base import EvalOptions
from .network import NetworkTask
from .diffusion import one_step_count, sample_request
from .parts import check_num_classes, model_parts


def build_story_model(config: ExperimentConfig, num_classes: Optional[int] = None,
                      sample_dir: Optional[Path] = None, autoencoder=None) -> StoryModel:
    """The StoryModel (AR-LDM) of a task=story config: data.story with the story conditioner."""
    check_num_classes(config, num_classes)
    if config.data.story is None:
        raise ConfigError("data.story: task=story trains on stories; set data.story (e.g. data.story.frames=4)")
    if config.model.conditioning.story is None:
        raise ConfigError("model.conditioning.story: task=story needs the story conditioner "
                          "(e.g. model.conditioning.story.dim=128)")
    if config.model.objective != "ddpm":
        raise ConfigError(f"model.objective={config.model.objective}: story runs train the DDPM process "
                          "(AR-LDM); set model.objective=ddpm")
    others = [name for name in ("class_label", "text", "concat", "latents_concat")
              if getattr(config.model.conditioning, name) is not None]
    if others:
        raise ConfigError(f"model.conditioning.{others[0]}: task=story is conditioned by "
                          "model.conditioning.story only")
    learned = config.model.process.variance_type == "learned_range"
    return StoryModel(process=GaussianDiffusion(config.model.process), story_mode=config.story.mode,
                      frames=config.data.story.frames,
                      **model_parts(config, autoencoder, sample_dir, learned_variance=learned))


def story_inputs(config: ExperimentConfig, captions: Sequence[str],
                 first_frame: Optional[str] = None) -> tuple[list[str], Optional[torch.Tensor]]:
    """The checked captions and the first frame (1, C, H, W) of `dforge story`, before any model is built."""
    frames = config.data.story.frames
    captions = [c.strip() for c in captions]
    if len(captions) > frames:
        raise ConfigError(f"--captions: {len(captions)} captions, but this run tells stories of at most "
                          f"{frames} frames")
    if any(not c for c in captions):
        raise ConfigError("--captions: a caption is empty")
    first = None
    if first_frame is not None:
        size = config.data.image_size
        first = load_image(first_frame, config.data.channels)
        if tuple(first.shape[-2:]) != (size, size):
            raise DataError(f"{first_frame}: is {first.shape[-1]}x{first.shape[-2]}; this run's frames "
                            f"are {size}x{size}")
    elif config.story.mode == "continuation":
        raise ConfigError("--first-frame: this run continues stories (story.mode=continuation); give frame 0")
    if first is not None and len(captions) < 2:
        raise ConfigError("--captions: with --first-frame give its caption and at least one more")
    return captions, first


def generate_stories(model: StoryModel, captions: list[str], request: SampleRequest, num: int = 1,
                     first: Optional[torch.Tensor] = None, seed: int = 0, batch_size: int = 16,
                     on_frame: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """``num`` stories (num, n, C, H, W) in [-1, 1] from the same captions, from one seeded generator
    (``on_frame``: ``StoryModel.generate``'s, called for each batch of stories)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        given = None if first is None else first.expand(n, -1, -1, -1)
        rows.append(model.generate([captions] * n, request, first_frames=given, generator=generator,
                                   on_frame=on_frame))
    return torch.cat(rows)


class StoryTask(NetworkTask):
    """Stories of frames generated one after another, each from its caption and the story so far."""

    name = "story"
    commands = frozenset({"story"})
    usage = "`dforge story RUN_DIR --captions ...`"

    def build_model(self, config: ExperimentConfig, num_classes: Optional[int] = None,
                    sample_dir: Optional[Path] = None, autoencoder=None):
        return build_story_model(config, num_classes, sample_dir, autoencoder)

    def evaluate(self, run_dir: Path, config: ExperimentConfig, options: EvalOptions) -> dict:
        """FID per frame, caption / position / size accuracy and identity consistency of the test stories;
        for PororoSV / FlintstonesSV HDF5 runs, FID over all frames and per frame index on the file's test split."""
        from ..evaluation.story import evaluate_story_run, story_classifier_name
        from ..evaluation.story_hdf5 import choose_rgb_features, evaluate_hdf5_story_run, hdf5_test_stories

        steps = one_step_count(options.steps, 50, "story")
        hdf5 = config.data.story.source == "hdf5"
        if hdf5:
            choose_rgb_features(options.features)  # bad input fails before the model is loaded
            hdf5_test_stories(config, options.num)
        else:
            name = story_classifier_name(config.data.story.source)
            if options.features is not None and options.features != name:
                raise ConfigError(f"--features: story runs are scored on the {name} classifier (crops of the "
                                  f"{config.data.story.source} items), got {options.features}")
        request = sample_request(config, options.sampler, steps, options.eta, options.guidance,
                                 options.use_ema, options.precision, schedule=options.schedule)
        model = self.load(run_dir, config, options.use_ema)
        if hdf5:
            return evaluate_hdf5_story_run(model, config, options.num, request, seed=options.seed,
                                           features=options.features, batch_size=options.batch_size)
        return evaluate_story_run(model, config, options.num, request, seed=options.seed,
                                  batch_size=options.batch_size)

"""StoryModel: AR-LDM story visualisation and continuation (task=story).

The ``GenerativeModel`` machinery (first stage, conditioner, backbone,
process, EMA, Lightning, checkpoints) on batches of stories; the
``StoryConditioner`` (``conditioning/story.py``) supplies the cross-attention
sequence and its causal mask. Training (Pan et al. 2024; ARLDM ``forward``),
for a batch of B stories of F frames ``x_{b,j}`` and captions ``y_{b,j}``:

    targets  = 0 .. F-1 (visualisation) or 1 .. F-1 (continuation: frame 0 is given)
    z0_{b,j} = E(x_{b,j})                          for every target j
    c_{b,j}  = C(y_{b,j}, {(y_{b,k}, x_{b,k}) : k < j})   ground-truth history (teacher forcing)
    loss     = the process's loss on (z0_{b,j}, c_{b,j}) over all B * |targets| frames

Sampling (``generate``) is autoregressive: frame j is sampled by any sampler
with classifier-free guidance, decoded, and put into the story, so the
history of frame j + 1 encodes the generated frame, not a real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import Tensor

from ..data.stories import collate_stories
from .generative import GenerativeModel, SampleRequest

StoryTask = Literal["visualisation", "continuation"]
GRID_STORIES = 8  # validation stories in the sample grids (rows: real, generated)


class StoryModel(GenerativeModel):
    """AR-LDM: a latent Gaussian diffusion model whose conditioner is a story conditioner.

    It is a ``GenerativeModel`` (not a sibling on ``NetworkModule``) because
    each frame is one Gaussian sample: ``generate`` calls ``sample`` with the
    story so far, with the run's sampler, guidance and guided channels
    (``grid_request``), and the loss is the diffusion loss over the frames.
    Its grids show dataset stories (``grid_source``), not classes.
    """

    def __init__(self, *args, story_mode: StoryTask = "visualisation", frames: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if story_mode not in ("visualisation", "continuation"):
            raise ValueError(f"story.mode must be visualisation or continuation, got {story_mode!r}")
        if story_mode == "continuation" and frames < 2:
            raise ValueError("story.mode=continuation needs stories of at least 2 frames")
        self.story_mode = story_mode
        self.frames = frames

    @property
    def first_target(self) -> int:
        """The first generated frame: 0, or 1 when frame 0 is given (continuation)."""
        return 1 if self.story_mode == "continuation" else 0

    # ----------------------------------------------------------------- training
    def diffusion_loss(self, batch: dict):
        """The process loss over every target frame of every story in ``batch``."""
        frames = batch["frames"]  # (B, F, C, H, W)
        if frames.dim() != 5 or frames.shape[1] != self.frames:
            raise ValueError(f"batch['frames'] must be (B, {self.frames}, C, H, W), got {tuple(frames.shape)}")
        targets = list(range(self.first_target, self.frames))
        flat = {"image": frames[:, targets].flatten(0, 1), "captions": batch["captions"],
                "frames": frames, "targets": targets}
        return super().diffusion_loss(flat)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.diffusion_loss(batch)
        stories = len(batch["captions"])
        self.log("train/loss", losses.loss, prog_bar=True, batch_size=stories)
        self.log("train/loss_simple", losses.loss_simple.mean(), batch_size=stories)
        return losses.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.diffusion_loss(batch).loss, sync_dist=True, batch_size=len(batch["captions"]))

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, captions: Sequence[Sequence[str]], request: SampleRequest,
                 first_frames: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None,
                 on_frame: Optional[Callable[[Tensor], None]] = None) -> Tensor:
        """Stories ``(B, n, C, H, W)`` in [-1, 1] for B lists of n <= F captions, frame by frame.

        A story shorter than the F frames trained on is padded with empty
        captions that are never seen (frame j attends to captions <= j only).
        ``first_frames`` ``(B, C, H, W)``: frame 0 is given and frames 1..n-1
        are generated (continuation; required by continuation models).
        ``on_frame(frames)`` after each generated frame j: the stories so far ``(B, j + 1, C, H, W)``
        (`dforge serve` shows the strip growing).
        """
        captions = [list(story) for story in captions]
        length = len(captions[0]) if captions else 0
        if not captions or not 1 <= length <= self.frames or any(len(story) != length for story in captions):
            raise ValueError(f"captions must be B lists of the same number (1..{self.frames}) of captions")
        if first_frames is None and self.story_mode == "continuation":
            raise ValueError("a continuation model needs the first frame of each story")
        count = len(captions)
        padded = [story + [""] * (self.frames - length) for story in captions]
        shape = self.image_shape
        frames = torch.zeros((count, self.frames, *shape), device=self.device)
        start = 0
        if first_frames is not None:
            if tuple(first_frames.shape) != (count, *shape):
                raise ValueError(f"first frames must have shape {(count, *shape)}, got {tuple(first_frames.shape)}")
            frames[:, 0] = first_frames.to(self.device)
            start = 1
        for j in range(start, length):
            batch = {"captions": padded, "frames": frames, "targets": [j]}
            frames[:, j] = self.sample(batch, count, request, generator=generator)
            if on_frame is not None:
                on_frame(frames[:, :j + 1])
        return frames[:, :length]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a frame: the first stage's decoding of the diffusion shape."""
        probe = torch.zeros((1, *self.latent_shape), device=self.device)
        return tuple(self.first_stage.decode(probe).shape[1:])

    def estimate_grid_seconds(self) -> None:
        """Not estimated before fit (its grid generates dataset stories); the budget reserves a share instead."""
        return None

    def grid_batch(self) -> dict:
        """The first GRID_STORIES stories of ``grid_source`` (the validation stories)."""
        return collate_stories(self.grid_items(GRID_STORIES))

    def write_sample_grid(self, path: Path, seed: int = 0, batch: Optional[dict] = None) -> Path:
        """Rows: a real story, then the story generated from its captions (and first frame if continuation)."""
        batch = self.grid_batch() if batch is None else batch
        request = self.grid_request()
        real = batch["frames"].to(self.device)
        first = real[:, 0] if self.story_mode == "continuation" else None
        generator = torch.Generator(self.device).manual_seed(seed)
        fake = self.generate(batch["captions"], request, first_frames=first, generator=generator)
        rows = torch.stack([real, fake], dim=1).flatten(0, 2)  # (B * 2 * F, C, H, W)
        return self.save_sample_grid(rows, path, self.frames)

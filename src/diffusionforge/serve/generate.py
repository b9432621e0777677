"""The Generate tab: a grid from a Gaussian run, as `dforge sample` draws it.

The request goes through the CLI's own library calls (``tasks.diffusion``:
``sample_request``, ``resolve_class``, ``sample_images``), so the page's grid
is the grid of the command it shows, pixel for pixel. The sampler reports
each step through ``SampleRequest.callback``, which moves the page's progress
bar.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from ..errors import ConfigError
from .files import PARAMETERS_KEY, scratch_file, write_png
from .models import ModelCache

Progress = Callable[..., None]  # gr.Progress: progress((done, total), desc=...)
MAX_IMAGES = 64                 # images per request on the page


@dataclass
class GenerateSettings:
    """The Generate tab's controls ("" / None: the run's default, as the CLI's omitted options)."""

    run: str                        # run name under RUNS_DIR
    class_name: str = ""            # a class name or label; "" = the classes in turn
    prompt: str = ""                # text-conditioned runs
    negative_prompt: str = ""
    sampler: str = ""
    schedule: str = ""
    steps: int = 50
    guidance: Optional[float] = None
    seed: int = 0
    num: int = 8

    def check(self) -> None:
        if not 1 <= int(self.num) <= MAX_IMAGES:
            raise ConfigError(f"images: must be in 1..{MAX_IMAGES}, got {self.num}")
        if int(self.steps) < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        if self.negative_prompt.strip() and not self.prompt.strip():
            raise ConfigError("negative prompt: give a prompt as well")


def sample_command(run_dir: Path, settings: GenerateSettings, sampler: str, schedule: str,
                   guidance: float) -> str:
    """The `dforge sample` command line that writes the same grid."""
    argv = ["dforge", "sample", str(run_dir), "--num", str(settings.num), "--sampler", sampler,
            "--schedule", schedule, "--steps", str(settings.steps), "--guidance", f"{guidance:g}",
            "--seed", str(settings.seed)]
    if settings.class_name.strip():
        argv += ["--class", settings.class_name.strip()]
    if settings.prompt.strip():
        argv += ["--prompt", settings.prompt.strip()]
    if settings.negative_prompt.strip():
        argv += ["--negative-prompt", settings.negative_prompt.strip()]
    return shlex.join(argv + ["--out", "samples.png"])


def step_reporter(progress: Optional[Progress], total: int, desc: str, offset: int = 0) -> Optional[Callable]:
    """A sampler callback(i, level, x, pred_x0) that reports step ``offset + i + 1`` of ``total``."""
    if progress is None:
        return None
    return lambda i, *_: progress((offset + i + 1, total), desc=desc)


def generate_grid(cache: ModelCache, settings: GenerateSettings, out_dir: Path,
                  progress: Optional[Progress] = None) -> tuple[Path, str]:
    """The grid PNG (settings in its text chunks) and the equivalent `dforge sample` command."""
    from ..tasks.diffusion import resolve_class, sample_images, sample_request
    from ..utils.images import make_grid

    settings.check()
    run_dir, config = cache.locate(settings.run, "sample")
    request = sample_request(config, settings.sampler or None, int(settings.steps), guidance=settings.guidance,
                             schedule=settings.schedule or None)
    class_label = resolve_class(config, settings.class_name.strip() or None, run_dir)
    loaded = cache.get(settings.run, "sample")
    request.callback = step_reporter(progress, request.steps, f"{request.sampler} step")
    with loaded.lock:
        images, nrow = sample_images(loaded.model, int(settings.num), request, class_label, int(settings.seed),
                                     batch_size=int(settings.num), progress=False,
                                     prompt=settings.prompt.strip() or None,
                                     negative_prompt=settings.negative_prompt.strip() or None)
    command = sample_command(run_dir, settings, request.sampler, request.schedule, request.guidance)
    text = {PARAMETERS_KEY: command, "run": run_dir, "sampler": request.sampler, "schedule": request.schedule,
            "steps": request.steps, "guidance": f"{request.guidance:g}", "seed": settings.seed,
            "num": settings.num, "class": settings.class_name.strip(), "prompt": settings.prompt.strip(),
            "negative_prompt": settings.negative_prompt.strip()}
    path = write_png(make_grid(images, nrow), scratch_file(out_dir, f"{Path(settings.run).name}-seed{settings.seed}"),
                     text)
    return path, command


class RunControls(NamedTuple):
    """What the Generate tab offers for a run: its class names (or labels), whether it takes a prompt, and
    its ``sample`` section's steps and guidance as the starting values."""

    classes: list[str]
    takes_prompt: bool
    steps: int
    guidance: float


def run_controls(cache: ModelCache, run: str) -> RunControls:
    from ..tasks.diffusion import class_names
    from ..tasks.parts import label_conditioning

    run_dir, config = cache.locate(run, "sample")
    labels = label_conditioning(config)
    count = None if labels is None else labels.num_classes
    names = class_names(config, run_dir) if count else None
    classes = list(names) if names and len(names) == count else [str(k) for k in range(count or 0)]
    return RunControls(classes, config.model.conditioning.text is not None, config.sample.steps,
                       config.sample.guidance)

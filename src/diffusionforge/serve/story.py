"""The Story tab: a story run's strip, shown growing frame by frame, as `dforge story` makes it.

The captions (one per line) and the optional first frame go through the
CLI's library calls (``tasks.story``: ``story_inputs``, ``generate_stories``);
``StoryModel.generate`` hands over the stories so far after each frame
(``on_frame``), and ``story_strips`` yields them as the page's partial
results. Generation runs in a worker thread holding the model's lock; the
generator only forwards what it emits (and its error, if any).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ..errors import ConfigError
from .files import plain, run_image_file
from .generate import Progress
from .models import ModelCache

MAX_STORIES = 4  # rows (stories from the same captions) per request
_DONE = object()


def stream(work: Callable[[Callable[[object], None]], None]) -> Iterator:
    """Run ``work(emit)`` in a thread and yield what it emits, as it emits it; its exception is re-raised."""
    items: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            work(items.put)
            items.put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            items.put(err)

    threading.Thread(target=run, daemon=True, name="dforge-serve-story").start()
    while (item := items.get()) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        yield item


def caption_lines(text: str) -> list[str]:
    """One caption per line; blank lines at the ends dropped (a blank line between two is an empty caption)."""
    lines = (text or "").strip("\n").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ConfigError("captions: give one caption per line")
    return lines


def story_strips(cache: ModelCache, run: str, captions_text: str, first_frame, steps: int,
                 guidance: Optional[float], seed: int, num: int, scratch: Path,
                 progress: Optional[Progress] = None) -> Iterator[np.ndarray]:
    """The strips (one row per story) after each generated frame, the last one complete."""
    from ..tasks.diffusion import sample_request
    from ..tasks.story import generate_stories, story_inputs
    from ..utils.images import make_grid

    run_dir, config = cache.locate(run, "story")
    if not 1 <= int(num) <= MAX_STORIES:
        raise ConfigError(f"stories: must be in 1..{MAX_STORIES}, got {num}")
    first_file = run_image_file(first_frame, config.data.channels, scratch, "first-frame")
    captions, first = story_inputs(config, caption_lines(captions_text), first_file and str(first_file))
    request = sample_request(config, None, int(steps), guidance=guidance)
    loaded = cache.get(run, "story")
    generated = len(captions) - (first is not None)
    done = [0]  # frames finished: the offset of the progress bar's steps

    def report(i, *_):
        if progress is not None:
            progress((done[0] * request.steps + i + 1, generated * request.steps),
                     desc=f"frame {done[0] + 1} of {generated}")

    def work(emit) -> None:
        def on_frame(frames) -> None:  # (num, j + 1, C, H, W)
            done[0] += 1
            emit(plain(make_grid(frames.flatten(0, 1), nrow=frames.shape[1])))
        request.callback = report
        with loaded.lock:
            generate_stories(loaded.model, captions, request, int(num), first, int(seed), batch_size=int(num),
                             on_frame=on_frame)

    yield from stream(work)


"""The page: a Gradio ``Blocks`` app with the Runs, Generate, Translate and Story tabs.

Why Gradio: it is the local demo library of the field (most model
repositories and Stable Diffusion front-ends ship a Gradio page), and it
gives, without code of ours, an HTTP API for every event (driven by
``gradio_client`` in the tests), a request queue with a concurrency limit,
per-step progress bars fed from a callback (``gr.Progress``) and generator
events whose partial results stream to the page (the story strip).

This module only lays out components and wires them to the serve modules,
which call the same library functions as the CLI. A ``DForgeError`` (or a
``ValueError`` of the library's argument checks) becomes a ``gr.Error``: its
one-line message shows on the page and the server keeps serving.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from pathlib import Path
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local page
import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from ..errors import DForgeError, one_line  # noqa: E402
from ..samplers.names import SAMPLER_NAMES, SCHEDULE_NAMES  # noqa: E402
from . import catalog  # noqa: E402
from .generate import MAX_IMAGES, GenerateSettings, generate_grid, run_controls  # noqa: E402
from .models import ModelCache  # noqa: E402
from .story import MAX_STORIES, story_strips  # noqa: E402
from .translate import test_input, translate  # noqa: E402

CONCURRENCY = 4  # events the queue runs at once; requests to one run still take turns (models.LoadedRun.lock)
# Results fill their box's width (a 28-pixel image is a thumbnail otherwise), and stay sharp when enlarged.
CSS = ("img { image-rendering: pixelated; } .scaled .image-frame { width: 100%; } "
       ".scaled img { width: 100%; height: auto; max-height: 70vh; object-fit: contain; }")
DEFAULT = ("the run's default", "")      # dropdown entry: leave the option to the run's sample section
TAB_COMMANDS = ("sample", "translate", "story")  # the run list of each generation tab


INPUT_ERRORS = (DForgeError, ValueError)  # bad input: a message on the page; anything else is a bug


def page_error(err: Exception) -> gr.Error:
    return gr.Error(one_line(err) if isinstance(err, DForgeError) else str(err))


def on_page(fn):
    """``fn`` with its one-line input errors shown on the page (gr.Error) instead of a traceback."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except INPUT_ERRORS as err:
                raise page_error(err) from None
        return streamed

    @functools.wraps(fn)
    def called(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except INPUT_ERRORS as err:
            raise page_error(err) from None
    return called


def read_image(path: Path) -> Image.Image:
    """A PNG of the run, read now (the page gets a copy, not a path into RUNS_DIR)."""
    with Image.open(path) as image:
        image.load()
        return image.copy()


def optional_number(value) -> Optional[float]:
    return None if value is None or value == "" else value


class Page:
    """The handlers of the page's events over one RUNS_DIR (plain functions of the components' values)."""

    def __init__(self, runs_dir: str | Path, scratch: Optional[str | Path] = None):
        self.cache = ModelCache(runs_dir)
        # uploads and results, removed when the server's process ends (the page has its own copies)
        self._scratch = None if scratch else tempfile.TemporaryDirectory(prefix="dforge-serve-")
        self.scratch = Path(scratch or self._scratch.name)

    def run_names(self) -> tuple[list[list], list[list[str]]]:
        """The Runs table's rows and the run lists of Runs, Generate, Translate and Story."""
        entries = catalog.find_runs(self.cache.runs_dir)
        lists = [[e.name for e in entries]] + [[e.name for e in entries if command in e.commands]
                                                for command in TAB_COMMANDS]
        return [e.row() for e in entries], lists

    def runs(self):
        """``run_names`` as updates of the table and the four run lists (the first run chosen)."""
        rows, lists = self.run_names()
        return [rows, *(gr.update(choices=names, value=names[0] if names else None) for names in lists)]

    def details(self, run: Optional[str]):
        """Loss curve, train_summary.json + metrics.json, and the sample grids over training of one run."""
        if not run:
            return None, None, []
        run_dir = self.cache.run_path(run)
        entry = catalog.read_entry(self.cache.runs_dir, run_dir)
        info = {"train_summary.json": entry.summary, "metrics.json": entry.metrics, "error": entry.error}
        grids = [(read_image(path), caption) for path, caption in catalog.step_grids(run_dir)]
        return catalog.loss_curve(run_dir), info, grids

    def first_defaults(self, names: list[str], command: str) -> tuple[int, float]:
        """(steps, guidance) the page starts with: the first run's (bridge.steps for translate), so that a
        click before the page has asked for them uses the run's own."""
        try:
            config = self.cache.locate(names[0], command)[1] if names else None
        except DForgeError:
            config = None
        if config is None:
            return 50, 1.0
        steps = config.bridge.steps if command == "translate" else config.sample.steps
        return steps, config.sample.guidance

    def controls(self, run: Optional[str]):
        """Generate: the run's classes, prompt boxes, steps and guidance."""
        if not run:
            return [gr.update()] * 5
        found = run_controls(self.cache, run)
        classes = [("classes in turn", "")] + [(name, name) for name in found.classes]
        return gr.update(choices=classes, value=""), gr.update(interactive=found.takes_prompt), \
            gr.update(interactive=found.takes_prompt), found.steps, found.guidance

    def translate_controls(self, run: Optional[str]):
        """Translate: the run's bridge steps."""
        return self.cache.locate(run, "translate")[1].bridge.steps if run else gr.update()

    def story_controls(self, run: Optional[str]):
        """Story: the run's steps and guidance."""
        if not run:
            return gr.update(), gr.update()
        sample = self.cache.locate(run, "story")[1].sample
        return sample.steps, sample.guidance

    def generate(self, run, class_name, prompt, negative_prompt, sampler, schedule, steps, guidance, seed, num,
                 progress=gr.Progress()):
        settings = GenerateSettings(run, class_name or "", prompt or "", negative_prompt or "", sampler or "",
                                    schedule or "", int(steps), optional_number(guidance), int(seed or 0), int(num))
        path, command = generate_grid(self.cache, settings, self.scratch / "generated", progress)
        return str(path), str(path), command

    def test_image(self, run, index):
        image, hole = test_input(self.cache, run, int(index))
        return {"background": image, "layers": [] if hole is None else [hole], "composite": None}

    def translate(self, run, editor, steps, seed, class_label, progress=gr.Progress()):
        label = optional_number(class_label)
        result = translate(self.cache, run, editor, optional_number(steps), int(seed or 0),
                           None if label is None else int(label), self.scratch / "inputs", progress)
        return result.before, result.after

    def story(self, run, captions, first_frame, steps, guidance, seed, num, progress=gr.Progress()):
        yield from story_strips(self.cache, run, captions, first_frame, int(steps), optional_number(guidance),
                                int(seed or 0), int(num), self.scratch / "inputs", progress)


def run_list(label: str, names: list[str]) -> gr.Dropdown:
    # a run made after the page was built is taken too (ModelCache.locate checks every name)
    return gr.Dropdown(label=label, choices=names, value=names[0] if names else None, interactive=True,
                       allow_custom_value=True)


def follow_run(app: gr.Blocks, run: gr.Dropdown, fn, outputs, api_name=False) -> None:
    """Fill ``outputs`` from the chosen run, when the page opens and whenever another run is chosen."""
    app.load(on_page(fn), run, outputs, api_name=False)
    run.change(on_page(fn), run, outputs, api_name=api_name)


def runs_tab(app: gr.Blocks, page: Page, rows: list, names: list[str]) -> tuple:
    """The Runs tab; (its refresh button, table, run list)."""
    refresh = gr.Button("Refresh the list")
    table = gr.Dataframe(rows, headers=catalog.ROW_HEADERS, interactive=False, wrap=True)
    run = run_list("run", names)
    with gr.Row():
        curve = gr.Image(label="loss curve", type="pil", format="png")
        info = gr.JSON(label="train_summary.json / metrics.json")
    grids = gr.Gallery(label="samples/ over training", columns=6, object_fit="contain")
    follow_run(app, run, page.details, [curve, info, grids], api_name="run_details")
    return refresh, table, run


def generate_tab(app: gr.Blocks, page: Page, names: list[str]) -> gr.Dropdown:
    """The Generate tab; its run list."""
    steps, guidance = page.first_defaults(names, "sample")
    with gr.Row():
        with gr.Column():
            run = run_list("Gaussian run", names)
            label = gr.Dropdown(label="class", choices=[("classes in turn", "")], value="", allow_custom_value=True)
            prompt = gr.Textbox(label="prompt (text-conditioned runs)")
            negative = gr.Textbox(label="negative prompt")
            with gr.Row():
                sampler = gr.Dropdown(label="sampler", value="",
                                      choices=[DEFAULT] + [(n, n) for n in SAMPLER_NAMES if n != "bridge_euler"])
                schedule = gr.Dropdown(label="schedule", value="", choices=[DEFAULT] + [(n, n) for n in SCHEDULE_NAMES])
            steps = gr.Slider(1, 1000, value=steps, step=1, label="steps")
            guidance = gr.Number(value=guidance, label="guidance (1: none)")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed")
                num = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images")
            go = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column():
            image = gr.Image(label="result", type="filepath", format="png", elem_id="generate-result",
                             elem_classes=["scaled"])
            download = gr.File(label="PNG (its settings in the PNG text chunks)")
            command = gr.Textbox(label="the same with the CLI", lines=2, buttons=["copy"])
    follow_run(app, run, page.controls, [label, prompt, negative, steps, guidance], api_name="run_controls")
    go.click(on_page(page.generate), [run, label, prompt, negative, sampler, schedule, steps, guidance, seed, num],
             [image, download, command], api_name="generate")
    return run


def translate_tab(app: gr.Blocks, page: Page, names: list[str]) -> gr.Dropdown:
    """The Translate tab; its run list."""
    with gr.Row():
        with gr.Column():
            run = run_list("bridge run", names)
            editor = gr.ImageEditor(label="input (inpainting runs: paint the region to fill)", type="numpy",
                                    image_mode="RGBA", format="png", brush=gr.Brush(colors=["#ff0000"], default_size=2))
            with gr.Row():
                index = gr.Number(value=0, precision=0, label="test image #")
                pick = gr.Button("Use this test image")
            with gr.Row():
                steps = gr.Number(value=page.first_defaults(names, "translate")[0], precision=0, label="steps")
                seed = gr.Number(value=0, precision=0, label="seed")
                label = gr.Number(value=None, precision=0, label="class (class-conditional runs)")
            go = gr.Button("Translate", variant="primary")
        with gr.Column(), gr.Row():
            before = gr.Image(label="before", format="png", elem_classes=["scaled"])
            after = gr.Image(label="after", format="png", elem_classes=["scaled"])
    follow_run(app, run, page.translate_controls, steps)
    pick.click(on_page(page.test_image), [run, index], editor, api_name="test_image")
    go.click(on_page(page.translate), [run, editor, steps, seed, label], [before, after], api_name="translate")
    return run


def story_tab(app: gr.Blocks, page: Page, names: list[str]) -> gr.Dropdown:
    """The Story tab; its run list."""
    steps, guidance = page.first_defaults(names, "story")
    with gr.Row():
        with gr.Column():
            run = run_list("story run", names)
            captions = gr.Textbox(label="captions, one per frame", lines=4)
            first = gr.Image(label="first frame (optional; continuation runs need it)", type="filepath")
            with gr.Row():
                steps = gr.Slider(1, 1000, value=steps, step=1, label="steps")
                guidance = gr.Number(value=guidance, label="guidance (1: none)")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed")
                num = gr.Slider(1, MAX_STORIES, value=1, step=1, label="stories")
            go = gr.Button("Tell", variant="primary")
        strip = gr.Image(label="story (frame by frame)", format="png", elem_classes=["scaled"])
    follow_run(app, run, page.story_controls, [steps, guidance])
    go.click(on_page(page.story), [run, captions, first, steps, guidance, seed, num], strip, api_name="story")
    return run


def build_app(runs_dir: str | Path, scratch: Optional[str | Path] = None) -> gr.Blocks:
    """The page over the runs under ``runs_dir`` (requests write their files under ``scratch``)."""
    page = Page(runs_dir, scratch)
    rows, lists = page.run_names()
    with gr.Blocks(title="diffusionforge", analytics_enabled=False) as app:
        gr.Markdown(f"## diffusionforge — runs under `{page.cache.runs_dir}`")
        with gr.Tab("Runs"):
            refresh, table, run = runs_tab(app, page, rows, lists[0])
        with gr.Tab("Generate"):
            g_run = generate_tab(app, page, lists[1])
        with gr.Tab("Translate"):
            t_run = translate_tab(app, page, lists[2])
        with gr.Tab("Story"):
            s_run = story_tab(app, page, lists[3])
        refresh.click(on_page(page.runs), None, [table, run, g_run, t_run, s_run], api_name="runs")
    return app.queue(default_concurrency_limit=CONCURRENCY)


def launch(runs_dir: str | Path, host: str = "127.0.0.1", port: Optional[int] = None, block: bool = True,
           quiet: bool = False):
    """Serve the page; ``block=False`` returns at once (tests), with the app (``app.close()`` stops it)."""
    app = build_app(runs_dir)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet, ssr_mode=False,
               show_error=True, css=CSS)
    return app

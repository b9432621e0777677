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
        self.scratch = Path(scratch or tempfile.mkdtemp(prefix="dforge-serve-"))

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

    def translate(self, run, editor, steps, seed, class_label):
        label = optional_number(class_label)
        result = translate(self.cache, run, editor, optional_number(steps), int(seed or 0),
                           None if label is None else int(label), self.scratch / "inputs")
        return result.before, result.after

    def story(self, run, captions, first_frame, steps, guidance, seed, num, progress=gr.Progress()):
        yield from story_strips(self.cache, run, captions, first_frame, int(steps), optional_number(guidance),
                                int(seed or 0), int(num), self.scratch / "inputs", progress)


def run_list(label: str, names: list[str]) -> gr.Dropdown:
    # a run made after the page was built is taken too (ModelCache.locate checks every name)
    return gr.Dropdown(label=label, choices=names, value=names[0] if names else None, interactive=True,
                       allow_custom_value=True)


def build_app(runs_dir: str | Path, scratch: Optional[str | Path] = None) -> gr.Blocks:
    """The page over the runs under ``runs_dir`` (requests write their files under ``scratch``)."""
    page = Page(runs_dir, scratch)
    rows, lists = page.run_names()
    steps, guidance = page.first_defaults(lists[1], "sample")
    t_default, _ = page.first_defaults(lists[2], "translate")
    s_steps_default, s_guidance_default = page.first_defaults(lists[3], "story")
    with gr.Blocks(title="diffusionforge") as app:
        gr.Markdown(f"## diffusionforge — runs under `{page.cache.runs_dir}`")
        with gr.Tab("Runs"):
            refresh = gr.Button("Refresh the list")
            table = gr.Dataframe(rows, headers=catalog.ROW_HEADERS, interactive=False, wrap=True)
            run = run_list("run", lists[0])
            with gr.Row():
                curve = gr.Image(label="loss curve", type="pil", format="png")
                info = gr.JSON(label="train_summary.json / metrics.json")
            grids = gr.Gallery(label="samples/ over training", columns=6, object_fit="contain")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    g_run = run_list("Gaussian run", lists[1])
                    g_class = gr.Dropdown(label="class", choices=[("classes in turn", "")], value="",
                                          allow_custom_value=True)
                    g_prompt = gr.Textbox(label="prompt (text-conditioned runs)")
                    g_negative = gr.Textbox(label="negative prompt")
                    with gr.Row():
                        g_sampler = gr.Dropdown(label="sampler", value="", choices=[DEFAULT] + [
                            (n, n) for n in SAMPLER_NAMES if n != "bridge_euler"])
                        g_schedule = gr.Dropdown(label="schedule", value="",
                                                 choices=[DEFAULT] + [(n, n) for n in SCHEDULE_NAMES])
                    g_steps = gr.Slider(1, 1000, value=steps, step=1, label="steps")
                    g_guidance = gr.Number(value=guidance, label="guidance (1: none)")
                    with gr.Row():
                        g_seed = gr.Number(value=0, precision=0, label="seed")
                        g_num = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images")
                    g_go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    g_image = gr.Image(label="result", type="filepath", format="png", elem_id="generate-result",
                                       elem_classes=["scaled"])
                    g_file = gr.File(label="PNG (its settings in the PNG text chunks)")
                    g_command = gr.Textbox(label="the same with the CLI", lines=2, buttons=["copy"])
        with gr.Tab("Translate"):
            with gr.Row():
                with gr.Column():
                    t_run = run_list("bridge run", lists[2])
                    t_editor = gr.ImageEditor(label="input (inpainting runs: paint the region to fill)",
                                              type="numpy", image_mode="RGBA", format="png",
                                              brush=gr.Brush(colors=["#ff0000"], default_size=2))
                    with gr.Row():
                        t_index = gr.Number(value=0, precision=0, label="test image #")
                        t_pick = gr.Button("Use this test image")
                    with gr.Row():
                        t_steps = gr.Number(value=t_default, precision=0, label="steps")
                        t_seed = gr.Number(value=0, precision=0, label="seed")
                        t_class = gr.Number(value=None, precision=0, label="class (class-conditional runs)")
                    t_go = gr.Button("Translate", variant="primary")
                with gr.Column():
                    with gr.Row():
                        t_before = gr.Image(label="before", format="png", elem_classes=["scaled"])
                        t_after = gr.Image(label="after", format="png", elem_classes=["scaled"])
        with gr.Tab("Story"):
            with gr.Row():
                with gr.Column():
                    s_run = run_list("story run", lists[3])
                    s_captions = gr.Textbox(label="captions, one per frame", lines=4)
                    s_first = gr.Image(label="first frame (optional; continuation runs need it)", type="filepath")
                    with gr.Row():
                        s_steps = gr.Slider(1, 1000, value=s_steps_default, step=1, label="steps")
                        s_guidance = gr.Number(value=s_guidance_default, label="guidance (1: none)")
                    with gr.Row():
                        s_seed = gr.Number(value=0, precision=0, label="seed")
                        s_num = gr.Slider(1, MAX_STORIES, value=1, step=1, label="stories")
                    s_go = gr.Button("Tell", variant="primary")
                s_strip = gr.Image(label="story (frame by frame)", format="png", elem_classes=["scaled"])

        listing = [table, run, g_run, t_run, s_run]
        g_controls = [g_class, g_prompt, g_negative, g_steps, g_guidance]
        refresh.click(on_page(page.runs), None, listing, api_name="runs")
        app.load(on_page(page.details), run, [curve, info, grids], api_name=False)
        app.load(on_page(page.controls), g_run, g_controls, api_name=False)
        app.load(on_page(page.translate_controls), t_run, t_steps, api_name=False)
        app.load(on_page(page.story_controls), s_run, [s_steps, s_guidance], api_name=False)
        run.change(on_page(page.details), run, [curve, info, grids], api_name="run_details")
        g_run.change(on_page(page.controls), g_run, g_controls, api_name="run_controls")
        t_run.change(on_page(page.translate_controls), t_run, t_steps, api_name=False)
        s_run.change(on_page(page.story_controls), s_run, [s_steps, s_guidance], api_name=False)
        g_go.click(on_page(page.generate), [g_run, g_class, g_prompt, g_negative, g_sampler, g_schedule, g_steps,
                                            g_guidance, g_seed, g_num], [g_image, g_file, g_command],
                   api_name="generate")
        t_pick.click(on_page(page.test_image), [t_run, t_index], t_editor, api_name="test_image")
        t_go.click(on_page(page.translate), [t_run, t_editor, t_steps, t_seed, t_class], [t_before, t_after],
                   api_name="translate")
        s_go.click(on_page(page.story), [s_run, s_captions, s_first, s_steps, s_guidance, s_seed, s_num], s_strip,
                   api_name="story")
    return app.queue(default_concurrency_limit=CONCURRENCY)


def launch(runs_dir: str | Path, host: str = "127.0.0.1", port: Optional[int] = None, block: bool = True,
           quiet: bool = False):
    """Serve the page; ``block=False`` returns at once (tests), with the app (``app.close()`` stops it)."""
    app = build_app(runs_dir)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet, ssr_mode=False,
               show_error=True, css=CSS)
    return app

"""`dforge serve` through its HTTP API (gradio_client) and a headless Chromium.

One server on a free loopback port over a folder of tiny runs (the session's
class-conditional run, a text-conditioned run, a super-resolution and an
inpainting bridge, a story run, and a run whose weights are missing). Each
tab returns images of the right size, the Generate grid is the grid of the
`dforge sample` command it shows (pixel for pixel, the settings in the PNG),
the story arrives frame by frame, bad input is a one-line error after which
the server still serves, and two requests to one model both finish.
"""

from __future__ import annotations

import shlex
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="dforge serve needs the serve extra (gradio)")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from diffusionforge.cli.main import main  # noqa: E402
from diffusionforge.utils.images import save_png, to_uint8  # noqa: E402
from test_cli import assert_one_line_error  # noqa: E402
from test_malformed_inputs import ONE_STEP_STORY, TINY_BRIDGE  # noqa: E402
from test_text_conditioner import _tiny_bert  # noqa: E402

SIZE, FRAME = 28, 16  # the diffusion and bridge runs' images; the story run's frames
CLASSES = 10          # Fashion-MNIST's: a grid of the classes in turn has a column per class
QUICK = ["trainer.max_steps=2", "data.limit_train=32", "data.val_size=8", "trainer.val_every_n_steps=1"]


def grid_side(count: int, nrow: int, size: int = SIZE) -> tuple[int, int]:
    """(width, height) of ``utils.images.make_grid``'s grid of ``count`` images, ``nrow`` a row (padding 2)."""
    rows = -(-count // nrow)
    return nrow * (size + 2) + 2, rows * (size + 2) + 2


def editor(background, layers=()) -> dict:
    """A gr.ImageEditor value as the client sends it: the image and the painted layers (files)."""
    return {"background": handle_file(str(background)), "layers": [handle_file(str(p)) for p in layers],
            "composite": None}


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def runs_dir(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    (root / "tiny").symlink_to(tiny_run, target_is_directory=True)  # the session's run, listed under its link
    bert = _tiny_bert(tmp_path_factory.mktemp("serve-bert"))
    text = ["model.conditioning.class_label=null", f"model.conditioning.text.path={bert}",
            "model.conditioning.text.max_length=8", "data.caption_template=a photo of {}"]
    assert main(["train", "tiny", *text, *QUICK, f"run_dir={root / 'text'}", "--no-progress"]) == 0
    for preset, name in (("fashion-lbm-sr", "sr"), ("fashion-lbm-inpaint", "inpaint")):
        assert main(["train", preset, *TINY_BRIDGE, f"run_dir={root / name}", "--no-progress"]) == 0
    assert main(["train", "fashion-arldm", *ONE_STEP_STORY, f"model.conditioning.story.path={bert}",
                 f"run_dir={root / 'story'}", "--no-progress"]) == 0
    (root / "unloadable").mkdir()  # a run whose training never exported its weights
    shutil.copy(tiny_run / "config.yaml", root / "unloadable" / "config.yaml")
    return root


@pytest.fixture(scope="module")
def server(runs_dir):
    from diffusionforge.serve.app import launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = launch(runs_dir, port=port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def generate(client, run="tiny", class_name="", prompt="", negative="", steps=3, seed=0, num=4, guidance=2.0):
    return client.predict(run, class_name, prompt, negative, "", "", steps, guidance, seed, num,
                          api_name="/generate")


def test_the_runs_tab_lists_every_run_with_its_curve_and_grids(client, runs_dir):
    table, *lists = client.predict(api_name="/runs")
    rows = {row[0]: row for row in table["data"]}
    assert set(rows) == {"inpaint", "sr", "story", "text", "tiny", "unloadable"}
    assert rows["tiny"][1:4] == ["diffusion", "tiny", 20] and rows["story"][1] == "story"
    assert [c[0] for c in lists[1]["choices"]] == ["text", "tiny", "unloadable"]  # the Generate tab's runs
    assert [c[0] for c in lists[2]["choices"]] == ["inpaint", "sr"]
    curve, info, grids = client.predict("tiny", api_name="/run_details")
    assert Image.open(curve).size == (800, 480) and info["train_summary.json"]["global_step"] == 20
    assert [g["caption"] for g in grids] == ["step 10", "step 20", "final"]


def test_generate_is_the_grid_of_the_command_it_shows(client, tmp_path):
    image, download, command = generate(client, class_name="Sneaker")
    assert Image.open(image).size == grid_side(4, 2)
    with Image.open(download) as png:
        assert png.text["parameters"] == command and png.text["class"] == "Sneaker"
        assert (png.text["sampler"], png.text["steps"], png.text["seed"]) == ("ddim", "3", "0")
    argv = shlex.split(command)
    assert argv[:2] == ["dforge", "sample"]
    assert main(argv[1:-1] + [str(tmp_path / "cli.png")]) == 0  # --out samples.png -> tmp_path
    np.testing.assert_array_equal(pixels(download), pixels(tmp_path / "cli.png"))
    np.testing.assert_array_equal(pixels(image), pixels(download))


def test_a_text_run_takes_a_prompt_and_a_negative_prompt(client):
    image, _, command = generate(client, "text", prompt="a red bag", negative="a photo of sneaker", num=3)
    assert Image.open(image).size == grid_side(3, 2)
    assert "--prompt 'a red bag' --negative-prompt 'a photo of sneaker'" in command
    with pytest.raises(AppError, match="negative prompt: give a prompt as well"):
        generate(client, "text", negative="a bag")


def test_the_progress_bar_moves_each_step(runs_dir, tmp_path):
    from diffusionforge.serve.generate import GenerateSettings, generate_grid
    from diffusionforge.serve.models import ModelCache

    calls = []
    generate_grid(ModelCache(runs_dir), GenerateSettings("tiny", steps=4, num=2), tmp_path,
                  progress=lambda done, desc: calls.append(done))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_the_translate_progress_bar_moves_each_step(runs_dir, tmp_path):
    from diffusionforge.serve.models import ModelCache
    from diffusionforge.serve.translate import test_input, translate

    cache, calls = ModelCache(runs_dir), []
    image, hole = test_input(cache, "inpaint", 0)
    translate(cache, "inpaint", {"background": image, "layers": [hole]}, 3, 0, None, tmp_path,
              progress=lambda done, desc: calls.append(done))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_translate_inpaints_a_test_image_with_its_mask(client):
    test = client.predict("inpaint", 3, api_name="/test_image")
    assert len(test["layers"]) == 1
    hole = np.asarray(Image.open(test["layers"][0]))[..., 3] > 0
    before, after = client.predict("inpaint", editor(test["background"], test["layers"]), 1, 0, None,
                                   api_name="/translate")
    source, target = pixels(before), pixels(after)
    assert source.shape == target.shape == (SIZE, SIZE)
    assert hole.any() and (source[~hole] == target[~hole]).all()  # kept outside the hole
    np.testing.assert_array_equal(source[~hole], pixels(test["background"])[~hole])


def test_translate_brings_a_low_resolution_upload_to_size(client, tmp_path):
    small = torch.linspace(-1, 1, 49).reshape(1, 1, 7, 7)
    rgba = Image.fromarray(to_uint8(small)[0][..., 0]).convert("RGBA")  # what a browser upload may be
    rgba.save(tmp_path / "low.png")
    before, after = client.predict("sr", editor(tmp_path / "low.png"), 2, 0, None, api_name="/translate")
    assert pixels(before).shape == pixels(after).shape == (SIZE, SIZE)


def test_the_story_strip_grows_frame_by_frame(client):
    job = client.submit("story", "a sneaker\nit moves to the right\nit gets smaller", None, 2, 2.0, 0, 2,
                        api_name="/story")
    final = job.result()
    strips = [Image.open(path).size for path in job.outputs()]
    assert strips == [grid_side(2 * k, k, FRAME) for k in (1, 2, 3)]  # 2 stories (rows), a frame more each time
    assert Image.open(final).size == strips[-1]


def test_a_story_from_an_uploaded_first_frame_keeps_it(client, tmp_path):
    frame = np.zeros((FRAME, FRAME, 4), np.uint8)
    frame[4:12, 2:10] = (200, 200, 200, 255)  # an RGBA upload of a grey run: converted, not refused
    Image.fromarray(frame).save(tmp_path / "first.png")
    job = client.submit("story", "a bag\nit moves to the right", handle_file(str(tmp_path / "first.png")), 2, 2.0,
                        0, 1, api_name="/story")
    strip = pixels(job.result())
    assert [Image.open(path).size for path in job.outputs()] == [grid_side(2, 2, FRAME)]  # one frame generated
    np.testing.assert_array_equal(strip[2:2 + FRAME, 2:2 + FRAME], np.asarray(Image.fromarray(frame).convert("L")))


@pytest.mark.parametrize("call, message", [
    (lambda c: generate(c, "unloadable"), "no exported weights (model.safetensors missing"),
    (lambda c: generate(c, class_name="Unicorn"), "--class 'Unicorn': unknown class"),
    (lambda c: generate(c, "sr"), "is a task=bridge run; `dforge sample` takes"),
    (lambda c: generate(c, "../.."), "../..: not a run under"),
    (lambda c: c.predict("sr", None, 1, 0, None, api_name="/translate"), "no input image"),
    (lambda c: c.predict("story", "  \n", None, 2, 2.0, 0, 1, api_name="/story"), "give one caption per line"),
    (lambda c: c.predict("story", "a sneaker\n\nit moves", None, 2, 2.0, 0, 1, api_name="/story"),
     "a caption is empty"),
], ids=["run-fails-to-load", "unknown-class", "wrong-tab", "outside-runs-dir", "no-image", "no-captions",
     "empty-caption"])
def test_bad_input_is_a_message_and_the_server_keeps_serving(client, call, message):
    with pytest.raises(AppError) as raised:
        call(client)
    assert message in str(raised.value) and "Traceback" not in str(raised.value)
    image, _, _ = generate(client, num=1, steps=1)
    assert Image.open(image).size == grid_side(1, CLASSES)  # the classes in turn: a column per class


def test_a_wrong_image_size_is_a_message(client, tmp_path):
    save_png(np.zeros((10, 10, 1), np.uint8), tmp_path / "ten.png")
    with pytest.raises(AppError, match="is 10x10; this run translates 28x28 images or 7x7"):
        client.predict("sr", editor(tmp_path / "ten.png"), 1, 0, None, api_name="/translate")


def test_two_requests_to_one_model_both_finish(client):
    jobs = [client.submit("tiny", "", "", "", "", "", 3, 2.0, seed, 4, api_name="/generate") for seed in (1, 2)]
    first, second = (pixels(job.result()[0]) for job in jobs)
    assert first.shape == second.shape == grid_side(4, CLASSES)[::-1]
    assert not np.array_equal(first, second)  # each its own seed


def test_serve_errors_are_one_line(tmp_path, capsys):
    assert_one_line_error(main(["serve", str(tmp_path / "missing")]), capsys.readouterr().err,
                          "runs directory not found")
    assert_one_line_error(main(["serve", str(tmp_path), "--port", "0"]), capsys.readouterr().err, "--port")


def test_a_generate_click_in_a_browser_shows_an_image(server):
    from diffusionforge.serve.browser import Browser, click_generate, find_chromium

    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium): the page is checked through its API only")
    with Browser(executable) as browser:
        browser.open(server)
        src = click_generate(browser)
        assert src.startswith(server) and "/file=" in src
        size = browser.wait_for("(() => { const i = document.querySelector('#generate-result img'); return "
                                "i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null; })()")
    assert tuple(size) == grid_side(8, CLASSES)  # the first Gaussian run (text): 8 images, the classes in turn


def test_a_run_made_after_the_start_is_listed_and_served(client, runs_dir, tiny_run):
    """(Last: it adds a run to the folder the other tests list.)"""
    shutil.copytree(tiny_run, runs_dir / "later")
    table, *_ = client.predict(api_name="/runs")
    assert "later" in [row[0] for row in table["data"]]
    image, _, _ = generate(client, "later", class_name="Bag", num=2, steps=2)
    assert Image.open(image).size == grid_side(2, 2)

"""Click-to-image time of `dforge serve`: the default run's 8-image grid at 50 steps of its sampler (or --sampler/--steps).

A server is started on a free loopback port over the folder holding RUN (in
this process, as `dforge serve` runs it) and the Generate tab is driven
through its HTTP API with ``gradio_client``, exactly as a click sends it:
8 images, the classes in turn, the run's own sampler (``sample.sampler``:
flow Euler for the default ``fashion-flow``, DDIM for ``fashion-ddpm``), 50
steps, the run's guidance. The
first request includes loading the model (once per server); the following
``--repeats`` are the warm clicks. The same grid timed by the library call
alone (``sample_images``, no server) gives the page's overhead.

The network's size, not its training, sets the time: any run of the default
preset will do, e.g. a short one::

    dforge train run_dir=runs/fashion-flow-short trainer.max_steps=20
    python benchmarks/serve_latency.py runs/fashion-flow-short [--repeats 5] [--screenshots docs]

``--screenshots DIR`` also opens the page in a headless system Chromium
(``serve/browser.py``), presses Generate and writes ``DIR/serve-generate.png``
and ``DIR/serve-runs.png``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

SETTINGS = {"class_name": "", "prompt": "", "negative_prompt": "", "sampler": "", "schedule": "",
            "steps": 50, "num": 8, "seed": 0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def click(client, run: str, guidance: float, seed: int) -> float:
    """Seconds from the API call to the image file on this side."""
    s = SETTINGS
    start = time.perf_counter()
    image, _, _ = client.predict(run, s["class_name"], s["prompt"], s["negative_prompt"], s["sampler"],
                                 s["schedule"], s["steps"], guidance, seed, s["num"], api_name="/generate")
    elapsed = time.perf_counter() - start
    assert Path(image).is_file()
    return elapsed


def library_seconds(run_dir: Path, repeats: int) -> list[float]:
    """The same grid from the library call the page makes, without the server."""
    from diffusionforge.runs import open_run
    from diffusionforge.tasks import task_of
    from diffusionforge.tasks.diffusion import sample_images, sample_request

    run_dir, config = open_run(run_dir)
    model = task_of(config).load(run_dir, config)
    request = sample_request(config, SETTINGS["sampler"], SETTINGS["steps"])
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        sample_images(model, SETTINGS["num"], request, seed=seed, batch_size=SETTINGS["num"], progress=False)
        times.append(time.perf_counter() - start)
    return times


# Type a value into the number box of the slider labelled LABEL (as a user would, then leave the box).
SET_SLIDER = ("(() => {{ const block = [...document.querySelectorAll('.block')].find(b => "
              "b.querySelector('input[type=range]') && b.textContent.trim().startsWith({label!r})); "
              "const box = block.querySelector('input[type=number]'); box.value = {value}; "
              "box.dispatchEvent(new Event('input', {{bubbles: true}})); "
              "box.dispatchEvent(new Event('blur', {{bubbles: true}})); return true; }})()")
SHOWN_IMAGES = 20  # the screenshot's grid: two rows of the ten classes


def screenshots(url: str, out: Path) -> list[Path]:
    from diffusionforge.serve.browser import SHOW_TAB, Browser, click_generate, find_chromium

    executable = find_chromium()
    if executable is None:
        print("no Chromium: no screenshots", file=sys.stderr)
        return []
    out.mkdir(parents=True, exist_ok=True)
    with Browser(executable, size=(1280, 900), timeout=600) as browser:
        browser.open(url)
        browser.wait_for(SHOW_TAB.format(name="Generate"))
        browser.wait_for(SET_SLIDER.format(label="images", value=SHOWN_IMAGES))
        click_generate(browser, timeout=600)
        time.sleep(1.0)  # the image fades in
        written = [browser.screenshot(out / "serve-generate.png")]
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 1500, "deviceScaleFactor": 1, "mobile": False})
        browser.wait_for(SHOW_TAB.format(name="Runs"))
        time.sleep(1.5)
        written.append(browser.screenshot(out / "serve-runs.png"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run of the default preset (fashion-flow)")
    parser.add_argument("--repeats", type=int, default=5, help="warm clicks timed (default 5)")
    parser.add_argument("--no-timing", action="store_true", help="only the screenshots")
    parser.add_argument("--sampler", default=None, help="sampler of the timed grid (default: the run's own)")
    parser.add_argument("--steps", type=int, default=50, help="its steps (default 50)")
    parser.add_argument("--screenshots", type=Path, default=None, metavar="DIR",
                        help="also write DIR/serve-generate.png and DIR/serve-runs.png (needs chromium)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    from gradio_client import Client

    from diffusionforge.runs import open_run
    from diffusionforge.serve.app import launch

    run_dir, config = open_run(args.run_dir)
    SETTINGS.update(sampler=args.sampler or config.sample.sampler, steps=args.steps)
    port = free_port()
    app = launch(args.run_dir.parent, port=port, block=False, quiet=True)  # the folder as given (links kept)
    url = f"http://127.0.0.1:{port}/"
    try:
        if not args.no_timing:
            client = Client(url, verbose=False)
            guidance = config.sample.guidance
            first = click(client, args.run_dir.name, guidance, seed=0)
            warm = [click(client, args.run_dir.name, guidance, seed=1 + k) for k in range(args.repeats)]
        for path in screenshots(url, args.screenshots) if args.screenshots else []:
            print(f"wrote {path}", file=sys.stderr)
    finally:
        app.close()
    if args.no_timing:
        return
    library = library_seconds(run_dir, args.repeats)
    figures = {"run": str(run_dir), "preset": config.name, "images": SETTINGS["num"], "sampler": SETTINGS["sampler"],
               "steps": SETTINGS["steps"], "first_click_s (model load + grid)": round(first, 2),
               "warm_click_median_s": round(statistics.median(warm), 2), "warm_click_min_s": round(min(warm), 2),
               "library_median_s": round(statistics.median(library), 2),
               "server_overhead_s": round(statistics.median(warm) - statistics.median(library), 2)}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")

if __name__ == "__main__":
    main()

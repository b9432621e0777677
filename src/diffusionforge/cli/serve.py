"""`dforge serve [RUNS_DIR]`: a local web page to look at runs and generate from them (Gradio)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CheckpointError, ConfigError, DForgeError

DESCRIPTION = """Serve a local page over the runs under RUNS_DIR (default ./runs):

  Runs       every run with its task, preset, steps, time, metrics.json numbers,
             loss curve and the samples/step_*.png grids over training
  Generate   Gaussian runs: class or prompt, sampler, schedule, steps, guidance,
             seed, images; a per-step progress bar; the PNG (settings in its
             text chunks) and the equivalent `dforge sample` command
  Translate  bridge runs: an uploaded or test image, a painted mask for
             inpainting runs, steps; before / after
  Story      story runs: captions, an optional first frame; the strip appears
             frame by frame

Models are loaded on first use and kept; one request at a time per model.
Needs the serve extra: pip install -e ".[serve]" (Gradio).

examples:
  dforge serve                          # ./runs on http://127.0.0.1:7860
  dforge serve runs --port 8080
  dforge serve runs --host 0.0.0.0      # reachable from other machines: no authentication"""


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="a local web page to browse runs and generate (Gradio)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", metavar="RUNS_DIR", nargs="?", default="runs",
                   help="folder holding run directories (searched 3 levels deep; default runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: must be in 1..65535, got {args.port}")
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        raise CheckpointError(f"{runs_dir}: runs directory not found")
    try:
        from ..serve.app import launch
    except ImportError as err:
        raise DForgeError(f"dforge serve needs Gradio ({err.name or err} is missing): "
                          "pip install -e \".[serve]\"") from None
    print(f"serving the runs under {runs_dir.resolve()} on http://{args.host}:{args.port}", file=sys.stderr)
    launch(runs_dir, args.host, args.port)
    return 0

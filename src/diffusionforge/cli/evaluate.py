"""`dforge evaluate RUN_DIR`: FID, KID and class accuracy (or, for autoencoder runs,
PSNR, SSIM, rFID and rKID of reconstructions) with their full protocol."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError
from ..utils.outputs import JSON, check_output_file
from .sample import add_sampling_arguments

EXAMPLE = """example:
  dforge evaluate runs/fashion-flow-20261123-101500 --num 10000 --sampler flow_euler --steps 50 \\
      --guidance 2 --seed 0 --features fashion-mnist
writes RUN_DIR/metrics.json: the numbers and the protocol (samples, sampler, schedule, steps, guidance,
seed, EMA or raw weights, precision, feature network and its sha256, reference split and size, version,
git commit).

autoencoder runs (task=autoencoder, e.g. `dforge train fashion-vae`) are scored by
reconstructing the first --num test images through the posterior mode: PSNR, SSIM,
rFID and rKID against those images; --batch-size, --features and --out apply, the
sampling flags (--sampler, --schedule, --steps, --eta, --guidance, --seed, --raw, --precision) are ignored:
  dforge evaluate runs/fashion-vae --num 10000

bridge runs (task=bridge, e.g. `dforge train fashion-lbm-sr`) are scored on the first --num
test pairs, degraded as in training: PSNR, SSIM, FID and KID of the translations at each of
--steps, beside the degraded input (and bicubic upsampling for super-resolution):
  dforge evaluate runs/fashion-lbm-sr --num 10000 --steps 1 2 4

folder runs (data.name=folder) are scored against all of the folder's images (it has no test split),
on ImageNet EfficientNet-Lite0 features unless --features says otherwise; a text-to-image run
(an imported Stable Diffusion, a captioned folder run) is prompted with the folder's captions,
sample i with caption i mod N; --data DIR names the folder (an imported run records none):
  dforge evaluate runs/sd15 --data coco-captions-subset --num 1000 --steps 25

story runs (task=story, e.g. `dforge train fashion-arldm`) generate the first --num test stories
from their captions (continuation runs: and their real first frame), frame by frame, and score
FID per frame, caption accuracy (named / omitted class), position and size accuracy and identity
consistency on the item crops, with the classifier of the story source, beside the same scores
of the real stories:
  dforge evaluate runs/fashion-arldm --num 1000 --steps 50 --guidance 2
PororoSV / FlintstonesSV runs (data.story.source=hdf5) generate the first --num stories of the
file's test split and score FID over all frames and per frame index, and KID, against the real
test frames, on EfficientNet-Lite0 unless --features says otherwise (continuation: frames 1..):
  dforge evaluate runs/pororo-arldm --num 1000 --steps 50 --guidance 2"""


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a run: FID, KID, class accuracy", epilog=EXAMPLE,
                       description="Generate samples from a run and score them against the "
                                   "held-out test split.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(p, num=10000, batch_size=125, steps_nargs="+",
                           steps_help="sampling steps (default 50); bridge runs take several, "
                                      "e.g. --steps 1 2 4 (default: the run's bridge.steps)")
    p.add_argument("--features", default=None,
                   help="feature network for FID/KID: a shipped classifier (fashion-mnist, mnist), "
                        "efficientnet (ImageNet EfficientNet-Lite0) or inception (Inception-v3 from "
                        "local weights only); default: the classifier of the run's dataset")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="diffusion runs: the images to score against instead of the run's data.root (an image "
                        "folder; for an imported Stable Diffusion a caption folder, whose captions prompt the samples)")
    p.add_argument("--out", default=None, help="metrics file (default RUN_DIR/metrics.json)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.num < 2 or any(k < 1 for k in args.steps or ()) or args.batch_size < 1:
        raise ConfigError("--num must be >= 2, --steps and --batch-size >= 1")
    from ..runs import METRICS_FILE, open_run, write_json
    from ..tasks import EvalOptions, task_of

    run_dir, config = open_run(args.run_dir)
    out = check_output_file(args.out or Path(args.run_dir) / METRICS_FILE, JSON)
    options = EvalOptions(num=args.num, steps=args.steps, sampler=args.sampler, schedule=args.schedule, eta=args.eta,
                          guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                          use_ema=not args.raw, precision=args.precision, features=args.features, data=args.data)
    record = task_of(config).evaluate(run_dir, config, options)
    out.parent.mkdir(parents=True, exist_ok=True)  # checked above: can be made
    write_json(out, record)
    print(json.dumps(record["metrics"], indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0

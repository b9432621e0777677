"""Sampling cost against quality for one trained run.

For DDPM with all T steps and DDIM with 10/20/50/100 steps: FID and KID on
the classifier features against the test split, class-conditional
accuracy, and wall time per image, all through the same ``evaluate_run``
as ``dforge evaluate``. Prints a table and writes
benchmarks/results/sampling_quality.json.

    python benchmarks/sampling_quality.py RUN_DIR [--num 1000] [--guidance 2] [--seed 0] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusionforge.evaluation import evaluate_run, metrics_record
from diffusionforge.models.generative import SampleRequest
from diffusionforge.tasks import load_run_model


def settings(num_timesteps: int) -> list[tuple[str, int]]:
    return [("ddpm", num_timesteps)] + [("ddim", n) for n in (10, 20, 50, 100)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="network arithmetic while sampling (recorded per row)")
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--skip-ddpm", action="store_true", help="leave out the T-step DDPM row")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling_quality.json"))
    args = parser.parse_args()
    model, config = load_run_model(args.run_dir)
    rows = []
    print(f"{'sampler':8s} {'steps':>5s} {'FID':>8s} {'KID':>9s} {'acc':>6s} {'score':>6s} {'s/img':>7s}")
    for sampler, steps in settings(config.model.process.num_timesteps):
        if sampler == "ddpm" and args.skip_ddpm:
            continue
        request = SampleRequest(sampler=sampler, steps=steps, spacing=config.sample.spacing,
                                guidance=args.guidance, guidance_channels=config.sample.guidance_channels,
                                clip_denoised=config.sample.clip_denoised,
                                precision=args.precision)
        result, protocol = evaluate_run(model, config, request, args.num, args.seed,
                                        batch_size=args.batch_size)
        row = metrics_record(result, protocol)
        per_image = row["timing"]["seconds_per_image"]
        rows.append(row)
        print(f"{sampler:8s} {steps:5d} {result.fid:8.3f} {result.kid_mean:9.5f} "
              f"{result.class_accuracy:6.1%} {result.classifier_score:6.2f} {per_image:7.3f}", flush=True)
    fid = {(r["protocol"]["sampler"], r["protocol"]["steps"]): r["metrics"]["fid"] for r in rows}
    ddpm = fid.get(("ddpm", config.model.process.num_timesteps))
    ratio = fid[("ddim", 50)] / ddpm if ddpm else None
    if ratio is not None:
        print(f"FID of DDIM-50 / FID of DDPM-{config.model.process.num_timesteps}: {ratio:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run_dir": str(args.run_dir), "threads": torch.get_num_threads(),
                                          "ddim50_over_ddpm_fid": ratio, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

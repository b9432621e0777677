"""Sampler quality against network evaluations (NFE) on one trained run: which solver buys quality cheapest.

For each sampler and NFE budget: FID and KID on the classifier features
against the test split, class accuracy and wall time per image, all through
the same ``evaluate_run`` as ``dforge evaluate`` (guidance 2 by default, the
same seed, so every row sees the same initial noise). NFE counts denoiser
evaluations per image (classifier-free guidance runs each on a doubled
batch); Heun takes 2 per step but the last, so its steps are (NFE + 1) // 2
and its NFE is 2 * steps - 1. Prints a table, checks the issue's goals (a
sampler at <= 15 NFE within 5% of DDIM-50's FID; at 8 NFE better than
DDIM-10) and writes benchmarks/results/sampler_nfe.json and a plot of FID
against NFE (docs/sampler-nfe.png).

    python benchmarks/sampler_nfe.py RUN_DIR [--num 1000] [--nfe 5 8 10 15 20 50] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusionforge.evaluation import evaluate_run, metrics_record
from diffusionforge.plotting import draw_line_plot
from diffusionforge.tasks import load_run_model
from diffusionforge.tasks.diffusion import sample_request

SAMPLERS = {  # label -> (sampler, schedule); None = the run's own
    "DDIM": ("ddim", None),
    "Euler": ("euler", None),
    "Heun": ("heun", None),
    "DPM++ 2M (Karras)": ("dpmpp_2m", "karras"),
    "UniPC": ("unipc", None),
}


def steps_for(sampler: str, nfe: int) -> tuple[int, int]:
    """(steps, the NFE they cost) for an NFE budget."""
    if sampler == "heun":
        steps = max(1, (nfe + 1) // 2)
        return steps, 2 * steps - 1
    return nfe, nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 8, 10, 15, 20, 50])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler_nfe.json"))
    parser.add_argument("--plot", default=str(Path(__file__).parent.parent / "docs" / "sampler-nfe.png"))
    args = parser.parse_args()
    model, config = load_run_model(args.run_dir)
    out = Path(args.out)
    done = json.loads(out.read_text())["rows"] if out.is_file() else []  # an interrupted call continues
    key = lambda r: (r["label"], r["nfe"], r["protocol"]["num_samples"], r["protocol"]["precision"])  # noqa: E731
    rows = list(done)
    print(f"{'sampler':18s} {'NFE':>4s} {'steps':>5s} {'FID':>8s} {'KID':>9s} {'acc':>6s} {'s/img':>7s}")
    for label in args.samplers:
        sampler, schedule = SAMPLERS[label]
        for budget in args.nfe:
            steps, nfe = steps_for(sampler, budget)
            if any(key(r) == (label, nfe, args.num, args.precision) for r in rows):
                continue
            request = sample_request(config, sampler, steps, guidance=args.guidance, precision=args.precision,
                                     schedule=schedule)
            started = time.time()
            result, protocol = evaluate_run(model, config, request, args.num, args.seed, batch_size=args.batch_size)
            row = {"label": label, "nfe": nfe, **metrics_record(result, protocol),
                   "wall_s": round(time.time() - started, 1)}
            rows.append(row)
            print(f"{label:18s} {nfe:4d} {steps:5d} {result.fid:8.3f} {result.kid_mean:9.5f} "
                  f"{result.class_accuracy:6.1%} {row['timing']['seconds_per_image']:7.3f}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"run_dir": str(args.run_dir), "threads": torch.get_num_threads(),
                                       "rows": rows}, indent=2) + "\n")
    mine = [r for r in rows if r["protocol"]["num_samples"] == args.num and r["protocol"]["precision"] == args.precision]
    fid = {(r["label"], r["nfe"]): r["metrics"]["fid"] for r in mine}
    if ("DDIM", 50) in fid:
        target = 1.05 * fid[("DDIM", 50)]
        near = sorted((nfe, label) for (label, nfe), value in fid.items() if nfe <= 15 and value <= target)
        print(f"within 5% of DDIM-50's FID {fid[('DDIM', 50)]:.3f} at <= 15 NFE: "
              + (", ".join(f"{label} at {nfe}" for nfe, label in near) or "none"))
    if ("DDIM", 10) in fid:
        better = [label for (label, nfe), value in fid.items() if nfe <= 8 and value < fid[("DDIM", 10)]]
        print(f"better than DDIM-10's FID {fid[('DDIM', 10)]:.3f} at <= 8 NFE: {', '.join(sorted(set(better))) or 'none'}")
    series = {label: [(r["nfe"], r["metrics"]["fid"]) for r in mine if r["label"] == label]
              for label in SAMPLERS if any(r["label"] == label for r in mine)}
    title = f"FID ({args.num} samples, guidance {args.guidance:g}) against NFE, {Path(args.run_dir).name}"
    draw_line_plot(series, title, "NFE", log_x=True).save(args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()

"""The three training objectives (DDPM-v, EDM, rectified flow) at equal training compute on the default data.

Each preset (fashion-ddpm, fashion-edm, fashion-flow: the same UNet, data,
batch, learning rate and EMA) trains the same number of optimizer steps in
fp32 with one thread (the same network, so equal steps are equal compute and
equal wall time on a quiet machine; a step bound keeps a busy machine from
changing the result), the three at once. Each run is then scored with every
candidate sampler at <= 20 NFE (``dforge evaluate``: FID, KID, class
accuracy and s/image on the classifier features, guidance 2), and one table
prints each objective's best. Runs and evaluations already in --out-dir are
reused, so an interrupted call continues.

    python benchmarks/objectives.py [--steps 600] [--num 500] [--out-dir /tmp/dforge-objectives]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PRESETS = {  # objective -> (preset, [(sampler, steps, schedule, NFE)])
    "ddpm (v)": ("fashion-ddpm", [("ddim", 20, "discrete", 20), ("unipc", 20, "discrete", 20)]),
    "edm": ("fashion-edm", [("heun", 10, "karras", 19), ("dpmpp_2m", 20, "karras", 20)]),
    "flow": ("fashion-flow", [("flow_euler", 20, "discrete", 20), ("unipc", 20, "discrete", 20)]),
}


def train_all(out_dir: Path, steps: int) -> None:
    """The three runs at once, each on one thread, bounded by ``steps``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = []
    for name, (preset, _) in PRESETS.items():
        run = out_dir / preset
        if (run / "train_summary.json").is_file():
            continue
        log = (out_dir / f"{preset}.log").open("w")
        cmd = ["dforge", "train", preset, f"run_dir={run}", f"trainer.max_steps={steps}",
               "trainer.time_budget=null", "trainer.max_time=null", "optim.schedule=steps",
               f"optim.warmup_steps={max(1, steps // 20)}", "trainer.precision=32-true",
               f"trainer.val_every_n_steps={steps + 1}", "--no-progress"]
        jobs.append((preset, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    for preset, job in jobs:
        if job.wait() != 0:
            sys.exit(f"training {preset} failed; see {out_dir / (preset + '.log')}")


def evaluate(run: Path, sampler: str, steps: int, schedule: str, num: int) -> dict:
    out = run / f"metrics-{sampler}-{schedule}-{steps}-{num}.json"
    if not out.is_file():
        subprocess.check_call(["dforge", "evaluate", str(run), "--num", str(num), "--sampler", sampler,
                               "--steps", str(steps), "--schedule", schedule, "--guidance", "2", "--seed", "0",
                               "--precision", "bf16" if native_bf16() else "fp32", "--out", str(out)],
                              stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def native_bf16() -> bool:
    from diffusionforge.machine import native_bf16 as native

    return native()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--out-dir", default="/tmp/dforge-objectives")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "objectives.json"))
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_all(out_dir, args.steps)
    rows = []
    print(f"{'objective':10s} {'sampler':18s} {'NFE':>4s} {'FID':>7s} {'KID':>8s} {'acc':>6s} {'s/img':>6s} {'train s':>8s}")
    for name, (preset, candidates) in PRESETS.items():
        run = out_dir / preset
        summary = json.loads((run / "train_summary.json").read_text())
        for sampler, steps, schedule, nfe in candidates:
            record = evaluate(run, sampler, steps, schedule, args.num)
            m = record["metrics"]
            row = {"objective": name, "preset": preset, "sampler": sampler, "schedule": schedule, "steps": steps,
                   "nfe": nfe, **m, "seconds_per_image": record["timing"]["seconds_per_image"],
                   "train_steps": summary["global_step"], "train_wall_s": summary["wall_time_s"]}
            rows.append(row)
            print(f"{name:10s} {sampler + ' ' + schedule:18s} {nfe:4d} {m['fid']:7.3f} {m['kid_mean']:8.4f} "
                  f"{m['class_accuracy']:6.1%} {row['seconds_per_image']:6.3f} {summary['wall_time_s']:8.0f}",
                  flush=True)
    best = {}
    for row in rows:
        if row["objective"] not in best or row["fid"] < best[row["objective"]]["fid"]:
            best[row["objective"]] = row
    print("best per objective: " + "; ".join(f"{k}: {v['sampler']} ({v['nfe']} NFE) FID {v['fid']:.3f}, "
                                             f"{v['class_accuracy']:.1%}" for k, v in best.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "num": args.num, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

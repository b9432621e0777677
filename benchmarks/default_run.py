"""The README's promise on both kinds of CPU: `dforge train` with no arguments, then its evaluation.

Runs the exact first command of the README (``dforge train``, default preset)
once per setting, timed from outside like ``/usr/bin/time -v`` (wall and peak
resident memory of the whole command), then ``dforge evaluate RUN --num N
--steps 50 --guidance 2 --seed 0`` on the run, and prints one table row per
setting: steps, wall, peak memory, FID, KID, class accuracy, and the machine
line the run printed.

Settings:
  native   this machine as it is
  fp32cpu  an AVX2-only CPU without native bf16 (most laptops; AMD Zen 3):
           oneDNN, MKL and ATen kernels capped at AVX2, so ``precision=auto``
           picks 32-true. On a machine that has AVX-512 this reproduces the
           fp32 kind's kernels; calibrate its speed with
           ``benchmarks/unet_train_step.py`` under the same variables.
           ``--fp32-threads`` sets OMP_NUM_THREADS for it (default: unset).

Evaluations run natively (the weights are fixed; only sampling speed depends
on the kernels). Slow (about 10 min of training and 10 min of evaluation per
setting on 2 cores); run on demand, not in CI. A setting whose run is
already in --out-dir (trained, or trained and evaluated) is not redone, so
an interrupted call continues:

    python benchmarks/default_run.py [--settings native fp32cpu] [--num 1000] [--out-dir /tmp/dforge-default]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

FP32_CPU_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def timed(cmd: list[str], env: dict, log: Path) -> None:
    """Run ``cmd`` under /usr/bin/time -v (its report beside ``log``, see ``time_figures``)."""
    with log.open("w") as out:
        code = subprocess.call(["/usr/bin/time", "-v", "-o", str(log.with_suffix(".time")), *cmd], env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed with status {code}; see {log}")


def time_figures(time_log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) from a /usr/bin/time -v report."""
    text = time_log.read_text()
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    wall = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":"))))
    peak_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return wall, int(peak_kb.group(1)) / 1024 if peak_kb else float("nan")


def evaluated(run_dir: Path, num: int) -> bool:
    path = run_dir / "metrics.json"
    return path.is_file() and json.loads(path.read_text())["protocol"]["num_samples"] == num


def run_setting(name: str, args, out_dir: Path) -> dict:
    env = dict(os.environ)
    if name == "fp32cpu":
        env.update(FP32_CPU_ENV)
        if args.fp32_threads:
            env["OMP_NUM_THREADS"] = str(args.fp32_threads)
    run_dir = out_dir / name
    if not ((run_dir / "train_summary.json").is_file() and (out_dir / f"{name}.time").is_file()):
        timed(["dforge", "train", f"run_dir={run_dir}", "--no-progress"], env, out_dir / f"{name}.log")
    wall, peak = time_figures(out_dir / f"{name}.time")
    machine = next((line for line in (out_dir / f"{name}.log").read_text().splitlines()
                    if line.startswith("machine:")), "")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    if not evaluated(run_dir, args.num):
        subprocess.check_call(["dforge", "evaluate", str(run_dir), "--num", str(args.num), "--steps", "50",
                               "--guidance", "2", "--seed", "0"], stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    return {"setting": name, "steps": summary["global_step"], "wall_s": round(wall, 1),
            "fit_s": summary["wall_time_s"], "peak_rss_mb": round(peak), "fid": metrics["fid"],
            "kid": metrics["kid_mean"], "accuracy": metrics["class_accuracy"], "machine": machine,
            "precision": summary.get("precision")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["native", "fp32cpu"], choices=["native", "fp32cpu"])
    parser.add_argument("--num", type=int, default=1000, help="samples for dforge evaluate")
    parser.add_argument("--fp32-threads", type=int, default=None, help="OMP_NUM_THREADS of the fp32cpu setting")
    parser.add_argument("--out-dir", default=f"/tmp/dforge-default-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "default_run.json"))
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'setting':8s} {'precision':>10s} {'steps':>6s} {'wall':>7s} {'peak MB':>8s} {'FID':>7s} {'KID':>7s} "
          f"{'acc':>6s}")
    for name in args.settings:
        row = run_setting(name, args, out_dir)
        rows.append(row)
        wall = f"{int(row['wall_s'] // 60)}:{int(row['wall_s'] % 60):02d}"
        print(f"{name:8s} {row['precision']:>10s} {row['steps']:6d} {wall:>7s} {row['peak_rss_mb']:8d} "
              f"{row['fid']:7.3f} {row['kid']:7.4f} {row['accuracy']:6.1%}\n         {row['machine']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"num": args.num, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

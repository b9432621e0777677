"""Throughput levers of the default training step, side by side in one process.

For the default preset's model (tasks.build_model on fashion-ddpm) and variants of
it, one training step (diffusion loss + backward + AdamW, batch of the
preset) is timed per lever: plain fp32, channels-last, ``torch.compile``
(its compile time reported separately: on 2 cores it has to be paid back
inside a 9-minute run), bf16 autocast (only where bf16 is native), and
architecture variants (width, attention, batch). Each row gives img/s, the
step's GFLOP (``torch.utils.flop_counter``) and the fraction of this
machine's fp32 / bf16 matmul peak. Rounds alternate between levers so that
a busy machine slows all of them alike.

Whether a lever is kept is decided on quality at equal wall time (see
README, "The default run on both kinds of CPU"), not on img/s alone.

    python benchmarks/throughput_levers.py [--rounds 3] [--steps 4] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusionforge.tasks import build_model
from diffusionforge.config import load_config
from diffusionforge.machine import describe_machine, machine_line
from machine_peak import matmul_gflops

VARIANTS = {  # name -> overrides of the default preset
    "default": [],
    "no attention": ["model.unet.attention_resolutions=[]"],
    "width 24": ["model.unet.model_channels=24", "model.unet.num_head_channels=24"],
    "width 48": ["model.unet.model_channels=48", "model.unet.num_head_channels=48"],
    "batch 32": ["data.batch_size=32"],
    "batch 128": ["data.batch_size=128"],
}


class Lever:
    """One model + optimiser + batch, stepping in a given mode."""

    def __init__(self, overrides: list[str], channels_last=False, compile_=False, bf16=False):
        torch.manual_seed(0)
        config = load_config("fashion-ddpm", overrides)
        self.model = build_model(config, 10)
        self.opt = torch.optim.AdamW(self.model.net.parameters(), 1e-4)
        n = config.data.batch_size
        image = torch.rand(n, 1, 28, 28) * 2 - 1
        self.batch = {"image": image.contiguous(memory_format=torch.channels_last) if channels_last else image,
                      "class_label": torch.randint(0, 10, (n,))}
        if channels_last:
            self.model.net.to(memory_format=torch.channels_last)
        if compile_:
            self.model.net["backbone"] = torch.compile(self.model.net["backbone"])
        self.bf16, self.size = bf16, n
        self.compile_s = self.timed_step() if compile_ else 0.0  # first call compiles
        self.gflop = self.count_gflop() if not compile_ else None

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model.diffusion_loss(self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()

    def timed_step(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    def count_gflop(self) -> float:
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops() / 1e9


def levers(compile_: bool, bf16_native: bool) -> dict[str, Lever]:
    out = {"fp32": Lever([]), "fp32 channels-last": Lever([], channels_last=True)}
    if compile_:
        out["fp32 compile"] = Lever([], compile_=True)
    if bf16_native:
        out["bf16 autocast"] = Lever([], bf16=True)
    for name, overrides in VARIANTS.items():
        if name != "default":
            out[f"fp32 {name}"] = Lever(overrides)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per lever per round")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput_levers.json"))
    args = parser.parse_args()
    machine = describe_machine("cpu")
    print(machine_line(machine, "-", "benchmark", None))
    peak = {"fp32": matmul_gflops(2048, torch.float32)}
    if machine.native_bf16:
        peak["bf16"] = matmul_gflops(2048, torch.bfloat16)
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
    table = levers(not args.no_compile, machine.native_bf16)
    for lever in table.values():
        lever.step()  # warm-up
    seconds = {name: [] for name in table}
    for _ in range(args.rounds):
        for name, lever in table.items():
            seconds[name] += [lever.timed_step() for _ in range(args.steps)]
    gflop = table["fp32"].gflop
    rows = []
    print(f"{'lever':26s} {'img/s':>7s} {'GFLOP':>7s} {'of peak':>8s} {'compile s':>9s}")
    for name, lever in table.items():
        dt = sorted(seconds[name])[len(seconds[name]) // 2]  # median step
        step_gflop = lever.gflop if lever.gflop is not None else gflop
        which = "bf16" if lever.bf16 else "fp32"
        fraction = step_gflop / dt / peak[which]
        rows.append({"lever": name, "images_per_s": round(lever.size / dt, 1), "gflop_per_step": round(step_gflop, 1),
                     "fraction_of_peak": round(fraction, 3), "peak": which, "compile_s": round(lever.compile_s, 1)})
        print(f"{name:26s} {lever.size / dt:7.1f} {step_gflop:7.1f} {fraction:7.1%}{'*' if which == 'bf16' else ' '} "
              f"{lever.compile_s:9.1f}", flush=True)
    print("(* of the bf16 peak; the others of the fp32 peak)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine.as_dict(), "peak_gflops": peak, "rows": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The machine's peak and how much of it a training step uses.

Measures achieved GFLOP/s of a large matmul in fp32 and bf16, then the
default UNet's training step (forward + backward + AdamW) with its FLOPs
counted by ``torch.utils.flop_counter.FlopCounterMode``, as a fraction of
each peak. Prints a table and writes benchmarks/results/machine_peak.json.

    python benchmarks/machine_peak.py [--size 2048] [--batch 128]
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


def matmul_gflops(size: int, dtype: torch.dtype, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def train_step(model, opt, batch, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.diffusion_loss(batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def training_gflops(batch_size: int, bf16: bool, repeats: int = 3) -> tuple[float, float]:
    """(GFLOP per step, achieved GFLOP/s) of the default preset's training step."""
    torch.manual_seed(0)
    model = build_model(load_config("fashion-ddpm"), 10)
    opt = torch.optim.AdamW(model.net.parameters(), 1e-4)
    batch = {"image": torch.rand(batch_size, 1, 28, 28) * 2 - 1,
             "class_label": torch.randint(0, 10, (batch_size,))}
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, batch, bf16)
    flops = counter.get_total_flops()
    start = time.perf_counter()
    for _ in range(repeats):
        train_step(model, opt, batch, bf16)
    seconds = (time.perf_counter() - start) / repeats
    return flops / 1e9, flops / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "machine_peak.json"))
    args = parser.parse_args()
    peak = {"fp32": matmul_gflops(args.size, torch.float32),
            "bf16": matmul_gflops(args.size, torch.bfloat16)}
    rows = {"matmul_gflops": peak, "threads": torch.get_num_threads(), "train": {}}
    print(f"matmul {args.size}^3: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s "
          f"(x{peak['bf16'] / peak['fp32']:.2f})")
    print(f"{'train step':12s} {'GFLOP':>8s} {'GFLOP/s':>9s} {'of peak':>8s}")
    for precision in ("fp32", "bf16"):
        gflop, rate = training_gflops(args.batch, precision == "bf16")
        rows["train"][precision] = {"gflop_per_step": round(gflop, 2), "gflops": round(rate, 1),
                                    "fraction_of_peak": round(rate / peak[precision], 3)}
        print(f"{precision:12s} {gflop:8.2f} {rate:9.1f} {rate / peak[precision]:8.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of one UNet training step (forward + backward + AdamW) on this machine.

Prints a table and writes it to benchmarks/results/unet_train_step.json.
Run on demand, not in CI:

    python benchmarks/unet_train_step.py [--batch 128] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusionforge.backbones.unet import UNet, UNetConfig

VARIANTS = {  # name -> UNet fields; "c32 r1" is the default preset's backbone
    "c32 r1": dict(model_channels=32, num_res_blocks=1),
    "c32 r2": dict(model_channels=32, num_res_blocks=2),
    "c48 r1": dict(model_channels=48, num_res_blocks=1),
    "c64 r1": dict(model_channels=64, num_res_blocks=1),
}
COMMON = dict(in_channels=1, out_channels=1, vector_dim=128, norm_groups=8, num_head_channels=32,
              channel_mult=(1, 2, 2), attention_resolutions=(4,))


def seconds_per_step(config: UNetConfig, batch: int, steps: int, bf16: bool) -> float:
    torch.manual_seed(0)
    model = UNet(config)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x, v = torch.randn(batch, 1, 28, 28), torch.randn(batch, 128)
    t = torch.randint(0, 1000, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, {"vector": v})
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "unet_train_step.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'variant':8s} {'params':>8s} {'precision':>10s} {'ms/step':>8s} {'img/s':>7s}")
    for name, fields in VARIANTS.items():
        config = UNetConfig(**COMMON, **fields)
        params = sum(p.numel() for p in UNet(config).parameters())
        for precision in ("fp32", "bf16"):
            dt = seconds_per_step(config, args.batch, args.steps, precision == "bf16")
            rows.append(dict(variant=name, params=params, precision=precision,
                             ms_per_step=round(dt * 1000, 1), images_per_s=round(args.batch / dt, 1)))
            print(f"{name:8s} {params / 1e6:7.2f}M {precision:>10s} {dt * 1000:8.0f} {args.batch / dt:7.0f}",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"batch": args.batch, "threads": torch.get_num_threads(),
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

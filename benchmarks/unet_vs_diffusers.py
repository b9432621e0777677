"""Our UNet against diffusers' ``UNet2DModel`` of the same architecture: training throughput and peak memory.

Both networks are built for the default preset's backbone (28x28 grey, 32
channels, multipliers (1, 2, 2), one ResBlock per level, attention at the
7x7 level and in the middle, scale-shift norm, GroupNorm 8, 32 channels per
head), unconditional so that the parameter sets match one to one (the class
embedding adds the same small table to either). A training step is forward
+ MSE backward + AdamW step. Throughput is measured alternately (ours,
diffusers, ours, ...) in one process so that machine load hits both alike;
the table reports the median of the rounds, then the ratio of our bf16
autocast step to diffusers' fp32 step (the project's fastest CPU setting
against the baseline) and where our bf16 step spends its time
(``torch.profiler`` self time per op). Peak memory is measured in a
fresh child process per network: CUDA's ``max_memory_allocated`` on GPU; on
CPU the peak resident set (VmHWM, reset just before) over the resident set
of the built model, i.e. what two training steps add.

    python benchmarks/unet_vs_diffusers.py [--batch 128] [--rounds 5] [--steps 3] [--device cpu]

Writes benchmarks/results/unet_vs_diffusers.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from diffusionforge.backbones.unet import UNet, UNetConfig

SIZE = 28  # Fashion-MNIST
OURS = UNetConfig(in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2, 2),
                  num_res_blocks=1, attention_resolutions=(4,), num_head_channels=32, norm_groups=8)


class Ours(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = UNet(OURS)

    def forward(self, x, t):
        return self.net(x, t, None)


class Diffusers(nn.Module):
    """diffusers UNet2DModel with the same levels, blocks, widths, heads and time embedding."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        widths = tuple(OURS.model_channels * m for m in OURS.channel_mult)
        self.net = UNet2DModel(
            sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=widths,
            layers_per_block=OURS.num_res_blocks,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            attention_head_dim=OURS.num_head_channels, norm_num_groups=OURS.norm_groups,
            resnet_time_scale_shift="scale_shift", flip_sin_to_cos=True, freq_shift=0,
            downsample_padding=1, attn_norm_num_groups=OURS.norm_groups)  # else its mid attention has no norm

    def forward(self, x, t):
        return self.net(x, t).sample


NETWORKS = {"ours": Ours, "diffusers": Diffusers}


def make_step(model: nn.Module, batch: int, device: str, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(batch, 1, SIZE, SIZE, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, steps: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def peak_memory_child(name: str, batch: int, device: str, bf16: bool, queue) -> None:
    torch.manual_seed(0)
    model = NETWORKS[name]().to(device)
    step = make_step(model, batch, device, bf16)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(), step()
        queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        reset_peak_rss()
        base = rss_kib("VmRSS")
        step(), step()
        queue.put((rss_kib("VmHWM") - base) / 1024)


def rss_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak counts only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(name: str, batch: int, device: str, bf16: bool) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=peak_memory_child, args=(name, batch, device, bf16, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per precision")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per network per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "unet_vs_diffusers.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {name: cls().to(args.device) for name, cls in NETWORKS.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print(f"parameters: ours {params['ours']:,}  diffusers {params['diffusers']:,}")
    rows = []
    print(f"{'precision':9s} {'ours img/s':>10s} {'diffusers img/s':>15s} {'ratio':>6s} "
          f"{'ours MiB':>9s} {'diffusers MiB':>13s}")
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        steps = {name: make_step(m, args.batch, args.device, bf16) for name, m in models.items()}
        for step in steps.values():
            step()  # warm-up
        times = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, step in steps.items():
                times[name].append(timed(step, args.steps, args.device))
        rate = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
        memory = {name: peak_memory_mib(name, args.batch, args.device, bf16) for name in models}
        row = dict(precision=precision, ours_images_per_s=round(rate["ours"], 1),
                   diffusers_images_per_s=round(rate["diffusers"], 1),
                   ratio=round(rate["ours"] / rate["diffusers"], 3),
                   ours_peak_mib=round(memory["ours"], 1), diffusers_peak_mib=round(memory["diffusers"], 1))
        rows.append(row)
        print(f"{precision:9s} {rate['ours']:10.1f} {rate['diffusers']:15.1f} {row['ratio']:6.2f} "
              f"{memory['ours']:9.0f} {memory['diffusers']:13.0f}", flush=True)
    fp32, bf16 = rows
    fastest = round(bf16["ours_images_per_s"] / fp32["diffusers_images_per_s"], 3)
    print(f"ours bf16 autocast / diffusers fp32: {fastest:.2f}x")
    profile = where_the_time_goes(models["ours"], args.batch, args.device)
    print("where ours spends a bf16 training step (torch.profiler, self time):")
    for name, ms in profile:
        print(f"  {ms:8.1f} ms  {name}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "batch": args.batch, "device": args.device, "threads": torch.get_num_threads(),
        "rounds": args.rounds, "steps_per_round": args.steps, "parameters": params, "rows": rows,
        "ours_bf16_over_diffusers_fp32": fastest,
        "ours_bf16_profile_ms": [{"op": n, "ms": round(ms, 1)} for n, ms in profile]},
        indent=2) + "\n")


def where_the_time_goes(model: nn.Module, batch: int, device: str, top: int = 10) -> list[tuple[str, float]]:
    """The ops with the most self time over two bf16 training steps (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(model, batch, device, bf16=True)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step(), step()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [(e.key, getattr(e, key) / 1000 / 2) for e in events]


if __name__ == "__main__":
    main()

"""Our UNet against diffusers' ``UNet2DModel`` of the same architecture: training throughput and peak memory.

Both networks are built for the default preset's backbone (28x28 grey, 32
channels, multipliers (1, 2, 2), one ResBlock per level, attention at the
7x7 level and in the middle, scale-shift norm, GroupNorm 8, 32 channels per
head), unconditional so that the parameter sets match one to one (the class
embedding adds the same small table to either). A training step is forward
+ MSE backward + AdamW step, the optimiser built as training builds it
(``OptimConfig`` defaults: betas, weight decay, no foreach/fused flag).
Throughput is measured alternately (ours, diffusers, ours, ...) in one
process so that machine load hits both alike; the table reports the median
of the rounds per setting: fp32, fp32 with both networks and inputs in
channels-last memory format, and bf16 autocast where the machine runs bf16
natively (``diffusionforge.machine.native_bf16``; skipped on fp32-only CPUs,
where it is emulated and unusably slow). Each row also gives the step's
achieved GFLOP/s (FLOPs by ``FlopCounterMode``) as a fraction of this
machine's fp32 (or bf16) 2048^3 matmul peak (``machine_peak.py``). Then the
ratio of our bf16 step to diffusers' fp32 step (where bf16 ran) and where
our step spends its time (``torch.profiler`` self time per op, bf16 where
it ran, else fp32). Peak memory is measured in a fresh child process per
network: CUDA's ``max_memory_allocated`` on GPU; on CPU the peak resident
set (VmHWM, reset just before) over the resident set of the built model,
i.e. what two training steps add.

    python benchmarks/unet_vs_diffusers.py [--batch 128] [--rounds 5] [--steps 3] [--device cpu]

The fp32-only kind of CPU (AVX2, no AVX-512) can be reproduced on an
AVX-512 machine with ``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
ATEN_CPU_CAPABILITY=avx2``; the header line says which ISA ran.

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
from machine_peak import matmul_gflops
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffusionforge.backbones.unet import UNet, UNetConfig
from diffusionforge.config.schema import OptimConfig
from diffusionforge.machine import cpu_model, native_bf16

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
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # --clock choices
SETTINGS = {  # row name -> (bf16 autocast, channels-last memory format)
    "fp32": (False, False),
    "fp32 channels-last": (False, True),
    "bf16": (True, False),
}


def make_step(model: nn.Module, batch: int, device: str, bf16: bool, channels_last: bool = False):
    """One training step of ``model`` on a fixed random batch; the optimiser as ``GenerativeModel`` builds it."""
    cfg = OptimConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 1, SIZE, SIZE, device=device).contiguous(memory_format=memory_format)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, steps: int, device: str, clock=time.perf_counter) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = clock()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (clock() - start) / steps


def step_gflop(step) -> float:
    """FLOPs of one call of ``step`` (forward + backward; the optimiser's elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def peak_memory_child(name: str, batch: int, device: str, setting: str, queue) -> None:
    torch.manual_seed(0)
    bf16, channels_last = SETTINGS[setting]
    model = NETWORKS[name]().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = make_step(model, batch, device, bf16, channels_last)
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


def peak_memory_mib(name: str, batch: int, device: str, setting: str) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=peak_memory_child, args=(name, batch, device, setting, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def measure_setting(models: dict, setting: str, args, peak: dict) -> dict:
    """Alternating rounds of both networks in one setting -> one table row."""
    bf16, channels_last = SETTINGS[setting]
    if channels_last:
        models = {name: m.to(memory_format=torch.channels_last) for name, m in models.items()}
    steps = {name: make_step(m, args.batch, args.device, bf16, channels_last) for name, m in models.items()}
    gflop = {name: step_gflop(step) for name, step in steps.items()}  # also the warm-up
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(step, args.steps, args.device, CLOCKS[args.clock]))
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    rate = {name: args.batch / s for name, s in seconds.items()}
    memory = {name: peak_memory_mib(name, args.batch, args.device, setting) for name in models}
    for m in models.values():
        m.to(memory_format=torch.contiguous_format)
    peak_gflops = peak["bf16" if bf16 else "fp32"]
    return dict(setting=setting, ours_images_per_s=round(rate["ours"], 1),
                diffusers_images_per_s=round(rate["diffusers"], 1), ratio=round(rate["ours"] / rate["diffusers"], 3),
                **{f"{name}_fraction_of_peak": round(gflop[name] / seconds[name] / peak_gflops, 3) for name in models},
                ours_peak_mib=round(memory["ours"], 1), diffusers_peak_mib=round(memory["diffusers"], 1),
                ours_gflop_per_step=round(gflop["ours"], 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per setting")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per network per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time: steadier on a loaded machine "
                             "with OMP_NUM_THREADS=1 (img/s then means per core-second)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "unet_vs_diffusers.json"))
    args = parser.parse_args()
    bf16_native = native_bf16()
    settings = [name for name, (bf16, _) in SETTINGS.items() if bf16_native or not bf16]
    peak = {"fp32": matmul_gflops(2048, torch.float32)}
    if bf16_native:
        peak["bf16"] = matmul_gflops(2048, torch.bfloat16)
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, ISA {isa}, native bf16: {bf16_native}; "
          + ", ".join(f"{k} matmul peak {v:.1f} GFLOP/s" for k, v in peak.items()))
    torch.manual_seed(0)
    models = {name: cls().to(args.device) for name, cls in NETWORKS.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print(f"parameters: ours {params['ours']:,}  diffusers {params['diffusers']:,}; batch {args.batch}, "
          f"{args.rounds} alternating rounds of {args.steps} steps, {args.clock} clock, medians")
    print(f"{'setting':18s} {'ours img/s':>10s} {'diffusers img/s':>15s} {'ratio':>6s} {'ours peak':>9s} "
          f"{'diff. peak':>10s} {'ours MiB':>9s} {'diffusers MiB':>13s}")
    rows = []
    for setting in settings:
        row = measure_setting(models, setting, args, peak)
        rows.append(row)
        print(f"{setting:18s} {row['ours_images_per_s']:10.1f} {row['diffusers_images_per_s']:15.1f} "
              f"{row['ratio']:6.3f} {row['ours_fraction_of_peak']:9.1%} {row['diffusers_fraction_of_peak']:10.1%} "
              f"{row['ours_peak_mib']:9.0f} {row['diffusers_peak_mib']:13.0f}", flush=True)
    by_setting = {row["setting"]: row for row in rows}
    fastest = None
    if "bf16" in by_setting:
        fastest = round(by_setting["bf16"]["ours_images_per_s"] / by_setting["fp32"]["diffusers_images_per_s"], 3)
        print(f"ours bf16 autocast / diffusers fp32: {fastest:.2f}x")
    profile = where_the_time_goes(models["ours"], args.batch, args.device, bf16_native)
    print(f"where ours spends a {'bf16' if bf16_native else 'fp32'} training step (torch.profiler, self time):")
    for name, ms in profile:
        print(f"  {ms:8.1f} ms  {name}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "batch": args.batch, "device": args.device, "cpu": cpu_model(), "isa": isa, "native_bf16": bf16_native,
        "threads": torch.get_num_threads(), "clock": args.clock, "rounds": args.rounds, "steps_per_round": args.steps,
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()}, "parameters": params, "rows": rows,
        "ours_bf16_over_diffusers_fp32": fastest,
        "ours_profile_ms": [{"op": n, "ms": round(ms, 1)} for n, ms in profile]},
        indent=2) + "\n")


def where_the_time_goes(model: nn.Module, batch: int, device: str, bf16: bool,
                        top: int = 10) -> list[tuple[str, float]]:
    """The ops with the most self time over two training steps (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(model, batch, device, bf16)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step(), step()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [(e.key, getattr(e, key) / 1000 / 2) for e in events]


if __name__ == "__main__":
    main()

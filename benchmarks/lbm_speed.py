"""Wall time per image: a 1-step bridge (LBM) translation against DDIM-50 of a latent diffusion model.

Both runs work on the same first stage (e.g. fashion-lbm-sr and fashion-ldm
on one fashion-vae run): the times include encoding the source (LBM),
the network evaluations (1 vs 50, or 100 with guidance) and decoding. Each
is timed ``--rounds`` times on the same batch, alternating, after a warm-up
pass; medians are reported. Writes benchmarks/results/lbm_speed.json.

    python benchmarks/lbm_speed.py LBM_RUN LDM_RUN [--batch 256] [--rounds 5] [--guidance 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffusionforge.data.datamodule import ImageDataModule
from diffusionforge.models.generative import SampleRequest
from diffusionforge.tasks import load_run_model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lbm_run")
    parser.add_argument("ldm_run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=2.0, help="DDIM's classifier-free guidance (1 = off)")
    parser.add_argument("--lbm-steps", type=int, default=1)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lbm_speed.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    lbm, lbm_config = load_run_model(args.lbm_run)
    ldm, ldm_config = load_run_model(args.ldm_run)
    datamodule = ImageDataModule(lbm_config.data, seed=lbm_config.seed)
    datamodule.setup("test")
    batch = next(iter(DataLoader(datamodule.test_set, batch_size=args.batch)))
    labels = ldm.label_batch(batch["class_label"]) if ldm.num_classes else {}
    request = SampleRequest(sampler="ddim", steps=args.ddim_steps, spacing=ldm_config.sample.spacing,
                            guidance=args.guidance, clip_denoised=ldm_config.sample.clip_denoised)
    jobs = {
        f"lbm_{args.lbm_steps}_step": lambda: lbm.translate(batch, steps=args.lbm_steps,
                                                           generator=torch.Generator().manual_seed(0)),
        f"ddim_{args.ddim_steps}": lambda: ldm.sample(labels, len(batch["image"]), request,
                                                      generator=torch.Generator().manual_seed(0)),
    }
    for job in jobs.values():  # warm-up
        job()
    times = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            times[name].append(timed(job) / args.batch)
    per_image = {name: statistics.median(t) for name, t in times.items()}
    names = list(jobs)
    ratio = per_image[names[1]] / per_image[names[0]]
    result = {"seconds_per_image": per_image, "ratio_ddim_over_lbm": ratio, "batch": args.batch,
              "rounds": args.rounds, "guidance": args.guidance, "threads": torch.get_num_threads(),
              "lbm_run": str(args.lbm_run), "ldm_run": str(args.ldm_run)}
    for name in names:
        print(f"{name:10s} {per_image[name] * 1000:9.3f} ms/image")
    print(f"DDIM-{args.ddim_steps} / LBM-{args.lbm_steps}: {ratio:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

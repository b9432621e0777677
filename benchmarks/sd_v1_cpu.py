"""Stable Diffusion v1 at full size on this CPU, random weights, 512x512: memory and seconds per DDIM step.

The model is the one `dforge import` builds from a CompVis v1 file
(``tasks/imported._sd_plan`` + ``_build``: our UNet at
``interop.unet.sd_v1_unet_config()``, our AutoencoderKL at
``interop.vae.sd_v1_vae_config()``, a ``transformers.CLIPTextModel`` at
``interop.pipelines.sd_v1_text_config()``, 1.07 B parameters, plus the EMA
copy of backbone + text encoder every run holds), with random weights instead
of a checkpoint (the speed does not depend on the values; the tokenizer is a
tiny letter vocabulary, 77 tokens padded as SD). Sampling is what `dforge
sample RUN --prompt P --steps N --guidance 7.5 --num 1` does, split into its
parts and timed with ``time.perf_counter``:

- text encoding: prompt + empty prompt (classifier-free guidance's two
  encodings), timed on the second call;
- DDIM steps through ``samplers.SAMPLERS["ddim"]`` with guidance 7.5 (one
  UNet call on a batch of 2 per step), a 4x64x64 latent; the first step is the
  warm-up, the others are averaged;
- the VAE decode of the 4x64x64 latent to 3x512x512 (one call).

Peak resident memory (``VmHWM``) is read twice: after building the model, and
for sampling alone (reset through ``/proc/self/clear_refs`` after the build).
Each precision runs in its own process: ``fp32``; ``bf16``, the run's
``--precision bf16`` (the UNet under CPU autocast: its fp32 weights are cast
at every call; text encoder and VAE in fp32), only where the CPU has native
bf16 (AVX512-BF16 or AMX). Writes benchmarks/results/sd_v1_cpu.json.

    python benchmarks/sd_v1_cpu.py [--steps 3] [--precision fp32 bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from unet_vs_diffusers import reset_peak_rss, rss_kib  # VmHWM / VmRSS, and the peak's reset (Linux)

from diffusionforge.machine import native_bf16

PROMPT = "a photo of an astronaut riding a horse"
GUIDANCE = 7.5
PRECISIONS = ("fp32", "bf16")


def write_text_encoder(folder: Path) -> None:
    """A random full-size SD v1 CLIP text encoder and a tiny letter tokenizer, as a diffusers folder."""
    import transformers

    from diffusionforge.interop.pipelines import sd_v1_text_config

    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*"abcdefghijklmnopqrstuvwxyz", *(c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz")]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**sd_v1_text_config())).save_pretrained(str(folder))


def build_model(text_dir: Path):
    """The GenerativeModel `dforge import` makes of an SD v1 CompVis file, with random weights."""
    from diffusionforge.backbones.unet import UNet
    from diffusionforge.first_stage.autoencoder import AutoencoderKL
    from diffusionforge.interop.pipelines import sd_v1_scheduler_settings
    from diffusionforge.interop.unet import sd_v1_unet_config
    from diffusionforge.interop.vae import sd_v1_vae_config
    from diffusionforge.tasks import imported

    unet, vae = UNet(sd_v1_unet_config()).eval(), AutoencoderKL(sd_v1_vae_config()).eval()
    plan = imported._sd_plan(Path("sd-v1-random"), unet, vae, vae.config.scaling_factor, 64,
                             sd_v1_scheduler_settings(), text_dir, text_dir, None, "random SD v1")
    config = imported._with_text_path(plan.config, str(text_dir))
    counts: dict[str, int] = {}
    model = imported._build(config, plan, counts)
    return model, config, counts


def measure(precision: str, steps: int) -> dict:
    """One precision in this process: build, encode, walk ``steps`` DDIM steps, decode."""
    from diffusionforge.models.generative import SampleRequest
    from diffusionforge.samplers import autocast_denoise, classifier_free_guidance, sampler_entry

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        text_dir = Path(tmp) / "text_encoder"
        write_text_encoder(text_dir)
        start = time.perf_counter()
        model, config, counts = build_model(text_dir)
        build_s = time.perf_counter() - start
    build_peak = rss_kib("VmHWM")
    reset_peak_rss()
    net = model.sampling_net()
    batch = {"caption": [PROMPT]}
    model._conditions(net, batch, model.first_stage)  # warm-up
    for conditioner in net["conditioner"].conditioners:
        conditioner._cache.clear()  # time the encoder, not the text conditioner's cache of recent captions
    start = time.perf_counter()
    cond, uncond = model._conditions(net, batch, model.first_stage)
    text_s = time.perf_counter() - start
    denoise = net["backbone"]
    if precision == "bf16":
        denoise = autocast_denoise(denoise, "cpu")
    denoise = classifier_free_guidance(denoise, GUIDANCE, uncond)
    request = SampleRequest(sampler="ddim", steps=steps, spacing=config.sample.spacing, guidance=GUIDANCE,
                            clip_denoised=config.sample.clip_denoised)
    entry = sampler_entry(request.sampler, model.objective)
    options = {name: getattr(request, name) for name in entry.options}
    stamps = [time.perf_counter()]
    x_T = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    out = entry.fn(denoise, model.process, x_T, cond, num_steps=steps, progress=False,
                   callback=lambda *_: stamps.append(time.perf_counter()), **options)
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    start = time.perf_counter()
    image = model.first_stage.decode(out.sample)
    decode_s = time.perf_counter() - start
    return dict(precision=precision, threads=torch.get_num_threads(), parameters=counts,
                latent=list(model.latent_shape), image=list(image.shape[1:]), build_s=build_s,
                build_peak_gib=build_peak / 2**20, sampling_peak_gib=rss_kib("VmHWM") / 2**20,
                text_encode_s=text_s, warmup_step_s=step_s[0], step_s=step_s[1:],
                mean_step_s=sum(step_s[1:]) / max(1, len(step_s) - 1), vae_decode_s=decode_s)


def report(results: list[dict]) -> None:
    first = results[0]
    total = sum(first["parameters"].values())
    print(f"SD v1, random weights, {first['image'][1]}x{first['image'][2]} (latent {first['latent']}), batch 1, "
          f"DDIM with guidance {GUIDANCE} (UNet batch 2), {first['threads']} threads, {total:,} parameters")
    print(f"{'precision':<10}{'build s':>9}{'build peak GiB':>16}{'sampling peak GiB':>19}{'text s':>8}"
          f"{'warm-up step s':>16}{'s / DDIM step':>15}{'VAE decode s':>14}")
    for r in results:
        print(f"{r['precision']:<10}{r['build_s']:>9.1f}{r['build_peak_gib']:>16.2f}{r['sampling_peak_gib']:>19.2f}"
              f"{r['text_encode_s']:>8.2f}{r['warmup_step_s']:>16.1f}{r['mean_step_s']:>15.1f}"
              f"{r['vae_decode_s']:>14.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps; the first is the warm-up (default 3)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sd_v1_cpu.json"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.precision[0], args.steps)))
        return 0
    results = []
    for precision in args.precision:
        if precision == "bf16" and not native_bf16():
            print("bf16: skipped, no native bf16 on this CPU (AVX512-BF16 / AMX)")
            continue
        command = [sys.executable, __file__, "--one", "--steps", str(args.steps), "--precision", precision]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"{precision}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not results:
        return 1
    report(results)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

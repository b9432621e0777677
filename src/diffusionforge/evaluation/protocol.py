"""The protocol recorded beside every reported number.

FID and accuracy drift silently with sample count, sampler, guidance, seed,
weights and feature network; ``metrics.json`` therefore stores all of them
with the numbers, plus the package version and git commit.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .. import __version__


@dataclass
class EvalProtocol:
    num_samples: int           # generated images scored
    sampler: str               # a samplers.names.SAMPLER_NAMES name: ddpm, ddim, euler, heun, dpmpp_2m, ...
    steps: int                 # sampling steps
    eta: float                 # DDIM eta
    spacing: str               # timestep spacing
    schedule: str              # sigma schedule of the sigma samplers: discrete | karras | exponential
    guidance: float            # classifier-free guidance scale
    guidance_channels: Optional[int]  # output channels guided; None = all prediction channels
    seed: int                  # seed of the sampling noise
    weights: str               # ema | raw
    precision: str             # fp32 | bf16: the network's arithmetic while sampling
    features: str              # feature network name
    features_sha256: str       # sha256 of its weights file
    reference_split: str       # e.g. fashion-mnist-embedded/test
    reference_size: int        # real images in the reference set
    package_version: str = __version__
    git_commit: str = ""


def git_commit(path: Path = Path(__file__).resolve().parent) -> str:
    """The commit of the checkout the package runs from, or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def protocol_dict(protocol: EvalProtocol) -> dict:
    return asdict(protocol)

"""Score an image-to-image (bridge) run on its paired test split: PSNR, SSIM, FID, KID.

The first ``num`` test images ``x`` are degraded exactly as in training
(``data.degradation``, deterministic per image: the pairs are the same on
every call), translated, and compared with ``x``. Beside the model, the
baselines a reader needs to judge it are scored on the same pairs:

==================  ============================================================
``input``           the degraded input as it is: for super-resolution the
                    low-resolution image shown at full size (nearest), else the
                    source (noisy, blurred, or with the hole filled)
``bicubic``         super-resolution only: the low-resolution image upsampled
                    bicubically (the classical baseline)
``lbm_<K>_steps``   the bridge model with K Euler steps, for each K asked
==================  ============================================================

Per method: PSNR and SSIM (as in ``reconstruction``: R = 2 on [-1, 1],
mean over images), FID and KID against the same ``num`` clean images on a
feature network. Inpainting runs also report, for the model, PSNR inside
the hole, the largest change outside it (0: preserved) and the same before
the known pixels are pasted back (what the network alone keeps). Its FID is
that of the filled images: they differ from the real ones only in the holes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..data.datamodule import ImageDataModule
from ..data.degradations import low_resolution, upsample
from ..errors import ConfigError
from ..metrics.features import load_feature_network
from .evaluate import choose_features, image_shape
from .protocol import git_commit
from .reconstruction import DATA_RANGE, SSIM_KERNEL, SSIM_SIGMA


@dataclass
class PairedProtocol:
    num_images: int            # test pairs translated and scored
    kind: str                  # data.degradation.kind
    degradation: dict          # the data.degradation settings that made the pairs
    steps: list                # Euler steps of the lbm_<K>_steps rows
    seed: int                  # seed of the bridge noise (matters for K > 1)
    weights: str               # ema | raw
    precision: str             # fp32 | bf16
    features: str              # feature network of FID/KID
    features_sha256: str
    reference_split: str       # e.g. fashion-mnist-embedded/test
    git_commit: str = ""


class MethodScores:
    """Accumulates PSNR, SSIM and the FID/KID features of one method against the clean images."""

    def __init__(self, network, shape):
        self.psnr = PeakSignalNoiseRatio(data_range=DATA_RANGE, dim=(1, 2, 3))
        self.ssim = StructuralSimilarityIndexMeasure(data_range=DATA_RANGE, kernel_size=SSIM_KERNEL,
                                                     sigma=SSIM_SIGMA)
        self.distribution = network.metrics(shape)
        self.seconds = 0.0
        self.extra: dict[str, float] = {}

    def update(self, images, target) -> None:
        images = images.float().cpu().clamp(-1, 1)
        self.psnr.update(images, target)
        self.ssim.update(images, target)
        self.distribution.update(target, real=True)
        self.distribution.update(images, real=False)

    def compute(self, num: int) -> dict:
        scores = self.distribution.compute()
        out = {"psnr": float(self.psnr.compute()), "ssim": float(self.ssim.compute()), "fid": scores.fid,
               "kid_mean": scores.kid_mean, "kid_std": scores.kid_std, **self.extra}
        if self.seconds:
            out["seconds_per_image"] = round(self.seconds / num, 5)
        return out


def _hole_psnr(images, target, hole) -> torch.Tensor:
    """(B,) PSNR over the hole pixels of each image (R = 2)."""
    channels = images.shape[1]
    err = ((images - target) ** 2 * hole).flatten(1).sum(1) / (hole.flatten(1).sum(1) * channels).clamp(min=1)
    return 10 * torch.log10(DATA_RANGE ** 2 / err.clamp(min=1e-12))


@torch.no_grad()
def evaluate_bridge_run(model, config, num: int, steps: Sequence[int], batch_size: int = 250,
                        features: Optional[str] = None, seed: int = 0, use_ema: bool = True,
                        precision: str = "fp32") -> dict:
    """metrics.json record of a bridge run: ``{"metrics": {method: scores}, "protocol": {...}}``."""
    degradation = config.data.degradation
    datamodule = ImageDataModule(config.data, seed=config.seed)
    datamodule.setup("test")
    if datamodule.test_set is None:
        raise ConfigError(f"data.name: {config.data.name} has no test split to evaluate the pairs on")
    pairs = Subset(datamodule.test_set, range(min(num, len(datamodule.test_set))))
    network = load_feature_network(choose_features(config.data.name, features))
    shape = image_shape(config)
    methods = ["input"] + (["bicubic"] if degradation.kind == "super_resolution" else [])
    methods += [f"lbm_{k}_steps" for k in steps]
    scores = {name: MethodScores(network, shape) for name in methods}
    hole_psnr: dict[int, list] = {k: [] for k in steps}
    outside_raw: dict[int, float] = {k: 0.0 for k in steps}
    outside_pasted: dict[int, float] = {k: 0.0 for k in steps}
    generator = torch.Generator(model.device).manual_seed(seed)
    for batch in DataLoader(pairs, batch_size=batch_size):
        target = batch["image"]
        source = batch[model.source_key]
        if degradation.kind == "super_resolution":
            low = low_resolution(target, degradation.scale)
            scores["input"].update(upsample(low, target.shape[-2:], "nearest"), target)
            scores["bicubic"].update(upsample(low, target.shape[-2:], "bicubic"), target)
        else:
            scores["input"].update(source, target)
        for k in steps:
            start = time.perf_counter()
            images = model.translate(batch, steps=k, generator=generator, use_ema=use_ema,
                                     precision=precision, paste=False).float().cpu()
            scores[f"lbm_{k}_steps"].seconds += time.perf_counter() - start
            if "mask" in batch and model.paste_key is not None:
                hole = batch["mask"]
                outside_raw[k] = max(outside_raw[k], float(((images - target).abs() * (1 - hole)).max()))
                images = hole * images + (1 - hole) * source
                outside_pasted[k] = max(outside_pasted[k], float(((images - target).abs() * (1 - hole)).max()))
                hole_psnr[k].append(_hole_psnr(images, target, hole))
            scores[f"lbm_{k}_steps"].update(images, target)
    for k in steps:
        if hole_psnr[k]:
            scores[f"lbm_{k}_steps"].extra.update(
                psnr_hole=float(torch.cat(hole_psnr[k]).mean()),
                outside_max_abs_diff=outside_pasted[k], outside_max_abs_diff_unpasted=outside_raw[k])
    metrics = {name: s.compute(len(pairs)) for name, s in scores.items()}
    protocol = PairedProtocol(
        num_images=len(pairs), kind=degradation.kind, degradation=asdict(degradation), steps=list(steps),
        seed=seed, weights="ema" if use_ema else "raw", precision=precision, features=network.name,
        features_sha256=network.sha256, reference_split=f"{config.data.name}/test", git_commit=git_commit())
    return {"metrics": metrics, "protocol": asdict(protocol)}

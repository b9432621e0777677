"""Score an autoencoder by reconstruction: PSNR, SSIM, rFID and rKID on the test split.

The first ``num`` images ``x`` of the test split are encoded and decoded
through the posterior mode, ``xhat = D(mode q(z | x))``, clamped to [-1, 1];
no noise is drawn, so the same command gives the same numbers.

Notation
--------
==========  ================================================================
``x, xhat``  test image and reconstruction ``(B, C, H, W)`` in [-1, 1]
``PSNR``     ``10 log10(R^2 / mean((x - xhat)^2))`` per image with
             ``R = 2`` (the range of [-1, 1]; equal to PSNR on [0, 1] images
             with R = 1), averaged over images, in dB
``SSIM``     Wang et al. 2004, Eq. 13, gaussian window 11 px, sigma 1.5,
             ``R = 2``: torchmetrics, which averages over all pixels with the
             borders reflect-padded (skimage averages only the interior; on
             28x28 images the two differ by a few hundredths), mean over images
``rFID``     FID between the reconstructions and the same ``num`` real
             images on a feature network (``metrics.features``)
``rKID``     KID (mean, std over subsets) on the same features
==========  ================================================================
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from .. import __version__
from ..errors import ConfigError
from ..first_stage.autoencoder import AutoencoderKL
from ..metrics.classifier import file_sha256
from ..metrics.features import load_feature_network
from .evaluate import choose_features, image_shape, split_images
from .protocol import git_commit

__all__ = ["ReconstructionProtocol", "ReconstructionResult", "evaluate_autoencoder",
           "reconstruction_record"]

DATA_RANGE = 2.0  # max - min of images in [-1, 1], for PSNR and SSIM
SSIM_KERNEL = 11  # gaussian window of SSIM (torchmetrics default, Wang et al. 2004)
SSIM_SIGMA = 1.5  # its standard deviation


@dataclass
class ReconstructionResult:
    psnr: float                    # dB, mean over images (R = 2 on [-1, 1])
    ssim: float                    # mean over images
    rfid: float                    # FID(reconstructions, originals)
    rkid_mean: float               # KID(reconstructions, originals), mean over subsets
    rkid_std: float                # ... and its std
    reconstruction_seconds: float  # wall time of encode + decode (not scoring)


@dataclass
class ReconstructionProtocol:
    num_images: int                # test images reconstructed and scored
    posterior: str                 # which latent is decoded: the posterior mode
    features: str                  # feature network of rFID/rKID
    features_sha256: str           # sha256 of its weights file
    reference_split: str           # e.g. fashion-mnist-embedded/test
    reference_size: int            # real images in the rFID reference (= num_images)
    weights: Optional[str] = None  # the autoencoder's weights file, when known
    weights_sha256: Optional[str] = None
    package_version: str = __version__
    git_commit: str = ""


def first_test_images(config, num: Optional[int]):
    """The first ``num`` images of the test split (all of them when None)."""
    dataset = split_images(config, "test")
    if num is None:
        return dataset
    if num < 2:
        raise ConfigError(f"--num: must be >= 2 images, got {num}")
    return Subset(dataset, range(min(num, len(dataset))))


@torch.no_grad()
def evaluate_autoencoder(autoencoder: AutoencoderKL, config, num: Optional[int] = None,
                         batch_size: int = 250, features: Optional[str] = None,
                         weights: Optional[Path] = None) -> tuple[ReconstructionResult, dict]:
    """Reconstruct the first ``num`` test images and score them against the originals.

    ``weights``: the file the autoencoder was loaded from, recorded with its sha256.
    Returns the numbers and the protocol (``asdict`` of ``ReconstructionProtocol``).
    """
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    network = load_feature_network(choose_features(config.data.name, features))
    distribution = network.metrics(image_shape(config))
    psnr = PeakSignalNoiseRatio(data_range=DATA_RANGE, dim=(1, 2, 3))  # per image, then mean
    ssim = StructuralSimilarityIndexMeasure(data_range=DATA_RANGE, kernel_size=SSIM_KERNEL,
                                            sigma=SSIM_SIGMA)
    dataset, seconds = first_test_images(config, num), 0.0
    for batch in DataLoader(dataset, batch_size=batch_size):
        x = batch["image"]  # (B, C, H, W) in [-1, 1]
        start = time.perf_counter()
        x_hat = autoencoder.decode(autoencoder.encode(x.to(device)).mode()).float().cpu()
        seconds += time.perf_counter() - start
        x_hat = x_hat.clamp(-1, 1)
        psnr.update(x_hat, x)
        ssim.update(x_hat, x)
        distribution.update(x, real=True)
        distribution.update(x_hat, real=False)
    scores = distribution.compute()
    result = ReconstructionResult(float(psnr.compute()), float(ssim.compute()), scores.fid,
                                  scores.kid_mean, scores.kid_std, seconds)
    protocol = ReconstructionProtocol(
        num_images=len(dataset), posterior="mode", features=network.name,
        features_sha256=network.sha256, reference_split=f"{config.data.name}/test",
        reference_size=len(dataset), weights=weights.name if weights is not None else None,
        weights_sha256=file_sha256(weights) if weights is not None else None,
        git_commit=git_commit())
    return result, asdict(protocol)


def reconstruction_record(result: ReconstructionResult, protocol: dict) -> dict:
    """metrics.json: the numbers, the wall time (which varies run to run) and the protocol."""
    metrics = asdict(result)
    seconds = metrics.pop("reconstruction_seconds")
    timing = {"reconstruction_seconds": round(seconds, 2),
              "seconds_per_image": round(seconds / protocol["num_images"], 5)}
    return {"metrics": metrics, "timing": timing, "protocol": protocol}

"""Inception-v3 FID (Heusel et al. 2017) from locally present weights only.

The standard FID network is torch-fidelity's port of the TF Inception-v3
("pt_inception-2015-12-05"). Its weights cannot be fetched on machines
without internet, and a silent download attempt hangs there. This module
therefore only *finds* the weights file — ``$DFORGE_INCEPTION_WEIGHTS``, or
the file name torch-fidelity uses in the torch hub cache — and otherwise
raises a one-line ``CheckpointError`` saying where it looked. Nothing is
ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..errors import CheckpointError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name
WEIGHTS_ENV = "DFORGE_INCEPTION_WEIGHTS"
INCEPTION_DIM = 2048  # pool3 features used by FID


def inception_search_paths() -> list[Path]:
    """Where the weights may be: the env variable, then the torch hub checkpoint cache."""
    paths = []
    if os.environ.get(WEIGHTS_ENV):
        paths.append(Path(os.environ[WEIGHTS_ENV]))
    paths.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    return paths


def find_inception_weights() -> Path:
    """The local Inception-v3 FID weights file, or a one-line CheckpointError."""
    for path in inception_search_paths():
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in inception_search_paths())
    raise CheckpointError(f"Inception-v3 FID weights not found (looked in {looked}); copy "
                          f"{INCEPTION_FILE} there or set ${WEIGHTS_ENV}; nothing is downloaded")


def _require_torch_fidelity() -> None:
    if importlib.util.find_spec("torch_fidelity") is None:
        raise CheckpointError("Inception-v3 FID needs torch-fidelity: pip install torch-fidelity")


def load_inception() -> torch.nn.Module:
    """torchmetrics' FID Inception-v3 on the local weights: uint8 (B, 3, H, W) -> (B, 2048)."""
    path = find_inception_weights()
    _require_torch_fidelity()
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_DIM)],
                              feature_extractor_weights_path=str(path)).eval()


def inception_fid(**kwargs):
    """A torchmetrics ``FrechetInceptionDistance`` on the local Inception-v3 weights (2048-d)."""
    path = find_inception_weights()
    _require_torch_fidelity()
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=INCEPTION_DIM, feature_extractor_weights_path=str(path),
                                    **kwargs)

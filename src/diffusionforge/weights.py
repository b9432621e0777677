"""Weights on disk: safetensors state dicts beside the resolved config.

Sampling weights are written as ``model.safetensors`` (EMA) and
``model_raw.safetensors`` (the trained weights) in the run directory, next
to ``config.yaml``. Nothing is loaded with pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError
from .utils.atomic import atomic_path


def save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write module's state dict as safetensors, atomically; non-finite weights are refused."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{path}: not written: tensor '{bad}' holds non-finite values (NaN or inf)")
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; weights are meant to be shared
    return path


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or inf, else None."""
    for name, value in tensors.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def load_weights(module: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights into module; a mismatch is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    check_state_fits(module, state, path)
    module.load_state_dict(state)
    return module


def check_state_fits(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}"
                        f" vs model {tuple(expected[k].shape)})")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the configured architecture: "
                              + "; ".join(problems))

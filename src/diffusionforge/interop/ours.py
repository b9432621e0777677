"""Our own single-network format: a folder with ``config.json`` and ``model.safetensors``.

=====================  =================================================================
file                   contents
=====================  =================================================================
``config.json``        ``{"format": "diffusionforge", "kind": "vae" | "unet" | "dit", **asdict(config)}``
``model.safetensors``  the network's state dict (our keys = CompVis LDM names)
=====================  =================================================================

``kind`` picks the config dataclass and network from ``KINDS``:
``"vae"`` = ``AutoencoderConfig`` / ``AutoencoderKL``, ``"unet"`` = ``UNetConfig`` / ``UNet``,
``"dit"`` = ``LabelDiTConfig`` / ``LabelDiT`` (keys = the official DiT state dict).
Nothing is pickled; every failure is a one-line ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Union

from torch import nn

from diffusionforge.backbones.dit import LabelDiT, LabelDiTConfig
from diffusionforge.backbones.unet import UNet, UNetConfig
from diffusionforge.errors import CheckpointError, DForgeError
from diffusionforge.first_stage.autoencoder import AutoencoderConfig, AutoencoderKL
from diffusionforge.weights import load_weights, save_weights

from .files import read_json

__all__ = [
    "KINDS",
    "OURS_CONFIG_NAME",
    "OURS_FORMAT",
    "OURS_WEIGHTS_NAME",
    "Kind",
    "NetworkKind",
    "config_from_dict",
    "load_ours",
    "save_ours",
]

Kind = Literal["vae", "unet", "dit"]
OURS_FORMAT = "diffusionforge"  # the "format" entry of our config.json
OURS_CONFIG_NAME = "config.json"
OURS_WEIGHTS_NAME = "model.safetensors"


class NetworkKind(NamedTuple):
    """The config dataclass and the network class of one ``Kind``."""

    config: type
    network: type[nn.Module]


KINDS: dict[str, NetworkKind] = {
    "vae": NetworkKind(AutoencoderConfig, AutoencoderKL),
    "unet": NetworkKind(UNetConfig, UNet),
    "dit": NetworkKind(LabelDiTConfig, LabelDiT),
}


def config_from_dict(kind: Kind, data: Mapping[str, Any]) -> Any:
    """The config dataclass of ``kind`` from its fields (lists become tuples).

    Raises ``ConfigError`` (from the dataclass checks) or ``CheckpointError``
    naming an unknown field.
    """
    cls = KINDS[kind].config
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in known]
    if unknown:
        raise CheckpointError(f"unknown {cls.__name__} field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return cls(**data)


def save_ours(model: nn.Module, kind: Kind, directory: Union[str, Path]) -> Path:
    """Write ``model`` (the network of ``kind``) as ``directory/config.json`` + ``model.safetensors``; returns it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not isinstance(model, KINDS[kind].network):
        raise ValueError(f"kind {kind!r} needs a {KINDS[kind].network.__name__}, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / OURS_WEIGHTS_NAME, metadata={"format": "pt", "kind": kind})
    config = {"format": OURS_FORMAT, "kind": kind, **dataclasses.asdict(model.config)}
    (directory / OURS_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_ours(directory: Union[str, Path]) -> tuple[nn.Module, Kind]:
    """``(network in eval mode, kind)`` from a folder written by ``save_ours``."""
    config_path = Path(directory) / OURS_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: file not found (expected a diffusionforge network folder)")
    data = read_json(config_path)
    fmt, kind = data.pop("format", None), data.pop("kind", None)
    if fmt != OURS_FORMAT:
        raise CheckpointError(f"{config_path}: \"format\" must be {OURS_FORMAT!r}, got {fmt!r}")
    if kind not in KINDS:
        raise CheckpointError(f"{config_path}: \"kind\" must be one of {sorted(KINDS)}, got {kind!r}")
    try:
        config = config_from_dict(kind, data)
    except DForgeError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    model = KINDS[kind].network(config)
    load_weights(model, Path(directory) / OURS_WEIGHTS_NAME)
    return model.eval(), kind

"""File helpers shared by the interop modules: diffusers model folders, JSON, safetensors, checked loading.

A diffusers model folder holds ``config.json`` and
``diffusion_pytorch_model.safetensors``; a pipeline folder holds one such
folder per network (``vae/``, ``unet/``, ...). Every failure is a one-line
``CheckpointError`` that names the file and, for weights, the model kind and
the first offending key with its shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Union

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffusionforge.errors import CheckpointError, DForgeError

__all__ = [
    "DIFFUSERS_CONFIG_NAME",
    "DIFFUSERS_WEIGHTS_NAME",
    "diffusers_folder",
    "first_line",
    "load_checked",
    "read_json",
    "read_safetensors",
    "write_diffusers_folder",
]

DIFFUSERS_CONFIG_NAME = "config.json"  # file names inside a diffusers model folder
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; CheckpointError (one line, naming ``path``) when unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read JSON: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; CheckpointError naming ``path`` when it cannot be read."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors: {first_line(err)}") from None


def diffusers_folder(directory: Union[str, Path], subfolder: str, kind: str) -> tuple[Path, Path]:
    """``(config.json, weights)`` paths of a diffusers model folder, checked to exist.

    ``directory`` may also be a pipeline folder whose ``subfolder`` (e.g.
    ``"vae"``) is the model folder. ``kind`` (e.g. ``"AutoencoderKL"``) names
    what was expected in the error.
    """
    directory = Path(directory)
    nested = directory / subfolder
    if not (directory / DIFFUSERS_CONFIG_NAME).is_file() and (nested / DIFFUSERS_CONFIG_NAME).is_file():
        directory = nested
    config_path, weights_path = directory / DIFFUSERS_CONFIG_NAME, directory / DIFFUSERS_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (expected a diffusers {kind} folder)")
    return config_path, weights_path


def write_diffusers_folder(directory: Union[str, Path], config: Mapping[str, Any], state: Mapping[str, Tensor]) -> Path:
    """Write a diffusers model folder (``config.json`` + safetensors weights); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    save_file(tensors, str(directory / DIFFUSERS_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / DIFFUSERS_CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return directory


def load_checked(
    model: nn.Module, state: Mapping[str, Tensor], source: str, kind: str, name: Callable[[str], str] = str
) -> nn.Module:
    """``model.load_state_dict(state)`` after naming the first unexpected, missing or mis-shaped key.

    ``source`` (a file, or e.g. "CompVis UNet state dict") starts the message,
    ``kind`` (e.g. "UNet") names the model; ``name`` maps one of our keys to
    how ``source`` spells it. Returns ``model``.
    """
    expected = model.state_dict()
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        key, more = unexpected[0], _more(unexpected)
        shape = tuple(state[key].shape)
        raise CheckpointError(f"{source}: unexpected key {_spell(name, key)!r} with shape {shape} for this {kind}{more}")
    missing = [key for key in expected if key not in state]
    if missing:
        key, more = missing[0], _more(missing)
        shape = tuple(expected[key].shape)
        raise CheckpointError(f"{source}: missing key {_spell(name, key)!r} (shape {shape}) of this {kind}{more}")
    for key, value in expected.items():
        got, want = tuple(state[key].shape), tuple(value.shape)
        if got != want:
            shapes = f"{got} in the checkpoint, {want} expected by this {kind}"
            raise CheckpointError(f"{source}: key {_spell(name, key)!r} has shape {shapes}")
    model.load_state_dict(state, strict=True)
    return model


def _spell(name: Callable[[str], str], key: str) -> str:
    """``name(key)``, or ``key`` itself where ``name`` has no spelling for it."""
    try:
        return name(key)
    except (DForgeError, KeyError, ValueError):
        return key


def _more(keys: list) -> str:
    return f" and {len(keys) - 1} more" if len(keys) > 1 else ""

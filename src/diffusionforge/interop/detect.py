"""Which layout SRC is, and reading the network of one kind from it.

SRC layouts, recognised in this order (a `dforge train` run directory is the
task's business: ``tasks``):

=====================================  ==================================================
SRC                                    read as
=====================================  ==================================================
folder, ``config.json`` ``"format":    our format (``interop.ours``)
"diffusionforge"``
folder with ``config.json``            a diffusers model folder (``_class_name`` must fit the kind)
folder with ``vae/``, ``unet/`` or     a diffusers pipeline folder; the kind's subfolder
``transformer/``
``.ckpt`` / ``.pt`` / ``.pth`` file    a CompVis checkpoint (``torch.load(weights_only=True)``); for
                                       dit an official facebookresearch/DiT one
``.safetensors`` file                  CompVis keys (prefixed or bare); config from ``config_path``
=====================================  ==================================================
"""

from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import torch
import yaml
from torch import Tensor, nn

from ..checkpoints import WEIGHTS_ONLY_FAILURE, imports_objects
from ..errors import CheckpointError, ConfigError, DForgeError
from ..runs import CONFIG_FILE as RUN_CONFIG_FILE  # a run directory is read by its task (tasks/)
from .files import DIFFUSERS_CONFIG_NAME, first_line, read_json, read_safetensors
from .ours import OURS_FORMAT, Kind, config_from_dict, load_ours
from .registry import INTEROP

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")  # read with torch.load(weights_only=True)
SAFETENSORS_SUFFIX = ".safetensors"


class Loaded(NamedTuple):
    """A network read from SRC and the layout it was read as (for the report line)."""

    model: nn.Module
    layout: str  # e.g. "diffusers folder", "CompVis checkpoint"


def load_network(src: Path, kind: Kind, config_path: Optional[Path] = None) -> Loaded:
    """The ``kind`` network in SRC (eval mode); ``config_path`` only for CompVis checkpoint files."""
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if src.is_dir():
        if config_path is not None:
            raise ConfigError(f"--config is for CompVis checkpoint files; the folder {src} has its own config")
        return _load_folder(src, kind)
    return _load_checkpoint_file(src, kind, config_path)


def _load_folder(src: Path, kind: Kind) -> Loaded:
    """Our folder, a diffusers model folder, or a diffusers pipeline folder with the ``kind`` subfolder."""
    config_path = src / DIFFUSERS_CONFIG_NAME
    if config_path.is_file():
        data = read_json(config_path)
        if data.get("format") == OURS_FORMAT:
            model, found = load_ours(src)
            _check_kind(src, found, kind, "diffusionforge folder")
            return Loaded(model, "diffusionforge folder")
        _check_kind(src, _diffusers_kind(config_path, data, kind), kind, "diffusers folder")
        return Loaded(INTEROP[kind].load_diffusers(src), "diffusers folder")
    nested = {k: src / i.subfolder for k, i in INTEROP.items() if (src / i.subfolder / DIFFUSERS_CONFIG_NAME).is_file()}
    if kind in nested:
        return Loaded(_load_folder(nested[kind], kind).model, "diffusers pipeline folder")
    if nested:
        has = ", ".join(f"{INTEROP[k].subfolder}/" for k in nested)
        raise CheckpointError(f"{src}: kind mismatch: this pipeline folder has {has} but no "
                              f"{INTEROP[kind].subfolder}/ for --kind {kind}")
    raise CheckpointError(f"{src}: unknown layout: expected {DIFFUSERS_CONFIG_NAME} (diffusers or diffusionforge "
                          f"network), a pipeline folder with vae/ or unet/, or {RUN_CONFIG_FILE} (a run)")


def _diffusers_kind(config_path: Any, data: Mapping[str, Any], kind: Kind) -> Kind:
    """The kind named by a diffusers config's ``_class_name`` (``kind`` itself when it has none)."""
    name = data.get("_class_name")
    if name is None:
        return kind
    kinds = {i.diffusers_class: k for k, i in INTEROP.items()}
    if name not in kinds:
        raise CheckpointError(f"{config_path}: unknown layout: diffusers class {name!r} is not one of {sorted(kinds)}")
    return kinds[name]


def _check_kind(src: Any, found: str, kind: Kind, layout: str) -> None:
    if found != kind:
        raise CheckpointError(f"{src}: kind mismatch: this {layout} holds a {found}, not a {kind} "
                              f"(pass --kind {found})")


def _load_checkpoint_file(src: Path, kind: Kind, config_path: Optional[Path]) -> Loaded:
    state = read_state_dict(src)
    found = {k for k, i in INTEROP.items() if any(key.startswith(i.compvis_prefix) or key == i.bare_key
                                                  for key in state)}
    if found and kind not in found:
        _check_kind(src, found.pop(), kind, "checkpoint")
    interop = INTEROP[kind]
    config = interop.default_config() if config_path is None else read_network_config(config_path, kind)
    try:
        return Loaded(interop.load_compvis(state, config), "CompVis checkpoint")
    except CheckpointError as err:
        hint = (" (the config is Stable Diffusion v1's; pass --config for another)"
                if config_path is None and kind != "dit" else "")
        raise CheckpointError(f"{src}: {err}{hint}") from None


def read_state_dict(src: Path) -> dict[str, Tensor]:
    """The tensors of a CompVis checkpoint file (``"state_dict"`` unwrapped; other entries dropped)."""
    suffix = src.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        data: Any = read_safetensors(src)
    elif suffix in CHECKPOINT_SUFFIXES:
        data = _torch_load(src)
    else:
        known = ", ".join((*CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX))
        raise CheckpointError(f"{src}: unknown layout: expected a folder or a {known} file")
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    elif isinstance(data, Mapping) and isinstance(data.get("ema"), Mapping):  # a DiT train.py checkpoint
        data = data["ema"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{src}: expected a state dict, got {type(data).__name__}")
    return {key: value for key, value in data.items() if isinstance(value, Tensor)}


def _torch_load(src: Path) -> Any:
    """torch.load(weights_only=True) of a foreign file; a payload, garbage or a truncated file is one line."""
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if WEIGHTS_ONLY_FAILURE in str(err) and ("GLOBAL" in str(err) or imports_objects(src)):
            raise CheckpointError(f"{src}: the checkpoint holds objects that are not plain tensors and will "
                                  "not be loaded (nothing in it was executed)") from None
        reason = "not a PyTorch checkpoint" if WEIGHTS_ONLY_FAILURE in str(err) else first_line(err)
        raise CheckpointError(f"{src}: cannot read with torch.load(weights_only=True): {reason}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:  # the zip reader's and I/O errors
        reason = "unexpected end of file" if isinstance(err, EOFError) else first_line(err)
        raise CheckpointError(f"{src}: cannot read with torch.load(weights_only=True): {reason}") from None


def read_network_config(path: Path, kind: Kind) -> Any:
    """The ``kind`` config in a JSON/YAML file: our config's fields, our config.json, or a diffusers config.json."""
    label = f"--config {path}"
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{label}: cannot read: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of config fields, got {type(data).__name__}")
    if "_class_name" in data:
        _check_kind(label, _diffusers_kind(label, data, kind), kind, "diffusers config")
        build = INTEROP[kind].config_from_diffusers
    else:
        fmt, found = data.pop("format", OURS_FORMAT), data.pop("kind", kind)
        if fmt != OURS_FORMAT:
            raise ConfigError(f"{label}: \"format\" must be {OURS_FORMAT!r}, got {fmt!r}")
        _check_kind(label, found, kind, "diffusionforge config")
        build = partial(config_from_dict, kind)
    try:
        return build(data)
    except DForgeError as err:
        raise ConfigError(f"{label}: {err}") from None

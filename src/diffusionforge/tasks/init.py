"""Fine-tuning: a run's network started from another run's weights (``init_from``), and which parts train
(``model.freeze``).

Every diffusion-family task's ``build`` calls, in order:

1. ``prepare_init(config)`` (before the model is built): checks that ``init_from`` is a run directory with
   ``model.safetensors`` and makes a relative text-encoder path of the config that names a folder inside that
   run absolute (``dforge import`` writes ``text_encoder`` beside its config), so ``dforge train
   RUN/config.yaml init_from=RUN`` works from any directory. The first stage of a latent run comes from
   ``RUN/first_stage.safetensors`` (``parts.load_latent_autoencoder``) unless ``model.latent.run_dir`` or
   ``model.latent.vae_dir`` name another, and its latent scale from RUN's config.
2. ``finetune(model, config)`` (after): loads RUN's EMA weights (``model.safetensors``: the weights the run
   samples with, and the only ones published checkpoints such as Stable Diffusion's hold; an import writes
   the same tensors to both files) into ``net`` and its EMA copy, then applies ``model.freeze``.

Loading is by state-dict key: a tensor of both with another shape is a one-line error naming it and both
shapes; a backbone tensor the run lacks is an error (another architecture); conditioner tensors the run
lacks (a story conditioner started from a text-to-image run) keep their fresh values and tensors of the run
this model has no place for are left out, each said in one line.

Without ``init_from`` and with the default ``model.freeze`` both steps change nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from torch import nn

from ..backbones.lora import base_key, has_lora, is_lora_key
from ..config.schema import ExperimentConfig, FreezeConfig
from ..errors import CheckpointError, ConfigError
from ..runs import CONFIG_FILE, EMA_WEIGHTS, resolve_run_paths

__all__ = ["finetune", "freeze_parts", "load_init_weights", "prepare_init"]


def prepare_init(config: ExperimentConfig) -> ExperimentConfig:
    """Check ``init_from`` and resolve paths into it (module docstring); the config unchanged without it."""
    if config.model.lora.rank and config.init_from is None:
        raise ConfigError("model.lora: adapters fine-tune a pretrained network: give init_from=RUN")
    if config.init_from is None:
        return config
    run_dir = Path(config.init_from).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"init_from: {run_dir}: no such run directory")
    for name in (CONFIG_FILE, EMA_WEIGHTS):
        if not (run_dir / name).is_file():
            raise ConfigError(f"init_from: {run_dir}: not a finished run ({name} missing)")
    run_dir = run_dir.resolve()
    return resolve_run_paths(run_dir, dataclasses.replace(config, init_from=str(run_dir)))


def finetune(model, config: ExperimentConfig):
    """``init_from``'s weights into ``model.net`` (and its EMA), then ``model.freeze``; returns ``model``."""
    if config.init_from is not None:
        load_init_weights(model, Path(config.init_from))
        model.initial_weights = f"init_from {config.init_from}"
    freeze_parts(model.net, config.model.freeze)
    for trained, averaged in zip(_text_conditioners(model.net), _text_conditioners(model.ema.module)):
        if not trained.fixed:  # the EMA copy's encoder changes with every update: no cached outputs
            averaged.config = dataclasses.replace(averaged.config, cache_size=0)
            averaged._cache.clear()
    return model


def load_init_weights(model, run_dir: Path) -> None:
    """RUN's ``model.safetensors`` into ``model.net`` and ``model.ema.module`` (module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = run_dir / EMA_WEIGHTS
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"init_from: {path}: not a readable safetensors file ({err})") from None
    # a LoRA model (backbones/lora.py): RUN's `to_q.weight` is its `to_q.base_layer.weight`; adapters start fresh
    own = {key: value for key, value in model.net.state_dict().items() if not is_lora_key(key)}
    ours = {base_key(key): key for key in own}
    state = {ours.get(key, key): value for key, value in state.items()}
    for key, value in own.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"init_from: {key} has shape {tuple(state[key].shape)} in {path} but "
                                  f"{tuple(value.shape)} in this model")
    missing = [key for key in own if key not in state]
    backbone_missing = [key for key in missing if key.startswith("backbone.")]
    if backbone_missing:
        raise CheckpointError(f"init_from: {path} has no {backbone_missing[0]} "
                              f"({len(backbone_missing)} backbone tensors missing: another architecture?)")
    if missing:
        print(f"init_from: {len(missing)} tensors of this model are not in {path} and keep their initial "
              f"values (e.g. {missing[0]})", file=sys.stderr)
    unused = [key for key in state if key not in own]
    if unused:
        print(f"init_from: {len(unused)} tensors of {path} are not used by this model (e.g. {unused[0]})",
              file=sys.stderr)
    shared = {key: state[key] for key in own if key in state}
    model.net.load_state_dict(shared, strict=False)
    model.ema.module.load_state_dict(model.net.state_dict())  # the EMA starts at the pretrained weights


def _attention_parameters(backbone: nn.Module) -> set[int]:
    """ids of the parameters inside the backbone's attention blocks (UNet: AttentionBlock / SpatialTransformer,
    the whole block as diffusers' ``attentions``; DiT: Attention / CrossAttention)."""
    ids: set[int] = set()
    for module in backbone.modules():
        name = type(module).__name__
        if "Attention" in name or name == "SpatialTransformer":
            ids.update(id(p) for p in module.parameters())
    return ids


def _text_conditioners(net: nn.Module) -> list:
    from ..conditioning.text import TextConditioner

    return [m for m in net["conditioner"].modules() if isinstance(m, TextConditioner)]


def freeze_parts(net: nn.Module, freeze: FreezeConfig) -> None:
    """Set ``requires_grad`` of ``net``'s parts as ``model.freeze`` says (the first stage is not in ``net``:
    ``NetworkModule`` freezes it). The defaults touch nothing."""
    backbone = net["backbone"]
    if has_lora(backbone):  # model.lora: the adapters train instead of the backbone's own weights
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad_(is_lora_key(name) and not freeze.backbone)
    elif freeze.backbone:
        backbone.requires_grad_(False)
    elif freeze.backbone_resnets:
        attention = _attention_parameters(backbone)
        if not attention:
            raise ConfigError("model.freeze.backbone_resnets: the backbone has no attention blocks (nothing "
                              "would train)")
        for parameter in backbone.parameters():
            if id(parameter) not in attention:
                parameter.requires_grad_(False)
    texts = _text_conditioners(net)
    if (freeze.text_encoder is not None or freeze.token_embeddings) and not texts:
        raise ConfigError("model.freeze.text_encoder / token_embeddings: the model has no text encoder")
    for text in texts:
        if freeze.text_encoder is not None and freeze.text_encoder != text.config.freeze:
            text.config = dataclasses.replace(text.config, freeze=freeze.text_encoder)
            text._cache.clear()
            text.encoder.requires_grad_(not freeze.text_encoder)
            text.train(text.training)  # a frozen encoder stays in eval mode
        if freeze.token_embeddings and text.config.freeze:
            text._cache.clear()
            text.encoder.get_input_embeddings().weight.requires_grad_(True)
    if freeze.history_encoder:
        histories = [m.history for m in net["conditioner"].modules() if getattr(m, "history", None) is not None]
        if not histories:
            raise ConfigError("model.freeze.history_encoder: the model has no story history encoder")
        for history in histories:
            history.requires_grad_(False)
    if not any(p.requires_grad for p in net.parameters()):
        raise ConfigError("model.freeze: every part of the network is frozen; nothing would train")


def trainable_count(net: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of ``net``."""
    params = list(net.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


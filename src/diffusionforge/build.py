"""Build the parts of an experiment from its config (explicit registries, no import strings)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from torch import nn

from .backbones import BACKBONES
from .conditioning import ClassEmbedder, Conditioner, ConditionerWrapper
from .config.schema import ExperimentConfig
from .data.datamodule import ImageDataModule
from .errors import ConfigError
from .first_stage import IdentityFirstStage
from .models.generative import GenerativeModel
from .processes.gaussian import GaussianDiffusion

FIRST_STAGES = {"identity": IdentityFirstStage}


def build_conditioner(config: ExperimentConfig) -> ConditionerWrapper:
    conditioners: list[Conditioner] = []
    class_cfg = config.model.conditioning.class_label
    if class_cfg is not None:
        conditioners.append(ClassEmbedder(class_cfg))
    return ConditionerWrapper(conditioners)


def vector_dim(conditioner: ConditionerWrapper) -> Optional[int]:
    dims = [c.embedding.embedding_dim for c in conditioner.conditioners if c.kind == "vector"]
    return sum(dims) if dims else None


def build_backbone(config: ExperimentConfig, conditioner: ConditionerWrapper) -> nn.Module:
    """The backbone with its channel counts derived from data, process and conditioning."""
    model = config.model
    config_cls, backbone_cls = BACKBONES[model.backbone]
    channels = config.data.channels
    learned = model.process.variance_type == "learned_range"
    derived = dict(in_channels=channels, out_channels=channels * (2 if learned else 1),
                   vector_dim=vector_dim(conditioner))
    backbone_cfg = getattr(model, model.backbone)
    try:
        backbone_cfg = dataclasses.replace(backbone_cfg, **derived)
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"model.{model.backbone}: {err}") from None
    return backbone_cls(backbone_cfg)


def build_model(config: ExperimentConfig, num_classes: Optional[int] = None,
                sample_dir: Optional[Path] = None) -> GenerativeModel:
    class_cfg = config.model.conditioning.class_label
    if class_cfg is not None and num_classes is not None and class_cfg.num_classes != num_classes:
        raise ConfigError(f"model.conditioning.class_label.num_classes is {class_cfg.num_classes} "
                          f"but the dataset '{config.data.name}' has {num_classes} classes")
    conditioner = build_conditioner(config)
    backbone = build_backbone(config, conditioner)
    size = config.data.image_size
    return GenerativeModel(
        backbone=backbone, process=GaussianDiffusion(config.model.process),
        conditioner=conditioner, first_stage=FIRST_STAGES[config.model.first_stage](),
        latent_shape=(config.data.channels, size, size), optim=config.optim,
        sample=config.sample, num_classes=class_cfg.num_classes if class_cfg else None,
        class_key=class_cfg.input_key if class_cfg else "class_label",
        sample_dir=sample_dir)


def build_datamodule(config: ExperimentConfig) -> ImageDataModule:
    return ImageDataModule(config.data, seed=config.seed)

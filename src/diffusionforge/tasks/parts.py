"""Build the parts of an experiment from its config (explicit registries, no import strings)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .backbones import BACKBONES
from .conditioning import ClassEmbedder, Conditioner, ConditionerWrapper
from .conditioning.labels import LabelConditioning
from .conditioning.latents_concat import LatentsConcat
from .conditioning.spatial import SpatialConcat
from .conditioning.story import StoryConditioner
from .conditioning.text import TextConditioner
from .config.schema import ExperimentConfig
from .data.captions import caption_names
from .data.datamodule import ImageDataModule
from .errors import ConfigError
from .first_stage import IdentityFirstStage
from .first_stage.latent import LatentFirstStage
from .models.generative import GenerativeModel
from .processes.gaussian import GaussianDiffusion


def build_conditioner(config: ExperimentConfig, shape: tuple[int, int, int]) -> ConditionerWrapper:
    """The conditioners of ``model.conditioning``; ``shape`` is the (C, H, W) of x_t."""
    conditioners: list[Conditioner] = []
    class_cfg = config.model.conditioning.class_label
    if class_cfg is not None:
        conditioners.append(ClassEmbedder(class_cfg))
    text_cfg = config.model.conditioning.text
    if text_cfg is not None:
        if config.data.caption_template is None:
            raise ConfigError("model.conditioning.text: needs captions; set data.caption_template "
                              "(e.g. 'a photo of {}')")
        conditioners.append(TextConditioner(text_cfg))
    concat_cfg = config.model.conditioning.concat
    if concat_cfg is not None:
        conditioners.append(SpatialConcat(concat_cfg, shape[1:]))
    latents_cfg = config.model.conditioning.latents_concat
    if latents_cfg is not None:
        degradation = config.data.degradation
        produced = {"image", config.bridge.source_key}
        if degradation is not None and degradation.task == "inpainting":
            produced.add("mask")
        missing = [k for k in (*latents_cfg.mask_keys, *latents_cfg.image_keys) if k not in produced]
        if missing:
            raise ConfigError(f"model.conditioning.latents_concat: batch keys {missing} are not in the data "
                              f"(it gives {sorted(produced)}; masks need data.degradation.task=inpainting)")
        conditioners.append(LatentsConcat(latents_cfg, latent_channels=shape[0]))
    story_cfg = config.model.conditioning.story
    if story_cfg is not None:
        if config.data.story is None:
            raise ConfigError("model.conditioning.story: needs stories; set data.story (e.g. data.story.frames=4)")
        conditioners.append(StoryConditioner(story_cfg, frames=config.data.story.frames, latent_shape=shape))
    return ConditionerWrapper(conditioners)


def conditioning_dim(conditioner: ConditionerWrapper, kind: str) -> Optional[int]:
    """Width of the merged ``kind`` output (outputs are concatenated along features)."""
    dims = [c.dim for c in conditioner.conditioners if c.kind == kind]
    return sum(dims) if dims else None


def build_first_stage(config: ExperimentConfig, autoencoder=None) -> nn.Module:
    """Identity, or the frozen autoencoder (given, or loaded from model.latent.run_dir)."""
    if config.model.first_stage == "identity":
        return IdentityFirstStage()
    latent = config.model.latent
    autoencoder = autoencoder if autoencoder is not None else load_latent_autoencoder(config)
    scale = latent.scale_factor if latent.scale_factor is not None else autoencoder.config.scaling_factor
    if scale is None:
        raise ConfigError("model.latent.scale_factor: not set and not estimated "
                          "(`dforge train` estimates it from the training images)")
    return LatentFirstStage(autoencoder, scale, latent.sample_posterior)


def load_latent_autoencoder(config: ExperimentConfig):
    """The AutoencoderKL of the run named by model.latent.run_dir."""
    if config.model.latent.run_dir is None:
        raise ConfigError("model.latent.run_dir: latent diffusion needs a trained autoencoder run "
                          "(e.g. `dforge train fashion-vae`)")
    from .autoencoder_run import load_autoencoder_run

    return load_autoencoder_run(config.model.latent.run_dir)[0]


def diffusion_shape(config: ExperimentConfig, first_stage: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of what the process runs on: images, or latents of the first stage."""
    size = config.data.image_size
    shape = (config.data.channels, size, size)
    return first_stage.latent_shape(shape) if hasattr(first_stage, "latent_shape") else shape


def build_backbone(config: ExperimentConfig, conditioner: ConditionerWrapper,
                   shape: Optional[tuple[int, int, int]] = None) -> nn.Module:
    """The backbone with its sizes derived from data/latents ``shape`` (C, H, W), process and conditioning."""
    model = config.model
    config_cls, backbone_cls = BACKBONES[model.backbone]
    size = config.data.image_size
    channels, height, width = (config.data.channels, size, size) if shape is None else shape
    learned = config.task != "bridge" and model.process.variance_type == "learned_range"
    derived = dict(in_channels=channels, out_channels=channels * (2 if learned else 1),
                   vector_dim=conditioning_dim(conditioner, "vector"),
                   context_dim=conditioning_dim(conditioner, "crossattn"),
                   concat_channels=conditioning_dim(conditioner, "concat") or 0)
    if "input_size" in {f.name for f in dataclasses.fields(config_cls)}:  # DiT: a fixed square token grid
        if height != width:
            raise ConfigError(f"model.{model.backbone}: needs square inputs, got {height}x{width}")
        derived["input_size"] = height
    backbone_cfg = getattr(model, model.backbone)
    try:
        backbone_cfg = dataclasses.replace(backbone_cfg, **derived)
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"model.{model.backbone}: {err}") from None
    return backbone_cls(backbone_cfg)


def label_conditioning(config: ExperimentConfig) -> Optional[LabelConditioning]:
    """How class labels condition the model: through its class and/or caption conditioner."""
    class_cfg, text_cfg = config.model.conditioning.class_label, config.model.conditioning.text
    if class_cfg is None and text_cfg is None:
        return None
    names = caption_names(config.data.name) if text_cfg is not None else ()
    return LabelConditioning(
        num_classes=class_cfg.num_classes if class_cfg is not None else len(names),
        class_key=class_cfg.input_key if class_cfg is not None else None,
        caption_key=text_cfg.input_key if text_cfg is not None else None,
        caption_template=config.data.caption_template if text_cfg is not None else None,
        caption_names=names)


def build_model(config: ExperimentConfig, num_classes: Optional[int] = None,
                sample_dir: Optional[Path] = None, autoencoder=None) -> GenerativeModel:
    """The GenerativeModel of a config; ``autoencoder`` overrides loading model.latent.run_dir."""
    class_cfg = config.model.conditioning.class_label
    if class_cfg is not None and num_classes is not None and class_cfg.num_classes != num_classes:
        raise ConfigError(f"model.conditioning.class_label.num_classes is {class_cfg.num_classes} "
                          f"but the dataset '{config.data.name}' has {num_classes} classes")
    first_stage = build_first_stage(config, autoencoder)
    shape = diffusion_shape(config, first_stage)
    conditioner = build_conditioner(config, shape)
    backbone = build_backbone(config, conditioner, shape=shape)
    parts = dict(backbone=backbone, conditioner=conditioner, first_stage=first_stage, latent_shape=shape,
                 optim=config.optim, sample=config.sample, labels=label_conditioning(config),
                 sample_dir=sample_dir)
    if config.task == "bridge":
        return build_bridge_model(config, parts)
    if config.task == "story":
        return build_story_model(config, parts)
    if config.data.story is not None:
        raise ConfigError("data.story: stories are trained by task=story (set task=story)")
    return GenerativeModel(process=GaussianDiffusion(config.model.process), **parts)


def build_bridge_model(config: ExperimentConfig, parts: dict):
    """task=bridge: the BridgeModel on paired data (``data.degradation``)."""
    from .losses.pixel import PixelLoss
    from .models.bridge import BridgeModel
    from .processes.bridge import BridgeMatching

    task = config.bridge
    if config.data.degradation is None:
        raise ConfigError("data.degradation: task=bridge trains on (source, target) pairs; set "
                          "data.degradation.task (super_resolution, inpainting, denoising, deblurring)")
    process = task.process
    pixel_loss = None
    if process.pixel_loss_weight > 0:
        lpips = None
        if process.pixel_loss_type == "lpips":
            from .losses.lpips import load_lpips

            lpips = load_lpips(task.lpips_vgg, task.lpips_lin)
            if lpips is None:
                raise ConfigError("bridge.process.pixel_loss_type=lpips: no LPIPS weights found; set "
                                  "bridge.lpips_vgg and bridge.lpips_lin (or use l2 / l1)")
        pixel_loss = PixelLoss(process.pixel_loss_type, process.pixel_loss_max_size,
                               process.pixel_loss_window, lpips)
    paste_key = task.paste_key if config.data.degradation.task == "inpainting" else None
    return BridgeModel(process=BridgeMatching(process), source_key=task.source_key, paste_key=paste_key,
                       sample_steps=task.steps, pixel_loss=pixel_loss, **parts)


def build_story_model(config: ExperimentConfig, parts: dict):
    """task=story: the StoryModel (AR-LDM) on data.story with the story conditioner."""
    from .models.story import StoryModel

    if config.data.story is None:
        raise ConfigError("data.story: task=story trains on stories; set data.story (e.g. data.story.frames=4)")
    if config.model.conditioning.story is None:
        raise ConfigError("model.conditioning.story: task=story needs the story conditioner "
                          "(e.g. model.conditioning.story.dim=128)")
    others = [name for name in ("class_label", "text", "concat", "latents_concat")
              if getattr(config.model.conditioning, name) is not None]
    if others:
        raise ConfigError(f"model.conditioning.{others[0]}: task=story is conditioned by "
                          "model.conditioning.story only")
    return StoryModel(process=GaussianDiffusion(config.model.process), story_task=config.story.task,
                      frames=config.data.story.frames, **parts)


def build_datamodule(config: ExperimentConfig) -> ImageDataModule:
    return ImageDataModule(config.data, seed=config.seed)


def prepare_first_stage(config: ExperimentConfig, datamodule: ImageDataModule):
    """Load the frozen autoencoder of a latent config and fix its latent scale.

    Returns ``(config, autoencoder)``; ``autoencoder`` is None in pixel space.
    With ``model.latent.scale_factor`` unset and no scaling factor stored with
    the autoencoder, the scale is estimated as 1/std of the latents of the
    first ``model.latent.scale_images`` training images and written into the
    returned config, so the run's config.yaml records the value it trained with.
    """
    if config.model.first_stage != "autoencoder":
        return config, None
    from .first_stage.latent import estimate_scale_factor

    latent = config.model.latent
    autoencoder = load_latent_autoencoder(config)
    scale = latent.scale_factor if latent.scale_factor is not None else autoencoder.config.scaling_factor
    if scale is None:
        datamodule.setup("fit")
        images = datamodule.train_set
        count = min(latent.scale_images, len(images))
        batches = (torch.cat([_images_of(images[i]) for i in range(start, min(start + 256, count))])
                   for start in range(0, count, 256))
        scale = estimate_scale_factor(autoencoder, batches, latent.sample_posterior, seed=config.seed)
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, latent=dataclasses.replace(latent, scale_factor=float(scale))))
    return config, autoencoder


def _images_of(item: dict) -> torch.Tensor:
    """A training item's images as (N, C, H, W): its image, or every frame of a story."""
    return item["frames"] if "frames" in item else item["image"].unsqueeze(0)

"""The parts every model-building task shares, built from the config (explicit registries, no import strings).

The first stage (identity, or a frozen autoencoder with its latent scale),
the conditioners, the backbone sized from the data / latent shape, the label
conditioning; and, for runs whose weights are ``model.safetensors``, exporting
and loading them. The tasks (``diffusion``, ``bridge``, ``story``) put these
parts together; nothing here knows which task it is building for."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..backbones import BACKBONES
from ..conditioning import ClassEmbedder, Conditioner, ConditionerWrapper
from ..conditioning.labels import LabelConditioning
from ..conditioning.latents_concat import LatentsConcat
from ..conditioning.spatial import SpatialConcat
from ..conditioning.story import StoryConditioner
from ..conditioning.text import TextConditioner
from ..config.schema import ExperimentConfig
from ..data.captions import caption_names
from ..data.config import FOLDERS
from ..errors import CheckpointError, ConfigError
from ..first_stage import IdentityFirstStage
from ..first_stage.autoencoder import AutoencoderConfig, AutoencoderKL
from ..first_stage.latent import LatentFirstStage, estimate_scale_factor
from ..runs import CONFIG_FILE, EMA_WEIGHTS, FIRST_STAGE_WEIGHTS, RAW_WEIGHTS, weights_file
from ..weights import load_weights, save_weights
from .autoencoder import load_autoencoder_run
from .latent_cache import cached_scale


def build_conditioner(config: ExperimentConfig, shape: tuple[int, int, int]) -> ConditionerWrapper:
    """The conditioners of ``model.conditioning``; ``shape`` is the (C, H, W) of x_t."""
    conditioners: list[Conditioner] = []
    class_cfg = config.model.conditioning.class_label
    if class_cfg is not None:
        conditioners.append(ClassEmbedder(class_cfg))
    text_cfg = config.model.conditioning.text
    if text_cfg is not None:
        if config.data.caption_template is None and config.data.name not in FOLDERS:  # folders: resolve_from_data
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
        if degradation is not None and degradation.kind == "inpainting":
            produced.add("mask")
        missing = [k for k in (*latents_cfg.mask_keys, *latents_cfg.image_keys) if k not in produced]
        if missing:
            raise ConfigError(f"model.conditioning.latents_concat: batch keys {missing} are not in the data "
                              f"(it gives {sorted(produced)}; masks need data.degradation.kind=inpainting)")
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
    """The AutoencoderKL of model.latent.run_dir (an autoencoder run) or model.latent.vae_dir (a diffusers
    AutoencoderKL folder), else the first stage of the ``init_from`` run."""
    latent = config.model.latent
    if latent.run_dir is not None and latent.vae_dir is not None:
        raise ConfigError("model.latent.run_dir and model.latent.vae_dir: give one first stage, not both")
    if latent.vae_dir is not None:
        from ..interop.vae import load_diffusers_vae

        return load_diffusers_vae(latent.vae_dir)
    if latent.run_dir is None and config.init_from is not None:
        return load_first_stage_copy(Path(config.init_from))
    if latent.run_dir is None:
        raise ConfigError("model.latent.run_dir: latent diffusion needs a trained autoencoder run "
                          "(e.g. `dforge train fashion-vae`), a diffusers VAE folder (model.latent.vae_dir) "
                          "or a latent run to start from (init_from)")
    return load_autoencoder_run(latent.run_dir)[0]


def diffusion_shape(config: ExperimentConfig, first_stage: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of what the process runs on: images, or latents of the first stage."""
    size = config.data.image_size
    shape = (config.data.channels, size, size)
    return first_stage.latent_shape(shape) if hasattr(first_stage, "latent_shape") else shape


def build_backbone(config: ExperimentConfig, conditioner: ConditionerWrapper,
                   shape: Optional[tuple[int, int, int]] = None, learned_variance: bool = False) -> nn.Module:
    """The backbone with its sizes derived from data/latents ``shape`` (C, H, W) and the conditioning.

    ``learned_variance``: the process also predicts a variance (DiT's learned sigma), which
    doubles the output channels.
    """
    model = config.model
    config_cls, backbone_cls = BACKBONES[model.backbone]
    size = config.data.image_size
    channels, height, width = (config.data.channels, size, size) if shape is None else shape
    derived = dict(in_channels=channels, out_channels=channels * (2 if learned_variance else 1),
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
    backbone = backbone_cls(backbone_cfg)
    if model.lora.rank:  # the adapters are part of the network: a LoRA run loads as it was trained
        from ..backbones.lora import add_lora

        backbone = add_lora(backbone, model.lora, model.backbone)
    return backbone


def label_conditioning(config: ExperimentConfig) -> Optional[LabelConditioning]:
    """How class labels condition the model: through its class and/or caption conditioner."""
    class_cfg, text_cfg = config.model.conditioning.class_label, config.model.conditioning.text
    if class_cfg is None and text_cfg is None:
        return None
    data = config.data
    if text_cfg is None:
        names: tuple[str, ...] = ()
    elif data.name in FOLDERS:  # captions from the folder's class names only with a template (else its own captions)
        names = tuple(data.class_names or ()) if data.caption_template else ()
    else:
        names = tuple(caption_names(data.name)) if has_caption_names(data.name) else ()
    if class_cfg is None and not names:
        return None  # captions from a prompt or the data only (an imported Stable Diffusion, a captioned folder)
    return LabelConditioning(
        num_classes=class_cfg.num_classes if class_cfg is not None else len(names),
        class_key=class_cfg.input_key if class_cfg is not None else None,
        caption_key=text_cfg.input_key if names else None,
        caption_template=data.caption_template if names else None,
        caption_names=names)


def has_caption_names(data_name: str) -> bool:
    """Whether the data source has class names that captions can be made from."""
    try:
        caption_names(data_name)
    except ConfigError:
        return False
    return True


def prepare_first_stage(config: ExperimentConfig, datamodule):
    """Load the frozen autoencoder of a latent config and fix its latent scale.

    Returns ``(config, autoencoder)``; ``autoencoder`` is None in pixel space.
    With ``model.latent.scale_factor`` unset and no scaling factor stored with
    the autoencoder, the scale is estimated as 1/std of the latents of the
    first ``model.latent.scale_images`` training images (or taken from the
    latent cache the run trains from, ``data.cache``) and written into the
    returned config, so the run's config.yaml records the value it trained with.
    """
    if config.model.first_stage != "autoencoder":
        return config, None
    latent = config.model.latent
    autoencoder = load_latent_autoencoder(config)
    scale = latent.scale_factor if latent.scale_factor is not None else init_run_scale(config)
    scale = scale if scale is not None else autoencoder.config.scaling_factor
    if scale is None:
        datamodule.setup("fit")
        scale = cached_scale(datamodule)  # data.cache: the scale the cache was made with
    if scale is None:
        images = datamodule.train_set
        if not hasattr(images, "__len__"):  # a stream (data.name=shards): its validation samples
            images = datamodule.val_set
        count = min(latent.scale_images, len(images))
        batches = (torch.cat([_images_of(images[i]) for i in range(start, min(start + 256, count))])
                   for start in range(0, count, 256))
        scale = estimate_scale_factor(autoencoder, batches, latent.sample_posterior, seed=config.seed)
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, latent=dataclasses.replace(latent, scale_factor=float(scale))))
    return config, autoencoder


def init_run_scale(config: ExperimentConfig) -> Optional[float]:
    """The latent scale the ``init_from`` run trained with, when its first stage is the one used here."""
    latent = config.model.latent
    if config.init_from is None or latent.run_dir is not None or latent.vae_dir is not None:
        return None
    from ..config.loader import load_config

    return load_config(str(Path(config.init_from) / CONFIG_FILE)).model.latent.scale_factor


def _images_of(item: dict) -> torch.Tensor:
    """A training item's images as (N, C, H, W): its image, or every frame of a story."""
    return item["frames"] if "frames" in item else item["image"].unsqueeze(0)


def model_parts(config: ExperimentConfig, autoencoder=None, sample_dir: Optional[Path] = None,
                learned_variance: bool = False) -> dict:
    """The keyword arguments every model built on a backbone shares (GenerativeModel and its kin)."""
    first_stage = build_first_stage(config, autoencoder)
    shape = diffusion_shape(config, first_stage)
    conditioner = build_conditioner(config, shape)
    backbone = build_backbone(config, conditioner, shape=shape, learned_variance=learned_variance)
    return dict(backbone=backbone, conditioner=conditioner, first_stage=first_stage, latent_shape=shape,
                optim=config.optim, sample=config.sample, labels=label_conditioning(config),
                sample_dir=sample_dir)


def check_num_classes(config: ExperimentConfig, num_classes: Optional[int]) -> None:
    """The class conditioner must have as many classes as the dataset."""
    class_cfg = config.model.conditioning.class_label
    if class_cfg is not None and num_classes is not None and class_cfg.num_classes != num_classes:
        raise ConfigError(f"model.conditioning.class_label.num_classes is {class_cfg.num_classes} "
                          f"but the dataset '{config.data.name}' has {num_classes} classes")


def resolve_from_data(config: ExperimentConfig, datamodule, check_labels: bool = True) -> ExperimentConfig:
    """The config as the data define it, so that the run's config.yaml records it.

    For one's own images (``data.name=folder`` / ``paired-folder``) the
    datamodule has read the files and resolved ``data`` (image size, channels,
    validation split, batch size, class names: ``datamodule.config``); the
    class conditioner's ``num_classes`` follows the folder's classes, and a
    folder without class sub-folders trains unconditionally (said in one line).
    ``check_labels``: then refuse a class-conditional config on unlabelled data.
    """
    data = getattr(datamodule, "config", config.data)
    if data.name in FOLDERS:
        conditioning = config.model.conditioning
        class_cfg, num_classes = conditioning.class_label, datamodule.num_classes
        if class_cfg is not None and num_classes is None:
            print("model.conditioning.class_label: dropped, the folder has no class sub-folders "
                  "(an unconditional model)", file=sys.stderr)
            conditioning = dataclasses.replace(conditioning, class_label=None)
        elif class_cfg is not None and class_cfg.num_classes != num_classes:
            print(f"model.conditioning.class_label.num_classes: {num_classes}, the folder's classes "
                  f"(not {class_cfg.num_classes})", file=sys.stderr)
            conditioning = dataclasses.replace(
                conditioning, class_label=dataclasses.replace(class_cfg, num_classes=num_classes))
        config = dataclasses.replace(config, data=data, model=dataclasses.replace(
            config.model, conditioning=conditioning))
        text_cfg = conditioning.text
        if text_cfg is not None and data.caption_template is None and not datamodule.has_captions:
            raise ConfigError("model.conditioning.text: the folder has no captions (metadata.jsonl / metadata.csv "
                              "with file_name and text, or name.txt beside name.png); add them or set "
                              "data.caption_template (e.g. 'a photo of {}', with class folders)")
        if text_cfg is not None and datamodule.has_captions and text_cfg.input_key != "caption":
            raise ConfigError(f"model.conditioning.text.input_key: a folder's captions arrive as 'caption', "
                              f"not {text_cfg.input_key!r}")
    if check_labels:
        check_class_labels(config, datamodule)
    return config


def check_class_labels(config: ExperimentConfig, datamodule) -> None:
    """A class-conditional config needs a dataset with class labels."""
    if config.model.conditioning.class_label is not None and datamodule.num_classes is None:
        raise ConfigError(f"model.conditioning.class_label: data.name={config.data.name} has no class labels "
                          "(an image folder needs one sub-folder per class); set model.conditioning.class_label=null")


def export_weights(model, run_dir: Path) -> Path:
    """EMA and raw sampling weights as safetensors beside config.yaml (+ the latent first stage)."""
    meta = {"format": "diffusionforge", "config": CONFIG_FILE}
    autoencoder = getattr(model.first_stage, "autoencoder", None)
    if autoencoder is not None:  # the run must not depend on the autoencoder run staying around
        save_weights(autoencoder, run_dir / FIRST_STAGE_WEIGHTS,
                     {**meta, "autoencoder_config": json.dumps(dataclasses.asdict(autoencoder.config))})
    save_weights(model.net, run_dir / RAW_WEIGHTS, meta)
    return save_weights(model.ema.module, run_dir / EMA_WEIGHTS, meta)


def load_first_stage_copy(run_dir: Path) -> AutoencoderKL:
    """The AutoencoderKL saved in a latent run (``first_stage.safetensors``)."""
    from safetensors import SafetensorError, safe_open

    path = run_dir / FIRST_STAGE_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: latent run without {FIRST_STAGE_WEIGHTS}")
    try:
        with safe_open(str(path), framework="pt") as f:
            fields = json.loads((f.metadata() or {}).get("autoencoder_config", "null") or "null")
    except (SafetensorError, OSError, ValueError) as err:  # truncated / foreign file, bad JSON metadata
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: no autoencoder_config in the file's metadata")
    try:
        config = AutoencoderConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the autoencoder_config in the file's metadata does not fit: {err}") from None
    return load_weights(AutoencoderKL(config), path).eval()


def load_exported(model, run_dir: Path, use_ema: bool = True):
    """``model`` with the run's exported weights (EMA or raw) loaded, in eval mode."""
    weights = weights_file(run_dir, EMA_WEIGHTS if use_ema else RAW_WEIGHTS)
    load_weights(model.ema.module if use_ema else model.net, weights)
    return model.eval()


def run_first_stage(run_dir: Path, config: ExperimentConfig):
    """The autoencoder copy a latent run carries (None in pixel space)."""
    return load_first_stage_copy(run_dir) if config.model.first_stage == "autoencoder" else None


def first_stage_network(run_dir: Path, config: ExperimentConfig, kind: str):
    """`dforge convert --kind vae` of a run on a first stage: its frozen autoencoder copy."""
    if kind != "vae":
        raise CheckpointError(f"{run_dir}: a task={config.task} run has no {kind} (use --kind vae)")
    if config.model.first_stage != "autoencoder":
        raise CheckpointError(f"{run_dir}: a pixel-space run has no vae (use --kind unet)")
    return load_first_stage_copy(run_dir), "latent run's first stage"

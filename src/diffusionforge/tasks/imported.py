"""`dforge import SRC --out RUN_DIR`: a pretrained pipeline becomes a task=diffusion run directory.

What ``interop.pipelines`` reads (a diffusers ``StableDiffusionPipeline`` or
``DiTPipeline`` folder, an official DiT checkpoint with a diffusers VAE, a
CompVis Stable Diffusion v1 file with a CLIP text encoder folder) is written as
a normal run: ``config.yaml`` (the scheduler as ``model.process`` and
``sample``, the VAE's scaling factor as ``model.latent.scale_factor``),
``model.safetensors`` = ``model_raw.safetensors`` (backbone + conditioner,
text encoder included), ``first_stage.safetensors`` (the VAE, its config in
the metadata), and for Stable Diffusion the CLIP text encoder + tokenizer in
``text_encoder/``, referenced from the config by that relative path
(``model.conditioning.text.path: text_encoder``; ``resolve_run_paths``
makes it absolute when the run is opened). A DiT's class names (``id2label``)
go to ``class_names.json``. The folder is written beside RUN_DIR and renamed
into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

from ..backbones.config import DiTConfig, UNetConfig
from ..conditioning.config import ClassLabelConfig, TextConditionerConfig
from ..config.loader import config_to_yaml
from ..config.schema import (ConditioningConfig, ExperimentConfig, LatentConfig, ModelConfig, SampleConfig)
from ..data.config import DataConfig
from ..errors import CheckpointError
from ..interop import pipelines as pipes
from ..interop.detect import CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX, read_state_dict
from ..interop.dit import OFFICIAL_DIT_KEY, dit_config_from_state_dict, load_diffusers_dit, load_official_dit
from ..interop.files import DIFFUSERS_CONFIG_NAME, read_json
from ..interop.unet import COMPVIS_UNET_PREFIX, load_compvis_unet, load_diffusers_unet, sd_v1_unet_config
from ..interop.vae import load_compvis_vae, load_diffusers_vae, sd_v1_vae_config
from ..processes.config import GaussianDiffusionConfig
from ..runs import CLASS_NAMES_FILE, CONFIG_FILE
from ..utils.atomic import write_folder_atomically
from .parts import export_weights

TEXT_ENCODER_DIR = "text_encoder"  # the CLIP text encoder + tokenizer inside an imported SD run
SD_GUIDANCE, DIT_GUIDANCE = 7.5, 4.0  # the diffusers pipelines' default guidance scales


class Imported(NamedTuple):
    """What ``import_pipeline`` wrote (for the CLI's report line)."""

    run_dir: Path
    layout: str  # e.g. "diffusers StableDiffusionPipeline folder"
    parameters: dict[str, int]  # part -> parameter count


class _Plan(NamedTuple):
    config: ExperimentConfig  # with the text encoder path still to be filled in
    backbone: torch.nn.Module  # our UNet, or a LabelDiT
    vae: torch.nn.Module
    text: Optional[Callable[[Path], None]]  # writes the text encoder + tokenizer into a folder
    class_names: Optional[list[str]]
    layout: str


def import_pipeline(src: Path, out: Path, *, vae: Optional[Path] = None, text_encoder: Optional[Path] = None,
                    num_heads: Optional[int] = None, overrides: Sequence[str] = ()) -> Imported:
    """Write the run directory ``out`` from the pipeline / checkpoint ``src`` (module docstring).

    ``num_heads``: the attention heads of an official DiT checkpoint of no published size
    (the published sizes are known by depth and width). ``overrides``: ``key=value`` settings of
    the run's config on top of what SRC says (e.g. ``data.root=DIR``, the reference images of
    `dforge evaluate`; ``sample.steps=25``).
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    plan = _plan(src, vae, text_encoder, num_heads)
    if overrides:
        plan = plan._replace(config=_overridden(plan.config, overrides))
    counts: dict[str, int] = {}

    def write(folder: Path) -> None:
        config = plan.config
        if plan.text is not None:
            plan.text(folder / TEXT_ENCODER_DIR)
            config = _with_text_path(config, str(folder / TEXT_ENCODER_DIR))
        model = _build(config, plan, counts)
        export_weights(model, folder)
        if plan.text is not None:
            config = _with_text_path(config, TEXT_ENCODER_DIR)  # relative: the run can move
        config = dataclasses.replace(config, run_dir=str(out.resolve()))
        (folder / CONFIG_FILE).write_text(config_to_yaml(config))
        (folder / "samples").mkdir()
        if plan.class_names is not None:
            (folder / CLASS_NAMES_FILE).write_text(json.dumps(plan.class_names, indent=1) + "\n")

    write_folder_atomically(out, write)
    return Imported(out, plan.layout, counts)


# ------------------------------------------------------------------ building the run's model
def _build(config: ExperimentConfig, plan: _Plan, counts: dict[str, int]):
    from ..backbones.dit import LabelDiT
    from .diffusion import build_diffusion_model

    model = build_diffusion_model(config, autoencoder=plan.vae)
    backbone = model.net["backbone"]
    state = dict(plan.backbone.state_dict())
    if isinstance(plan.backbone, LabelDiT):
        table = state.pop("y_embedder.embedding_table.weight")
        embedder = model.net["conditioner"].conditioners[0]
        with torch.no_grad():
            embedder.embedding.weight.copy_(table)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise CheckpointError(f"imported {type(plan.backbone).__name__} does not fit the run's backbone: "
                              f"{'missing' if missing else 'unexpected'} key {key!r}")
    model.ema.module.load_state_dict(model.net.state_dict())  # EMA = the pretrained weights
    counts["backbone"] = sum(p.numel() for p in plan.backbone.parameters())
    counts["vae"] = sum(p.numel() for p in plan.vae.parameters())
    for conditioner in model.net["conditioner"].conditioners:
        encoder = getattr(conditioner, "encoder", None)
        if encoder is not None:
            counts["text_encoder"] = sum(p.numel() for p in encoder.parameters())
    return model.eval()


def _overridden(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """``config`` with ``key=value`` overrides, checked as `dforge train` checks them."""
    import tempfile

    from ..config.loader import load_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / CONFIG_FILE
        path.write_text(config_to_yaml(config))
        return load_config(str(path), overrides)


def _with_text_path(config: ExperimentConfig, path: str) -> ExperimentConfig:
    conditioning = config.model.conditioning
    text = dataclasses.replace(conditioning.text, path=path)
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, conditioning=dataclasses.replace(conditioning, text=text)))


# ------------------------------------------------------------------ reading SRC
def _plan(src: Path, vae: Optional[Path], text_encoder: Optional[Path], num_heads: Optional[int]) -> _Plan:
    if num_heads is not None and (src.is_dir() or OFFICIAL_DIT_KEY not in read_state_dict(src)):
        raise CheckpointError("--num-heads: only for official DiT checkpoint files")
    if src.is_dir():
        if not (src / pipes.MODEL_INDEX).is_file():
            raise CheckpointError(f"{src}: unknown layout: no {pipes.MODEL_INDEX} (expected a diffusers "
                                  f"{pipes.SD_PIPELINE} or {pipes.DIT_PIPELINE} folder)")
        index = pipes.read_model_index(src)
        if index["_class_name"] == pipes.SD_PIPELINE:
            _unused(vae, "--vae", "the pipeline folder has its own vae/")
            _unused(text_encoder, "--text-encoder", "the pipeline folder has its own text_encoder/")
            return _sd_pipeline(src)
        _unused(text_encoder, "--text-encoder", "a DiT has no text encoder")
        _unused(vae, "--vae", "the pipeline folder has its own vae/")
        return _dit_pipeline(src, index)
    suffix = src.suffix.lower()
    if suffix not in (*CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX):
        raise CheckpointError(f"{src}: unknown layout: expected a pipeline folder or a "
                              f"{', '.join((*CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX))} file")
    state = read_state_dict(src)
    if OFFICIAL_DIT_KEY in state:
        _unused(text_encoder, "--text-encoder", "a DiT has no text encoder")
        if vae is None:
            raise CheckpointError(f"{src}: an official DiT checkpoint needs --vae DIR (a diffusers AutoencoderKL "
                                  "folder, e.g. sd-vae-ft-ema)")
        return _official_dit(src, state, vae, num_heads)
    if any(key.startswith(COMPVIS_UNET_PREFIX) for key in state):
        _unused(vae, "--vae", "the checkpoint holds its first stage")
        if text_encoder is None:
            raise CheckpointError(f"{src}: a CompVis Stable Diffusion checkpoint needs --text-encoder DIR (a "
                                  "diffusers text_encoder + tokenizer folder, or a pipeline folder): it holds "
                                  "no tokenizer")
        return _compvis_sd(src, state, text_encoder)
    raise CheckpointError(f"{src}: unknown layout: neither an official DiT ({OFFICIAL_DIT_KEY}) nor a CompVis "
                          f"Stable Diffusion checkpoint ({COMPVIS_UNET_PREFIX}*)")


def _unused(value: Any, flag: str, why: str) -> None:
    if value is not None:
        raise CheckpointError(f"{flag}: not used here ({why})")


def _sd_pipeline(src: Path) -> _Plan:
    settings = pipes.read_scheduler(src, stable_diffusion=True)
    unet = load_diffusers_unet(src / "unet")
    vae = load_diffusers_vae(src / "vae")
    scale = pipes.vae_scaling_factor(src / "vae")
    sample_size = read_json(src / "unet" / DIFFUSERS_CONFIG_NAME).get("sample_size", 64)
    encoder_dir, tokenizer_dir = pipes.clip_text_folders(src)
    return _sd_plan(src, unet, vae, scale, int(sample_size), settings, encoder_dir, tokenizer_dir, None,
                    f"diffusers {pipes.SD_PIPELINE} folder")


def _compvis_sd(src: Path, state: dict, text_encoder: Path) -> _Plan:
    unet = load_compvis_unet(state, sd_v1_unet_config())
    vae = load_compvis_vae(state, sd_v1_vae_config())
    encoder_dir, tokenizer_dir = pipes.clip_text_folders(text_encoder)
    text_state = pipes.compvis_text_state(state)
    return _sd_plan(src, unet, vae, vae.config.scaling_factor, 64, pipes.sd_v1_scheduler_settings(), encoder_dir,
                    tokenizer_dir, text_state or None, "CompVis Stable Diffusion v1 checkpoint")


def _sd_plan(src: Path, unet, vae, scale: float, sample_size: int, settings: pipes.SchedulerSettings,
             encoder_dir: Path, tokenizer_dir: Path, text_state: Optional[dict], layout: str) -> _Plan:
    text_dim = read_json(encoder_dir / DIFFUSERS_CONFIG_NAME).get("hidden_size")
    _check_sizes(src, unet.config.context_dim, text_dim, "the UNet's cross_attention_dim", "the text encoder's hidden_size")
    _check_sizes(src, unet.config.in_channels, vae.config.embed_dim, "the UNet's in_channels", "the VAE's latent_channels")
    factor = 2 ** (len(vae.config.channel_mult) - 1)
    max_length = pipes.tokenizer_max_length(tokenizer_dir)
    text = TextConditionerConfig(encoder="clip", path=None, max_length=max_length, ucg_rate=0.1, sd_padding=True)
    config = _run_config(src, sample_size * factor, scale, settings, SD_GUIDANCE, backbone="unet",
                         unet=_network_fields(UNetConfig, unet.config), conditioning=ConditioningConfig(text=text))

    def write_text(folder: Path) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
            encoder = CLIPTextModel.from_pretrained(str(encoder_dir), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{encoder_dir}: cannot load the CLIP text encoder: {first}") from None
        if text_state is not None:
            pipes.load_compvis_text(encoder, text_state, src)
        tokenizer.save_pretrained(str(folder))
        encoder.save_pretrained(str(folder), safe_serialization=True)

    return _Plan(config, unet, vae, write_text, None, layout)


def _dit_pipeline(src: Path, index: dict) -> _Plan:
    settings = pipes.read_scheduler(src)
    dit = load_diffusers_dit(src / "transformer")
    vae = load_diffusers_vae(src / "vae")
    transformer = read_json(src / "transformer" / DIFFUSERS_CONFIG_NAME)
    names = pipes.class_names(index, transformer, dit.config.num_classes)
    return _dit_plan(src, dit, vae, pipes.vae_scaling_factor(src / "vae"), settings, None, names,
                     f"diffusers {pipes.DIT_PIPELINE} folder")


def _official_dit(src: Path, state: dict, vae_dir: Path, num_heads: Optional[int]) -> _Plan:
    try:
        dit = load_official_dit(state, dit_config_from_state_dict(state, num_heads))
    except CheckpointError as err:
        raise CheckpointError(f"{src}: {err}" + (" (pass --num-heads)" if "num_heads" in str(err) else "")) from None
    vae = load_diffusers_vae(vae_dir)
    settings = pipes.scheduler_settings({"_class_name": "DDIMScheduler", "beta_schedule": "linear",
                                         "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False})
    # the published sampler (forward_with_cfg) guides 3 of the 4 latent channels
    return _dit_plan(src, dit, vae, pipes.vae_scaling_factor(vae_dir), settings, 3, None,
                     "official DiT checkpoint")


def _dit_plan(src: Path, dit, vae, scale: float, settings: pipes.SchedulerSettings,
              guidance_channels: Optional[int], names: Optional[list[str]], layout: str) -> _Plan:
    _check_sizes(src, dit.config.in_channels, vae.config.embed_dim, "the DiT's in_channels", "the VAE's latent_channels")
    factor = 2 ** (len(vae.config.channel_mult) - 1)
    learned = dit.config.out_channels == 2 * dit.config.in_channels
    settings = pipes.SchedulerSettings({**settings.process, "variance_type": "learned_range" if learned else "fixed_small"},
                                       {**settings.sample, "guidance_channels": guidance_channels})
    class_label = ClassLabelConfig(num_classes=dit.config.num_classes, embed_dim=dit.config.hidden_size, ucg_rate=0.1)
    fields = _network_fields(DiTConfig, dit.config)
    config = _run_config(src, dit.config.input_size * factor, scale, settings, DIT_GUIDANCE, backbone="dit",
                         dit=fields, conditioning=ConditioningConfig(class_label=class_label))
    return _Plan(config, dit, vae, None, names, layout)


def _network_fields(config_cls, network_config) -> Any:
    """``config_cls`` with the fields of ``network_config`` (a LabelDiTConfig loses num_classes and its name)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in dataclasses.asdict(network_config).items() if k in names}
    if "name" in values:
        values["name"] = None
    return config_cls(**values)


def _check_sizes(src: Path, a: Any, b: Any, what_a: str, what_b: str) -> None:
    if a != b:
        raise CheckpointError(f"{src}: mismatched sizes: {what_a} is {a} but {what_b} is {b}")


def _run_config(src: Path, image_size: int, scale: float, settings: pipes.SchedulerSettings, guidance: float,
                **model: Any) -> ExperimentConfig:
    """The run's config: latent diffusion on ``image_size`` RGB images, the scheduler as process and sampler."""
    name = src.stem if src.is_file() else src.name
    return ExperimentConfig(
        name=f"imported-{name}",
        task="diffusion",
        data=DataConfig(name="folder", image_size=image_size, channels=3),  # a folder's own captions, no template
        model=ModelConfig(objective="ddpm", process=GaussianDiffusionConfig(**settings.process),
                          first_stage="autoencoder", latent=LatentConfig(scale_factor=float(scale)), **model),
        sample=SampleConfig(guidance=guidance, **settings.sample),
    )

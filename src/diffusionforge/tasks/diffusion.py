"""task=diffusion: Gaussian diffusion in pixel or latent space (DDPM, LDM, DiT), sampled as images.

`dforge train` builds a ``GenerativeModel`` from the shared parts
(``tasks/parts.py``) and the ``GaussianDiffusion`` process; the run exports
``model.safetensors`` (EMA), ``model_raw.safetensors`` and, in latent space,
``first_stage.safetensors``; `dforge sample` draws images from it and
`dforge evaluate` scores them (FID, KID, class accuracy).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..config.schema import ExperimentConfig
from ..errors import CheckpointError, ConfigError
from ..models.generative import GenerativeModel, SampleRequest
from ..processes.registry import build_process  # model.objective: ddpm | edm | flow
from .base import EvalOptions, Task, validation_items
from .parts import resolve_from_data
from .parts import (check_class_labels, check_num_classes, export_weights, load_exported, model_parts,
                    prepare_first_stage, run_first_stage, first_stage_network)


def build_diffusion_model(config: ExperimentConfig, num_classes: Optional[int] = None,
                          sample_dir: Optional[Path] = None, autoencoder=None) -> GenerativeModel:
    """The GenerativeModel of a task=diffusion config; ``autoencoder`` overrides loading model.latent.run_dir."""
    check_num_classes(config, num_classes)
    if config.data.story is not None:
        raise ConfigError("data.story: stories are trained by task=story (set task=story)")
    ddpm = config.model.objective == "ddpm"
    learned = ddpm and config.model.process.variance_type == "learned_range"  # EDM and flow predict C channels
    return GenerativeModel(process=build_process(config.model),
                           **model_parts(config, autoencoder, sample_dir, learned_variance=learned))


def sample_request(config: ExperimentConfig, sampler: Optional[str] = None, steps: int = 50, eta: float = 0.0,
                   guidance: Optional[float] = None, use_ema: bool = True, precision: str = "fp32",
                   progress: bool = False, schedule: Optional[str] = None) -> SampleRequest:
    """How to walk the run's process: the given settings, the rest (sampler, schedule, guidance, spacing)
    from the run's ``sample`` section."""
    from ..samplers.registry import sampler_entry

    sampler = config.sample.sampler if sampler is None else sampler
    schedule = config.sample.schedule if schedule is None else schedule
    try:
        entry = sampler_entry(sampler, config.model.objective)
    except ValueError as err:
        raise ConfigError(f"--sampler: {err}") from None
    discrete = config.model.objective == "ddpm" and ("schedule" not in entry.options or schedule == "discrete")
    if discrete and steps > config.model.process.num_timesteps:
        raise ConfigError(f"--steps {steps} exceeds the process's {config.model.process.num_timesteps} timesteps")
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"--eta: must be a number >= 0, got {eta}")
    if guidance is not None and not math.isfinite(guidance):
        raise ConfigError(f"--guidance: must be a finite number, got {guidance}")
    return SampleRequest(
        sampler=sampler, steps=steps, eta=eta, spacing=config.sample.spacing, schedule=schedule,
        guidance=config.sample.guidance if guidance is None else guidance,
        guidance_channels=config.sample.guidance_channels, clip_denoised=config.sample.clip_denoised,
        use_ema=use_ema, precision=precision, progress=progress)


def class_labels(num: int, num_classes: Optional[int], class_label: Optional[int]) -> Optional[torch.Tensor]:
    """The label of each of ``num`` samples: ``class_label``, or the classes in turn (None: unconditional)."""
    if num_classes is None:
        if class_label is not None:
            raise ConfigError("--class given but the model is not class-conditional")
        return None
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ConfigError(f"--class must be in 0..{num_classes - 1}, got {class_label}")
    if class_label is not None:
        return torch.full((num,), class_label, dtype=torch.long)
    return torch.arange(num) % num_classes


def sample_images(model: GenerativeModel, num: int, request: SampleRequest, class_label: Optional[int] = None,
                  seed: int = 0, batch_size: int = 256, progress: bool = True) -> tuple[torch.Tensor, Optional[int]]:
    """``num`` samples (num, C, H, W) in [-1, 1] in batches from one seeded generator, and the grid's row
    length (one column per class when the classes are taken in turn)."""
    labels = class_labels(num, model.num_classes, class_label)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, num, batch_size), desc="sampling", file=sys.stderr, disable=not progress):
        n = min(batch_size, num - start)
        batch = {} if labels is None else model.label_batch(labels[start:start + n])
        chunks.append(model.sample(batch, n, request, generator=generator))
    nrow = model.num_classes if labels is not None and class_label is None else None
    return torch.cat(chunks), nrow


def one_step_count(steps: Optional[list[int]], default: int, what: str) -> int:
    """The single step count of ``--steps`` (a Gaussian run is scored at one)."""
    if steps is not None and len(steps) > 1:
        raise ConfigError(f"--steps: a {what} run is scored at one step count, got {steps}")
    return default if steps is None else steps[0]


class DiffusionTask(Task):
    """Gaussian diffusion of images or latents, conditioned on classes, captions or maps."""

    name = "diffusion"
    commands = frozenset({"sample"})
    usage = "`dforge sample`"

    def build_model(self, config: ExperimentConfig, num_classes: Optional[int] = None,
                    sample_dir: Optional[Path] = None, autoencoder=None):
        return build_diffusion_model(config, num_classes, sample_dir, autoencoder)

    def build(self, config: ExperimentConfig, datamodule) -> tuple[ExperimentConfig, GenerativeModel]:
        """Latent runs load their frozen autoencoder and fix the latent scale here (recorded in the config)."""
        config = resolve_from_data(config, datamodule)  # a folder's size, channels, classes
        config, autoencoder = prepare_first_stage(config, datamodule)
        model = self.build_model(config, datamodule.num_classes, autoencoder=autoencoder)
        model.grid_source = validation_items(datamodule)
        return config, model

    def finish(self, model: GenerativeModel, datamodule, run_dir: Path, config: ExperimentConfig) -> Path:
        export_weights(model, run_dir)
        return model.write_sample_grid(run_dir / "samples" / "final.png", seed=config.seed)

    def load(self, run_dir: Path, config: ExperimentConfig, use_ema: bool = True) -> GenerativeModel:
        model = self.build_model(config, autoencoder=run_first_stage(run_dir, config))
        return load_exported(model, run_dir, use_ema)

    def evaluate(self, run_dir: Path, config: ExperimentConfig, options: EvalOptions) -> dict:
        """FID, KID and class accuracy of ``options.num`` samples against the test split."""
        from ..evaluation import evaluate_run, metrics_record

        steps = one_step_count(options.steps, 50, "diffusion")
        request = sample_request(config, options.sampler, steps, options.eta, options.guidance,
                                 options.use_ema, options.precision, schedule=options.schedule)
        model = self.load(run_dir, config, options.use_ema)
        result, protocol = evaluate_run(model, config, request, options.num, options.seed,
                                        features=options.features, batch_size=options.batch_size)
        return metrics_record(result, protocol)

    def network(self, run_dir: Path, config: ExperimentConfig, kind: str):
        """vae: the latent run's first stage; unet / dit: the backbone with its EMA weights."""
        if kind == "vae":
            return first_stage_network(run_dir, config, kind)
        if config.model.backbone != kind:
            raise CheckpointError(f"{run_dir}: kind mismatch: this run's backbone is a {config.model.backbone} "
                                  f"(pass --kind {config.model.backbone})")
        net = self.load(run_dir, config).sampling_net()
        if kind == "dit":
            return label_dit_of_run(run_dir, net), "diffusion run (EMA weights)"
        return net["backbone"], "diffusion run (EMA weights)"


def label_dit_of_run(run_dir: Path, net):
    """The published DiT layout (``LabelDiT``) of a class-conditional DiT run: its table joins the backbone."""
    from ..backbones.dit import LabelDiT, LabelDiTConfig
    from ..conditioning.class_label import ClassEmbedder

    backbone, conditioners = net["backbone"], list(net["conditioner"].conditioners)
    if len(conditioners) != 1 or not isinstance(conditioners[0], ClassEmbedder) or \
            conditioners[0].dim != backbone.config.hidden_size:
        raise CheckpointError(f"{run_dir}: only a DiT conditioned on class labels alone, with "
                              f"class_label.embed_dim = hidden_size, has the published DiT layout")
    fields = dataclasses.asdict(backbone.config)
    label_dit = LabelDiT(LabelDiTConfig(**fields, num_classes=conditioners[0].num_classes))
    state = dict(backbone.state_dict(), **{"y_embedder.embedding_table.weight": conditioners[0].embedding.weight})
    label_dit.load_state_dict(state)
    return label_dit.eval()

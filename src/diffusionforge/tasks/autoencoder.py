"""task=autoencoder: build, finish, load and score a KL-autoencoder run (the first stage of LDM).

`dforge train fashion-vae` trains ``AutoencoderKL`` with ``AutoencoderModule``
through the same Lightning fit as diffusion runs (``training.fit``). The run
directory has the diffusion layout (``config.yaml``, ``checkpoints/last.ckpt``,
``logs/version_N/``, ``samples/``, ``train_summary.json``) with, instead of
``model*.safetensors``::

    autoencoder.safetensors   the AutoencoderKL state dict (no discriminator,
                              no LPIPS); its config in the file's metadata
    samples/final.png         top row validation images, bottom row their
                              reconstructions from the posterior mode

Settings taken from the config:

=========================  ===============================================
``autoencoder.network``    ``AutoencoderConfig``; in/out channels and
                           resolution are derived from ``data``
``autoencoder.loss``       ``AutoencoderLossConfig``; ``disc_in_channels``
                           derived from ``data.channels``
``autoencoder.lpips_*``    LPIPS weight files (loaded only when
                           ``loss.perceptual_weight > 0``)
``optim.lr``               learning rate of both Adam optimisers
``optim.grad_clip``        gradient-norm clip of each optimiser (0 = off)
``trainer.*``              as for diffusion, but Lightning counts two
                           optimiser steps per batch (generator, then
                           discriminator): ``max_steps`` and
                           ``checkpoint_every_n_steps`` count both,
                           ``val_every_n_steps`` counts batches
=========================  ===============================================

``optim.betas``, ``weight_decay``, ``warmup_steps`` and ``ema_decay`` do not
apply (LDM's Adam with betas (0.5, 0.9), constant rate, no EMA).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from ..config.schema import ExperimentConfig
from ..errors import CheckpointError, ConfigError
from ..first_stage.autoencoder import AutoencoderKL
from ..losses.autoencoder_loss import AutoencoderLossConfig
from ..losses.lpips import load_lpips
from ..models.autoencoder_module import AutoencoderModule
from ..runs import AUTOENCODER_WEIGHTS, CONFIG_FILE, open_run, weights_file
from ..weights import load_weights, save_weights
from .base import EvalOptions, Task, task_of, validation_items

__all__ = ["AUTOENCODER_WEIGHTS", "AutoencoderTask", "build_autoencoder", "build_autoencoder_module",
           "finish_autoencoder_run", "load_autoencoder_run"]

FINAL_GRID_IMAGES = 16  # validation images (one row) above their reconstructions in final.png


def build_autoencoder(config: ExperimentConfig) -> AutoencoderKL:
    """The AutoencoderKL of ``autoencoder.network`` with channels and resolution from ``data``."""
    data = config.data
    derived = dict(in_channels=data.channels, out_channels=data.channels,
                   resolution=data.image_size)
    try:
        return AutoencoderKL(dataclasses.replace(config.autoencoder.network, **derived))
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"autoencoder.network: {err}") from None


def loss_config(config: ExperimentConfig) -> AutoencoderLossConfig:
    """``autoencoder.loss`` with the discriminator's input channels from ``data.channels``."""
    try:
        return dataclasses.replace(config.autoencoder.loss, disc_in_channels=config.data.channels)
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"autoencoder.loss: {err}") from None


def build_autoencoder_module(config: ExperimentConfig,
                             sample_dir: Optional[Path] = None) -> AutoencoderModule:
    """The LightningModule of a task=autoencoder config (LPIPS from local files, or None)."""
    task = config.autoencoder
    loss = loss_config(config)
    lpips = load_lpips(task.lpips_vgg, task.lpips_lin) if loss.perceptual_weight > 0 else None
    return AutoencoderModule(build_autoencoder(config), loss, lr=config.optim.lr, lpips=lpips,
                             sample_dir=sample_dir, grad_clip=config.optim.grad_clip,
                             optim=config.optim)


def finish_autoencoder_run(model: AutoencoderModule, datamodule, run_dir: Path, config: ExperimentConfig) -> Path:
    """After fit: export ``autoencoder.safetensors``, write ``samples/final.png``; returns the grid."""
    autoencoder = model.autoencoder
    meta = {"format": "diffusionforge", "config": CONFIG_FILE,
            "autoencoder_config": json.dumps(dataclasses.asdict(autoencoder.config))}
    save_weights(autoencoder, run_dir / AUTOENCODER_WEIGHTS, meta)
    images = torch.stack([item["image"] for item in validation_items(datamodule)(FINAL_GRID_IMAGES)])  # (N, C, H, W)
    return model.write_sample_grid(run_dir / "samples" / "final.png", images=images)


def load_autoencoder_run(run_dir: str | Path) -> tuple[AutoencoderKL, ExperimentConfig]:
    """The trained AutoencoderKL of a task=autoencoder run (eval mode) and the run's config."""
    run_dir, config = open_run(run_dir)
    if not isinstance(task_of(config), AutoencoderTask):
        raise CheckpointError(f"{run_dir}: a task={config.task} run, not an autoencoder run "
                              "(train one with `dforge train fashion-vae`)")
    return load_autoencoder(run_dir, config), config


def load_autoencoder(run_dir: Path, config: ExperimentConfig) -> AutoencoderKL:
    """The AutoencoderKL of ``config`` with the run's exported weights, in eval mode."""
    autoencoder = load_weights(build_autoencoder(config), weights_file(run_dir, AUTOENCODER_WEIGHTS))
    return autoencoder.eval()


class AutoencoderTask(Task):
    """The KL autoencoder (LDM's first stage): reconstructions, scored by PSNR, SSIM, rFID and rKID."""

    name = "autoencoder"
    usage = "`dforge evaluate` to score it, or as model.latent.run_dir of a latent run"
    batches_per_optimizer_step = 2  # Lightning counts the generator's and the discriminator's step

    def build_model(self, config: ExperimentConfig, num_classes: Optional[int] = None,
                    sample_dir: Optional[Path] = None, autoencoder=None) -> AutoencoderModule:
        return build_autoencoder_module(config, sample_dir)

    def build(self, config: ExperimentConfig, datamodule) -> tuple[ExperimentConfig, AutoencoderModule]:
        config = dataclasses.replace(config, data=datamodule.config)  # a folder's size and channels, resolved
        model = self.build_model(config)
        model.grid_source = validation_items(datamodule)
        return config, model

    def finish(self, model: AutoencoderModule, datamodule, run_dir: Path, config: ExperimentConfig) -> Path:
        return finish_autoencoder_run(model, datamodule, run_dir, config)

    def load(self, run_dir: Path, config: ExperimentConfig, use_ema: bool = True) -> AutoencoderKL:
        return load_autoencoder(run_dir, config)

    def evaluate(self, run_dir: Path, config: ExperimentConfig, options: EvalOptions) -> dict:
        """Reconstructions of the first ``options.num`` test images through the posterior mode."""
        from ..evaluation.reconstruction import evaluate_autoencoder, reconstruction_record

        result, protocol = evaluate_autoencoder(self.load(run_dir, config), config, options.num,
                                                options.batch_size, features=options.features,
                                                weights=run_dir / AUTOENCODER_WEIGHTS)
        return reconstruction_record(result, protocol)

    def network(self, run_dir: Path, config: ExperimentConfig, kind: str) -> tuple[AutoencoderKL, str]:
        if kind != "vae":
            raise CheckpointError(f"{run_dir}: a task={self.name} run has no {kind} (use --kind vae)")
        return self.load(run_dir, config), "autoencoder run"

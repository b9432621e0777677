"""What the tasks of a backbone walking a process share (diffusion, bridge, story): one build, finish and load.

Their runs hold ``model.safetensors`` (EMA) and ``model_raw.safetensors`` of
the backbone and conditioners, plus ``first_stage.safetensors`` in latent
space; each subclass says only how its model is made (``build_model``) and
what it evaluates.
"""

from __future__ import annotations

from pathlib import Path

from ..config.schema import ExperimentConfig
from .base import Task, validation_items
from .init import finetune, prepare_init
from .latent_cache import check_latent_cache
from .parts import export_weights, first_stage_network, load_exported, prepare_first_stage, resolve_from_data, \
    run_first_stage


class NetworkTask(Task):
    """A task whose model is built by ``build_model`` from the shared parts (tasks/parts.py)."""

    def build(self, config: ExperimentConfig, datamodule):
        """A folder's size, channels and classes; ``init_from``; the frozen first stage and its latent scale
        (recorded in the returned config); then the model, with its grids fed from the validation set."""
        config = resolve_from_data(config, datamodule)
        config = prepare_init(config)
        config, autoencoder = prepare_first_stage(config, datamodule)
        model = finetune(self.build_model(config, datamodule.num_classes, autoencoder=autoencoder), config)
        check_latent_cache(model, datamodule)  # data.cache: made with this model's first stage and text encoder
        model.grid_source = validation_items(datamodule)
        return config, model

    def finish(self, model, datamodule, run_dir: Path, config: ExperimentConfig) -> Path:
        """Export the weights (a LoRA UNet's adapters also in the diffusers LoRA format); samples/final.png,
        the model's own grid."""
        export_weights(model, run_dir)
        if config.model.lora.rank and config.model.backbone == "unet":
            from ..interop.lora import save_diffusers_lora

            save_diffusers_lora(model.ema.module["backbone"], run_dir)
        return model.write_sample_grid(run_dir / "samples" / "final.png", seed=config.seed)

    def load(self, run_dir: Path, config: ExperimentConfig, use_ema: bool = True):
        model = self.build_model(config, autoencoder=run_first_stage(run_dir, config))
        return load_exported(model, run_dir, use_ema)

    def network(self, run_dir: Path, config: ExperimentConfig, kind: str):
        """vae: a latent run's frozen first stage (the subclasses add their backbones)."""
        return first_stage_network(run_dir, config, kind)

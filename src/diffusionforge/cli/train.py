"""`dforge train [CONFIG] [key=value ...]` and `dforge train --resume RUN_DIR`."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import lightning as L

from ..budget import fit_time_limit
from ..checkpoints import check_resume_fits, resume_checkpoint
from ..build import build_datamodule, build_model, prepare_first_stage
from ..config.schema import ExperimentConfig
from ..data.datamodule import ImageDataModule
from ..errors import ConfigError
from ..plotting import plot_after_fit
from ..run_lock import run_lock
from ..machine import choose_precision, describe_machine, machine_line
from ..runs import (CONFIG_FILE, create_run_dir, export_weights, last_checkpoint, open_run,
                    run_dir_for_workers, write_json, write_text_atomic)
from ..config.loader import config_to_yaml, load_config

DESCRIPTION = """Train a model. With no CONFIG the default preset (class-conditional
DDPM on the embedded Fashion-MNIST subset) runs. CONFIG is a preset name
(see `dforge presets`) or a YAML file; key=value overrides follow it, e.g.
trainer.max_steps=500 data.batch_size=64 model.unet.model_channels=32.
`dforge train fashion-vae` trains a KL autoencoder (task=autoencoder), the
first stage of latent diffusion; it writes autoencoder.safetensors."""

# After fit, on rank 0: export weights and write samples/final.png; returns the grid's path.
Finish = Callable[[L.LightningModule, ImageDataModule, Path, ExperimentConfig], Path]


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="preset name or YAML file, then overrides")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from checkpoints/last.ckpt (overrides may extend it, "
                        "e.g. trainer.max_steps=6000)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run)


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def run(args: argparse.Namespace) -> int:
    with ExitStack() as lock:  # RUN_DIR/.lock, held until the run has finished or failed
        return train(args, lock)


def train(args: argparse.Namespace, lock: ExitStack) -> int:
    source, overrides = split_args(args.args)
    if args.resume:
        if source is not None:
            raise ConfigError(f"--resume takes its config from the run; drop '{source}'")
        run_dir, config = open_run(args.resume, overrides)
        lock.enter_context(run_lock(run_dir))
        resume = resume_checkpoint(last_checkpoint(run_dir))  # refusals leave the run untouched
        ckpt = resume.path
    else:
        config = load_config(source or "fashion-ddpm", overrides)
        ckpt = resume = None
    from ..training import check_logger
    check_logger(config.trainer)  # e.g. trainer.logger=tensorboard without its package
    machine = describe_machine(config.trainer.accelerator)
    precision, why = choose_precision(config.trainer.precision, machine)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")  # data errors surface before a run directory is made
    config, model, finish = build_task(config, datamodule)
    started = getattr(args, "started", time.monotonic())
    max_time, budget = fit_time_limit(config.trainer.time_budget, config.trainer.max_time, model, started)
    if resume is None:
        run_dir, config = create_run_dir(config)
        lock.enter_context(run_lock(run_dir))
    else:
        check_resume_fits(model, resume)
        resume = None  # release the memory-mapped checkpoint
        write_text_atomic(run_dir / CONFIG_FILE, config_to_yaml(config))
    print(machine_line(machine, precision, why, config.trainer.time_budget or config.trainer.max_time),
          file=sys.stderr)  # after every input check: a refusal is one line
    model.sample_dir = run_dir / "samples"
    fit_config = replace(config, trainer=replace(config.trainer, max_time=max_time, precision=precision))
    extra = {"machine": machine.as_dict(), "precision": precision, "precision_reason": why, **budget}
    return fit(fit_config, model, datamodule, run_dir, ckpt, progress=not args.no_progress,
               finish=finish, extra_summary=extra)


def build_task(config: ExperimentConfig,
               datamodule: ImageDataModule) -> tuple[ExperimentConfig, L.LightningModule, Finish]:
    """The LightningModule of ``config.task`` and what to do with it after fit.

    Latent diffusion loads its frozen autoencoder here and fixes the latent
    scale, so the returned config (written to the run) records the scale used.
    """
    if config.task == "autoencoder":
        from ..autoencoder_run import build_autoencoder_module, finish_autoencoder_run

        return config, build_autoencoder_module(config), finish_autoencoder_run
    if config.model.conditioning.class_label is not None and datamodule.num_classes is None:
        raise ConfigError(f"model.conditioning.class_label: data.name={config.data.name} has no class labels "
                          "(an image folder needs one sub-folder per class); set model.conditioning.class_label=null")
    config, autoencoder = prepare_first_stage(config, datamodule)
    model = build_model(config, datamodule.num_classes, autoencoder=autoencoder)
    return config, model, finish_diffusion_run


def finish_diffusion_run(model, datamodule: ImageDataModule, run_dir: Path,
                         config: ExperimentConfig) -> Path:
    """Export the sampling weights and write samples/final.png (bridge runs: validation pairs); returns the grid."""
    export_weights(model, run_dir)
    return model.write_sample_grid(run_dir / "samples" / "final.png", seed=config.seed)


class StartStep(L.Callback):
    """Records the global step at which fit starts (after a resume's checkpoint is loaded)."""

    def __init__(self) -> None:
        self.step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def trainer_config(config, model: L.LightningModule):
    """Lightning clips gradients only under automatic optimisation; manual modules clip themselves."""
    if model.automatic_optimization:
        return config
    return replace(config, optim=replace(config.optim, grad_clip=0.0))


def fit(config, model, datamodule, run_dir, ckpt, progress: bool,
        finish: Finish = finish_diffusion_run, extra_summary: Optional[dict] = None) -> int:
    from ..training import make_trainer

    L.seed_everything(config.seed, workers=True, verbose=False)
    trainer = make_trainer(trainer_config(config, model), run_dir, progress=progress)
    start_step = StartStep()
    trainer.callbacks.append(start_step)
    start = time.time()
    with run_dir_for_workers(run_dir):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    wall = time.time() - start
    if not trainer.is_global_zero:
        return 0
    grid = finish(model, datamodule, run_dir, config)
    plot_after_fit(run_dir)  # loss.png from every logs/version_N/metrics.csv of the run
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"wall_time_s": round(wall, 1), "global_step": trainer.global_step,
               "resumed_from_step": start_step.step, "peak_rss_mb": round(peak_mb, 1),
               "world_size": trainer.world_size,
               "steps_per_s": round((trainer.global_step - start_step.step) / max(wall, 1e-9), 3),
               **(extra_summary or {})}
    write_json(run_dir / "train_summary.json", summary)
    print(f"run dir: {run_dir}\nsamples: {grid}\n"
          f"steps {start_step.step} -> {trainer.global_step} in {wall:.0f} s, "
          f"peak memory {peak_mb:.0f} MB", file=sys.stderr)
    return 0

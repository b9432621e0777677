"""The Lightning Trainer of an experiment, configured from ``TrainerConfig``.

Lightning owns the loop, devices, precision, accumulation, clipping,
checkpointing, logging and DDP/FSDP; this module only translates config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from .checkpoint_io import AtomicCheckpointIO
from .config.schema import ExperimentConfig, TrainerConfig
from .divergence import NonFiniteGuard
from .errors import ConfigError
from .machine import choose_precision, describe_machine


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16-mixed where bf16 is native, else 32-true; anything else as given."""
    return choose_precision(precision, describe_machine())[0]


TENSORBOARD_MISSING = ('trainer.logger=tensorboard needs the tensorboard package: '
                       'pip install -e ".[tensorboard]"')


def check_logger(t: TrainerConfig) -> None:
    """Raise before any work starts when trainer.logger=tensorboard lacks its package."""
    if t.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(TENSORBOARD_MISSING)


def make_loggers(t: TrainerConfig, run_dir: Path) -> list:
    """logs/version_N/metrics.csv always (a resume never erases earlier logs; `dforge plot`
    reads them); trainer.logger=tensorboard adds event files in logs/version_N/tensorboard."""
    csv = CSVLogger(run_dir, name="logs")
    if t.logger == "csv":
        return [csv]
    check_logger(t)
    from lightning.pytorch.loggers import TensorBoardLogger

    return [csv, TensorBoardLogger(run_dir, name="logs", version=csv.version, sub_dir="tensorboard",
                                   default_hp_metric=False)]


def make_trainer(config: ExperimentConfig, run_dir: Path, progress: bool = True) -> L.Trainer:
    t = config.trainer
    # always checkpoints/last.ckpt, also in a moved or copied run (no last-v1.ckpt beside a stale last.ckpt)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=t.checkpoint_every_n_steps,
                                 enable_version_counter=False)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        num_nodes=t.num_nodes, precision=resolve_precision(t.precision), max_steps=t.max_steps,
        max_time=t.max_time, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=config.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0, default_root_dir=run_dir,
        logger=make_loggers(t, run_dir),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"),
                   NonFiniteGuard(t.max_nonfinite_steps)],  # a diverging run stops before a bad step
        plugins=[AtomicCheckpointIO()],  # checkpoints: temp file + rename, last-prev.ckpt kept
        enable_progress_bar=progress, enable_model_summary=False,
    )

"""`dforge train` as a library call: the Lightning Trainer of an experiment and the run around it.

Lightning owns the loop, devices, precision, accumulation, clipping,
checkpointing, logging and DDP/FSDP; this module translates the config into
a Trainer (``make_trainer``), fits the task's module (``fit``) and, around
that, handles the run directory: a fresh run or ``--resume``, its lock, the
machine line, the time budget and ``train_summary.json`` (``train``).
"""

from __future__ import annotations

import importlib.util
import resource
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from .budget import fit_time_limit
from .checkpoint_io import AtomicCheckpointIO
from .checkpoints import check_resume_fits, resume_checkpoint
from .config.loader import DEFAULT_PRESET, config_to_yaml, load_config
from .config.schema import ExperimentConfig, TrainerConfig
from .data.datamodule import ImageDataModule
from .divergence import NonFiniteGuard
from .epoch_position import EpochPosition
from .errors import ConfigError
from .machine import choose_precision, describe_machine, machine_line
from .plotting import plot_after_fit
from .run_lock import run_lock
from .sharding import SHARDED, check_shardable, full_state, make_strategy
from .runs import (CONFIG_FILE, check_launched_run_dir, create_run_dir, first_process, last_checkpoint, open_run,
                   run_dir_for_workers, write_summary, write_text_atomic)
from .tasks import Task, task_of


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
    """The Trainer of ``config``; what Lightning refuses in it, or in how the cluster launched the processes
    (SLURM's tasks per node against ``trainer.devices``, checked here rather than at launch), is a one-line
    ConfigError."""
    try:
        trainer = _trainer(config, run_dir, progress)
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is not None:
            environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    except (ValueError, MisconfigurationException) as err:
        raise ConfigError(f"trainer: {str(err).strip().splitlines()[0]}") from None
    return trainer


def _trainer(config: ExperimentConfig, run_dir: Path, progress: bool) -> L.Trainer:
    t = config.trainer
    # always checkpoints/last.ckpt, also in a moved or copied run (no last-v1.ckpt beside a stale last.ckpt)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=t.checkpoint_every_n_steps,
                                 enable_version_counter=False)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=make_strategy(t.strategy),
        num_nodes=t.num_nodes, precision=resolve_precision(t.precision), max_steps=t.max_steps,
        max_time=t.max_time, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=config.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0, default_root_dir=run_dir,
        logger=make_loggers(t, run_dir),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"),
                   NonFiniteGuard(t.max_nonfinite_steps),  # a diverging run stops before a bad step
                   EpochPosition()],  # a resumed epoch goes on with its unseen images, for any number of processes
        plugins=[AtomicCheckpointIO()],  # checkpoints: temp file + rename, last-prev.ckpt kept
        enable_progress_bar=progress, enable_model_summary=False,
    )


# Lightning warns that a plain DataLoader replays a mid-epoch resume's epoch from its start; ours go on with the
# epoch's unseen images (EpochPosition with data/epoch_order.py; a shard stream keeps its own position).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def train(source: Optional[str] = None, overrides: Sequence[str] = (), resume: Optional[str] = None,
          progress: bool = True, started: Optional[float] = None) -> int:
    """Train a config (preset name or YAML file, then overrides) into a new run directory, or continue the
    run ``resume`` from its last checkpoint. ``started``: when the command began (the time budget's zero).

    Every input is checked before a run directory is made or touched; the run
    directory is locked (``RUN/.lock``) until the run has finished or failed.
    """
    started = time.monotonic() if started is None else started
    with ExitStack() as lock:
        if resume:
            if source is not None:
                raise ConfigError(f"--resume takes its config from the run; drop '{source}'")
            run_dir, config = open_run(resume, overrides)
            lock.enter_context(run_lock(run_dir))
            resumed = resume_checkpoint(last_checkpoint(run_dir))  # refusals leave the run untouched
            ckpt = resumed.path
        else:
            config = load_config(source or DEFAULT_PRESET, overrides)
            check_launched_run_dir(config)  # before the data is read
            ckpt = resumed = None
        task = task_of(config)
        task.check(config)
        check_logger(config.trainer)  # e.g. trainer.logger=tensorboard without its package
        machine = describe_machine(config.trainer.accelerator)
        precision, why = choose_precision(config.trainer.precision, machine)
        datamodule = ImageDataModule(config.data, seed=config.seed)
        datamodule.setup("fit")  # data errors surface before a run directory is made
        L.seed_everything(config.seed, verbose=False)  # the initial weights too follow the seed
        config, model = task.build(config, datamodule)
        check_shardable(config.trainer, model)
        max_time, budget = fit_time_limit(config.trainer.time_budget, config.trainer.max_time, model, started)
        if resumed is None:
            run_dir, config = create_run_dir(config)
            lock.enter_context(run_lock(run_dir))
        else:
            check_resume_fits(model, resumed)
            resumed = None  # release the memory-mapped checkpoint
            if first_process():  # one writer of the run directory
                write_text_atomic(run_dir / CONFIG_FILE, config_to_yaml(config))
        print(machine_line(machine, precision, why, config.trainer.time_budget or config.trainer.max_time),
              file=sys.stderr)  # after every input check: a refusal is one line
        model.sample_dir = run_dir / "samples"
        fit_config = replace(config, trainer=replace(config.trainer, max_time=max_time, precision=precision))
        extra = {"machine": machine.as_dict(), "precision": precision, "precision_reason": why, **budget}
        return fit(fit_config, task, model, datamodule, run_dir, ckpt, progress=progress, extra_summary=extra)


class StartStep(L.Callback):
    """Records the global step at which fit starts (after a resume's checkpoint is loaded)."""

    def __init__(self) -> None:
        self.step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def trainer_config(config: ExperimentConfig, model: L.LightningModule) -> ExperimentConfig:
    """Lightning clips gradients only under automatic optimisation; manual modules clip themselves."""
    if model.automatic_optimization:
        return config
    return replace(config, optim=replace(config.optim, grad_clip=0.0))


def unsharded_copy(model: L.LightningModule, task: Task, config: ExperimentConfig, datamodule,
                   device: torch.device):
    """On rank 0, a freshly built module on ``device`` holding the sharded ``model``'s full weights (and EMA);
    ``model`` itself elsewhere. Every rank must call it (the shards are gathered)."""
    state = full_state(model)
    if state is None:
        return model
    _, copy = task.build(config, datamodule)
    copy.load_state_dict(state)
    copy.sample_dir = model.sample_dir
    return copy.to(device)


def fit(config: ExperimentConfig, task: Task, model: L.LightningModule, datamodule, run_dir: Path,
        ckpt: Optional[Path], progress: bool, extra_summary: Optional[dict] = None) -> int:
    """Fit ``model``; then, on rank 0, the task's finish (weights, final grid), loss.png and the summary."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    trainer = make_trainer(trainer_config(config, model), run_dir, progress=progress)
    start_step = StartStep()
    trainer.callbacks.append(start_step)
    start = time.time()
    sharded = config.trainer.strategy.lower() == SHARDED
    if config.trainer.activation_checkpointing:  # applied in the module's configure_model (sharding.py)
        model.activation_checkpointing = True
    with run_dir_for_workers(run_dir):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    wall = time.time() - start
    checkpointed = getattr(model, "checkpointed_blocks", 0)
    if sharded:  # every rank gathers the shards; rank 0 exports them from an unsharded copy
        model = unsharded_copy(model, task, config, datamodule, trainer.strategy.root_device)
    if not trainer.is_global_zero:
        return 0
    grid = task.finish(model, datamodule, run_dir, config)
    plot_after_fit(run_dir)  # loss.png from every logs/version_N/metrics.csv of the run
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"wall_time_s": round(wall, 1), "global_step": trainer.global_step,
               "resumed_from_step": start_step.step, "peak_rss_mb": round(peak_mb, 1),
               "world_size": trainer.world_size, "activation_checkpointed_blocks": checkpointed,
               "steps_per_s": round((trainer.global_step - start_step.step) / max(wall, 1e-9), 3),
               **(extra_summary or {})}
    write_summary(run_dir, summary)
    print(f"run dir: {run_dir}\nsamples: {grid}\n"
          f"steps {start_step.step} -> {trainer.global_step} in {wall:.0f} s, "
          f"peak memory {peak_mb:.0f} MB", file=sys.stderr)
    return 0

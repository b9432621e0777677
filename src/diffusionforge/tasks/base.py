"""The protocol of a task: one kind of run, from its config to its run directory and back.

A task answers every question the commands ask about a run of its kind:

=================  ==============================================================
``build_model``    the untrained LightningModule of a config
``build``          `dforge train`: the module for the datamodule's data (and the
                   config as the run records it, e.g. with its estimated latent scale)
``finish``         after the fit, on rank 0: export the weights into the run
                   directory and write ``samples/final.png``
``load``           the trained model of a run directory, in eval mode
``evaluate``       `dforge evaluate`: the ``metrics.json`` record of a run
``network``        `dforge convert`: one network of a run (``vae``, ``unet``, ``dit``)
``commands``       which of `sample`, `translate`, `story` take its runs
=================  ==============================================================

Tasks are found through one registry, ``TASKS`` (filled by ``tasks/__init__.py``
with one instance of each task); ``task_of(config)`` is the one place that
reads ``ExperimentConfig.task``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from ..config.schema import ExperimentConfig
from ..errors import CheckpointError, ConfigError


@dataclass
class EvalOptions:
    """What `dforge evaluate` was asked for; each task reads the fields that apply to it."""

    num: int = 10000                       # samples (or test images / pairs / stories) scored
    steps: Optional[list[int]] = None      # sampling steps; bridges take several, None = the run's default
    sampler: Optional[str] = None         # None = the run's sample.sampler
    schedule: Optional[str] = None        # sigma schedule of the sigma samplers; None = the run's sample.schedule
    eta: float = 0.0
    guidance: Optional[float] = None       # None = the run's sample.guidance
    seed: int = 0
    batch_size: int = 125
    use_ema: bool = True
    precision: str = "fp32"
    features: Optional[str] = None         # feature network for FID/KID; None = the dataset's classifier
    data: Optional[str] = None             # diffusion runs: the data.root scored against (a folder; an imported SD's caption folder)


class Task:
    """One kind of run. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]                    # the value of ExperimentConfig.task
    commands: ClassVar[frozenset[str]] = frozenset()  # generation commands that take its runs
    usage: ClassVar[str] = ""              # how its runs are used, for a refusal by another command
    batches_per_optimizer_step: ClassVar[int] = 1  # optimiser steps Lightning counts per training batch
    trains_from_cache: ClassVar[bool] = False  # data.cache: its runs train from a `dforge cache` folder

    def check(self, config: ExperimentConfig) -> None:
        """Rules on the config that only the task knows; raises ConfigError."""
        if config.data.cache is not None and not self.trains_from_cache:
            takers = " or ".join(f"task={name}" for name, task in TASKS.items() if task.trains_from_cache)
            raise ConfigError(f"data.cache: task={self.name} runs do not train from a latent cache "
                              f"({takers} runs do)")
        if config.data.cache is not None and config.model.first_stage != "autoencoder":
            raise ConfigError("data.cache: a latent cache holds first-stage latents; this run is in pixel space "
                              "(model.first_stage=identity)")
        optim = config.optim
        batches = config.trainer.max_steps // self.batches_per_optimizer_step
        if optim.schedule == "steps" and optim.lr_decay != "none" and batches <= optim.warmup_steps:
            raise ConfigError(f"optim.lr_decay={optim.lr_decay} decays over trainer.max_steps "
                              f"({batches} training batches), which must exceed optim.warmup_steps "
                              f"({optim.warmup_steps})")

    def build_model(self, config: ExperimentConfig, num_classes: Optional[int] = None,
                    sample_dir: Optional[Path] = None, autoencoder=None):
        """The untrained LightningModule of a config (``autoencoder``: a first stage to use as is)."""
        raise NotImplementedError

    def build(self, config: ExperimentConfig, datamodule) -> tuple[ExperimentConfig, Any]:
        """`dforge train`: the module for ``datamodule``'s data and the config as the run records it."""
        raise NotImplementedError

    def finish(self, model, datamodule, run_dir: Path, config: ExperimentConfig) -> Path:
        raise NotImplementedError

    def load(self, run_dir: Path, config: ExperimentConfig, use_ema: bool = True):
        raise NotImplementedError

    def evaluate(self, run_dir: Path, config: ExperimentConfig, options: EvalOptions) -> dict:
        raise NotImplementedError

    def network(self, run_dir: Path, config: ExperimentConfig, kind: str) -> tuple[Any, str]:
        """(module, the layout it was read as) for `dforge convert --kind KIND`."""
        raise CheckpointError(f"{run_dir}: a task={self.name} run has no {kind}")

    def refuse(self, command: str, run_dir: Path, takers: list[str]) -> ConfigError:
        """The one-line error of `dforge COMMAND` given a run of this task."""
        runs = " or ".join(f"task={name}" for name in takers)
        hint = f": use {self.usage}" if self.usage else ""
        return ConfigError(f"{run_dir} is a task={self.name} run; `dforge {command}` takes {runs} runs{hint}")


def validation_items(datamodule):
    """The grid source of a model: ``count`` -> the first items of the validation set (training set when
    data.val_size=0)."""
    def items(count: int) -> list[dict]:
        dataset = datamodule.val_set if datamodule.val_set is not None and len(datamodule.val_set) \
            else datamodule.train_set
        return [dataset[i] for i in range(min(count, len(dataset)))]
    return items


TASKS: dict[str, Task] = {}  # ExperimentConfig.task -> its Task; filled by register() in tasks/__init__.py


def register(task: Task) -> Task:
    """Add ``task`` to the registry under ``task.name``."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def task_of(config: ExperimentConfig) -> Task:
    """The task of a config (``config.task``)."""
    try:
        return TASKS[config.task]
    except KeyError:
        raise ConfigError(f"task: unknown task {config.task!r} (one of {', '.join(TASKS)})") from None

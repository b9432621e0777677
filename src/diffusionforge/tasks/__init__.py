"""The tasks: one module per kind of run, found through one registry.

==================  ===========================================================
``base``            the ``Task`` protocol (build, finish, load, evaluate,
                    network, commands) and ``EvalOptions``
``parts``           what the model-building tasks share: first stage,
                    conditioners, backbone, exporting and loading weights
``network``         ``NetworkTask``: their one build / finish / load
``init``            ``init_from`` (fine-tuning from a run) and ``model.freeze``
``imported``        `dforge import`: pretrained pipelines as run directories
``diffusion``       Gaussian diffusion (DDPM, LDM, DiT): `dforge sample`
``autoencoder``     the KL autoencoder of latent diffusion
``bridge``          Latent Bridge Matching: `dforge translate`
``story``           AR-LDM stories: `dforge story`
==================  ===========================================================

``TASKS`` is the registry (``base.py``; filled here); ``task_of(config)`` is
the only place that reads ``ExperimentConfig.task``. A new task is a module
with a ``Task`` subclass and one entry in the tuple below
(docs/ARCHITECTURE.md walks through an example).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config.schema import ExperimentConfig
from ..errors import CheckpointError, ConfigError
from ..interop.detect import load_network
from ..runs import CONFIG_FILE, open_run
from .autoencoder import AutoencoderTask
from .base import TASKS, EvalOptions, Task, register, task_of
from .bridge import BridgeTask
from .diffusion import DiffusionTask
from .story import StoryTask

for _task in (DiffusionTask(), AutoencoderTask(), BridgeTask(), StoryTask()):
    register(_task)

__all__ = ["TASKS", "EvalOptions", "Task", "build_model", "command_task", "load_run_model",
           "read_network", "task_of"]


def command_task(config: ExperimentConfig, command: str, run_dir: Path) -> Task:
    """The task of a run given to `dforge COMMAND`; a one-line refusal when the command does not apply."""
    task = task_of(config)
    if command not in task.commands:
        raise task.refuse(command, run_dir, [t.name for t in TASKS.values() if command in t.commands])
    return task


def load_run_model(run_dir: str | Path, use_ema: bool = True):
    """The model of a run sampled through a diffusion process (diffusion, bridge, story), and its config."""
    run_dir, config = open_run(run_dir)
    task = task_of(config)
    if not task.commands:
        raise CheckpointError(f"{run_dir}: a task={config.task} run, not a diffusion, bridge or story model")
    return task.load(run_dir, config, use_ema), config


def build_model(config: ExperimentConfig, num_classes: Optional[int] = None,
                sample_dir: Optional[Path] = None, autoencoder=None):
    """The untrained model of a config (``autoencoder``: the first stage to use instead of loading
    model.latent.run_dir)."""
    return task_of(config).build_model(config, num_classes, sample_dir=sample_dir, autoencoder=autoencoder)


def read_network(src: Path, kind: str, config_path: Optional[Path] = None):
    """(network, the layout it was read as) of `dforge convert SRC --kind KIND`: a run directory through its
    task, any other layout through ``interop.detect``."""
    if src.is_dir() and (src / CONFIG_FILE).is_file():
        if config_path is not None:
            raise ConfigError("--config: a run directory carries its own config.yaml")
        run_dir, config = open_run(src)
        return task_of(config).network(run_dir, config, kind)
    loaded = load_network(src, kind, config_path)
    return loaded.model, loaded.layout

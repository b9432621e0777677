"""Run directories: their layout, create, open, config file, summary, checkpoint and weights paths.

Pure file handling: nothing here imports model code (what a run's weights
*mean* is its task's business, ``tasks/``).

A run directory holds::

    config.yaml             the resolved config (the only input `sample` needs)
    checkpoints/last.ckpt   Lightning checkpoint for --resume
    checkpoints/last-prev.ckpt  the checkpoint before it (a fallback; checkpoint_io.py)
    .lock                   while `dforge train` runs: its pid and host (run_lock.py)
    model.safetensors       EMA weights for sampling
    model_raw.safetensors   the trained (non-EMA) weights
    autoencoder.safetensors task=autoencoder runs: the AutoencoderKL (instead of model*.safetensors)
    first_stage.safetensors latent runs: a copy of the frozen autoencoder (config in its metadata)
    samples/                PNG grids written during validation and at the end
    logs/version_N/         metrics.csv of each fit (a resume adds a version)
    loss.png                train and validation loss against step (plotting.py, `dforge plot`)
    train_summary.json      wall time, steps and peak memory of the last fit
    class_names.json        `dforge import` of a DiT: the class names (id2label), one per class index
    text_encoder/           `dforge import` of Stable Diffusion: the CLIP text encoder + tokenizer
                            (model.conditioning.text.path: text_encoder, relative to the run)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from .config.loader import config_to_yaml, load_config
from .config.schema import ExperimentConfig
from .errors import CheckpointError, ConfigError
from .utils.atomic import atomic_path

CONFIG_FILE = "config.yaml"
EMA_WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "model_raw.safetensors"
FIRST_STAGE_WEIGHTS = "first_stage.safetensors"
AUTOENCODER_WEIGHTS = "autoencoder.safetensors"  # task=autoencoder runs, instead of model*.safetensors
SUMMARY_FILE = "train_summary.json"
METRICS_FILE = "metrics.json"
CLASS_NAMES_FILE = "class_names.json"  # imported class-conditional runs (`dforge import`): a JSON list, one name per class index
LAST_CKPT = Path("checkpoints") / "last.ckpt"
RUN_DIR_ENV = "DFORGE_RUN_DIR"  # set for DDP worker processes that re-run the CLI
RANK_VARIABLES = ("RANK", "SLURM_PROCID")  # global rank, set by torchrun / srun for every process of a run
NODE_VARIABLES = ("NODE_RANK", "GROUP_RANK", "LOCAL_RANK")  # node and local rank (Lightning's environment, torchrun)
WORLD_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS")  # processes of an externally launched run


def _env_int(variable: str) -> Optional[int]:
    value = os.environ.get(variable, "").strip()
    return int(value) if value.isdigit() else None


def launched_rank() -> int:
    """Global rank given by an external launcher (torchrun, SLURM's srun, or ``NODE_RANK`` / ``LOCAL_RANK`` as a
    cluster sets them for Lightning); 0 when there is none. From node and local rank alone the global rank is not
    known without the devices per node: any non-zero one gives a rank > 0 (only "is this the first process" matters)."""
    for variable in RANK_VARIABLES:
        rank = _env_int(variable)
        if rank is not None:
            return rank
    return max((_env_int(v) or 0 for v in NODE_VARIABLES), default=0)


def first_process() -> bool:
    """Whether this process is the one that owns the run directory: not a DDP worker that Lightning started
    (``$DFORGE_RUN_DIR``), not a process of rank > 0 that an external launcher started."""
    return not os.environ.get(RUN_DIR_ENV) and launched_rank() == 0


def launched_world_size() -> int:
    """Processes of a run started by an external launcher (1 when none says otherwise)."""
    return max((_env_int(v) or 1 for v in WORLD_VARIABLES), default=1)


@contextmanager
def run_dir_for_workers(run_dir: Path) -> Iterator[None]:
    """Expose run_dir to worker processes that Lightning launches during fit."""
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_launched_run_dir(config: ExperimentConfig) -> None:
    """A run that an external launcher starts as several processes names its directory: the processes could
    not agree on a time-stamped one."""
    if config.run_dir is None and (launched_rank() > 0 or launched_world_size() > 1):
        raise ConfigError("run_dir: a run launched as several processes (torchrun, srun, NODE_RANK) needs "
                          "run_dir=PATH, the same on every node, on a filesystem they all share")


def create_run_dir(config: ExperimentConfig) -> tuple[Path, ExperimentConfig]:
    """Make a new run directory and write the resolved config into it.

    DDP worker processes re-run the same command; they find the directory
    chosen by the launching process in ``$DFORGE_RUN_DIR`` and reuse it.
    Processes that an external launcher starts on several nodes (torchrun,
    srun, ``NODE_RANK``) share the ``run_dir`` they are all given: the first
    one (global rank 0) makes it and writes its config, the others only use it.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited), replace(config, run_dir=inherited)
    check_launched_run_dir(config)
    if launched_rank() > 0:
        run_dir = Path(config.run_dir).resolve()
        return run_dir, replace(config, run_dir=str(run_dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_dir or Path("runs") / f"{config.name}-{stamp}").resolve()
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run_dir {run_dir} already holds a run; continue it with "
                          f"`dforge train --resume {run_dir}` or choose another run_dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} exists and is not a directory")
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    config = replace(absolute_data_paths(config), run_dir=str(run_dir))
    write_text_atomic(run_dir / CONFIG_FILE, config_to_yaml(config))
    return run_dir, config


def absolute_data_paths(config: ExperimentConfig) -> ExperimentConfig:
    """``data.root``, ``data.cache`` and ``data.story.root`` given relative to the working directory, made
    absolute for the run's config.yaml, so ``--resume``, ``sample`` and ``evaluate`` find them from anywhere.
    URLs (``pipe:...``, ``s3://...``) and paths that do not exist here are kept as given."""
    def absolute(value: Optional[str]) -> Optional[str]:
        if value is None or ":" in value or Path(value).is_absolute() or not Path(value).exists():
            return value
        return str(Path(value).resolve())

    data = config.data
    story = data.story if data.story is None else replace(data.story, root=absolute(data.story.root))
    data = replace(data, root=absolute(data.root), cache=absolute(data.cache), story=story)
    return replace(config, data=data)


def open_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, ExperimentConfig]:
    """An existing run directory and its config (with optional overrides)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    run_dir = run_dir.resolve()
    return run_dir, resolve_run_paths(run_dir, load_config(str(run_dir / CONFIG_FILE), overrides))


def resolve_run_paths(run_dir: Path, config: ExperimentConfig) -> ExperimentConfig:
    """A relative ``model.conditioning.text.path`` naming a folder inside the run (``dforge import``'s
    ``text_encoder``) made absolute, so the run reads its own copy wherever it has moved."""
    text = config.model.conditioning.text
    if text is None or text.path is None or Path(text.path).is_absolute() or not (run_dir / text.path).is_dir():
        return config
    conditioning = replace(config.model.conditioning, text=replace(text, path=str(run_dir / text.path)))
    return replace(config, model=replace(config.model, conditioning=conditioning))


def last_checkpoint(run_dir: Path) -> Path:
    path = run_dir / LAST_CKPT
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from ({LAST_CKPT} missing)")
    return path


def weights_file(run_dir: Path, name: str) -> Path:
    """``run_dir/name``, which training exports at its end; a one-line error when it is missing."""
    path = run_dir / name
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no exported weights ({name} missing; has training finished?)")
    return path


def write_summary(run_dir: Path, summary: dict) -> None:
    write_json(run_dir / SUMMARY_FILE, summary)

"""Run directories: create, open, find checkpoints, export and load weights.

A run directory holds::

    config.yaml             the resolved config (the only input `sample` needs)
    checkpoints/last.ckpt   Lightning checkpoint for --resume
    checkpoints/last-prev.ckpt  the checkpoint before it (a fallback; checkpoint_io.py)
    .lock                   while `dforge train` runs: its pid and host (run_lock.py)
    model.safetensors       EMA weights for sampling
    model_raw.safetensors   the trained (non-EMA) weights
    first_stage.safetensors latent runs: a copy of the frozen autoencoder (config in its metadata)
    samples/                PNG grids written during validation and at the end
    logs/version_N/         metrics.csv of each fit (a resume adds a version)
    loss.png                train and validation loss against step (plotting.py, `dforge plot`)
    train_summary.json      wall time, steps and peak memory of the last fit
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Sequence

from .config.loader import config_to_yaml, load_config
from .config.schema import ExperimentConfig
from .errors import CheckpointError, ConfigError
from .utils.atomic import atomic_path
from .weights import load_weights, save_weights

CONFIG_FILE = "config.yaml"
EMA_WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "model_raw.safetensors"
FIRST_STAGE_WEIGHTS = "first_stage.safetensors"
LAST_CKPT = Path("checkpoints") / "last.ckpt"
RUN_DIR_ENV = "DFORGE_RUN_DIR"  # set for DDP worker processes that re-run the CLI


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


def create_run_dir(config: ExperimentConfig) -> tuple[Path, ExperimentConfig]:
    """Make a new run directory and write the resolved config into it.

    DDP worker processes re-run the same command; they find the directory
    chosen by the launching process in ``$DFORGE_RUN_DIR`` and reuse it.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited), replace(config, run_dir=inherited)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_dir or Path("runs") / f"{config.name}-{stamp}").resolve()
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run_dir {run_dir} already holds a run; continue it with "
                          f"`dforge train --resume {run_dir}` or choose another run_dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} exists and is not a directory")
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    config = replace(config, run_dir=str(run_dir))
    write_text_atomic(run_dir / CONFIG_FILE, config_to_yaml(config))
    return run_dir, config


def open_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, ExperimentConfig]:
    """An existing run directory and its config (with optional overrides)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    return run_dir.resolve(), load_config(str(run_dir / CONFIG_FILE), overrides)


def last_checkpoint(run_dir: Path) -> Path:
    path = run_dir / LAST_CKPT
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from ({LAST_CKPT} missing)")
    return path


def export_weights(model, run_dir: Path) -> Path:
    """EMA and raw sampling weights as safetensors beside config.yaml (+ the latent first stage)."""
    meta = {"format": "diffusionforge", "config": CONFIG_FILE}
    autoencoder = getattr(model.first_stage, "autoencoder", None)
    if autoencoder is not None:  # the run must not depend on the autoencoder run staying around
        save_weights(autoencoder, run_dir / FIRST_STAGE_WEIGHTS,
                     {**meta, "autoencoder_config": json.dumps(asdict(autoencoder.config))})
    save_weights(model.net, run_dir / RAW_WEIGHTS, meta)
    return save_weights(model.ema.module, run_dir / EMA_WEIGHTS, meta)


def load_first_stage_copy(run_dir: Path):
    """The AutoencoderKL saved in a latent run (``first_stage.safetensors``)."""
    from safetensors import SafetensorError, safe_open

    from .first_stage.autoencoder import AutoencoderConfig, AutoencoderKL

    path = run_dir / FIRST_STAGE_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: latent run without {FIRST_STAGE_WEIGHTS}")
    try:
        with safe_open(str(path), framework="pt") as f:
            fields = json.loads((f.metadata() or {}).get("autoencoder_config", "null") or "null")
    except (SafetensorError, OSError, ValueError) as err:  # truncated / foreign file, bad JSON metadata
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: no autoencoder_config in the file's metadata")
    try:
        config = AutoencoderConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the autoencoder_config in the file's metadata does not fit: {err}") from None
    return load_weights(AutoencoderKL(config), path).eval()


def load_run_model(run_dir: str | Path, use_ema: bool = True):
    """The GenerativeModel of a run, with its exported weights loaded, in eval mode."""
    from .build import build_model  # local: build imports the whole model stack

    run_dir, config = open_run(run_dir)
    if config.task not in ("diffusion", "bridge", "story"):
        raise CheckpointError(f"{run_dir}: a task={config.task} run, not a diffusion, bridge or story model")
    autoencoder = load_first_stage_copy(run_dir) if config.model.first_stage == "autoencoder" else None
    model = build_model(config, autoencoder=autoencoder)
    weights = run_dir / (EMA_WEIGHTS if use_ema else RAW_WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{run_dir}: no exported weights ({weights.name} missing; "
                              "has training finished?)")
    load_weights(model.ema.module if use_ema else model.net, weights)
    return model.eval(), config

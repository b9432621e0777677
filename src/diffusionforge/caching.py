"""`dforge cache` as a library call: a dataset's training images encoded once by a model's frozen parts.

``RUN_OR_CONFIG`` names the model: a latent run directory (its own first-stage
copy, latent scale and text encoder, loaded as `dforge sample` loads the run)
or a config / preset (its frozen parts built as `dforge train` builds them: the
autoencoder of ``model.latent``, the latent scale estimated from the training
images, the text encoder). Either way the images are the training split its
``data`` section defines; ``data/latent_cache.py`` describes what is written
and ``tasks/latent_cache.py`` what a run trained from it must share.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .conditioning.text import EMPTY_CAPTION, TextConditioner
from .config.loader import load_config
from .config.schema import ExperimentConfig
from .data.datamodule import ImageDataModule
from .data.latent_cache import LATENTS_INDEX, Index, dataset_facts, write_cache
from .runs import CONFIG_FILE, FIRST_STAGE_WEIGHTS, open_run
from .tasks import Task, task_of
from .tasks.latent_cache import SOURCE, FrozenParts, frozen_parts

__all__ = ["CacheSummary", "cache"]

MOMENTS = ("mean", "std")  # the posterior's, in latents.safetensors
LABELS = ("class_label",)  # item keys stored whether or not the model reads them


@dataclass
class CacheSummary:
    """What `dforge cache` wrote."""

    directory: Path
    count: int  # images encoded
    captions: int  # distinct captions encoded (the empty one included), over all caption keys
    seconds: float  # encoding time (model building and writing not counted)


def cache(source: str, out: str | Path, overrides: Sequence[str] = (), batch_size: int = 256,
          progress: bool = True) -> CacheSummary:
    """Encode the training split of ``source`` (a latent run directory, a config or a preset) into ``out``."""
    config, model, datamodule, made_from = frozen_model(source, overrides)
    parts = frozen_parts(model)  # refuses pixel space and conditioners that encode images
    train = datamodule.train_set  # a Subset of the training source: DataConfig refuses flips, pairs and streams
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.first_stage.to(device)
    model.net["conditioner"].to(device)
    started = time.perf_counter()
    latents, captions = encode_images(model, parts, train, batch_size, config.data.num_workers, progress)
    text = encode_captions(model, captions, batch_size)
    seconds = time.perf_counter() - started
    index = Index(count=len(train), dataset=dataset_facts(config.data, len(train.dataset)),
                  first_stage={**parts.first_stage, SOURCE: made_from},
                  latent_scale=float(model.first_stage.scale_factor), text=parts.text,
                  tensors=[key for key in latents if key not in MOMENTS],
                  made_from=str(source), seconds=round(seconds, 3))
    latents[LATENTS_INDEX] = torch.tensor(train.indices, dtype=torch.int64)
    directory = write_cache(Path(out), index, latents, text)
    distinct = sum(len(text[key]) for key in text if key.endswith(".hidden"))
    return CacheSummary(directory, len(train), distinct, seconds)


def frozen_model(source: str, overrides: Sequence[str]) -> tuple[ExperimentConfig, object, ImageDataModule, str]:
    """(config, model, datamodule set up for fit, where its first stage came from) of RUN_OR_CONFIG."""
    run_dir = Path(source)
    is_run = run_dir.is_dir() and (run_dir / CONFIG_FILE).is_file()
    if is_run:
        run_dir, config = open_run(run_dir, overrides)
    else:
        config = load_config(source, overrides)
    task, config = checked_for_cache(config)
    datamodule = ImageDataModule(config.data, seed=config.seed)
    datamodule.setup("fit")
    if is_run:  # the run's own first-stage copy, latent scale and text encoder
        return config, task.load(run_dir, config, use_ema=False), datamodule, str(run_dir / FIRST_STAGE_WEIGHTS)
    config, model = task.build(config, datamodule)  # as `dforge train` builds it (the scale estimated)
    latent = config.model.latent
    return config, model, datamodule, str(latent.run_dir or latent.vae_dir or config.init_from)


def checked_for_cache(config: ExperimentConfig) -> tuple[Task, ExperimentConfig]:
    """The task and the config reading images (data.cache dropped), after the rules of training from a cache are
    checked on it: ``DataConfig`` (no flips, random crops, degradations, stories, streams) and ``Task.check``
    (a latent task=diffusion config)."""
    cached = dataclasses.replace(config, data=dataclasses.replace(config.data, cache="cache"))  # validates
    task = task_of(cached)
    task.check(cached)
    return task, dataclasses.replace(config, data=dataclasses.replace(config.data, cache=None))


@torch.no_grad()
def encode_images(model, parts: FrozenParts, train: Subset, batch_size: int, workers: int,
                  progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Posterior ``mean`` / ``std`` (N, c, h, w) and the per-item tensors of ``train`` (those the conditioners read,
    and its class labels); its captions per key."""
    autoencoder, device = model.first_stage.autoencoder, model.first_stage.autoencoder.quant_conv.weight.device
    labels = [key for key in LABELS if key in train[0] and key not in parts.tensors]  # kept, though unread
    stored: dict[str, list[torch.Tensor]] = {key: [] for key in (*MOMENTS, *parts.tensors, *labels)}
    captions: dict[str, list[str]] = {key: [] for key in parts.text}
    loader = DataLoader(train, batch_size=batch_size, shuffle=False, num_workers=workers)
    for batch in tqdm(loader, desc="caching", file=sys.stderr, disable=not progress):
        posterior = autoencoder.encode(batch["image"].to(device))
        stored["mean"].append(posterior.mean.float().cpu())
        stored["std"].append(posterior.std.float().cpu())
        for key in (*parts.tensors, *labels):
            stored[key].append(batch[key])
        for key in parts.text:
            captions[key].extend(batch[key])
    return {key: torch.cat(values) for key, values in stored.items()}, captions


@torch.no_grad()
def encode_captions(model, captions: dict[str, list[str]], batch_size: int) -> dict[str, torch.Tensor]:
    """Per caption key: the table of its distinct captions' ``hidden`` / ``mask`` (row 0 the empty caption)
    and each item's ``row`` in it."""
    encoders = {c.input_key: c for c in model.net["conditioner"].conditioners if isinstance(c, TextConditioner)}
    text: dict[str, torch.Tensor] = {}
    for key, items in captions.items():
        table = list(dict.fromkeys([EMPTY_CAPTION, *items]))  # NULL_ROW = 0
        chunks = [encoders[key].embed(table[i:i + batch_size]) for i in range(0, len(table), batch_size)]
        position = {caption: row for row, caption in enumerate(table)}
        text[f"{key}.hidden"] = torch.cat([hidden for hidden, _ in chunks]).float().cpu()
        text[f"{key}.mask"] = torch.cat([mask for _, mask in chunks]).bool().cpu()
        text[f"{key}.row"] = torch.tensor([position[c] for c in items], dtype=torch.int64)
    return text

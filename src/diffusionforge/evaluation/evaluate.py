"""Score a trained class-conditional run: FID, KID and class-conditional accuracy.

Samples are generated for classes 0..K-1 in turn, in batches, from a seeded
generator (the same command gives the same numbers). The shipped classifier
of the dataset family supplies the features (FID/KID against the held-out
test split) and the class predictions (accuracy: the fraction of samples
classified as the class they were generated for).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.datasets import build_dataset
from ..errors import ConfigError
from ..metrics.classifier import classifier_sha256, load_classifier
from ..metrics.distribution import DistributionMetrics
from ..models.generative import GenerativeModel, SampleRequest
from .protocol import EvalProtocol, git_commit

FEATURES_FOR_DATA = {"fashion-mnist-embedded": "fashion-mnist", "fashion-mnist": "fashion-mnist",
                     "mnist": "mnist"}


@dataclass
class EvalResult:
    fid: float
    kid_mean: float
    kid_std: float
    class_accuracy: Optional[float]
    sampling_seconds: float        # wall time spent generating (not scoring)


def choose_features(data_name: str, features: Optional[str]) -> str:
    name = features or FEATURES_FOR_DATA.get(data_name)
    if name not in ("fashion-mnist", "mnist"):
        raise ConfigError(f"--features: no shipped feature network for data '{data_name}' "
                          "(choose fashion-mnist or mnist)")
    return name


def split_images(config, split: str):
    """The ``split`` of the run's data source; a source without it is a config error."""
    dataset = build_dataset(config.data.name, split, root=config.data.root,
                            image_size=config.data.image_size, channels=config.data.channels)
    if dataset is None:
        raise ConfigError(f"data.name: '{config.data.name}' has no {split} split to compare with")
    return dataset


def classifier_metrics(config, feature_name: str):
    """The shipped classifier and FID/KID metrics on its features."""
    classifier = load_classifier(feature_name)
    shape = (config.data.channels, config.data.image_size, config.data.image_size)
    return classifier, DistributionMetrics(classifier, classifier.config.feature_dim, shape)


def add_images(metrics: DistributionMetrics, dataset, real: bool, batch_size: int) -> int:
    """Feed a dataset's images to the metrics; returns how many."""
    for batch in DataLoader(dataset, batch_size=batch_size):
        metrics.update(batch["image"], real=real)
    return len(dataset)


def evaluate_run(model: GenerativeModel, config, request: SampleRequest, num: int, seed: int,
                 features: Optional[str] = None,
                 batch_size: int = 250) -> tuple[EvalResult, EvalProtocol]:
    feature_name = choose_features(config.data.name, features)
    classifier, metrics = classifier_metrics(config, feature_name)
    n_ref = add_images(metrics, split_images(config, "test"), True, batch_size)
    correct, sampling_seconds = 0, 0.0
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % model.num_classes if model.num_classes else None
    for start in tqdm(range(0, num, batch_size), desc="evaluating"):
        n = min(batch_size, num - start)
        cond = {} if labels is None else {model.class_key: labels[start:start + n]}
        start_time = time.perf_counter()
        images = model.sample(cond, n, request, generator=generator)
        sampling_seconds += time.perf_counter() - start_time
        metrics.update(images, real=False)
        if labels is not None:
            with torch.no_grad():
                correct += (classifier(images).argmax(1) == labels[start:start + n]).sum().item()
    scores = metrics.compute()
    result = EvalResult(scores.fid, scores.kid_mean, scores.kid_std,
                        correct / num if labels is not None else None, sampling_seconds)
    protocol = EvalProtocol(
        num_samples=num, sampler=request.sampler, steps=request.steps, eta=request.eta,
        spacing=request.spacing, guidance=request.guidance, seed=seed,
        weights="ema" if request.use_ema else "raw", features=f"classifier/{feature_name}",
        features_sha256=classifier_sha256(feature_name),
        reference_split=f"{config.data.name}/test", reference_size=n_ref, git_commit=git_commit())
    return result, protocol


def metrics_record(result: EvalResult, protocol: EvalProtocol) -> dict:
    """metrics.json: the numbers, the wall time (which varies run to run) and the protocol."""
    metrics = asdict(result)
    seconds = metrics.pop("sampling_seconds")
    timing = {"sampling_seconds": round(seconds, 2),
              "seconds_per_image": round(seconds / protocol.num_samples, 4)}
    return {"metrics": metrics, "timing": timing, "protocol": asdict(protocol)}


def real_floor(config, features: Optional[str] = None, batch_size: int = 500) -> dict:
    """FID/KID between the real train and test splits: the floor under any model's score."""
    feature_name = choose_features(config.data.name, features)
    _, metrics = classifier_metrics(config, feature_name)
    sizes = {split: add_images(metrics, split_images(config, split), split == "test", batch_size)
             for split in ("train", "test")}
    scores = metrics.compute()
    return {"fid": scores.fid, "kid_mean": scores.kid_mean, "kid_std": scores.kid_std,
            "train_size": sizes["train"], "test_size": sizes["test"],
            "features": f"classifier/{feature_name}", "features_sha256": classifier_sha256(feature_name),
            "data": config.data.name}

"""Score a trained class-conditional run: FID, KID and class-conditional accuracy.

Samples are generated for classes 0..K-1 in turn, in batches, from a seeded
generator (the same command gives the same numbers). FID/KID are computed
against the held-out test split on a feature network (``metrics.features``;
by default the shipped classifier of the dataset family). An image folder
(``data.name=folder``) has no test split: its samples are scored against all
of the folder's images on ImageNet EfficientNet-Lite0 features by default, and
a text-to-image run whose captions are not class names is prompted with the
folder's captions (sample i: caption i mod N). That classifier
also gives the class-conditional accuracy (the fraction of samples
classified as the class they were generated for) and an Inception-style
score (``metrics.classifier_score``).
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
from ..metrics.classifier import load_classifier
from ..metrics.classifier_score import ClassifierScore
from ..metrics.distribution import DistributionMetrics
from ..metrics.features import FEATURE_NAMES, load_feature_network
from ..models.generative import GenerativeModel, SampleRequest
from .protocol import EvalProtocol, git_commit

CLASSIFIER_FOR_DATA = {"fashion-mnist-embedded": "fashion-mnist", "fashion-mnist": "fashion-mnist",
                       "mnist": "mnist"}
FEATURES_FOR_DATA = {**CLASSIFIER_FOR_DATA, "folder": "efficientnet"}  # own images: ImageNet features


@dataclass
class EvalResult:
    fid: float
    kid_mean: float
    kid_std: float
    class_accuracy: Optional[float]  # None without a class-conditional model and a classifier
    classifier_score: Optional[float]  # Inception-style score on the classifier (None without one)
    classifier_score_std: Optional[float]  # its std over 10 splits
    sampling_seconds: float        # wall time spent generating (not scoring)


def choose_features(data_name: str, features: Optional[str]) -> str:
    """The feature network: ``features`` if given, else the classifier of the data family."""
    name = features or FEATURES_FOR_DATA.get(data_name)
    if name is None:
        raise ConfigError(f"--features: no shipped classifier for data '{data_name}' "
                          f"(choose one of {', '.join(FEATURE_NAMES)})")
    if name not in FEATURE_NAMES:
        raise ConfigError(f"--features: unknown feature network '{name}' "
                          f"(choose one of {', '.join(FEATURE_NAMES)})")
    return name


def split_images(config, split: str):
    """The ``split`` of the run's data source; a source without it is a config error."""
    dataset = build_dataset(config.data.name, split, root=config.data.root,
                            image_size=config.data.image_size, channels=config.data.channels)
    if dataset is None:
        raise ConfigError(f"data.name: '{config.data.name}' has no {split} split to compare with")
    return dataset


def reference_images(config):
    """``(dataset, name)``: the real images samples are scored against: the source's test split, or for an
    image folder (which has no test split) all of its images (``data.root``)."""
    if config.data.name == "folder":
        dataset = build_dataset(config.data.name, "train", root=config.data.root,
                                image_size=config.data.image_size, channels=config.data.channels)
        return dataset, f"folder {config.data.root}"
    return split_images(config, "test"), f"{config.data.name}/test"


def caption_prompts(reference, name: str) -> list[str]:
    """The reference folder's captions: the prompts of a text-to-image run's samples (sample i: caption i mod N)."""
    captions = getattr(reference, "captions", None)
    if not captions:
        raise ConfigError(f"this run is text-conditioned: it is scored against a caption folder, and {name} has "
                          "no captions (metadata.jsonl / metadata.csv, or name.txt beside each image); give --data DIR")
    return list(captions)


def image_shape(config) -> tuple[int, int, int]:
    return (config.data.channels, config.data.image_size, config.data.image_size)


def accuracy_classifier(config):
    """The shipped classifier of the run's data family (class accuracy), or None."""
    name = CLASSIFIER_FOR_DATA.get(config.data.name)
    return load_classifier(name) if name is not None else None


def add_images(metrics: DistributionMetrics, dataset, real: bool, batch_size: int) -> int:
    """Feed a dataset's images to the metrics; returns how many."""
    for batch in DataLoader(dataset, batch_size=batch_size):
        metrics.update(batch["image"], real=real)
    return len(dataset)


def evaluate_run(model: GenerativeModel, config, request: SampleRequest, num: int, seed: int,
                 features: Optional[str] = None, batch_size: int = 125,
                 caption_key: Optional[str] = None) -> tuple[EvalResult, EvalProtocol]:
    """Generate ``num`` samples (classes in turn) and score them against ``reference_images``.

    ``caption_key``: the batch key of a text-conditioned run whose captions are not made from class names
    (an imported Stable Diffusion, a captioned folder run): sample i is prompted with the reference folder's
    caption i mod N (COCO-style text-to-image FID)."""
    network = load_feature_network(choose_features(config.data.name, features))
    metrics = network.metrics(image_shape(config))
    classifier = accuracy_classifier(config)
    score = ClassifierScore(classifier, seed=seed) if classifier is not None else None
    reference, reference_name = reference_images(config)
    prompts = None if caption_key is None else caption_prompts(reference, reference_name)
    n_ref = add_images(metrics, reference, True, batch_size)
    correct, sampling_seconds = 0, 0.0
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % model.num_classes if model.num_classes else None
    for start in tqdm(range(0, num, batch_size), desc="evaluating"):
        n = min(batch_size, num - start)
        cond = {} if labels is None else model.label_batch(labels[start:start + n])
        if prompts is not None:
            cond[caption_key] = [prompts[i % len(prompts)] for i in range(start, start + n)]
        start_time = time.perf_counter()
        images = model.sample(cond, n, request, generator=generator)
        sampling_seconds += time.perf_counter() - start_time
        metrics.update(images, real=False)
        if score is not None:
            score.update(images)
        if classifier is not None and labels is not None:
            with torch.no_grad():
                correct += (classifier(images).argmax(1) == labels[start:start + n]).sum().item()
    scores = metrics.compute()
    is_mean, is_std = score.compute() if score is not None else (None, None)
    accuracy = correct / num if classifier is not None and labels is not None else None
    result = EvalResult(scores.fid, scores.kid_mean, scores.kid_std, accuracy, is_mean, is_std,
                        sampling_seconds)
    protocol = EvalProtocol(
        num_samples=num, sampler=request.sampler, steps=request.steps, eta=request.eta,
        spacing=request.spacing, schedule=request.schedule, guidance=request.guidance,
        guidance_channels=request.guidance_channels, seed=seed,
        weights="ema" if request.use_ema else "raw", precision=request.precision,
        features=network.name, features_sha256=network.sha256,
        reference_split=reference_name, reference_size=n_ref, git_commit=git_commit())
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
    network = load_feature_network(choose_features(config.data.name, features))
    metrics = network.metrics(image_shape(config))
    sizes = {split: add_images(metrics, split_images(config, split), split == "test", batch_size)
             for split in ("train", "test")}
    scores = metrics.compute()
    floor = {"fid": scores.fid, "kid_mean": scores.kid_mean, "kid_std": scores.kid_std}
    classifier = accuracy_classifier(config)
    if classifier is not None:  # the score of real test images: the ceiling of a model's score
        score = ClassifierScore(classifier)
        for batch in DataLoader(split_images(config, "test"), batch_size=batch_size):
            score.update(batch["image"])
        floor["test_classifier_score"], floor["test_classifier_score_std"] = score.compute()
    return {**floor, "train_size": sizes["train"], "test_size": sizes["test"],
            "features": network.name, "features_sha256": network.sha256,
            "data": config.data.name}

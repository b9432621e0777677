"""The shipped FID/KID classifier: its files, shapes, sha256 checks and accuracy."""

import shutil

import pytest
import torch

from diffusionforge.data.datasets import build_dataset
from diffusionforge.errors import CheckpointError
from diffusionforge.metrics import (
    CLASSIFIER_SHA256,
    ClassifierConfig,
    SmallClassifier,
    classifier_path,
    classifier_sha256,
    file_sha256,
    load_classifier,
    load_classifier_file,
)

NAMES = ["fashion-mnist", "mnist"]
MAX_WEIGHTS_BYTES = 2 * 1024 * 1024
EMBEDDED_TEST_IMAGES = 500
MIN_EMBEDDED_ACCURACY = 0.90


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_match_recorded_sha256(name):
    path = classifier_path(name)
    assert path.is_file()
    assert path.stat().st_size < MAX_WEIGHTS_BYTES
    assert len(classifier_sha256(name)) == 64
    assert file_sha256(path) == classifier_sha256(name) == CLASSIFIER_SHA256[name]


@pytest.mark.parametrize("name", NAMES)
def test_load_classifier_shapes_and_eval_mode(name):
    model = load_classifier(name)
    assert not model.training
    x = torch.rand(3, 1, 28, 28) * 2 - 1  # (B, C, H, W) in [-1, 1]
    with torch.no_grad():
        h, logits = model.features(x), model(x)
    assert h.shape == (3, model.config.feature_dim)
    assert logits.shape == (3, 10)
    assert torch.allclose(model.head(h), logits, atol=1e-5)  # eval: dropout is off


def test_untrained_model_is_small():
    model = SmallClassifier(ClassifierConfig())
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_tampered_weights_raise_checkpoint_error(tmp_path):
    name = "fashion-mnist"
    copy = tmp_path / "tampered.safetensors"
    shutil.copyfile(classifier_path(name), copy)
    assert isinstance(load_classifier_file(copy, classifier_sha256(name)), SmallClassifier)
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF  # a byte inside the last tensor: still a readable file
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_classifier_file(copy, classifier_sha256(name))
    assert "\n" not in str(err.value)


def test_missing_weights_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier_file(tmp_path / "absent.safetensors", "0" * 64)


def test_unknown_classifier_name():
    with pytest.raises(ValueError, match="unknown classifier"):
        load_classifier("cifar10")


def test_fashion_classifier_accuracy_on_embedded_test_split():
    data = build_dataset("fashion-mnist-embedded", "test")
    items = [data[i] for i in range(EMBEDDED_TEST_IMAGES)]
    x = torch.stack([item["image"] for item in items])  # (500, 1, 28, 28) in [-1, 1]
    y = torch.stack([item["class_label"] for item in items])  # (500,)
    model = load_classifier("fashion-mnist")
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    assert accuracy >= MIN_EMBEDDED_ACCURACY

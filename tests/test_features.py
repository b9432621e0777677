"""Feature networks by name: classifier, EfficientNet-Lite0, Inception (local weights only)."""

import pytest
import torch

from diffusionforge.cli.main import main
from diffusionforge.errors import ConfigError
from diffusionforge.evaluation.evaluate import choose_features
from diffusionforge.metrics import classifier_sha256, efficientnet_sha256, inception
from diffusionforge.metrics.features import FEATURE_NAMES, load_feature_network


def test_default_features_follow_the_data_family():
    assert choose_features("fashion-mnist-embedded", None) == "fashion-mnist"
    assert choose_features("mnist", None) == "mnist"
    assert choose_features("folder", None) == "efficientnet"  # one's own images: ImageNet features
    assert choose_features("folder", "inception") == "inception"


def test_data_without_a_default_needs_explicit_features():
    with pytest.raises(ConfigError, match="--features: no shipped classifier for data 'shards'"):
        choose_features("shards", None)


def test_classifier_feature_network_is_recorded_with_its_hash():
    network = load_feature_network("mnist")
    assert network.name == "classifier/mnist" and network.sha256 == classifier_sha256("mnist")
    assert not network.rgb and network.dim == network.network.config.feature_dim


def test_efficientnet_metrics_take_grey_images():
    network = load_feature_network("efficientnet")
    assert network.name == "efficientnet-lite0" and network.sha256 == efficientnet_sha256()
    assert network.rgb and network.dim == 1280
    metrics = network.metrics((1, 28, 28))
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(6, 1, 28, 28, generator=generator) * 2 - 1
    metrics.update(real, real=True)
    metrics.update(real.flip(-1), real=False)
    scores = metrics.compute()
    assert scores.fid > 0 and torch.isfinite(torch.tensor(scores.kid_mean))


def test_unknown_feature_name_is_refused():
    with pytest.raises(ValueError, match="unknown feature network 'vgg'"):
        load_feature_network("vgg")
    assert set(FEATURE_NAMES) == {"fashion-mnist", "mnist", "efficientnet", "inception"}


def test_evaluate_with_inception_but_no_weights_is_one_line_error(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    code = main(["evaluate", str(tiny_run), "--num", "4", "--steps", "1", "--features", "inception",
                 "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Inception-v3 FID weights not found" in err and "Traceback" not in err
    assert not (tmp_path / "m.json").exists()

"""`dforge evaluate`: numbers plus the full protocol, and the same numbers twice."""

import json

import pytest
import torch

from diffusionforge.cli.main import main
from diffusionforge.metrics import classifier_sha256
from diffusionforge.models.generative import SampleRequest
from diffusionforge.tasks import load_run_model


def test_evaluate_records_protocol_and_repeats_exactly(tiny_run, tmp_path, capsys):
    outs = [tmp_path / "m1.json", tmp_path / "m2.json"]
    for out in outs:
        code = main(["evaluate", str(tiny_run), "--num", "20", "--steps", "3", "--guidance", "2",
                     "--seed", "5", "--batch-size", "10", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
    first, second = (json.loads(p.read_text()) for p in outs)
    assert first["metrics"] == second["metrics"] and first["protocol"] == second["protocol"]
    assert first["timing"]["seconds_per_image"] > 0
    metrics, protocol = first["metrics"], first["protocol"]
    assert metrics["fid"] > 0 and 0 <= metrics["class_accuracy"] <= 1
    assert 1 <= metrics["classifier_score"] <= 10 and metrics["classifier_score_std"] >= 0
    assert protocol["num_samples"] == 20 and protocol["steps"] == 3
    assert protocol["sampler"] == "ddim" and protocol["schedule"] == "discrete"  # the run's sample section
    assert protocol["guidance"] == 2.0 and protocol["seed"] == 5 and protocol["weights"] == "ema"
    assert protocol["precision"] == "fp32"
    assert protocol["features"] == "classifier/fashion-mnist"
    assert protocol["features_sha256"] == classifier_sha256("fashion-mnist")
    assert protocol["reference_split"] == "fashion-mnist-embedded/test"
    assert protocol["reference_size"] == 10000
    assert protocol["package_version"] and protocol["git_commit"]


def test_evaluate_missing_run_is_one_line_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "run directory not found" in err and "Traceback" not in err


def test_bf16_sampling_is_recorded_and_close_to_fp32(tiny_run, tmp_path, capsys):
    out = tmp_path / "bf16.json"
    assert main(["evaluate", str(tiny_run), "--num", "10", "--steps", "2", "--precision", "bf16",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["protocol"]["precision"] == "bf16" and record["metrics"]["fid"] > 0


def test_bf16_autocast_changes_only_the_network_arithmetic(tiny_run):
    model, _ = load_run_model(tiny_run)
    batch = model.label_batch(torch.arange(4))
    images = {}
    for precision in ("fp32", "bf16"):
        request = SampleRequest(steps=3, guidance=2.0, precision=precision)
        images[precision] = model.sample(batch, 4, request, generator=torch.Generator().manual_seed(0))
        assert images[precision].dtype == torch.float32
    difference = (images["fp32"] - images["bf16"]).abs()
    assert 0 < difference.max() < 0.25 and difference.mean() < 0.02


def test_classifier_score_on_known_cases():
    """Real test images score near the number of classes; one class, or noise, scores near 1."""
    from diffusionforge.config import load_config
    from diffusionforge.evaluation.evaluate import accuracy_classifier, split_images
    from diffusionforge.metrics.classifier_score import ClassifierScore

    config = load_config("tiny")
    classifier = accuracy_classifier(config)
    test = split_images(config, "test")
    images = torch.stack([test[i]["image"] for i in range(1000)])
    labels = torch.stack([torch.as_tensor(test[i]["class_label"]) for i in range(1000)])

    def score(x):
        metric = ClassifierScore(classifier, seed=0)
        metric.update(x)
        return metric.compute()

    real, real_std = score(images)
    assert real > 5.5 and real_std < 1.0  # 10 balanced classes, confidently predicted (6.3 here)
    assert score(images)[0] == real  # seeded split shuffle: the same number twice
    assert score(images[labels == 7])[0] < 1.6  # sneakers only: confident but not diverse
    assert score(torch.zeros(200, 1, 28, 28))[0] == pytest.approx(1.0, abs=1e-4)  # one image


def test_evaluate_records_the_sigma_sampler_and_schedule(tiny_run, tmp_path, capsys):
    out = tmp_path / "heun.json"
    code = main(["evaluate", str(tiny_run), "--num", "10", "--steps", "2", "--sampler", "heun", "--schedule",
                 "karras", "--batch-size", "10", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    protocol = json.loads(out.read_text())["protocol"]
    assert protocol["sampler"] == "heun" and protocol["schedule"] == "karras" and protocol["steps"] == 2

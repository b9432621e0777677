"""AR-LDM end to end through the CLI: the fashion-arldm preset shrunk to a tiny pixel-space run
(visualisation and continuation), `dforge story`, `dforge evaluate` on a story run, the
datamodule's story batches, and the one-line errors of bad input."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionforge.cli.main import main
from diffusionforge.config.loader import load_config
from diffusionforge.data.datamodule import ImageDataModule
from diffusionforge.utils.images import save_png, to_uint8
from test_cli import assert_one_line_error
from test_text_conditioner import _tiny_bert

CANVAS = 16
TINY_STORY = ["model.first_stage=identity", f"data.image_size={CANVAS}", "data.batch_size=4",
              f"data.story.canvas={CANVAS}", "data.story.item_size=8", "data.story.train_stories=32",
              "data.story.val_stories=4", "data.story.test_stories=8", "data.story.val_instances=50",
              "model.unet.model_channels=16", "model.unet.channel_mult=[1,2]", "model.unet.num_res_blocks=1",
              "model.unet.attention_resolutions=[2]", "model.unet.num_head_channels=16",
              "model.unet.norm_groups=8", "model.process.num_timesteps=100",
              "model.conditioning.story.dim=16", "model.conditioning.story.heads=2",
              "model.conditioning.story.patch=4", "model.conditioning.story.max_length=8",
              "optim.warmup_steps=2", "optim.ema_decay=0.5", "trainer.max_steps=4", "trainer.max_time=null",
              "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2",
              "trainer.limit_val_batches=1", "trainer.precision=32-true", "sample.steps=3"]
TASKS = ["visualisation", "continuation"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("story-runs")
    text = _tiny_bert(tmp_path_factory.mktemp("story-run-bert"))
    made = {}
    for task in TASKS:
        made[task] = root / task
        assert main(["train", "fashion-arldm", *TINY_STORY, f"model.conditioning.story.path={text}",
                     f"story.mode={task}", f"run_dir={made[task]}", "--no-progress"]) == 0
    return made


@pytest.fixture(scope="module")
def frame_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("story-inputs") / "frame0.png"
    frame = torch.full((1, 1, CANVAS, CANVAS), -1.0)
    frame[..., 2:10, 4:12] = 0.5
    save_png(to_uint8(frame)[0], path)
    return path


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("task", TASKS)
def test_story_run_directory(runs, task):
    run = runs[task]
    for name in ["config.yaml", "model.safetensors", "model_raw.safetensors", "samples/final.png",
                 "train_summary.json"]:
        assert (run / name).is_file(), name
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == 4
    grid = _png(run / "samples" / "final.png")
    assert grid.shape[0] > grid.shape[1]  # 4 stories x (real, generated) rows of 4 frames


def test_datamodule_batches_stories():
    config = load_config("fashion-arldm", TINY_STORY)
    datamodule = ImageDataModule(config.data)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["frames"].shape == (4, 4, 1, CANVAS, CANVAS)
    assert len(batch["captions"]) == 4 and all(len(c) == 4 for c in batch["captions"])
    assert datamodule.num_classes is None


def test_story_command_writes_a_strip_per_story(runs, tmp_path):
    out = tmp_path / "story.png"
    assert main(["story", str(runs["visualisation"]), "--captions", "a sneaker at the top left",
                 "it moves to the right", "it gets smaller", "--steps", "3", "--num", "2",
                 "--out", str(out)]) == 0
    strip = _png(out)
    pad = 2  # make_grid padding
    assert strip.shape[:2] == (2 * (CANVAS + pad) + pad, 3 * (CANVAS + pad) + pad)


def test_continuation_keeps_the_given_first_frame(runs, frame_png, tmp_path):
    out = tmp_path / "cont.png"
    assert main(["story", str(runs["continuation"]), "--first-frame", str(frame_png), "--captions",
                 "a bag at the top", "it moves to the left", "--steps", "3", "--out", str(out)]) == 0
    strip, given = _png(out), _png(frame_png)
    np.testing.assert_array_equal(strip[2:2 + CANVAS, 2:2 + CANVAS], given)


@pytest.mark.parametrize("argv, fragments", [
    (["--captions", "a", "b", "c", "d", "e"], ["--captions", "at most 4"]),
    (["--captions", "a sneaker", " "], ["--captions", "empty"]),
    (["--captions", "a", "b", "--steps", "0"], ["--steps"]),
])
def test_story_errors_are_one_line(runs, capsys, argv, fragments):
    code = main(["story", str(runs["visualisation"]), *argv, "--out", "unused.png"])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


def test_continuation_needs_the_first_frame(runs, capsys, tmp_path):
    code = main(["story", str(runs["continuation"]), "--captions", "a", "b", "--out", str(tmp_path / "x.png")])
    assert_one_line_error(code, capsys.readouterr().err, "--first-frame")
    wrong = tmp_path / "small.png"
    save_png(to_uint8(torch.zeros(1, 1, 8, 8))[0], wrong)
    code = main(["story", str(runs["continuation"]), "--first-frame", str(wrong), "--captions", "a", "b",
                 "--out", str(tmp_path / "x.png")])
    assert_one_line_error(code, capsys.readouterr().err, "small.png", "16x16")


def test_other_commands_refuse_a_story_run(runs, capsys, tmp_path, frame_png):
    code = main(["sample", str(runs["visualisation"]), "--out", str(tmp_path / "x.png")])
    assert_one_line_error(code, capsys.readouterr().err, "dforge story")
    code = main(["translate", str(runs["visualisation"]), str(frame_png), "--out", str(tmp_path / "x.png")])
    assert_one_line_error(code, capsys.readouterr().err, "task=story")


@pytest.mark.parametrize("task", TASKS)
def test_evaluate_scores_generated_beside_real_stories(runs, tmp_path, task):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(runs[task]), "--num", "8", "--steps", "2", "--seed", "0",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    model, real = record["metrics"]["model"], record["metrics"]["real"]
    for key in ["caption_accuracy", "caption_accuracy_omitted", "position_accuracy", "size_accuracy",
                "consistency_gap", "instance_gap", "fid", "fid_frame_1"]:
        assert key in model, key
    assert "fid" not in real and real["position_accuracy"] >= 0.9
    protocol = record["protocol"]
    assert protocol["num_stories"] == 8 and protocol["mode"] == task and protocol["history"] is True
    assert protocol["steps"] == 2 and protocol["classifier"] == "classifier/fashion-mnist"


def test_evaluate_refuses_other_feature_networks(runs, capsys):
    code = main(["evaluate", str(runs["visualisation"]), "--num", "4", "--features", "efficientnet"])
    assert_one_line_error(code, capsys.readouterr().err, "--features")


HDF5_FRAMES = 5  # frames of a write_arldm_file story


def _hdf5_overrides(path, text) -> list[str]:
    """TINY_STORY on an ARLDM-layout file: 5 RGB frames of 8 x 8, batches of 2 (the file has 2 stories a split)."""
    overrides = [o for o in TINY_STORY if not o.startswith(("data.story.", "data.image_size", "data.batch_size"))]
    return [*overrides, "data.story.source=hdf5", f"data.story.root={path}", f"data.story.frames={HDF5_FRAMES}",
            "data.image_size=8", "data.channels=3", "data.batch_size=2", "model.conditioning.story.patch=2",
            f"model.conditioning.story.path={text}"]


def test_hdf5_stories_train_tell_and_evaluate(tmp_path, capsys):
    """A PororoSV / FlintstonesSV file in ARLDM's layout trains a story run (RGB frames) end to end, and
    `dforge evaluate` scores its test split: FID over all frames and per frame index, with the protocol."""
    pytest.importorskip("h5py")
    from test_stories import write_arldm_file

    path = write_arldm_file(tmp_path / "pororo.h5")
    run = tmp_path / "run"
    assert main(["train", "fashion-arldm", *_hdf5_overrides(path, _tiny_bert(tmp_path)), "trainer.max_steps=2",
                 f"run_dir={run}", "--no-progress"]) == 0
    out = tmp_path / "story.png"
    assert main(["story", str(run), "--captions", "a", "b", "--steps", "2", "--out", str(out)]) == 0
    assert _png(out).shape == (8 + 4, 2 * 10 + 2, 3)
    assert main(["evaluate", str(run), "--num", "2", "--steps", "2", "--seed", "0"]) == 0
    record = json.loads((run / "metrics.json").read_text())
    keys = ["fid", "kid_mean", "kid_std"] + [f"fid_frame_{j}" for j in range(HDF5_FRAMES)]
    assert sorted(record["metrics"]) == sorted(keys)
    assert all(math.isfinite(record["metrics"][k]) for k in keys)
    protocol = record["protocol"]
    assert protocol["num_stories"] == 2 and protocol["scored_frames"] == list(range(HDF5_FRAMES))
    assert protocol["mode"] == "visualisation" and protocol["steps"] == 2 and protocol["image_size"] == 8
    assert protocol["features"] == "efficientnet-lite0" and protocol["reference_size"] == 2 * HDF5_FRAMES
    assert protocol["reference_split"].startswith(f"{path}:test")
    capsys.readouterr()
    for argv, fragments in [(["--num", "3"], ["--num 3", "2 test stories"]),
                            (["--num", "2", "--features", "fashion-mnist"], ["--features", "RGB"])]:
        code = main(["evaluate", str(run), *argv, "--steps", "2"])
        assert_one_line_error(code, capsys.readouterr().err, *fragments)
    untested = write_arldm_file(tmp_path / "untested.h5", splits=("train", "val"))  # no test group
    shutil.copytree(run, tmp_path / "run2")
    config = tmp_path / "run2" / "config.yaml"
    config.write_text(config.read_text().replace(str(path), str(untested)))
    code = main(["evaluate", str(tmp_path / "run2"), "--num", "2", "--steps", "2"])
    assert_one_line_error(code, capsys.readouterr().err, "untested.h5", "no split group 'test'")


class ReplayStories:
    """A story model that returns the real test story of each caption list, its frames rolled by ``shift``
    frame indices: the model ``evaluate_hdf5_story_run`` should score FID 0 (shift 0), or 0 pooled but > 0
    per frame index (shift 1: the right frames at the wrong places)."""

    def __init__(self, stories, mode: str, shift: int = 0):
        self.real = {tuple(stories[i]["captions"]): stories[i]["frames"] for i in range(len(stories))}
        self.story_mode, self.device, self.shift = mode, torch.device("cpu"), shift
        self.given = []  # first_frames of each generate call

    def generate(self, captions, request, first_frames=None, generator=None):
        self.given.append(first_frames)
        return torch.stack([self.real[tuple(c)] for c in captions]).roll(self.shift, dims=1)


@pytest.mark.parametrize("mode, shift", [("visualisation", 0), ("visualisation", 1), ("continuation", 0)])
def test_hdf5_story_fid_is_zero_for_the_real_stories(tmp_path, mode, shift):
    pytest.importorskip("h5py")
    from diffusionforge.evaluation.story_hdf5 import evaluate_hdf5_story_run, hdf5_test_stories
    from diffusionforge.tasks.diffusion import sample_request
    from test_stories import write_arldm_file

    path = write_arldm_file(tmp_path / "flintstones.h5")
    config = load_config("fashion-arldm", [*_hdf5_overrides(path, tmp_path / "unused"), f"story.mode={mode}"])
    stories = hdf5_test_stories(config, 2)
    model = ReplayStories(stories, mode, shift)
    request = sample_request(config, None, 2, 0.0, None, True, "fp32")
    record = evaluate_hdf5_story_run(model, config, 2, request, batch_size=1)
    metrics, scored = record["metrics"], record["protocol"]["scored_frames"]
    assert scored == list(range(1 if mode == "continuation" else 0, HDF5_FRAMES))
    assert sorted(k for k in metrics if k.startswith("fid_frame_")) == sorted(f"fid_frame_{j}" for j in scored)
    assert abs(metrics["fid"]) < 1e-3  # the same frames, pooled
    assert metrics["kid_mean"] < 1e-3  # unbiased KID of a set against itself: at or below 0
    per_frame = [metrics[f"fid_frame_{j}"] for j in scored]
    if shift == 0:
        assert max(abs(f) for f in per_frame) < 1e-3
    else:
        assert min(per_frame) > 1.0, per_frame
    if mode == "continuation":  # frame 0 of each story is given: the real one
        for i, given in enumerate(model.given):
            torch.testing.assert_close(given, stories[i]["frames"][:1])  # (1, 3, 8, 8): batches of 1
    else:
        assert model.given == [None, None]


class CountingFeatures(torch.nn.Module):
    """A tiny RGB feature network (per-channel means and spreads) that counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def features(self, images):
        self.calls += 1
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)  # (B, 6)


def test_frame_fid_runs_the_network_once_per_frame_and_pools_all_frames():
    from diffusionforge.evaluation.story_hdf5 import FrameFID
    from diffusionforge.metrics.features import FeatureNetwork

    network = FeatureNetwork("counting", "", CountingFeatures(), 6, rgb=True)
    generator = torch.Generator().manual_seed(0)
    real, fake = (torch.rand((6, 4, 3, 8, 8), generator=generator) * 2 - 1 for _ in range(2))
    scores = FrameFID(network, (3, 8, 8), scored=[1, 2, 3])
    scores.update(real, real=True)
    scores.update(fake, real=False)
    assert network.network.calls == 2 * 3  # frames 1..3 of the real and the generated batch, once each
    result = scores.compute(seed=0)
    pooled = network.metrics((3, 8, 8))  # the same frames in one batch each
    pooled.update(real[:, 1:].flatten(0, 1), real=True)
    pooled.update(fake[:, 1:].flatten(0, 1), real=False)
    expected = pooled.compute(seed=0)
    assert result["fid"] == pytest.approx(expected.fid, rel=1e-6) and result["fid"] > 0
    assert "fid_frame_0" not in result and all(result[f"fid_frame_{j}"] > 0 for j in (1, 2, 3))

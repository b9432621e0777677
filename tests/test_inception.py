"""Inception-v3 FID is found locally or refused with a clear message, never downloaded."""

import pytest
import torch

from diffusionforge.errors import CheckpointError
from diffusionforge.metrics import inception


def test_missing_weights_is_one_line_error_naming_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError) as info:
        inception.inception_fid()
    message = str(info.value)
    assert "\n" not in message and "nothing is downloaded" in message
    assert str(tmp_path / "nope.pth") in message and inception.INCEPTION_FILE in message


def test_weights_found_from_env_then_hub_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    cached = hub / "checkpoints" / inception.INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    assert inception.find_inception_weights() == cached
    own = tmp_path / "mine.pth"
    own.write_bytes(b"x")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(own))
    assert inception.find_inception_weights() == own


def test_weights_present_but_torch_fidelity_missing(tmp_path, monkeypatch):
    own = tmp_path / "mine.pth"
    own.write_bytes(b"x")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(own))
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install torch-fidelity"):
        inception.inception_fid()

"""The LightningModules' shared base: what each module exposes, grids fed through
``grid_source``, and state-dict keys unchanged from the modules before the base."""

import hashlib

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from diffusionforge.config import load_config
from diffusionforge.models.autoencoder_module import AutoencoderModule
from diffusionforge.models.base import BaseModule, NetworkModule, NoGridSource
from diffusionforge.models.bridge import GRID_PAIRS, BridgeModel
from diffusionforge.models.generative import GenerativeModel
from diffusionforge.models.story import StoryModel
from diffusionforge.tasks import build_model
from diffusionforge.tasks.autoencoder import build_autoencoder

# (number of keys, sha256 of the sorted keys joined by newlines, first 16 hex digits) of
# model.state_dict() for each preset, recorded from the modules before the shared base existed:
# runs trained then must load, and their checkpoints resume, with the same keys.
STATE_DICT_KEYS = {
    "tiny": (267, "a18779683cd4a26a"),
    "fashion-ldm": (591, "9153540b3735aa55"),
    "fashion-dit": (297, "3369766721f4edd2"),
    "fashion-lbm-sr": (581, "2af521e358dad973"),
    "fashion-lbm-inpaint": (581, "2af521e358dad973"),
    "fashion-arldm": (1053, "90af993147839b1d"),
    "fashion-vae": (169, "b50dfe5184f9bd25"),
}
BRIDGE = ["task=bridge", "data.degradation.kind=denoising", "model.conditioning.class_label=null",
          "bridge.steps=2"]
GAUSSIAN_ONLY = ("sample", "inpaint", "guided_channels", "grid_request")


def preset_module(name: str):
    """The untrained LightningModule of a preset; latent presets get the fashion-vae architecture."""
    config = load_config(name)
    autoencoder = None
    if config.task != "autoencoder" and config.model.first_stage == "autoencoder":
        config = load_config(name, ["model.latent.scale_factor=1.0"])
        autoencoder = build_autoencoder(load_config("fashion-vae"))
    return build_model(config, autoencoder=autoencoder)


def key_digest(keys) -> tuple[int, str]:
    keys = sorted(keys)
    return len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", list(STATE_DICT_KEYS))
def test_state_dict_keys_are_those_of_earlier_runs(name):
    torch.manual_seed(0)
    module = preset_module(name)
    keys = list(module.state_dict())
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    assert key_digest(keys) == STATE_DICT_KEYS[name], f"{name}: state-dict keys changed; prefixes now {prefixes}"


# ------------------------------------------------------------- what applies
def test_each_module_exposes_only_what_applies_to_it():
    for cls in (GenerativeModel, BridgeModel, StoryModel):
        assert issubclass(cls, NetworkModule)
    assert issubclass(AutoencoderModule, BaseModule) and not issubclass(AutoencoderModule, NetworkModule)
    assert not issubclass(BridgeModel, GenerativeModel)
    bridge = build_model(load_config("tiny", BRIDGE))
    assert isinstance(bridge, BridgeModel)
    for name in GAUSSIAN_ONLY:
        assert not hasattr(bridge, name), name
    assert callable(bridge.translate) and bridge.num_classes is None and bridge.label_batch(torch.arange(2)) == {}
    for name in (*GAUSSIAN_ONLY, "label_batch", "num_classes", "sampling_net"):
        assert hasattr(GenerativeModel, name), name
    assert hasattr(StoryModel, "generate") and not hasattr(GenerativeModel, "generate")


# -------------------------------------------------------------------- grids
def pairs(count: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"source": torch.rand(1, 28, 28, generator=generator) * 2 - 1,
             "image": torch.rand(1, 28, 28, generator=generator) * 2 - 1} for _ in range(count)]


def test_bridge_grid_comes_from_the_hook_without_a_trainer(tmp_path):
    model = build_model(load_config("tiny", BRIDGE))
    with pytest.raises(NoGridSource, match="grid_source is not set"):
        model.write_sample_grid(tmp_path / "none.png")
    asked = []
    items = pairs(GRID_PAIRS + 3)
    model.grid_source = lambda n: asked.append(n) or items[:n]
    assert model._trainer is None
    path = model.write_sample_grid(tmp_path / "grid.png", seed=1)
    assert path.is_file() and (tmp_path / "latest.png").is_file() and asked == [GRID_PAIRS]
    # the grid shows the source's pairs: the same grid from the same batch given explicitly
    batch = torch.utils.data.default_collate(items[:GRID_PAIRS])
    model.write_sample_grid(tmp_path / "given.png", seed=1, batch=batch)
    assert (tmp_path / "given.png").read_bytes() == path.read_bytes()


def test_validation_grids_come_from_the_hook_in_a_fit(tmp_path):
    """A fit on plain dataloaders (no datamodule): the grid's items come from grid_source."""
    model = build_model(load_config("tiny", BRIDGE))
    model.sample_dir = tmp_path / "samples"
    items = pairs(4)
    model.grid_source = lambda n: items[:n]
    trainer = L.Trainer(max_steps=1, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DataLoader(items, batch_size=2), DataLoader(items, batch_size=2))
    assert (tmp_path / "samples" / "step_0000001.png").is_file()
    assert (tmp_path / "samples" / "latest.png").is_file()


def test_validation_without_a_grid_source_warns_and_skips_the_grid(tmp_path):
    model = build_model(load_config("tiny", BRIDGE))
    model.sample_dir = tmp_path / "samples"
    items = pairs(2)
    trainer = L.Trainer(max_steps=1, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.warns(UserWarning, match="no validation grid"):
        trainer.fit(model, DataLoader(items, batch_size=2), DataLoader(items, batch_size=2))
    assert not (tmp_path / "samples").exists()


def test_class_grids_need_no_data(tmp_path):
    model = build_model(load_config("tiny"))
    assert model.grid_source is None and model._trainer is None
    path = model.write_sample_grid(tmp_path / "grid.png")
    assert path.is_file() and (tmp_path / "latest.png").is_file()


def test_autoencoder_grid_comes_from_the_hook(tmp_path):
    model = build_model(load_config("fashion-vae"))
    with pytest.raises(NoGridSource):
        model.write_sample_grid(tmp_path / "none.png")
    items = pairs(3)
    model.grid_source = lambda n: items[:n]
    path = model.write_sample_grid(tmp_path / "recon.png")
    assert path.is_file() and (tmp_path / "recon_latest.png").is_file()

"""A short Lightning fit on real (embedded Fashion-MNIST) images lowers the loss; EMA tracks it."""

import lightning as L
import pytest
import torch

from diffusionforge.data.datamodule import ImageDataModule
from diffusionforge.tasks import build_model
from diffusionforge.config import load_config


def fixed_loss(model, batch, seed=123) -> float:
    """The training loss on one batch with t and noise drawn from a fixed seed."""
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loss = model.diffusion_loss(batch).loss.item()
    model.train()
    return loss


def test_short_training_lowers_the_loss(tmp_path):
    config = load_config("tiny", ["data.limit_train=512", "data.batch_size=32",
                                  "trainer.max_steps=40", "optim.ema_decay=0.5"])
    L.seed_everything(0, verbose=False)
    datamodule = ImageDataModule(config.data, seed=config.seed)
    datamodule.setup("fit")
    model = build_model(config, datamodule.num_classes)
    batch = next(iter(datamodule.val_dataloader()))
    before = fixed_loss(model, batch)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    after = fixed_loss(model, batch)
    assert after < 0.7 * before, (before, after)
    assert int(model.ema.n_averaged) == 40
    raw = dict(model.net.named_parameters())
    ema = dict(model.ema.module.named_parameters())
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_sample_shapes_and_classes_respected():
    config = load_config("tiny")
    model = build_model(config, 10)
    from diffusionforge.models import SampleRequest
    gen = torch.Generator().manual_seed(0)
    images = model.sample({"class_label": torch.arange(4)}, 4,
                          SampleRequest(steps=3, guidance=3.0), generator=gen)
    assert images.shape == (4, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1


def test_slow_ema_for_the_run_length_is_warned(tmp_path):
    config = load_config("tiny", ["data.limit_train=64", "data.batch_size=16", "optim.ema_decay=0.999"])
    datamodule = ImageDataModule(config.data, seed=config.seed)
    model = build_model(config, 10)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"optim.ema_decay=0.999: after 2 steps the EMA weights still hold 100%"):
        trainer.fit(model, datamodule=datamodule)


def test_lr_schedule_warms_up_then_decays_by_a_half_cosine():
    from diffusionforge.config.schema import OptimConfig
    from diffusionforge.optim import lr_factor

    constant = lr_factor(OptimConfig(warmup_steps=4), total_steps=100)
    assert [constant(s) for s in (0, 1, 3, 50, 500)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = lr_factor(OptimConfig(warmup_steps=4, lr_decay="cosine", min_lr_ratio=0.1), total_steps=104)
    assert cosine(3) == 1.0 and cosine(4) == 1.0
    assert cosine(54) == pytest.approx(0.55)  # halfway: (1 + min) / 2
    assert cosine(104) == pytest.approx(0.1) and cosine(10_000) == pytest.approx(0.1)
    values = [cosine(s) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("overrides, key", [
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio"),
    (["optim.lr_decay=linear"], "lr_decay"),
])
def test_bad_lr_schedule_is_a_config_error(overrides, key):
    from diffusionforge.config import load_config
    from diffusionforge.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config("tiny", overrides)


@pytest.mark.parametrize("preset, max_steps, message", [
    ("tiny", 100, "(100 training batches)"),
    ("fashion-vae", 200, "(100 training batches)"),  # the autoencoder's task counts 2 optimiser steps per batch
])
def test_a_decay_shorter_than_the_warm_up_is_refused_by_the_task(tmp_path, capsys, preset, max_steps, message):
    """A rule that depends on the task (optimiser steps per batch) is checked by the task, before any work."""
    from diffusionforge.cli.main import main

    run_dir = tmp_path / "run"
    code = main(["train", preset, "optim.schedule=steps", "optim.lr_decay=cosine", f"trainer.max_steps={max_steps}",
                 "optim.warmup_steps=100", "trainer.time_budget=null", "trainer.max_time=null", f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "trainer.max_steps" in err[0] and message in err[0], err
    assert not run_dir.exists()

"""Latent diffusion: the same GenerativeModel on a frozen autoencoder's scaled latents; text; inpainting."""

import dataclasses

import pytest
import torch

from diffusionforge.data.datamodule import ImageDataModule
from diffusionforge.tasks import build_model
from diffusionforge.tasks.parts import prepare_first_stage
from diffusionforge.config import load_config
from diffusionforge.errors import ConfigError
from diffusionforge.first_stage.autoencoder import AutoencoderConfig, AutoencoderKL
from diffusionforge.first_stage.latent import LatentFirstStage, estimate_scale_factor
from diffusionforge.models.generative import SampleRequest

LATENT = ["model.first_stage=autoencoder", "model.latent.run_dir=unused",
          "model.unet.model_channels=16", "model.unet.channel_mult=[1,2]",
          "model.unet.attention_resolutions=[2]", "model.unet.num_head_channels=16"]


def tiny_autoencoder(scaling_factor=None) -> AutoencoderKL:
    torch.manual_seed(0)
    config = AutoencoderConfig(in_channels=1, out_channels=1, base_channels=16, channel_mult=(1, 2, 2),
                               num_res_blocks=1, norm_groups=8, z_channels=4, embed_dim=4,
                               resolution=28, scaling_factor=scaling_factor)
    return AutoencoderKL(config).eval()


def latent_model(overrides=(), scale=0.5):
    config = load_config("tiny", [*LATENT, f"model.latent.scale_factor={scale}", *overrides])
    return build_model(config, autoencoder=tiny_autoencoder()), config


def test_latent_model_runs_the_process_on_latents():
    model, _ = latent_model()
    assert model.latent_shape == (4, 7, 7)
    backbone = model.net["backbone"]
    assert backbone.config.in_channels == 4 and backbone.config.out_channels == 4
    assert isinstance(model.first_stage, LatentFirstStage) and model.first_stage.scale_factor == 0.5
    batch = {"image": torch.rand(3, 1, 28, 28) * 2 - 1, "class_label": torch.tensor([0, 1, 2])}
    losses = model.diffusion_loss(batch)
    assert torch.isfinite(losses.loss)
    losses.loss.backward()
    first_stage_params = list(model.first_stage.parameters())
    assert first_stage_params and all(p.grad is None and not p.requires_grad for p in first_stage_params)
    images = model.sample({"class_label": torch.tensor([0, 1])}, 2, SampleRequest(steps=2, guidance=2.0))
    assert images.shape == (2, 1, 28, 28) and images.abs().max() <= 1


def test_first_stage_stays_frozen_in_eval_mode():
    model, _ = latent_model()
    model.train()
    assert not model.first_stage.autoencoder.training
    assert not any(p is q for p in model.net.parameters() for q in model.first_stage.parameters())


def test_latents_are_scaled_by_the_factor():
    autoencoder = tiny_autoencoder()
    stage = LatentFirstStage(autoencoder, 0.25, sample_posterior=False)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(stage.encode(x), 0.25 * autoencoder.encode(x).mode())
    z = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(stage.decode(z), autoencoder.decode(z / 0.25))


def test_estimated_scale_gives_unit_variance_latents():
    autoencoder = tiny_autoencoder()
    batches = [torch.rand(16, 1, 28, 28) * 2 - 1 for _ in range(2)]
    scale = estimate_scale_factor(autoencoder, batches, sample_posterior=False)
    z = torch.cat([autoencoder.encode(b).mode() for b in batches]) * scale
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    again = estimate_scale_factor(autoencoder, batches, sample_posterior=True, seed=3)
    assert again == estimate_scale_factor(autoencoder, batches, sample_posterior=True, seed=3)


def test_prepare_first_stage_estimates_and_records_the_scale(monkeypatch):
    import diffusionforge.tasks.parts as build

    autoencoder = tiny_autoencoder()
    monkeypatch.setattr(build, "load_latent_autoencoder", lambda config: autoencoder)
    config = load_config("tiny", [*LATENT, "model.latent.scale_images=64"])
    assert config.model.latent.scale_factor is None
    resolved, loaded = prepare_first_stage(config, ImageDataModule(config.data, seed=config.seed))
    assert loaded is autoencoder and resolved.model.latent.scale_factor > 0
    assert config.model.latent.scale_factor is None  # the input config is not mutated
    stored = tiny_autoencoder(scaling_factor=0.3)
    monkeypatch.setattr(build, "load_latent_autoencoder", lambda config: stored)
    assert prepare_first_stage(config, ImageDataModule(config.data, seed=config.seed))[0].model.latent.scale_factor == 0.3


def test_latent_config_without_autoencoder_run_is_a_config_error():
    config = load_config("tiny", ["model.first_stage=autoencoder"])
    with pytest.raises(ConfigError, match="model.latent.run_dir"):
        build_model(config)


@pytest.mark.parametrize("latent", [False, True])
def test_inpainting_keeps_known_pixels_exactly(latent):
    if latent:
        model, _ = latent_model()
    else:
        model = build_model(load_config("tiny"))
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    mask = torch.ones(2, 1, 28, 28)
    mask[:, :, 8:20, 8:20] = 0
    out = model.inpaint({"class_label": torch.tensor([3, 4])}, images, mask, SampleRequest(steps=3),
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[mask.expand_as(out) == 1], images[mask.expand_as(images) == 1])
    assert not torch.equal(out[:, :, 8:20, 8:20], images[:, :, 8:20, 8:20])
    with pytest.raises(ValueError, match="mask must have shape"):
        model.inpaint({}, images, mask[:, :, :20], SampleRequest(steps=1))


def test_text_conditioned_model_trains_on_captions_from_class_names():
    config = load_config("tiny", ["model.conditioning.class_label=null", "model.conditioning.text.max_length=8",
                                  "data.caption_template=a photo of {}"])
    model = build_model(config)
    assert model.net["backbone"].config.context_dim == 384  # MiniLM-L6 hidden size
    assert model.num_classes == 10
    batch = model.label_batch(torch.tensor([7, 9]))
    assert batch == {"caption": ["a photo of a sneaker", "a photo of an ankle boot"]}
    datamodule = ImageDataModule(config.data, seed=config.seed)
    datamodule.setup("fit")
    train_batch = next(iter(datamodule.train_dataloader()))
    assert len(train_batch["caption"]) == config.data.batch_size
    loss = model.diffusion_loss(train_batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    encoder = model.net["conditioner"].conditioners[0].encoder
    assert all(p.grad is None for p in encoder.parameters())
    images = model.sample(batch, 2, SampleRequest(steps=2, guidance=3.0))
    assert images.shape == (2, 1, 28, 28)


def test_text_conditioning_without_captions_is_a_config_error():
    config = load_config("tiny", ["model.conditioning.text.max_length=8"])
    with pytest.raises(ConfigError, match="data.caption_template"):
        build_model(config)


def test_caption_template_needs_one_placeholder():
    with pytest.raises(ConfigError, match="data.caption_template"):
        load_config("tiny", ["data.caption_template=a photo"])


def test_concat_conditioner_resizes_to_the_latent_grid_and_zeroes_dropped_samples():
    from diffusionforge.conditioning.spatial import ConcatConditionerConfig, SpatialConcat

    cond = SpatialConcat(ConcatConditionerConfig(input_key="mask", channels=1), size=(7, 7))
    mask = torch.zeros(2, 1, 28, 28)
    mask[:, :, :14] = 1  # top half
    out = cond({"mask": mask})
    assert out.shape == (2, 1, 7, 7)
    assert torch.equal(out[:, :, :3], torch.ones(2, 1, 3, 7)) and torch.equal(out[:, :, 4:], torch.zeros(2, 1, 3, 7))
    assert torch.equal(cond({"mask": mask}, force_uncond=True), torch.zeros(2, 1, 7, 7))
    with pytest.raises(ValueError, match=r"batch\['mask'\] must be \(B, 1, H, W\)"):
        cond({"mask": torch.zeros(2, 3, 28, 28)})


def test_hybrid_conditioning_concat_plus_crossattn_in_latent_space():
    """LDM 'hybrid': a mask stacked onto z_t and caption tokens through cross-attention."""
    model, _ = latent_model(["model.conditioning.class_label=null", "model.conditioning.text.max_length=8",
                             "data.caption_template=a photo of {}", "model.conditioning.concat.input_key=mask",
                             "model.conditioning.concat.channels=1"])
    backbone = model.net["backbone"]
    assert backbone.config.concat_channels == 1 and backbone.config.context_dim == 384
    batch = {"image": torch.rand(2, 1, 28, 28) * 2 - 1, "caption": ["a photo of a bag"] * 2,
             "mask": torch.ones(2, 1, 28, 28)}
    cond = model.net["conditioner"](batch)
    assert cond["concat"].shape == (2, 1, 7, 7) and cond["crossattn"].shape[:2] == (2, 8)
    loss = model.diffusion_loss(batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for p in backbone.out.parameters():  # zero-initialised output layer: give it weights to see through
        torch.nn.init.normal_(p, std=0.1)
    z, t = torch.randn(2, 4, 7, 7), torch.tensor([10, 500])
    outs = [backbone(z, t, model.net["conditioner"]({**batch, "mask": m}))
            for m in (torch.ones(2, 1, 28, 28), torch.zeros(2, 1, 28, 28))]
    assert not torch.allclose(*outs)  # the mask channel reaches the output
    images = model.sample({"caption": batch["caption"], "mask": batch["mask"]}, 2, SampleRequest(steps=2))
    assert images.shape == (2, 1, 28, 28)

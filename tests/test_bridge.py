"""Latent Bridge Matching: the interpolant, time sampling, the Euler sampler, the
latents-concat conditioner, the pixel loss and the config checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusionforge.conditioning import ConditionerWrapper
from diffusionforge.conditioning.latents_concat import LatentsConcat, LatentsConcatConfig
from diffusionforge.conditioning.spatial import ConcatConditionerConfig, SpatialConcat
from diffusionforge.config.loader import load_config
from diffusionforge.errors import ConfigError
from diffusionforge.losses.pixel import PixelLoss
from diffusionforge.processes.bridge import BridgeMatching, BridgeMatchingConfig
from diffusionforge.samplers.bridge import sample_bridge


def bridge(**kwargs) -> BridgeMatching:
    return BridgeMatching(BridgeMatchingConfig(**kwargs))


def pair(shape=(3, 2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ---------------------------------------------------------------- interpolant
def test_interpolant_endpoints_are_target_and_source_exactly():
    process = bridge(bridge_noise_sigma=0.7)
    z0, z1 = pair()
    noise = torch.randn_like(z0)
    assert torch.equal(process.interpolate(z0, z1, torch.zeros(3), noise), z0)
    assert torch.allclose(process.interpolate(z0, z1, torch.ones(3), noise), z1, atol=0)


def test_interpolant_mean_and_variance():
    sigma, t = 0.5, 0.3
    process = bridge(bridge_noise_sigma=sigma)
    z0, z1 = pair((1, 1, 2, 2))
    n = 40000
    torch.manual_seed(0)
    x = process.interpolate(z0.expand(n, -1, -1, -1), z1.expand(n, -1, -1, -1), torch.full((n,), t))
    mean = (1 - t) * z0 + t * z1
    std = sigma * math.sqrt(t * (1 - t))
    assert torch.allclose(x.mean(0), mean[0], atol=4 * std / math.sqrt(n))
    assert torch.allclose(x.std(0), torch.full_like(mean[0], std), rtol=0.02)


def test_velocity_and_predicted_target():
    process = bridge(bridge_noise_sigma=0.3)
    z0, z1 = pair()
    t = torch.tensor([0.25, 0.5, 1.0])
    x_t = process.interpolate(z0, z1, t, noise=torch.zeros_like(z0))
    v = process.velocity(z0, z1)
    assert torch.equal(v, z1 - z0)
    assert torch.allclose(process.predict_target(x_t, v, t), z0, atol=1e-6)


def test_latent_losses():
    v_true, v_pred = pair()
    l2 = bridge(latent_loss_type="l2", latent_loss_weight=2.0).latent_loss(v_pred, v_true)
    l1 = bridge(latent_loss_type="l1").latent_loss(v_pred, v_true)
    assert torch.allclose(l2, 2 * ((v_pred - v_true) ** 2).flatten(1).mean(1))
    assert torch.allclose(l1, (v_pred - v_true).abs().flatten(1).mean(1))
    assert l2.shape == l1.shape == (3,)


# ---------------------------------------------------------------- time sampling
def test_uniform_times_lie_on_the_training_grid():
    process = bridge(num_train_timesteps=10)
    t = process.sample_t(5000, generator=torch.Generator().manual_seed(0))
    grid = torch.arange(1, 11) / 10
    assert set(torch.round(t * 10).long().tolist()) == set(range(1, 11))
    assert torch.allclose(t, grid[torch.round(t * 10).long() - 1])


def test_log_normal_times_follow_lbm():
    process = bridge(timestep_sampling="log_normal", logit_mean=0.5, logit_std=0.8)
    t = process.sample_t(1000, generator=torch.Generator().manual_seed(3))
    n = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.5
    expected = 1 - (torch.sigmoid(n) * 1000).long() / 1000
    assert torch.allclose(t, expected)
    assert (t > 0).all() and (t <= 1).all()


def test_custom_times_have_the_given_probabilities():
    process = bridge(timestep_sampling="custom_timesteps", selected_timesteps=[250, 500, 1000],
                     prob=[0.1, 0.2, 0.7])
    t = process.sample_t(20000, generator=torch.Generator().manual_seed(0))
    freq = [(t == v).float().mean().item() for v in (0.25, 0.5, 1.0)]
    assert freq == pytest.approx([0.1, 0.2, 0.7], abs=0.015)


@pytest.mark.parametrize("override, key", [
    ("bridge.process.prob=[0.5,0.6]", "bridge.process.prob: must sum to 1"),
    ("bridge.process.prob=[1.0]", "bridge.process.prob: has 1 entries but selected_timesteps has 2"),
    ("bridge.process.selected_timesteps=[0,500]", "bridge.process.selected_timesteps"),
    ("bridge.process.bridge_noise_sigma=-1", "bridge.process.bridge_noise_sigma"),
    ("bridge.process.timestep_sampling=cosine", "bridge.process.timestep_sampling"),
])
def test_bridge_config_errors_name_the_key(override, key):
    base = ["task=bridge", "data.degradation.kind=super_resolution",
            "bridge.process.timestep_sampling=custom_timesteps", "bridge.process.selected_timesteps=[500,1000]"]
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_config("tiny", [*base, override])


def test_conditioner_rate_errors():
    with pytest.raises(ConfigError, match="ucg_rate"):
        load_config("tiny", ["model.conditioning.latents_concat.ucg_rate=1.5"])
    with pytest.raises(ConfigError, match="ucg_rate"):
        load_config("tiny", ["model.conditioning.class_label.ucg_rate=-0.1"])
    with pytest.raises(ConfigError, match="ucg_rate"):
        ConcatConditionerConfig(ucg_rate=2.0)


def test_custom_probabilities_default_to_equal():
    config = load_config("tiny", ["task=bridge", "data.degradation.kind=denoising",
                                  "bridge.process.timestep_sampling=custom_timesteps",
                                  "bridge.process.selected_timesteps=[500,1000]"])
    assert config.bridge.process.prob is None
    t = BridgeMatching(config.bridge.process).sample_t(4000, generator=torch.Generator().manual_seed(1))
    assert (t == 1.0).float().mean().item() == pytest.approx(0.5, abs=0.03)


# ---------------------------------------------------------------- sampler
@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_exact_velocity_maps_source_to_target(steps):
    """v(x, t) = (x - z0) / t, the field whose Euler steps stay on the bridge to z0."""
    process = bridge(bridge_noise_sigma=0.3)
    z0, z1 = pair()
    seen = []

    def exact(x, t, cond):
        seen.append(t[0].item())
        return (x - z0) / (t / process.num_train_timesteps).view(-1, 1, 1, 1)

    out = sample_bridge(exact, process, z1, num_steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.sample, z0, atol=1e-5)
    assert seen == pytest.approx([1000 * (1 - i / steps) for i in range(steps)])


def test_constant_velocity_without_noise_maps_source_to_target():
    process = bridge(bridge_noise_sigma=0.0)
    z0, z1 = pair()
    out = sample_bridge(lambda x, t, c: z1 - z0, process, z1, num_steps=3)
    assert torch.allclose(out.sample, z0, atol=1e-6)


def test_bridge_noise_between_steps_only():
    """Noise sigma_b sqrt(t (1 - t)) after every step but the last (LBM sample)."""
    process = bridge(bridge_noise_sigma=0.2)
    z0, z1 = pair((1, 1, 2, 2))
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    generator = torch.Generator().manual_seed(5)
    out = sample_bridge(zero, process, z1, num_steps=2, generator=generator, return_intermediates=True)
    noise = torch.randn(z1.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out.intermediates[0], z1 + 0.2 * math.sqrt(0.25) * noise)
    assert torch.equal(out.intermediates[1], out.sample)
    assert torch.equal(out.sample, out.intermediates[0])  # v = 0 and no noise after the last step


def test_sampler_matches_diffusers_flow_match_euler():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    steps = 4
    scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)])
    weight = torch.randn(2, 2, 1, 1)
    net = lambda x, t, c: F.conv2d(x, weight) * (t.view(-1, 1, 1, 1) / 1000)  # noqa: E731
    z1 = torch.randn(2, 2, 4, 4)
    x = z1.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t.repeat(2), None), t, x, return_dict=False)[0]
    ours = sample_bridge(net, bridge(bridge_noise_sigma=0.0), z1, num_steps=steps)
    assert torch.allclose(ours.sample, x, atol=1e-5)


def test_sampler_rejects_learned_variance_outputs():
    with pytest.raises(ValueError, match="latent shape"):
        sample_bridge(lambda x, t, c: torch.cat([x, x], 1), bridge(), torch.zeros(1, 2, 4, 4))


# ---------------------------------------------------------------- latents-concat conditioner
class PoolStage(torch.nn.Module):
    """A stand-in first stage: f = 2 average pooling, 3 -> 2 channels."""

    downsample_factor = 2

    def encode(self, x, sample=None):
        return F.avg_pool2d(x[:, :2], 2) * 3.0


def concat(mask_keys=("mask",), image_keys=("source",), ucg_rate=0.0):
    return LatentsConcat(LatentsConcatConfig(image_keys=list(image_keys), mask_keys=list(mask_keys),
                                             ucg_rate=ucg_rate), latent_channels=2)


def test_latents_concat_channels_masks_then_latents():
    conditioner = concat(mask_keys=("mask", "edges"))
    source = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4, :4] = 1
    batch = {"source": source, "mask": mask, "edges": torch.ones(2, 1, 8, 8)}
    out = ConditionerWrapper([conditioner])(batch, first_stage=PoolStage())["concat"]
    assert conditioner.dim == 2 + 2 == out.shape[1]
    assert out.shape == (2, 4, 4, 4)
    quarter = torch.zeros(4, 4)
    quarter[:2, :2] = 1
    assert torch.allclose(out[:, 0], quarter.expand(2, 4, 4), atol=1e-6)  # mask on the latent grid
    assert torch.allclose(out[:, 1], torch.ones(2, 4, 4))
    assert torch.allclose(out[:, 2:], PoolStage().encode(source))


def test_latents_concat_mask_fraction_per_latent_cell():
    conditioner = concat(image_keys=())
    mask = torch.zeros(1, 1, 8, 8)
    mask[:, :, 0, 0] = 1  # one pixel of the 2x2 patch of latent cell (0, 0)
    out = conditioner({"mask": mask}, first_stage=PoolStage())
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.25, abs=1e-6)
    assert out[0, 0].sum().item() == pytest.approx(0.25, abs=1e-6)


def test_latents_concat_checks_sizes_and_needs_the_first_stage():
    conditioner = concat()
    batch = {"source": torch.zeros(1, 3, 8, 8), "mask": torch.zeros(1, 1, 6, 6)}
    with pytest.raises(ValueError, match="share their spatial size"):
        conditioner(batch, first_stage=PoolStage())
    with pytest.raises(ValueError, match="needs the first stage"):
        conditioner({"source": torch.zeros(1, 3, 8, 8), "mask": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(KeyError, match="mask"):
        conditioner({"source": torch.zeros(1, 3, 8, 8)}, first_stage=PoolStage())


def test_latents_concat_dropout_rate_and_forced_zero():
    conditioner = concat(ucg_rate=0.3).train()
    n = 4000
    batch = {"source": torch.ones(n, 3, 4, 4), "mask": torch.ones(n, 1, 4, 4)}
    out = conditioner(batch, first_stage=PoolStage(), generator=torch.Generator().manual_seed(0))
    dropped = (out.flatten(1).abs().sum(1) == 0).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.03)
    conditioner.eval()
    assert (conditioner(batch, first_stage=PoolStage()).flatten(1).abs().sum(1) > 0).all()
    wrapper = ConditionerWrapper([conditioner])
    for key in ("mask", "source"):  # any of its keys zeroes the whole conditioner
        zeroed = wrapper(batch, ucg_keys=[key], first_stage=PoolStage())["concat"]
        assert zeroed.shape == (n, 1 + 2, 2, 2) and not zeroed.any()
    with pytest.raises(ValueError, match="name no conditioner"):
        wrapper(batch, ucg_keys=["caption"], first_stage=PoolStage())
    wrapper.train()
    wrapper.set_ucg_rate_zero()
    assert conditioner.ucg_rate == 0.0
    assert (wrapper(batch, first_stage=PoolStage())["concat"].flatten(1).abs().sum(1) > 0).all()


def test_wrapper_concatenates_spatial_and_latent_channels():
    wrapper = ConditionerWrapper([SpatialConcat(ConcatConditionerConfig(input_key="edges", channels=2), (4, 4)),
                                  concat()])
    batch = {"edges": torch.ones(3, 2, 4, 4), "source": torch.zeros(3, 3, 8, 8), "mask": torch.zeros(3, 1, 8, 8)}
    out = wrapper(batch, first_stage=PoolStage())
    assert out["concat"].shape == (3, 2 + 1 + 2, 4, 4)
    assert wrapper.input_keys == ["edges", "mask", "source"]


def test_latents_concat_config_errors():
    with pytest.raises(ConfigError, match="at least one"):
        LatentsConcatConfig(image_keys=[], mask_keys=[])
    with pytest.raises(ConfigError, match="repeat"):
        LatentsConcatConfig(image_keys=["mask"], mask_keys=["mask"])


# ---------------------------------------------------------------- pixel loss
def decode_nearest(z):
    return F.interpolate(z, scale_factor=2, mode="nearest")


def test_pixel_loss_whole_image_and_gradients():
    z = torch.zeros(2, 1, 4, 4, requires_grad=True)
    x0 = torch.full((2, 1, 8, 8), 0.5)
    loss = PixelLoss("l2", max_size=64)(decode_nearest, z, x0)
    assert torch.allclose(loss, torch.full((2,), 0.25))
    loss.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.allclose(PixelLoss("l1", max_size=64)(decode_nearest, z.detach(), x0), torch.full((2,), 0.5))


def test_pixel_loss_crop_aligns_latent_and_pixel_windows():
    z = torch.arange(16.0).view(1, 1, 4, 4) / 16
    x0 = decode_nearest(z)  # the exact decoding: every aligned window has zero loss
    loss = PixelLoss("l2", max_size=4, window="crop")
    for seed in range(5):
        assert loss(decode_nearest, z, x0, generator=torch.Generator().manual_seed(seed)).item() == 0.0
    shifted = PixelLoss("l2", max_size=4, window="crop")(decode_nearest, z, x0.roll(1, -1))
    assert shifted.item() > 0


def test_pixel_loss_resize_window():
    z = torch.zeros(1, 1, 8, 8)
    x0 = torch.ones(1, 1, 16, 16)
    assert PixelLoss("l1", max_size=4, window="resize")(decode_nearest, z, x0).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="LPIPS weights"):
        PixelLoss("lpips", max_size=4)

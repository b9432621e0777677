"""Training objectives: EDM, rectified flow, and the DDPM options (min-SNR, offset noise, zero terminal SNR).

Oracles: the equations of Karras et al. 2022 (Table 1, Eq. 2, 7-8), Esser et
al. 2024 (Eq. 3, 19-20, the shift), Lin et al. 2024 (Algorithm 1), and
diffusers (``compute_density_for_timestep_sampling``, ``compute_snr``,
``FlowMatchEulerDiscreteScheduler``, ``DDPMScheduler(rescale_betas_zero_snr)``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusionforge.backbones.unet import UNet, UNetConfig
from diffusionforge.config.loader import load_config
from diffusionforge.errors import ConfigError
from diffusionforge.processes.bridge import BridgeMatching
from diffusionforge.processes.config import (BridgeMatchingConfig, EDMConfig, GaussianDiffusionConfig,
                                             RectifiedFlowConfig)
from diffusionforge.processes.edm import EDMProcess
from diffusionforge.processes.flow import RectifiedFlow, shift_time
from diffusionforge.processes.gaussian import GaussianDiffusion
from diffusionforge.processes.loss_weighting import min_snr_weight, snr
from diffusionforge.processes.registry import build_process
from diffusionforge.processes.schedules import make_beta_schedule, rescale_zero_terminal_snr
from diffusionforge.samplers.denoiser import Denoiser
from diffusionforge.samplers.flow_euler import sample_flow_euler

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)


class RandomField(nn.Module):
    """A fixed random smooth function (x, t, cond) -> tensor shaped like x: the "network" of the oracle tests."""

    def __init__(self, channels: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g, dtype=torch.float64) / channels
        self.b = torch.randn(channels, generator=g, dtype=torch.float64)
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append((x.clone(), t.clone()))
        phase = t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000.0
        mixed = torch.einsum("oc,bchw->bohw", self.w.to(x.dtype), torch.tanh(x))
        return mixed + torch.cos(phase * 3.0) * self.b.to(x.dtype).reshape(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------------ EDM
def test_edm_preconditioning_is_table_1():
    process = EDMProcess(EDMConfig(sigma_data=0.5))
    c = process.precondition(SIGMAS)
    sd = 0.5
    for i, s in enumerate(SIGMAS.tolist()):
        assert c.c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert c.c_out[i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c.c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c.c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    assert torch.allclose(c.c_skip + (c.c_out / sd) ** 2, torch.ones_like(SIGMAS))  # c_skip + c_out^2/sd^2 = 1


def test_edm_loss_weight_is_one_over_c_out_squared():
    process = EDMProcess(EDMConfig(sigma_data=0.7))
    weight = process.loss_weight(SIGMAS)
    expected = (SIGMAS**2 + 0.49) / (SIGMAS * 0.7) ** 2  # Table 1
    assert torch.allclose(weight, expected, rtol=1e-12)
    assert torch.allclose(weight * process.precondition(SIGMAS).c_out ** 2, torch.ones_like(SIGMAS), rtol=1e-12)


def test_edm_input_and_effective_target_have_unit_variance():
    """Karras et al. App. B.6: Var[c_in (x0 + sigma n)] = 1 and Var[(x0 - c_skip x) / c_out] = 1 for std(x0) = sigma_data."""
    process = EDMProcess(EDMConfig(sigma_data=0.5))
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(200_000, generator=g, dtype=torch.float64)
    n = torch.randn(200_000, generator=g, dtype=torch.float64)
    for s in SIGMAS.tolist():
        c = process.precondition(torch.tensor(s, dtype=torch.float64))
        x = x0 + s * n
        assert (c.c_in * x).var().item() == pytest.approx(1.0, abs=0.02)
        assert ((x0 - c.c_skip * x) / c.c_out).var().item() == pytest.approx(1.0, abs=0.02)


def test_edm_denoiser_calls_the_network_as_edmprecond():
    process = EDMProcess(EDMConfig())
    net = RandomField(channels=2)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 40.0], dtype=torch.float64)
    D = process.denoise(net, x, sigma)
    c = process.precondition(sigma)
    seen_x, seen_t = net.calls[-1]
    assert torch.allclose(seen_x, c.c_in.reshape(-1, 1, 1, 1) * x)
    assert torch.allclose(seen_t, torch.log(sigma) / 4)
    F = net(seen_x, seen_t)
    expected = c.c_skip.reshape(-1, 1, 1, 1) * x + c.c_out.reshape(-1, 1, 1, 1) * F
    assert torch.allclose(D, expected)


def test_edm_loss_is_edmloss_and_eq_8():
    """loss = lambda |D - x0|^2 (EDMLoss) = |F - (x0 - c_skip x) / c_out|^2 (Eq. 8), same draws."""
    process = EDMProcess(EDMConfig())
    net = RandomField(channels=2)
    x0 = torch.randn(5, 2, 4, 4, dtype=torch.float64) * 0.5
    out = process.loss(net, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = (torch.randn(5, generator=g) * 1.2 - 1.2).exp()
    n = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = x0 + sigma.double().reshape(-1, 1, 1, 1) * n
    c = process.precondition(sigma)
    F = net(c.c_in.double().reshape(-1, 1, 1, 1) * x, c.c_noise)
    target = (x0 - c.c_skip.double().reshape(-1, 1, 1, 1) * x) / c.c_out.double().reshape(-1, 1, 1, 1)
    eq8 = (F - target).pow(2).flatten(1).mean(1)
    assert torch.allclose(out.loss_simple.double(), eq8, rtol=1e-4)
    assert out.loss.item() == pytest.approx(eq8.mean().item(), rel=1e-4)


def test_edm_log_normal_sigma_statistics():
    process = EDMProcess(EDMConfig(p_mean=-1.2, p_std=1.2))
    log_sigma = process.sample_sigma(400_000, generator=torch.Generator().manual_seed(0)).double().log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)
    # median sigma = exp(P_mean); P(sigma > sigma_data = 0.5) = P(z > (ln 0.5 + 1.2) / 1.2)
    share = (log_sigma > math.log(0.5)).double().mean().item()
    expected = 0.5 * math.erfc((math.log(0.5) + 1.2) / 1.2 / math.sqrt(2))
    assert share == pytest.approx(expected, abs=0.005)


def test_edm_denoiser_protocol():
    process = EDMProcess(EDMConfig(sigma_min=0.002, sigma_max=80.0))
    den = process.denoiser(RandomField(channels=1))
    assert isinstance(den, Denoiser)
    assert den.sigma_min == pytest.approx(0.002, rel=1e-6) and den.sigma_max == pytest.approx(80.0, rel=1e-6)
    assert bool((den.sigmas[1:] > den.sigmas[:-1]).all())
    t = torch.tensor([0.0, 10.5, 998.25, 999.0])
    assert torch.allclose(den.sigma_to_t(den.t_to_sigma(t)), t, atol=1e-3)
    assert den.prior_scale(80.0) == 80.0


# ------------------------------------------------------------------------------------------------ flow
def test_flow_interpolation_velocity_and_endpoint():
    flow = RectifiedFlow(RectifiedFlowConfig())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(4)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(4)), eps)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    x_t = flow.interpolate(x0, eps, t)
    assert torch.allclose(x_t, (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps)
    h = 1e-3  # v = dx_t/dt
    fd = (flow.interpolate(x0.double(), eps.double(), t.double() + h)
          - flow.interpolate(x0.double(), eps.double(), t.double() - h)) / (2 * h)
    assert torch.allclose(fd.float(), flow.velocity(x0, eps), atol=1e-5)
    assert torch.allclose(flow.predict_x0(x_t, flow.velocity(x0, eps), t), x0, atol=1e-6)


def test_flow_shift_closed_form_and_diffusers_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert torch.allclose(shifted, 3 * t / (1 + 2 * t))
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] > t[1:-1]).all())  # s > 1: towards noise
    flow = RectifiedFlow(RectifiedFlowConfig(shift=3.0))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours = flow.training_sigmas().flip(0)  # descending VE levels of the scheduler's training times (its "sigmas")
    assert torch.allclose((ours / (1 + ours))[1:].float(), scheduler.sigmas[1:], atol=1e-6)
    assert ours[0] == 4096.0  # t = 1 clamped to SNR 2^-24


@pytest.mark.parametrize("kind,kwargs", [("logit_normal", dict(logit_mean=0.3, logit_std=1.1)),
                                         ("mode", dict(mode_scale=1.29)), ("logit_normal", dict(shift=3.0))])
def test_flow_time_sampling_matches_diffusers_training_scripts(kind, kwargs):
    """t = scheduler.sigmas[(u * T).long()] with u from compute_density_for_timestep_sampling (SD3 training)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    shift = kwargs.pop("shift", 1.0)
    config = RectifiedFlowConfig(time_sampling=kind, shift=shift, **kwargs)
    flow = RectifiedFlow(config)
    ours = flow.sample_t(4096, generator=torch.Generator().manual_seed(1))
    u = compute_density_for_timestep_sampling(kind, 4096, logit_mean=config.logit_mean, logit_std=config.logit_std,
                                              mode_scale=config.mode_scale,
                                              generator=torch.Generator().manual_seed(1))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    theirs = scheduler.sigmas[(u * 1000).long().clamp(0, 999)]
    assert torch.allclose(ours, theirs, atol=2e-6)


def test_flow_time_sampling_statistics():
    T = 1000
    g = torch.Generator().manual_seed(0)
    uniform = RectifiedFlow(RectifiedFlowConfig(time_sampling="uniform")).sample_t(200_000, generator=g)
    assert uniform.min() >= 1 / T and uniform.max() <= 1.0
    assert torch.allclose(uniform * T, (uniform * T).round(), atol=1e-3)  # on the grid k / T
    assert uniform.mean().item() == pytest.approx(0.5 + 0.5 / T, abs=0.003)
    logit = RectifiedFlow(RectifiedFlowConfig(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8))
    t = logit.sample_t(200_000, generator=g).double().clamp(max=1 - 0.5 / T)
    z = torch.log((1 - t) / t)  # logit of u = 1 - t (descending grid), within a grid step
    assert z.mean().item() == pytest.approx(0.5, abs=0.02)
    assert z.std().item() == pytest.approx(0.8, abs=0.02)
    mode = RectifiedFlow(RectifiedFlowConfig(time_sampling="mode", mode_scale=1.29)).sample_t(200_000, generator=g)
    assert mode.mean().item() == pytest.approx(0.5, abs=0.005)  # f_mode is symmetric: t and 1 - t alike
    middle = ((mode > 0.25) & (mode < 0.75)).float().mean().item()
    assert middle > ((uniform > 0.25) & (uniform < 0.75)).float().mean().item() + 0.1  # s > 0 favours the middle


def test_bridge_from_noise_without_bridge_noise_is_rectified_flow():
    bridge = BridgeMatching(BridgeMatchingConfig(bridge_noise_sigma=0.0, timestep_sampling="log_normal",
                                                 logit_mean=0.2, logit_std=0.9))
    flow = RectifiedFlow(RectifiedFlowConfig(time_sampling="logit_normal", logit_mean=0.2, logit_std=0.9))
    t_bridge = bridge.sample_t(64, generator=torch.Generator().manual_seed(5))
    t_flow = flow.sample_t(64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t_bridge, t_flow)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 1, 4, 4, generator=g), torch.randn(64, 1, 4, 4, generator=g)
    assert torch.equal(bridge.interpolate(x0, eps, t_bridge, noise=torch.randn_like(x0)),
                       flow.interpolate(x0, eps, t_flow))
    assert torch.equal(bridge.velocity(x0, eps), flow.velocity(x0, eps))
    uniform = BridgeMatching(BridgeMatchingConfig(timestep_sampling="uniform"))
    assert torch.equal(uniform.sample_t(64, generator=torch.Generator().manual_seed(2)),
                       RectifiedFlow(RectifiedFlowConfig(time_sampling="uniform")).sample_t(
                           64, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 1.0), (10, 3.0), (28, 3.0)])
def test_flow_euler_matches_diffusers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    field = RandomField(channels=2, seed=1)
    x_T = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    flow = RectifiedFlow(RectifiedFlowConfig(shift=shift))
    trajectory = sample_flow_euler(field, flow, x_T, num_steps=steps, progress=False,
                                   return_intermediates=True).intermediates
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(field(x, t.expand(x.shape[0])), t, x).prev_sample
        assert torch.allclose(trajectory[i], x, atol=1e-5), f"step {i}"


def test_flow_euler_is_ve_euler_over_the_denoiser():
    """The flow denoiser's VE coordinates: an Euler step in sigma lands where the flow-time Euler step does."""
    field = RandomField(channels=2, seed=2)
    flow = RectifiedFlow(RectifiedFlowConfig(shift=2.0))
    den = flow.denoiser(field)
    assert isinstance(den, Denoiser)
    times = flow.sampling_times(6)[1:-1].float()  # t = 1 (sigma = inf) and 0 are the ends the VE view clamps
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        sigma, sigma_next = t / (1 - t), t_next / (1 - t_next)
        x_ve = x / (1 - t)
        d = (x_ve - den(x_ve, torch.full((2,), sigma, dtype=torch.float64))) / sigma  # k-diffusion to_d
        x_ve_next = x_ve + (sigma_next - sigma) * d
        x_flow = x + (t_next - t) * field(x, torch.full((2,), t * 1000.0))
        assert torch.allclose(x_ve_next * (1 - t_next), x_flow, atol=1e-6)
        x = x_flow
    assert den.sigma_max == pytest.approx(4096.0) and den.prior_scale(3.0) == 4.0


# ------------------------------------------------------------------------------------------------ DDPM options
def test_zero_terminal_snr_matches_diffusers_and_lin_et_al():
    from diffusers import DDPMScheduler

    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

    betas = make_beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    assert torch.allclose(rescaled, diffusers_rescale(betas.clone()), rtol=1e-12, atol=1e-15)  # same float64 input
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", rescale_betas_zero_snr=True).betas  # float32 throughout
    assert torch.allclose(rescaled.float(), theirs, rtol=2e-4)
    process = GaussianDiffusion(GaussianDiffusionConfig(beta_schedule="scaled_linear", linear_start=0.00085,
                                                        linear_end=0.012, prediction_type="v",
                                                        rescale_betas_zero_snr=True))
    abar, abar_old = process.alphas_cumprod.double(), torch.cumprod(1 - betas, 0)
    assert abar[-1].item() == 0.0 and abar[-2].item() > 0.0
    assert abar[0].item() == pytest.approx(abar_old[0].item(), rel=1e-6)  # the first step is kept
    # Algorithm 1 is an affine map of sqrt(abar): the rescaled curve is the old one shifted and stretched
    a, b = abar_old.sqrt(), abar.sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    assert torch.allclose(b, (a - a[-1]) * slope, atol=1e-6)
    log_snr = torch.log(abar[:-1] / (1 - abar[:-1]))
    assert bool((log_snr[1:] < log_snr[:-1]).all())  # monotone, reaching 0 SNR only at T - 1
    # Lin et al.: Stable Diffusion's terminal SNR 0.0047 becomes 0; the rescaled log-SNR curve follows the
    # old one closely over the first half and departs from it only towards the end
    assert (abar_old[-1] / (1 - abar_old[-1])).item() == pytest.approx(0.0047, abs=0.0002)
    old_log_snr = torch.log(abar_old[:-1] / (1 - abar_old[:-1]))
    gap = (log_snr - old_log_snr).abs()
    assert gap[:500].max().item() < 0.2 and gap[-1].item() > 5.0
    assert bool((log_snr <= old_log_snr + 1e-9).all())  # never more signal than before


def test_zero_terminal_snr_trains_and_samples_at_the_last_step():
    from diffusionforge.samplers.ddim import sample_ddim

    process = GaussianDiffusion(GaussianDiffusionConfig(num_timesteps=100, beta_schedule="linear", prediction_type="v",
                                                        rescale_betas_zero_snr=True, snr_gamma=5.0))
    field = RandomField(channels=1)
    x0 = torch.randn(4, 1, 4, 4)
    t = torch.full((4,), 99)
    out = process.training_loss(field(process.q_sample(x0, t, x0 * 0 + 1), t), x0,
                                process.q_sample(x0, t, x0 * 0 + 1), t, x0 * 0 + 1)
    assert torch.isfinite(out.loss)
    assert torch.equal(process.q_sample(x0, t, torch.ones_like(x0)), torch.ones_like(x0))  # pure noise at T - 1
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sample = sample_ddim(field, process, x_T, num_steps=5, spacing="trailing", clip_denoised=True,
                         progress=False).sample
    assert torch.isfinite(sample).all()
    with pytest.raises(ConfigError, match="prediction_type"):
        GaussianDiffusionConfig(rescale_betas_zero_snr=True, prediction_type="eps")


def test_offset_noise_statistics_and_unchanged_random_numbers():
    x0 = torch.zeros(4000, 3, 8, 8)
    plain = GaussianDiffusion(GaussianDiffusionConfig())
    torch.manual_seed(0)
    a = plain.sample_noise(x0)
    torch.manual_seed(0)
    assert torch.equal(a, torch.randn_like(x0))  # off: exactly the old draws
    s = 0.3
    noise = GaussianDiffusion(GaussianDiffusionConfig(offset_noise=s)).sample_noise(
        x0, generator=torch.Generator().manual_seed(1)).double()
    assert noise.var().item() == pytest.approx(1 + s**2, rel=0.02)
    channel_means = noise.mean(dim=(2, 3))  # (B, C): the per-(B, C) offset plus the mean of 64 N(0, 1)
    assert channel_means.var().item() == pytest.approx(s**2 + 1 / 64, rel=0.05)
    assert channel_means.mean().abs().item() < 0.01
    # pixels of one (B, C) plane are correlated by s^2 / (1 + s^2); different channels are not
    flat = noise.flatten(2)
    same = (flat[:, :, 0] * flat[:, :, 1]).mean().item()
    across = (flat[:, 0, 0] * flat[:, 1, 0]).mean().item()
    assert same == pytest.approx(s**2, abs=0.02) and abs(across) < 0.03


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_min_snr_gamma_weights_as_diffusers_training_scripts(prediction_type):
    """diffusers train_text_to_image.py: min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), and min(SNR, gamma) for x0."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    process = GaussianDiffusion(GaussianDiffusionConfig(beta_schedule="cosine", prediction_type=prediction_type,
                                                        snr_gamma=5.0))
    t = torch.arange(0, 1000, 37)
    theirs_snr = compute_snr(scheduler, t).double()
    weights = torch.stack([theirs_snr, 5.0 * torch.ones_like(theirs_snr)], dim=1).min(dim=1)[0]
    if prediction_type == "eps":
        weights = weights / theirs_snr
    elif prediction_type == "v":
        weights = weights / (theirs_snr + 1)
    assert torch.allclose(process.loss_weights(t).double(), weights, rtol=1e-4)
    assert torch.allclose(min_snr_weight(snr(process.alphas_cumprod, t), 5.0, prediction_type), weights, rtol=1e-4)


def test_gaussian_loss_draws_as_before():
    """process.loss consumes the global random numbers exactly as the old training step did."""
    process = GaussianDiffusion(GaussianDiffusionConfig(prediction_type="v"))
    field = RandomField(channels=1)
    x0 = torch.randn(6, 1, 4, 4)
    torch.manual_seed(7)
    new = process.loss(field, x0)
    torch.manual_seed(7)
    t = process.sample_timesteps(6, x0.device)
    noise = torch.randn_like(x0)
    x_t = process.q_sample(x0, t, noise)
    old = process.training_loss(field(x_t, t), x0, x_t, t, noise)
    assert torch.equal(new.loss, old.loss) and torch.equal(new.loss_simple, old.loss_simple)


# ------------------------------------------------------------------------------------------------ training
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), norm_groups=8))


@pytest.mark.parametrize("process", [EDMProcess(EDMConfig()), RectifiedFlow(RectifiedFlowConfig())],
                         ids=["edm", "flow"])
def test_a_few_steps_decrease_the_loss_on_a_fixed_batch(process):
    net = tiny_unet()
    x0 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1) * 0.5
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)

    def loss():
        return process.loss(net, x0, generator=torch.Generator().manual_seed(1)).loss  # the same draws each time

    first = loss().item()
    for _ in range(15):
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()
    assert loss().item() < 0.8 * first


def test_objective_selects_the_process():
    assert isinstance(build_process(load_config(None).model), GaussianDiffusion)
    config = load_config(None, ["model.objective=edm", "model.edm.sigma_data=0.6"])
    process = build_process(config.model)
    assert isinstance(process, EDMProcess) and process.sigma_data == 0.6
    config = load_config(None, ["model.objective=flow", "model.flow.shift=3.0", "model.flow.time_sampling=mode"])
    assert isinstance(build_process(config.model), RectifiedFlow) and build_process(config.model).config.shift == 3.0
    with pytest.raises(ConfigError):
        load_config(None, ["model.objective=vdm"])
    with pytest.raises(ConfigError, match="model.flow.mode_scale"):
        load_config(None, ["model.flow.mode_scale=5"])

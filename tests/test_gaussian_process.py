"""GaussianDiffusion against diffusers' DDPMScheduler and against closed forms."""

from __future__ import annotations

import math
from functools import partial
from typing import get_args

import pytest
import torch
from diffusers import DDPMScheduler

from diffusionforge.errors import ConfigError
from diffusionforge.processes import (
    BETA_SCHEDULES,
    GaussianDiffusion,
    GaussianDiffusionConfig,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    make_beta_schedule,
    mean_flat,
    normal_kl,
)
from diffusionforge.processes.schedules import BetaScheduleName

from schedule_pairs import SCHEDULES


def make_pair(schedule, diffusers_schedule, start, end, **config):
    config = GaussianDiffusionConfig(beta_schedule=schedule, linear_start=start, linear_end=end, **config)
    process = GaussianDiffusion(config)
    scheduler = DDPMScheduler(beta_schedule=diffusers_schedule, beta_start=start, beta_end=end, clip_sample=False)
    return process, scheduler


def reference_tables(schedule, start, end, v_posterior=0.0):
    """Schedule quantities written out directly from Ho et al. 2020, float64."""
    betas = make_beta_schedule(schedule, 1000, start, end)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas
    sigma2 = (1 - v_posterior) * beta_tilde + v_posterior * betas
    coef1 = torch.sqrt(abar_prev) * betas / (1 - abar)
    return dict(betas=betas, alphas=alphas, abar=abar, sigma2=sigma2, coef1=coef1, beta_tilde=beta_tilde)


@pytest.mark.parametrize("schedule,diffusers_schedule,start,end", SCHEDULES)
def test_alphas_cumprod_match_diffusers(schedule, diffusers_schedule, start, end):
    process, scheduler = make_pair(schedule, diffusers_schedule, start, end)
    torch.testing.assert_close(process.alphas_cumprod, scheduler.alphas_cumprod, atol=1e-6, rtol=0)
    torch.testing.assert_close(process.betas, scheduler.betas, atol=1e-6, rtol=0)
    assert make_beta_schedule(schedule, 1000, start, end).dtype == torch.float64


@pytest.mark.parametrize("schedule,diffusers_schedule,start,end", SCHEDULES)
def test_posterior_matches_diffusers_step(schedule, diffusers_schedule, start, end):
    """Read coef1, coef2 and the variance off diffusers' DDPM step (x0-prediction, float64)."""
    process, scheduler = make_pair(schedule, diffusers_schedule, start, end)
    scheduler.config.prediction_type = "sample"
    scheduler.betas = scheduler.betas.double()  # diffusers' own formulas, without float32 cancellation in 1 - abar
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas, 0)
    zeros, ones = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    for t in [1, 2, 10, 250, 500, 998, 999]:
        def step(x0, x_t):
            return scheduler.step(x0, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
        noise = torch.randn(1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        base = step(zeros, zeros)
        coef1, coef2, std = step(ones, zeros) - base, step(zeros, ones) - base, base / noise
        for ours, theirs in [(process.posterior_mean_coef1[t], coef1), (process.posterior_mean_coef2[t], coef2),
                             (process.posterior_variance[t], std**2)]:
            assert abs(float(ours) - float(theirs)) <= 1e-6 * (1 + abs(float(theirs))), t


@pytest.mark.parametrize("schedule,diffusers_schedule,start,end", SCHEDULES)
def test_q_sample_matches_add_noise_and_velocity(schedule, diffusers_schedule, start, end):
    process, scheduler = make_pair(schedule, diffusers_schedule, start, end)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(process.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(process.get_v(x0, noise, t), scheduler.get_velocity(x0, noise, t), atol=1e-5, rtol=0)


def test_schedule_shapes_and_cosine_cap():
    betas = make_beta_schedule("cosine", 1000)
    assert betas.shape == (1000,) and float(betas.max()) == pytest.approx(0.999)
    lin = make_beta_schedule("scaled_linear", 10, 0.01, 0.04)
    torch.testing.assert_close(lin.sqrt(), torch.linspace(0.1, 0.2, 10, dtype=torch.float64))
    with pytest.raises(ConfigError, match="beta_schedule"):
        make_beta_schedule("quadratic", 10)
    assert set(get_args(BetaScheduleName)) == set(BETA_SCHEDULES)  # the config's Literal lists the registry


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_conversions_round_trip(prediction_type):
    process = GaussianDiffusion(GaussianDiffusionConfig(beta_schedule="cosine", prediction_type=prediction_type))
    g = torch.Generator().manual_seed(2)
    x0, eps = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([1, 400, 950])
    x_t = process.q_sample(x0, t, eps)
    close = partial(torch.testing.assert_close, rtol=1e-4, atol=1e-4)  # float32 tables, 1/sqrt(abar) ~ 100
    v = process.get_v(x0, eps, t)
    close(process.predict_x0_from_eps(x_t, t, eps), x0)
    close(process.predict_eps_from_x0(x_t, t, x0), eps)
    close(process.predict_x0_from_v(x_t, t, v), x0)
    close(process.predict_eps_from_v(x_t, t, v), eps)
    output = {"eps": eps, "x0": x0, "v": v}[prediction_type]
    x0_hat, eps_hat = process.model_output_to_x0_eps(output, x_t, t)
    close(x0_hat, x0)
    close(eps_hat, eps)


@pytest.mark.parametrize("schedule,start,end", [(s, a, b) for s, _, a, b in SCHEDULES])
def test_vlb_weights_closed_forms(schedule, start, end):
    ref = reference_tables(schedule, start, end)
    weights = {}
    for kind in ("eps", "x0", "v"):
        process = GaussianDiffusion(GaussianDiffusionConfig(beta_schedule=schedule, linear_start=start,
                                                            linear_end=end, prediction_type=kind))
        weights[kind] = process.lvlb_weights.double()
        assert weights[kind][0] == weights[kind][1]
    s = slice(1, None)
    eps_w = ref["betas"] ** 2 / (2 * ref["sigma2"] * ref["alphas"] * (1 - ref["abar"]))
    x0_w = ref["coef1"] ** 2 / (2 * ref["sigma2"])
    torch.testing.assert_close(weights["eps"][s], eps_w[s], rtol=1e-5, atol=0)
    torch.testing.assert_close(weights["x0"][s], x0_w[s], rtol=1e-5, atol=0)
    torch.testing.assert_close(weights["v"][s], (eps_w * ref["abar"])[s], rtol=1e-5, atol=0)  # eps = sqrt(abar) v + ...
    ldm_typo = 0.5 * torch.sqrt(ref["abar"]) / (2.0 * 1 - ref["abar"])
    assert not torch.allclose(weights["x0"][s], ldm_typo[s], rtol=1e-2)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_vlb_weight_times_error_is_the_kl(prediction_type):
    """lvlb_weights[t] * ||target - pred||^2 == KL(q(x_{t-1}|x_t,x0) || p) for fixed sigma_t^2."""
    process = GaussianDiffusion(GaussianDiffusionConfig(prediction_type=prediction_type))
    g = torch.Generator().manual_seed(3)
    x0, noise = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([1, 300, 999])
    x_t = process.q_sample(x0, t, noise)
    target = process.training_target(x0, noise, t)
    prediction = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    p = process.p_mean_variance(prediction, x_t, t)
    true_mean, _, log_var = process.q_posterior(x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, log_var, p.mean, log_var))
    expected = process.lvlb_weights[t].double() * mean_flat((prediction - target) ** 2)
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_perfect_prediction_has_zero_simple_loss(prediction_type, variance_type):
    process = GaussianDiffusion(GaussianDiffusionConfig(prediction_type=prediction_type, variance_type=variance_type))
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = process.sample_timesteps(4, torch.device("cpu"), generator=g)
    x_t = process.q_sample(x0, t, noise)
    output = process.training_target(x0, noise, t)
    if variance_type == "learned_range":
        output = torch.cat([output, torch.zeros_like(output)], dim=1)
    losses = process.training_loss(output, x0, x_t, t, noise)
    assert losses.loss_simple.shape == (4,)
    assert float(losses.loss_simple.abs().max()) < 1e-9


def test_loss_combines_simple_and_ldm_vlb():
    config = GaussianDiffusionConfig(l_simple_weight=0.5, original_elbo_weight=2.0, loss_type="l1")
    process = GaussianDiffusion(config)
    g = torch.Generator().manual_seed(5)
    x0, noise, out = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 500, 999])
    losses = process.training_loss(out, x0, process.q_sample(x0, t, noise), t, noise)
    simple = (out - noise).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses.loss_simple, simple)
    torch.testing.assert_close(losses.loss_vlb, process.lvlb_weights[t] * simple)
    torch.testing.assert_close(losses.loss, 0.5 * simple.mean() + 2.0 * (process.lvlb_weights[t] * simple).mean())


def learned_range_setup(seed=6):
    process = GaussianDiffusion(GaussianDiffusionConfig(variance_type="learned_range"))
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 256, (3, 2, 4, 4), generator=g).double() / 127.5) - 1
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps_hat = noise + 0.3 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    v = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    return process, x0, noise, eps_hat, v


def test_hybrid_vb_term_is_the_gaussian_kl():
    process, x0, noise, eps_hat, v = learned_range_setup()
    ref = reference_tables("linear", 1e-4, 2e-2)
    t = torch.tensor([1, 200, 999])
    x_t = process.q_sample(x0, t, noise)
    losses = process.training_loss(torch.cat([eps_hat, v], 1), x0, x_t, t, noise)
    b, a, abar = (ref[k][t].view(-1, 1, 1, 1) for k in ("betas", "alphas", "abar"))
    abar_prev = ref["abar"][t - 1].view(-1, 1, 1, 1)
    mu_q = (torch.sqrt(abar_prev) * b * x0 + torch.sqrt(a) * (1 - abar_prev) * x_t) / (1 - abar)  # Ho Eq. 7
    var_q = ref["beta_tilde"][t].view(-1, 1, 1, 1)
    mu_p = (x_t - b / torch.sqrt(1 - abar) * eps_hat) / torch.sqrt(a)  # Ho Eq. 11
    var_p = torch.exp((v + 1) / 2 * torch.log(b) + (1 - v) / 2 * torch.log(var_q))  # N&D Eq. 15
    kl = 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1)
    torch.testing.assert_close(losses.loss_vlb, kl.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses.loss, losses.loss_simple.mean() + losses.loss_vlb.mean())


def test_hybrid_vb_term_trains_only_the_variance_and_uses_decoder_nll_at_zero():
    process, x0, noise, eps_hat, v = learned_range_setup(7)
    t = torch.tensor([0, 0, 5])
    x_t = process.q_sample(x0, t, noise)
    output = torch.cat([eps_hat, v], 1).requires_grad_(True)
    losses = process.training_loss(output, x0, x_t, t, noise)
    losses.loss_vlb.sum().backward()
    assert float(output.grad[:, :2].abs().max()) == 0.0 and float(output.grad[:, 2:].abs().max()) > 0.0
    p = process.p_mean_variance(output.detach(), x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0, means=p.mean, log_scales=0.5 * p.log_variance)
    torch.testing.assert_close(losses.loss_vlb[:2], (mean_flat(nll) / math.log(2))[:2].detach())


def test_discretized_likelihood_against_exact_normal_cdf():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0], dtype=torch.float64)
    means, log_scales = x - 0.05, torch.full_like(x, math.log(0.3))  # away from the tails of the tanh approx.
    ndtr, std = torch.special.ndtr, 0.3
    upper, lower = ndtr((x - means + 1 / 255) / std), ndtr((x - means - 1 / 255) / std)
    exact = torch.log(torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower)))
    got = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    torch.testing.assert_close(got, exact, rtol=2e-3, atol=1e-4)
    grid = torch.linspace(-4, 4, 101, dtype=torch.float64)
    assert float((approx_standard_normal_cdf(grid) - ndtr(grid)).abs().max()) < 1e-3


def test_variance_types():
    g = torch.Generator().manual_seed(8)
    x_t = torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 500, 999])
    large = GaussianDiffusion(GaussianDiffusionConfig(variance_type="fixed_large"))
    var, _ = large.model_variance(None, x_t, t)
    torch.testing.assert_close(var[1:, 0, 0, 0], large.betas[t[1:]])
    assert float(var[0, 0, 0, 0]) == float(large.posterior_variance[1])
    learned = GaussianDiffusion(GaussianDiffusionConfig(variance_type="learned_range"))
    v = torch.rand(5, 2, 4, 4, generator=g) * 2 - 1
    var, log_var = learned.model_variance(v, x_t, t)
    low, high = learned.posterior_variance[t[1:]].view(-1, 1, 1, 1), learned.betas[t[1:]].view(-1, 1, 1, 1)
    assert bool(((var[1:] >= low * (1 - 1e-5)) & (var[1:] <= high * (1 + 1e-5))).all())
    torch.testing.assert_close(learned.model_variance(-torch.ones_like(v), x_t, t)[0][1:], low.expand(4, 2, 4, 4))
    torch.testing.assert_close(learned.model_variance(torch.ones_like(v), x_t, t)[0][1:], high.expand(4, 2, 4, 4))


def test_v_posterior_mixes_variances():
    ref = reference_tables("linear", 1e-4, 2e-2, v_posterior=0.3)
    process = GaussianDiffusion(GaussianDiffusionConfig(v_posterior=0.3))
    torch.testing.assert_close(process.posterior_variance.double(), ref["sigma2"], rtol=1e-6, atol=0)


def test_respaced_with_all_steps_equals_original():
    process = GaussianDiffusion(GaussianDiffusionConfig(beta_schedule="cosine", variance_type="learned_range"))
    same = process.respaced(range(1000))
    for name, buffer in process.named_buffers():
        torch.testing.assert_close(getattr(same, name), buffer, rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(same.timestep_map, torch.arange(1000))


def test_respaced_subset_keeps_abar_and_maps_timesteps():
    process = GaussianDiffusion(GaussianDiffusionConfig())
    keep = [0, 100, 250, 999]
    spaced = process.respaced(keep)
    torch.testing.assert_close(spaced.alphas_cumprod, process.alphas_cumprod[keep])
    assert spaced.timestep_map.tolist() == keep
    assert spaced.respaced([1, 3]).timestep_map.tolist() == [100, 999]
    torch.testing.assert_close(spaced.betas[2], 1 - process.alphas_cumprod[250] / process.alphas_cumprod[100])
    with pytest.raises(ValueError):
        process.respaced([1000])


@pytest.mark.parametrize(
    "field,value",
    [("num_timesteps", 0), ("beta_schedule", "sigmoid"), ("linear_end", 1e-5), ("v_posterior", 1.5),
     ("prediction_type", "score"), ("variance_type", "learned"), ("loss_type", "huber"), ("cosine_s", 0.0),
     ("l_simple_weight", -1.0), ("timestep_sampling", "logit_normal"), ("linear_start", "1e-4")],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        GaussianDiffusionConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_learned_range_rejects_ldm_elbo_weight_and_wrong_channels():
    with pytest.raises(ConfigError, match="original_elbo_weight"):
        GaussianDiffusionConfig(variance_type="learned_range", original_elbo_weight=1.0)
    process = GaussianDiffusion(GaussianDiffusionConfig(variance_type="learned_range"))
    with pytest.raises(ValueError, match="channels"):
        process.model_output_to_x0_eps(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.tensor([5]))


def test_sample_timesteps_is_seeded_and_in_range():
    process = GaussianDiffusion(GaussianDiffusionConfig(num_timesteps=50))
    a = process.sample_timesteps(1000, torch.device("cpu"), torch.Generator().manual_seed(9))
    b = process.sample_timesteps(1000, torch.device("cpu"), torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and a.dtype == torch.long and int(a.min()) == 0 and int(a.max()) == 49

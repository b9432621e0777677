"""DDPM/DDIM steps and loops against diffusers' schedulers and closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

from diffusionforge.processes import GaussianDiffusion, GaussianDiffusionConfig, make_beta_schedule
from diffusionforge.samplers import (
    SAMPLERS,
    ddim_step,
    ddpm_step,
    invert_ddim,
    make_timesteps,
    sample_ddim,
    sample_ddpm,
)

from schedule_pairs import SCHEDULES

PREDICTIONS = [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")]
SHAPE = (2, 3, 8, 8)


def process_for(schedule, start, end, **config):
    config = GaussianDiffusionConfig(beta_schedule=schedule, linear_start=start, linear_end=end, **config)
    return GaussianDiffusion(config)


def float64_scheduler(cls, diffusers_schedule, start, end, **kwargs):
    """A diffusers scheduler whose tables are float64.

    diffusers keeps betas and abar in float32, where 1 - abar near t = 0
    loses 3-4 digits and the capped cosine beta 0.999 becomes 0.99900001
    (1 - beta off by 1e-5). With float64 tables these tests compare the step
    formulas; test_gaussian_process compares the float32 schedules (1e-6).
    """
    s = cls(beta_schedule=diffusers_schedule, beta_start=start, beta_end=end, clip_sample=False, **kwargs)
    ours = {"squaredcos_cap_v2": "cosine"}.get(diffusers_schedule, diffusers_schedule)
    s.betas = make_beta_schedule(ours, len(s.betas), start, end)
    torch.testing.assert_close(s.betas.float(), s.__class__(**s.config).betas, atol=1e-6, rtol=0)
    s.alphas = 1 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    s.one = torch.tensor(1.0, dtype=torch.float64)
    for name in ("final_alpha_cumprod", "initial_alpha_cumprod"):
        if hasattr(s, name):
            setattr(s, name, getattr(s, name).double())
    return s


def assert_near(ours, reference, tol=1e-5):
    """``max |ours - ref| <= tol * (1 + max |ref|)``.

    Scaled by the largest entry: at the cosine schedule's last step x0_hat is
    ~1e5 and float32 tables put its rounding on every element alike.
    """
    err = (ours.double() - reference.double()).abs().max() / (1 + reference.double().abs().max())
    assert float(err) <= tol, float(err)


def randn(seed, dtype=torch.float32, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_train,num_steps,offset", [(1000, 10, 0), (1000, 50, 1), (1000, 1000, 0), (1000, 3, 0),
                                                        (1000, 7, 1), (100, 33, 0), (20, 20, 0), (1, 1, 0)])
def test_make_timesteps_matches_diffusers(spacing, num_train, num_steps, offset):
    for cls in (DDIMScheduler, DDPMScheduler):
        scheduler = cls(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=offset)
        scheduler.set_timesteps(num_steps)
        ours = make_timesteps(num_train, num_steps, spacing, steps_offset=offset)
        assert torch.equal(ours, scheduler.timesteps), (ours, scheduler.timesteps)
    with pytest.raises(ValueError):
        make_timesteps(num_train, num_train + 1, spacing)


@pytest.mark.parametrize("schedule,diffusers_schedule,start,end", SCHEDULES)
@pytest.mark.parametrize("prediction_type,diffusers_prediction", PREDICTIONS)
def test_ddim_step_matches_diffusers(schedule, diffusers_schedule, start, end, prediction_type, diffusers_prediction):
    process = process_for(schedule, start, end, prediction_type=prediction_type)
    x, out = randn(0), randn(1)
    for num_steps in (10, 50, 1000):
        for spacing in ("leading", "trailing"):
            scheduler = float64_scheduler(DDIMScheduler, diffusers_schedule, start, end, timestep_spacing=spacing,
                                          prediction_type=diffusers_prediction)
            scheduler.set_timesteps(num_steps)
            timesteps = make_timesteps(1000, num_steps, spacing)
            for eta in (0.0, 1.0):
                for i in (0, 1, num_steps // 2, num_steps - 1):
                    t = int(timesteps[i])
                    t_prev = t - 1000 // num_steps  # diffusers' rule; equals timesteps[i + 1] for these n
                    noise = randn(100 + i)
                    ref = scheduler.step(out.double(), t, x.double(), eta=eta, variance_noise=noise.double())
                    ours = ddim_step(process, out, x, t, t_prev, eta, noise)
                    assert_near(ours.prev_sample, ref.prev_sample)
                    assert_near(ours.pred_x0, ref.pred_original_sample, tol=1e-4)


@pytest.mark.parametrize("schedule,diffusers_schedule,start,end", SCHEDULES)
@pytest.mark.parametrize("prediction_type,diffusers_prediction", PREDICTIONS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_matches_diffusers(schedule, diffusers_schedule, start, end, prediction_type,
                                     diffusers_prediction, variance_type):
    process = process_for(schedule, start, end, prediction_type=prediction_type, variance_type=variance_type)
    x, out = randn(2), randn(3, shape=(2, 6, 8, 8) if variance_type == "learned_range" else SHAPE)
    if variance_type == "learned_range":
        out[:, 3:] = out[:, 3:].tanh()
    for num_steps in (10, 50, None):
        for spacing in ("leading", "trailing"):
            schedulers = [float64_scheduler(DDPMScheduler, diffusers_schedule, start, end, timestep_spacing=spacing,
                                            prediction_type=diffusers_prediction, variance_type=kind)
                          for kind in (variance_type, "fixed_small")]
            for scheduler in schedulers:
                if num_steps is not None:
                    scheduler.set_timesteps(num_steps)
            timesteps = make_timesteps(1000, num_steps or 1000, spacing)
            n = len(timesteps)
            for i in (0, 1, n // 2, n - 2, n - 1):
                t = int(timesteps[i])
                t_prev = int(timesteps[i + 1]) if i + 1 < n else -1
                # On a last step at t > 0 (trailing) diffusers adds noise of variance beta' unless the variance is
                # fixed_small (beta_tilde' = 0 there); Ho et al. Alg. 2 adds none: compare with the noiseless mean.
                scheduler, ref_out = (schedulers[1], out[:, :3]) if t_prev == -1 else (schedulers[0], out)
                ref = scheduler.step(ref_out.double(), t, x.double(), generator=torch.Generator().manual_seed(i))
                ours = ddpm_step(process, out, x, t, t_prev, randn(i, dtype=torch.float64).float())
                assert_near(ours.prev_sample, ref.prev_sample)
                assert_near(ours.pred_x0, ref.pred_original_sample, tol=1e-4)


class ToyDenoiser:
    """A fixed nonlinear function of (x, t), standing in for a backbone."""

    def __init__(self, out_channels=3, dtype=torch.float32):
        self.weight = randn(7, dtype, (out_channels, 3)) * 0.5
        self.calls = []

    def __call__(self, x, t, cond=None):
        self.calls.append(t.clone())
        mixed = torch.einsum("oc,bchw->bohw", self.weight.to(x.dtype), x)
        return torch.tanh(mixed + torch.cos(t.to(x.dtype) / 100).view(-1, 1, 1, 1))


def diffusers_loop(scheduler, denoise, x, timesteps, **step_kwargs):
    for t in timesteps:
        out = denoise(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(out, int(t), x, **step_kwargs).prev_sample
    return x


# Not (trailing, learned_range): there diffusers adds noise on the last step (see test_ddpm_step_matches_diffusers).
@pytest.mark.parametrize("spacing,variance_type", [("leading", "fixed_small"), ("trailing", "fixed_small"),
                                                   ("leading", "learned_range")])
def test_sample_ddpm_loop_matches_diffusers(spacing, variance_type):
    channels = 6 if variance_type == "learned_range" else 3
    process = process_for("scaled_linear", 0.00085, 0.012, variance_type=variance_type)
    scheduler = float64_scheduler(DDPMScheduler, "scaled_linear", 0.00085, 0.012, timestep_spacing=spacing,
                                  variance_type=variance_type)
    scheduler.set_timesteps(10)
    x_T = randn(11, torch.float64)
    ref = diffusers_loop(scheduler, ToyDenoiser(channels, torch.float64), x_T, scheduler.timesteps,
                         generator=torch.Generator().manual_seed(5))
    denoise = ToyDenoiser(channels, torch.float64)
    ours = sample_ddpm(denoise, process, x_T, num_steps=10, spacing=spacing, generator=torch.Generator().manual_seed(5),
                       progress=False)
    assert_near(ours.sample, ref)
    assert torch.equal(torch.stack(denoise.calls)[:, 0], scheduler.timesteps)  # backbone sees original timesteps


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_loop_matches_diffusers(eta):
    process = process_for("linear", 1e-4, 2e-2, prediction_type="v")
    scheduler = float64_scheduler(DDIMScheduler, "linear", 1e-4, 2e-2, prediction_type="v_prediction")
    scheduler.set_timesteps(20)
    x_T = randn(12, torch.float64)
    ref = diffusers_loop(scheduler, ToyDenoiser(dtype=torch.float64), x_T, scheduler.timesteps, eta=eta,
                         generator=torch.Generator().manual_seed(6))
    ours = sample_ddim(ToyDenoiser(dtype=torch.float64), process, x_T, num_steps=20, eta=eta,
                       generator=torch.Generator().manual_seed(6), progress=False)
    assert_near(ours.sample, ref)


def test_ddim_inversion_step_matches_diffusers_inverse_scheduler():
    process = process_for("scaled_linear", 0.00085, 0.012)
    scheduler = float64_scheduler(DDIMInverseScheduler, "scaled_linear", 0.00085, 0.012)
    scheduler.set_timesteps(25)
    denoise = ToyDenoiser(dtype=torch.float64)
    x0 = randn(13, torch.float64)
    ref = x0
    for t in scheduler.timesteps:
        ref = scheduler.step(denoise(ref, torch.full((2,), int(t))), int(t), ref).prev_sample
    ours = invert_ddim(denoise, process, x0, num_steps=25, progress=False)
    assert_near(ours.sample, ref)


def test_ddim_eta_zero_is_deterministic():
    process = process_for("cosine", 1e-4, 2e-2)
    x_T = randn(14)
    runs = [sample_ddim(ToyDenoiser(), process, x_T, num_steps=10, generator=torch.Generator().manual_seed(s),
                        progress=False).sample for s in (0, 1)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("sampler,kwargs", [(sample_ddpm, {"num_steps": 10}),
                                            (sample_ddim, {"eta": 1.0, "num_steps": 10})])
def test_same_seed_same_samples(sampler, kwargs):
    process = process_for("linear", 1e-4, 2e-2)
    x_T = randn(15)

    def run(seed):
        return sampler(ToyDenoiser(), process, x_T, generator=torch.Generator().manual_seed(seed), progress=False,
                       **kwargs).sample

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def exact_x0_denoiser(process, x0):
    """Returns the eps that makes x_t a noised version of the fixed ``x0``."""
    def denoise(x_t, t, cond=None):
        return process.predict_eps_from_x0(x_t, t, x0)
    return denoise


def gaussian_data_denoiser(process, mu, s):
    """Optimal eps for data ~ N(mu, s^2 I): E[x0 | x_t] is linear in x_t."""
    def denoise(x_t, t, cond=None):
        abar = process.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        x0_mean = mu + abar.sqrt() * s**2 / (abar * s**2 + 1 - abar) * (x_t - abar.sqrt() * mu)
        return (x_t - abar.sqrt() * x0_mean) / (1 - abar).sqrt()
    return denoise


def test_invert_then_sample_reproduces_x0():
    process = process_for("linear", 1e-4, 2e-2)
    x0 = randn(16, torch.float64).clamp(-1, 1)
    denoise = exact_x0_denoiser(process, x0)
    x_T = invert_ddim(denoise, process, x0, num_steps=50, progress=False).sample
    back = sample_ddim(denoise, process, x_T, num_steps=50, progress=False).sample
    torch.testing.assert_close(back, x0, atol=1e-4, rtol=0)
    # A non-trivial ODE: data N(mu, s^2); the round trip is exact up to discretisation error.
    mu, s = randn(17, torch.float64) * 0.3, 0.5
    denoise = gaussian_data_denoiser(process, mu, s)
    x0 = mu + s * randn(18, torch.float64)
    x_T = invert_ddim(denoise, process, x0, num_steps=500, progress=False).sample
    assert float((x_T - x0).abs().mean()) > 0.3  # it went somewhere
    back = sample_ddim(denoise, process, x_T, num_steps=500, progress=False).sample
    torch.testing.assert_close(back, x0, atol=2e-2, rtol=0)


@pytest.mark.parametrize("sampler", [sample_ddpm, sample_ddim])
def test_mask_inpainting_keeps_known_region(sampler):
    process = process_for("linear", 1e-4, 2e-2)
    x0_known = randn(19).clamp(-1, 1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    inputs, toy = [], ToyDenoiser()

    def denoise(x, t, cond=None):
        inputs.append(x)
        return toy(x, t, cond)

    x_T = randn(20)
    out = sampler(denoise, process, x_T, num_steps=10, known_mask=mask, x0_known=x0_known,
                  generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(out.sample[..., :4], x0_known[..., :4])
    assert not torch.allclose(out.sample[..., 4:], x0_known[..., 4:], atol=1e-2)
    # Before the first step the known region is q_sample(x0_known, t_0, first noise drawn), the rest is x_T.
    first_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = process.q_sample(x0_known, torch.full((2,), 900), first_noise)
    torch.testing.assert_close(inputs[0][..., :4], expected[..., :4])
    assert torch.equal(inputs[0][..., 4:], x_T[..., 4:])
    with pytest.raises(ValueError):
        sampler(ToyDenoiser(), process, randn(20), num_steps=10, known_mask=mask, progress=False)


def test_callback_and_intermediates():
    process = process_for("linear", 1e-4, 2e-2)
    record = []
    out = sample_ddim(ToyDenoiser(), process, randn(21), num_steps=5, progress=False, return_intermediates=True,
                      callback=lambda i, t, x, pred_x0: record.append((i, t, pred_x0.shape)))
    assert [r[:2] for r in record] == list(enumerate(make_timesteps(1000, 5, "leading").tolist()))
    assert len(out.intermediates) == 5 and torch.equal(out.intermediates[-1], out.sample)


def test_sample_ddpm_all_steps_by_default():
    process = GaussianDiffusion(GaussianDiffusionConfig(num_timesteps=20))
    denoise = ToyDenoiser()
    sample_ddpm(denoise, process, randn(22), generator=torch.Generator().manual_seed(0), progress=False)
    assert [int(t[0]) for t in denoise.calls] == list(range(19, -1, -1))


def test_respaced_ddpm_uses_interpolated_learned_variance():
    """On a big step, v = +1 gives beta' = 1 - abar_t/abar_prev and v = -1 the respaced beta_tilde."""
    process = process_for("linear", 1e-4, 2e-2, variance_type="learned_range")
    x, eps = randn(23), randn(24)
    abar_t, abar_prev = process.alphas_cumprod[500].double(), process.alphas_cumprod[400].double()
    beta_big = 1 - abar_t / abar_prev
    for v, variance in [(1.0, beta_big), (-1.0, (1 - abar_prev) / (1 - abar_t) * beta_big), (0.0, None)]:
        out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
        std = ddpm_step(process, out, x, 500, 400, torch.ones_like(x)).prev_sample
        std = std - ddpm_step(process, out, x, 500, 400, torch.zeros_like(x)).prev_sample
        if variance is None:  # v = 0: the geometric mean of the two
            variance = (beta_big * (1 - abar_prev) / (1 - abar_t) * beta_big).sqrt()
        torch.testing.assert_close(std, variance.sqrt().float().expand_as(x), rtol=1e-4, atol=1e-6)


def test_clip_denoised_bounds_pred_x0():
    process = process_for("linear", 1e-4, 2e-2)
    out = randn(26) * 10
    for step in (lambda: ddim_step(process, out, randn(27), 900, 880, 0.0, None, clip_denoised=True),
                 lambda: ddpm_step(process, out, randn(27), 900, 880, randn(28), clip_denoised=True)):
        assert float(step().pred_x0.abs().max()) <= 1.0


def test_registry():
    assert SAMPLERS["ddpm"].fn is sample_ddpm and SAMPLERS["ddim"].fn is sample_ddim

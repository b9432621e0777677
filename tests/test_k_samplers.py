"""The sigma samplers: whole trajectories against diffusers' schedulers, Heun against EDM Algorithm 2.

A fixed random network (a 3x3 convolution, a tanh and a smooth dependence on
the timestep it is given) plays the trained model. diffusers walks its
scheduler loop (``scale_model_input``, the net, ``step``) in float32, as it
always upcasts to; ours runs in float64 on the scheduler's own abar table, and
the noise both draw comes from one list. Agreement is measured relative to the
largest value of the trajectory's end (``assert_near``).
"""

from __future__ import annotations

import dataclasses
import math

import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)

import diffusionforge.samplers.dpmpp as dpmpp_module
import diffusionforge.samplers.k_samplers as k_module
from diffusionforge.models.generative import SampleRequest
from diffusionforge.processes import GaussianDiffusion, GaussianDiffusionConfig
from diffusionforge.processes.config import EDMConfig, RectifiedFlowConfig
from diffusionforge.processes.edm import EDMProcess
from diffusionforge.processes.flow import RectifiedFlow
from diffusionforge.samplers import SAMPLERS, classifier_free_guidance, sampler_entry
from diffusionforge.samplers.denoiser import VPDenoiser
from diffusionforge.samplers.dpmpp import dpmpp_multistep
from diffusionforge.samplers.k_samplers import euler, euler_ancestral, heun
from diffusionforge.samplers.names import SAMPLER_NAMES
from diffusionforge.samplers.sigmas import make_sigmas
from diffusionforge.samplers.spacing import make_timesteps

SHAPE = (2, 3, 6, 6)
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


class FixedNet:
    """``net(x, t (B,), cond) -> (B, C, H, W)``, deterministic, computed in float64."""

    def __init__(self, seed: int = 0, channels: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64) * 0.3

    def __call__(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        x64 = x.double()
        y = torch.tanh(torch.nn.functional.conv2d(x64, self.weight, padding=1))
        return (0.7 * x64 + 0.3 * y * torch.cos(t / 400)).to(x.dtype)


class NoiseQueue:
    """The same standard normal tensors, in order, for diffusers' ``randn_tensor`` and our ``randn``."""

    def __init__(self, seed: int = 7, count: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(count)]
        self.ours = iter(self.noises)
        self.theirs = iter(self.noises)

    def diffusers(self, shape, generator=None, device=None, dtype=None, **_):
        return next(self.theirs).to(dtype or torch.float32)

    def randn(self, like, generator=None):
        return next(self.ours).to(like.dtype)


def assert_near(ours, reference, tol=1e-5):
    """``max |ours - ref| <= tol * (1 + max |ref|)``."""
    err = (ours.double() - reference.double()).abs().max() / (1 + reference.double().abs().max())
    assert float(err) <= tol, float(err)


def start_noise(seed=3):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def diffusers_walk(scheduler, net, num_steps, noise):
    """diffusers' loop from ``noise (SHAPE)`` in float32."""
    scheduler.set_timesteps(num_steps)
    x = noise.float() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(net(model_in, t), t, x).prev_sample
    return x


def ours_for(scheduler, net, prediction, quantize=False):
    return VPDenoiser(net, scheduler.alphas_cumprod, prediction, quantize=quantize)


def schedule_kwargs(schedule):
    """(our schedule, spacing) and the diffusers config for one of our schedule choices."""
    name, _, spacing = schedule.partition("-")
    config = {"use_karras_sigmas": name == "karras", "use_exponential_sigmas": name == "exponential",
              "timestep_spacing": spacing or "linspace"}
    return name, spacing or "leading", config


def run_ours(solver, denoiser, scheduler, num_steps, schedule, spacing, noise, **options):
    sigmas = make_sigmas(denoiser, num_steps, schedule, spacing)
    x = noise * float(scheduler.init_noise_sigma) if hasattr(scheduler, "init_noise_sigma") else noise
    return solver(denoiser, x, sigmas, progress=False, **options).sample


# ---- schedules -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["discrete-leading", "discrete-trailing", "discrete-linspace", "karras",
                                      "exponential"])
@pytest.mark.parametrize("num_steps", [1, 7, 25])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_sigma_schedules_match_diffusers(schedule, num_steps, beta_schedule):
    name, spacing, config = schedule_kwargs(schedule)
    if num_steps == 1 and name != "discrete":
        pytest.skip("one Karras/exponential step: diffusers takes its range from linspace(0, T-1, 1) = [0], "
                    "sigma_max = sigma_min; ours starts at sigma_max")
    for cls in (EulerDiscreteScheduler, HeunDiscreteScheduler):
        scheduler = cls(beta_schedule=beta_schedule, **config)
        scheduler.set_timesteps(num_steps)
        theirs = scheduler.sigmas  # Heun's repeats each inner level for its second evaluation
        if cls is HeunDiscreteScheduler:
            theirs = torch.cat([theirs[:1], theirs[1:-1:2], theirs[-1:]])
        ours = make_sigmas(VPDenoiser(FixedNet(), scheduler.alphas_cumprod), num_steps, name, spacing)
        torch.testing.assert_close(ours.float(), theirs, rtol=2e-6, atol=0)
        assert ours[-1] == 0 and len(ours) == num_steps + 1


@pytest.mark.parametrize("num_steps", [1, 7, 25])
def test_leading_spacing_takes_the_steps_offset(num_steps):
    """Stable Diffusion's steps_offset = 1 moves every leading timestep up by one in Euler and Heun too."""
    for cls in (EulerDiscreteScheduler, HeunDiscreteScheduler):
        scheduler = cls(beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
        scheduler.set_timesteps(num_steps)
        theirs = scheduler.sigmas if cls is EulerDiscreteScheduler else torch.cat(
            [scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]])
        ours = make_sigmas(VPDenoiser(FixedNet(), scheduler.alphas_cumprod), num_steps, "discrete", "leading", 1)
        torch.testing.assert_close(ours.float(), theirs, rtol=2e-6, atol=0)


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)])
@pytest.mark.parametrize("num_steps", [1, 7, 12, 25])
def test_multistep_grid_matches_diffusers(cls, spacing, offset, num_steps):
    """DPM-Solver++ and UniPC space leading / linspace timesteps over n + 1 points and drop the last."""
    scheduler = cls(beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(num_steps)
    assert torch.equal(make_timesteps(1000, num_steps, spacing, offset, multistep=True), scheduler.timesteps)
    ours = make_sigmas(VPDenoiser(FixedNet(), scheduler.alphas_cumprod), num_steps, "discrete", spacing, offset,
                       multistep=True)
    torch.testing.assert_close(ours.float(), scheduler.sigmas, rtol=2e-6, atol=0)
    if spacing != "trailing":  # not the single-scheduler grid
        assert not torch.equal(make_timesteps(1000, num_steps, spacing, offset), scheduler.timesteps)


@pytest.mark.parametrize("schedule", ["karras", "exponential", "discrete-trailing"])
def test_dpm_solver_sigmas_match_diffusers(schedule):
    name, spacing, config = schedule_kwargs(schedule)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", **config)
    scheduler.set_timesteps(12)
    ours = make_sigmas(VPDenoiser(FixedNet(), scheduler.alphas_cumprod), 12, name, spacing)
    torch.testing.assert_close(ours.float(), scheduler.sigmas, rtol=2e-6, atol=0)


def test_sigma_to_t_inverts_t_to_sigma():
    denoiser = VPDenoiser(FixedNet(), EulerDiscreteScheduler(beta_schedule="scaled_linear").alphas_cumprod)
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.75, 999.0], dtype=torch.float64)
    torch.testing.assert_close(denoiser.sigma_to_t(denoiser.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(denoiser.t_to_sigma(t[[0, 2, 6]]), denoiser.sigmas[[0, 1, 999]], rtol=1e-12, atol=0)


# ---- whole trajectories against diffusers --------------------------------------------------------------

SCHEDULES = ["discrete-leading", "discrete-trailing", "karras"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("num_steps", [8, 30])
def test_euler_matches_diffusers(schedule, prediction, num_steps):
    name, spacing, config = schedule_kwargs(schedule)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type=PREDICTIONS[prediction],
                                       **config)
    net, noise = FixedNet(), start_noise()
    theirs = diffusers_walk(scheduler, net, num_steps, noise)
    ours = run_ours(euler, ours_for(scheduler, net, prediction), scheduler, num_steps, name, spacing, noise)
    assert_near(ours, theirs)


@pytest.mark.parametrize("schedule", ["discrete-leading", "discrete-trailing"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_ancestral_matches_diffusers(schedule, prediction, monkeypatch):
    name, spacing, config = schedule_kwargs(schedule)
    scheduler = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", prediction_type=PREDICTIONS[prediction],
                                                timestep_spacing=config["timestep_spacing"])  # no Karras option
    queue, net, noise = NoiseQueue(), FixedNet(), start_noise()
    monkeypatch.setattr(euler_a_module, "randn_tensor", queue.diffusers)
    monkeypatch.setattr(k_module, "randn", queue.randn)
    theirs = diffusers_walk(scheduler, net, 12, noise)
    ours = run_ours(euler_ancestral, ours_for(scheduler, net, prediction), scheduler, 12, name, spacing, noise)
    assert_near(ours, theirs)


@pytest.mark.parametrize("schedule", SCHEDULES + ["exponential"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_heun_matches_diffusers(schedule, prediction):
    name, spacing, config = schedule_kwargs(schedule)
    scheduler = HeunDiscreteScheduler(beta_schedule="scaled_linear", prediction_type=PREDICTIONS[prediction],
                                      **config)
    net, noise = FixedNet(), start_noise()
    theirs = diffusers_walk(scheduler, net, 10, noise)
    ours = run_ours(heun, ours_for(scheduler, net, prediction), scheduler, 10, name, spacing, noise)
    assert_near(ours, theirs)


def third_order_sde_as_derived(original):
    """diffusers' order-3 sde-dpmsolver++ update with its D2 coefficient ``-(phi_3 + 1)`` corrected to ``-phi_3``.

    The added ``alpha_t * D2`` is the whole difference (test_dpmpp_coefficients_are_the_integrals shows
    ``-phi_3`` is the integral); everything else stays diffusers' own.
    """

    def update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        x_t = original(self, model_output_list, *args, sample=sample, noise=noise, **kwargs)
        if self.config.algorithm_type != "sde-dpmsolver++":
            return x_t
        i = self.step_index
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        lambdas = []
        for sigma in (self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1], self.sigmas[i - 2]):
            alpha, sigma_vp = self._sigma_to_alpha_sigma_t(sigma)
            lambdas.append(torch.log(alpha) - torch.log(sigma_vp))
        h, h_0, h_1 = lambdas[0] - lambdas[1], lambdas[1] - lambdas[2], lambdas[2] - lambdas[3]
        r0, r1 = h_0 / h, h_1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        return x_t + alpha_t * (d1_0 - d1_1) / (r0 + r1)

    return update


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("schedule", ["discrete-trailing", "karras"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("num_steps", [6, 20])
def test_dpm_solver_pp_matches_diffusers(algorithm, order, schedule, prediction, num_steps, monkeypatch):
    name, spacing, config = schedule_kwargs(schedule)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", algorithm_type=algorithm,
                                            solver_order=order, prediction_type=PREDICTIONS[prediction], **config)
    queue, net, noise = NoiseQueue(), FixedNet(), start_noise()
    monkeypatch.setattr(dpm_module, "randn_tensor", queue.diffusers)
    monkeypatch.setattr(dpmpp_module, "randn", queue.randn)
    monkeypatch.setattr(DPMSolverMultistepScheduler, "multistep_dpm_solver_third_order_update",
                        third_order_sde_as_derived(DPMSolverMultistepScheduler.multistep_dpm_solver_third_order_update))
    theirs = diffusers_walk(scheduler, net, num_steps, noise)
    # diffusers' DPM-Solver rounds the timesteps of its Karras sigmas (quantize); noise starts at VP x_T ~ N(0, I)
    denoiser = ours_for(scheduler, net, prediction, quantize=schedule == "karras")
    sigmas = make_sigmas(denoiser, num_steps, name, spacing)
    x = noise * denoiser.prior_scale(float(sigmas[0]))
    ours = dpmpp_multistep(denoiser, x, sigmas, order=order, sde=algorithm.startswith("sde"), progress=False)
    assert_near(ours.sample, theirs)


def test_dpmpp_coefficients_are_the_integrals():
    """phi_k h^k = integral over u in [0, h] of w(u) u^(k-1) / (k-1)!, w = e^{-(h-u)} (ODE) or 2 e^{-2(h-u)} (SDE).

    The D1 / D2 coefficients of order 3 are phi_2 and -(phi_3 - ...) as in dpmpp.py: with
    ``hh = h`` (ODE) or ``2h`` (SDE), phi_2 = expm1(-hh)/hh + 1 and phi_3 = phi_2/hh - 1/2.
    """
    for sde in (False, True):
        for h in (0.05, 0.4, 1.3):
            hh = 2 * h if sde else h
            u = torch.linspace(0, h, 200001, dtype=torch.float64)
            w = (2 if sde else 1) * torch.exp(-(hh / h) * (h - u))
            phi_2 = math.expm1(-hh) / hh + 1
            phi_3 = phi_2 / hh - 0.5
            assert torch.trapezoid(w * u, u).item() / h == pytest.approx(phi_2, rel=1e-8)
            assert torch.trapezoid(w * u**2 / 2, u).item() / h**2 == pytest.approx(-phi_3, rel=1e-7)


# ---- Heun against the equations of Karras et al. 2022 ----------------------------------------------------

def edm_algorithm_2(D, sigmas, x, noises, s_churn, s_tmin, s_tmax, s_noise):
    """Algorithm 2 of Karras et al. 2022, line by line (t_i = sigma_i, s(t) = 1)."""
    n = len(sigmas) - 1
    noises = iter(noises)
    for i in range(n):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0  # line 4
        t_hat = t_cur + gamma * t_cur  # line 5
        x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * next(noises) if gamma > 0 else x  # line 6
        d = (x_hat - D(x_hat, t_hat)) / t_hat  # line 7
        x = x_hat + (t_next - t_hat) * d  # line 8
        if t_next != 0:  # lines 9-11
            d_prime = (x - D(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
    return x


@pytest.mark.parametrize("s_churn,s_tmin,s_tmax,s_noise", [(0, 0, math.inf, 1), (40, 0.05, 50, 1.003),
                                                            (80, 0, math.inf, 1)])
def test_heun_is_edm_algorithm_2(s_churn, s_tmin, s_tmax, s_noise, monkeypatch):
    net = FixedNet(seed=4)

    def D(x, sigma, cond=None):  # an EDM-like denoiser: x0_hat from the net at c_in x
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        return x / (1 + sigma**2) + net(x / (1 + sigma**2).sqrt(), sigma.reshape(-1).log() / 4)

    sigmas = make_sigmas(type("EDM", (), {"sigma_min": 0.002, "sigma_max": 80.0})(), 12, "karras")
    queue = NoiseQueue()
    monkeypatch.setattr(k_module, "randn", queue.randn)
    x = start_noise() * 80.0
    ours = heun(D, x, sigmas, progress=False, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    reference = edm_algorithm_2(D, sigmas, x, queue.noises, s_churn, s_tmin, s_tmax, s_noise)
    torch.testing.assert_close(ours.sample, reference, rtol=1e-12, atol=1e-12)


# ---- the denoiser view of GaussianDiffusion --------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_vp_denoiser_is_the_process_x0_at_integer_timesteps(prediction):
    """D(x_VE, sigma_t) equals the process's own x0 from the net's output at x_VP = x_VE / sqrt(1 + sigma^2)."""
    process = GaussianDiffusion(GaussianDiffusionConfig(prediction_type=prediction))
    net = FixedNet(seed=2)
    denoiser = process.denoiser(net)
    t = torch.tensor([0, 17, 500, 999])
    sigma = denoiser.sigmas[t]
    x_vp = start_noise().repeat(2, 1, 1, 1).double()
    x_ve = x_vp * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    expected, _ = process.double().model_output_to_x0_eps(net(x_vp, t.double()), x_vp, t)
    assert_near(denoiser(x_ve, sigma), expected, tol=1e-7)  # the process's tables are float32


def test_vp_denoiser_reads_the_first_channels_of_a_learned_variance():
    process = GaussianDiffusion(GaussianDiffusionConfig(variance_type="learned_range"))
    net = FixedNet(seed=2)
    wide = lambda x, t, cond=None: torch.cat([net(x, t), 100 + x], dim=1)  # noqa: E731  (B, 2C, H, W)
    x, sigma = start_noise(), torch.full((SHAPE[0],), 3.0, dtype=torch.float64)
    torch.testing.assert_close(process.denoiser(wide)(x, sigma), GaussianDiffusion().denoiser(net)(x, sigma))
    with pytest.raises(ValueError, match="channels"):
        process.denoiser(net)(x, sigma)


def test_vp_denoiser_of_a_respaced_process_calls_the_original_timesteps():
    seen = []
    process = GaussianDiffusion().respaced([0, 250, 500, 999])
    denoiser = process.denoiser(lambda x, t, cond=None: seen.append(t.clone()) or torch.zeros_like(x))
    denoiser(start_noise(), denoiser.sigmas[[3, 1]].contiguous())
    torch.testing.assert_close(seen[0], torch.tensor([999.0, 250.0]))


def test_zero_terminal_snr_gets_a_finite_top_level():
    process = GaussianDiffusion(GaussianDiffusionConfig(rescale_betas_zero_snr=True, prediction_type="v"))
    denoiser = process.denoiser(FixedNet())
    assert float(process.alphas_cumprod[-1]) == 0 and math.isfinite(denoiser.sigma_max)
    assert denoiser.sigma_max == pytest.approx((1 - 2**-24) ** 0.5 / 2**-12)


# ---- every registered sampler: guidance, masks, callbacks, intermediates, seeds --------------------------

class CondNet:
    """``net(x, t, cond)`` reading ``cond["vector"]``: a FixedNet shifted by the condition."""

    def __init__(self):
        self.net = FixedNet(seed=5)

    def __call__(self, x, t, cond=None):
        shift = 0 if cond is None else cond["vector"].mean(dim=1).reshape(-1, 1, 1, 1).to(x.dtype)
        return self.net(x, t) + 0.2 * shift


def process_of(objective):
    if objective == "ddpm":
        return GaussianDiffusion(GaussianDiffusionConfig(num_timesteps=100))
    if objective == "edm":
        return EDMProcess(EDMConfig())
    return RectifiedFlow(RectifiedFlowConfig(num_train_timesteps=100))


# the bridge sampler starts from a source image, not noise: tests/test_bridge*.py and the test below
CASES = [(name, objective) for name, entry in SAMPLERS.items() for objective in entry.objectives
         if objective != "bridge"]


def run_registered(name, objective, net, cond=None, seed=0, steps=4, **kwargs):
    entry = SAMPLERS[name]
    options = {key: value for key, value in {"schedule": "karras", "spacing": "trailing", "clip_denoised": False,
                                              "eta": 0.5}.items() if key in entry.options}
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100))
    return entry.fn(net, process_of(objective), x_T, cond, num_steps=steps, progress=False,
                    generator=torch.Generator().manual_seed(seed), **options, **kwargs)


def test_the_registry_holds_every_name_and_only_request_fields():
    assert set(SAMPLERS) == set(SAMPLER_NAMES)
    fields = {f.name for f in dataclasses.fields(SampleRequest)}
    for name, entry in SAMPLERS.items():
        assert set(entry.options) <= fields, name
        assert set(entry.objectives) <= {"ddpm", "edm", "flow", "bridge"}, name  # bridge: LBM (BridgeMatching)


@pytest.mark.parametrize("name,objective", CASES)
def test_same_seed_same_sample(name, objective):
    first = run_registered(name, objective, FixedNet(), seed=3).sample
    assert torch.equal(first, run_registered(name, objective, FixedNet(), seed=3).sample)
    assert torch.isfinite(first).all() and first.shape == SHAPE


@pytest.mark.parametrize("name,objective", CASES)
def test_callbacks_and_intermediates(name, objective):
    calls = []
    out = run_registered(name, objective, FixedNet(), callback=lambda i, level, x, x0: calls.append((i, x, x0)),
                         return_intermediates=True)
    assert [i for i, _, _ in calls] == list(range(4)) and len(out.intermediates) == 4
    assert torch.equal(out.intermediates[-1], out.sample) and torch.equal(calls[-1][1], out.sample)
    assert all(x0.shape == SHAPE for _, _, x0 in calls)


@pytest.mark.parametrize("name,objective", CASES)
def test_inpainting_keeps_the_known_region(name, objective):
    known = torch.zeros(1, 1, SHAPE[2], SHAPE[3])
    known[..., :, : SHAPE[3] // 2] = 1
    x0_known = torch.rand(SHAPE, generator=torch.Generator().manual_seed(9)) * 2 - 1
    out = run_registered(name, objective, FixedNet(), known_mask=known, x0_known=x0_known).sample
    assert torch.equal(out[..., : SHAPE[3] // 2], x0_known[..., : SHAPE[3] // 2])
    free = run_registered(name, objective, FixedNet()).sample
    assert not torch.allclose(out[..., SHAPE[3] // 2:], free[..., SHAPE[3] // 2:])  # the known region steered it


@pytest.mark.parametrize("name,objective", CASES)
def test_guidance_wraps_the_network(name, objective):
    """The guided sample is the sample of the network that mixes its two outputs itself (Ho & Salimans Eq. 6)."""
    net, scale = CondNet(), 3.0
    cond = {"vector": torch.randn(SHAPE[0], 4, generator=torch.Generator().manual_seed(1))}
    uncond = {"vector": torch.zeros(1, 4)}
    guided = run_registered(name, objective, classifier_free_guidance(net, scale, uncond), cond).sample

    def mixed(x, t, c):
        u = net(x, t, {"vector": uncond["vector"].expand(x.shape[0], -1)})
        return u + scale * (net(x, t, c) - u)

    torch.testing.assert_close(guided, run_registered(name, objective, mixed, cond).sample, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, run_registered(name, objective, net, cond).sample)


def test_a_sampler_refuses_a_process_it_does_not_walk():
    with pytest.raises(ValueError, match="objective edm"):
        sampler_entry("ddim", "edm")
    assert sampler_entry("heun", "edm").fn is SAMPLERS["heun"].fn


def test_the_bridge_sampler_is_registered_for_bridges_only_and_refuses_masks():
    from diffusionforge.processes.bridge import BridgeMatching
    from diffusionforge.processes.config import BridgeMatchingConfig
    from diffusionforge.samplers.registry import sampler_entry

    entry = sampler_entry("bridge_euler", "bridge")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    out = entry.fn(FixedNet(), BridgeMatching(BridgeMatchingConfig()), x, None, num_steps=2,
                   generator=torch.Generator().manual_seed(0), return_intermediates=True)
    assert out.sample.shape == SHAPE and len(out.intermediates) == 2 and torch.isfinite(out.sample).all()
    with pytest.raises(ValueError, match="known_mask"):
        entry.fn(FixedNet(), BridgeMatching(BridgeMatchingConfig()), x, None, num_steps=1,
                 known_mask=torch.ones(SHAPE), x0_known=x)
    with pytest.raises(ValueError, match="bridge_euler walks bridge runs"):
        sampler_entry("bridge_euler", "ddpm")

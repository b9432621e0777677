"""UniPC (bh2), PNDM and PLMS against diffusers' schedulers, closed forms and their convergence orders.

diffusers is the oracle: whole trajectories of its scheduler loops on a fixed
toy network with the same initial noise. Both sides read the same abar table
(the process's), in float64, so the comparisons test the algorithms to
rounding (about 1e-15); diffusers would otherwise round its sigmas to float32
and lose digits where ``1 - abar`` is small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, UniPCMultistepScheduler

from diffusionforge.processes import EDMProcess, RectifiedFlow
from diffusionforge.samplers.pndm import sample_plms, sample_pndm
from diffusionforge.samplers.sigmas import make_sigmas
from diffusionforge.samplers.spacing import make_timesteps
from diffusionforge.samplers.unipc import sample_unipc, unipc

from test_samplers import SHAPE, ToyDenoiser, assert_near, diffusers_loop, exact_x0_denoiser, process_for, randn

PREDICTIONS = [("eps", "epsilon"), ("v", "v_prediction"), ("x0", "sample")]
EXACT = 1e-12  # float64, same tables: the algorithms agree to rounding
FLOAT32 = 1e-5  # float32 sampling against diffusers in float64


class RoundedToy(ToyDenoiser):
    """ToyDenoiser at the nearest integer time: diffusers' UniPC rounds its Karras timesteps,
    the VP denoiser passes fractional ones (equal after rounding)."""

    def __call__(self, x, t, cond=None):
        return super().__call__(x, t.round(), cond)


def unipc_scheduler(process, num_steps, *, prediction="epsilon", order=2, spacing="linspace", karras=False,
                    steps_offset=0):
    """diffusers' UniPC on the abar of the process's denoiser (float64), its sigmas recomputed in float64."""
    s = UniPCMultistepScheduler(prediction_type=prediction, solver_order=order, timestep_spacing=spacing,
                                use_karras_sigmas=karras, steps_offset=steps_offset)
    s.alphas_cumprod = 1 / (1 + process.denoiser(None).sigmas.double() ** 2)
    s.set_timesteps(num_steps)
    abar = s.alphas_cumprod.numpy()
    table = ((1 - abar) / abar) ** 0.5
    levels = s._convert_to_karras(table[::-1].copy(), num_steps) if karras else table[s.timesteps.numpy()]
    s.sigmas = torch.from_numpy(np.append(levels, 0.0))
    return s


def pndm_scheduler(process, num_steps, *, skip_prk_steps, spacing="leading", steps_offset=0,
                   set_alpha_to_one=False, prediction="epsilon"):
    """diffusers' PNDM on the process's abar buffer (which PNDM, like DDIM, reads), in float64."""
    s = PNDMScheduler(skip_prk_steps=skip_prk_steps, timestep_spacing=spacing, steps_offset=steps_offset,
                      set_alpha_to_one=set_alpha_to_one, prediction_type=prediction)
    s.alphas_cumprod = process.alphas_cumprod.double()
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else s.alphas_cumprod[0]
    s.set_timesteps(num_steps)
    return s


def seen_timesteps(denoise):
    return torch.stack(denoise.calls)[:, 0]


# ---------------------------------------------------------------- UniPC
# (schedule, spacing, steps_offset, through): "sample" is the registry function on our sigma schedule
# (sigmas.py with the multistep grid: n + 1 points, 0 dropped, for leading / linspace, the process's
# steps_offset); "solver" runs unipc on the sigmas of diffusers' scheduler.
UNIPC_CASES = [("discrete", "trailing", 0, "sample"), ("karras", "linspace", 0, "sample"),
               ("discrete", "leading", 1, "sample"), ("discrete", "linspace", 0, "sample"),
               ("discrete", "leading", 1, "solver")]


@pytest.mark.parametrize("prediction_type,diffusers_prediction", PREDICTIONS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("schedule,spacing,offset,through", UNIPC_CASES)
def test_unipc_matches_diffusers(prediction_type, diffusers_prediction, order, schedule, spacing, offset, through):
    process = process_for("scaled_linear", 0.00085, 0.012, prediction_type=prediction_type, steps_offset=offset)
    for num_steps in (6, 15):
        scheduler = unipc_scheduler(process, num_steps, prediction=diffusers_prediction, order=order,
                                    spacing=spacing, karras=schedule == "karras", steps_offset=offset)
        x_T = randn(30, torch.float64)
        ref = diffusers_loop(scheduler, RoundedToy(dtype=torch.float64), x_T, scheduler.timesteps)
        denoise = (RoundedToy if schedule == "karras" else ToyDenoiser)(dtype=torch.float64)
        if through == "sample":
            ours = sample_unipc(denoise, process, x_T, num_steps=num_steps, order=order, schedule=schedule,
                                spacing=spacing, progress=False)
        else:
            denoiser = process.denoiser(denoise)
            ours = unipc(denoiser, x_T * denoiser.prior_scale(float(scheduler.sigmas[0])), scheduler.sigmas,
                         order=order, progress=False)
        assert_near(ours.sample, ref, EXACT)
        assert torch.equal(seen_timesteps(denoise).round().long(), scheduler.timesteps)


@pytest.mark.parametrize("schedule", ["discrete", "karras"])
@pytest.mark.parametrize("prediction_type,diffusers_prediction", PREDICTIONS[:2])
def test_unipc_float32_matches_diffusers(schedule, prediction_type, diffusers_prediction):
    process = process_for("linear", 1e-4, 2e-2, prediction_type=prediction_type)
    scheduler = unipc_scheduler(process, 10, prediction=diffusers_prediction, order=3, spacing="trailing",
                                karras=schedule == "karras")
    x_T = randn(31, torch.float64)
    ref = diffusers_loop(scheduler, RoundedToy(dtype=torch.float64), x_T, scheduler.timesteps)
    ours = sample_unipc(RoundedToy(), process, x_T.float(), num_steps=10, order=3, schedule=schedule,
                        spacing="trailing", progress=False)
    assert ours.sample.dtype == torch.float32
    assert_near(ours.sample, ref, FLOAT32)


def gaussian_data_net(process, mu, s):
    """eps-network of data ~ N(mu, s^2 I) at fractional times (the VP denoiser interpolates them)."""
    table = process.denoiser(None)

    def denoise(x_t, t, cond=None):
        abar = 1 / (1 + table.t_to_sigma(t.double()) ** 2).view(-1, 1, 1, 1)
        x0_mean = mu + abar.sqrt() * s**2 / (abar * s**2 + 1 - abar) * (x_t - abar.sqrt() * mu)
        return (x_t - abar.sqrt() * x0_mean) / (1 - abar).sqrt()

    return denoise


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_convergence_order(order):
    """UniC-p is accurate to order p + 1: on Gaussian data the exact ODE is known.

    From ``x_VE`` at sigma_max the probability-flow ODE keeps
    ``z = (x - mu) / sqrt(s^2 + sigma^2)``; the chain ends with the denoiser at
    sigma_min, ``mu + s^2 / sqrt(s^2 + sigma_min^2) z``.
    """
    process = process_for("scaled_linear", 0.00085, 0.012)
    mu, s = randn(32, torch.float64) * 0.3, 0.5
    table = process.denoiser(None)
    x_T = randn(33, torch.float64)
    z = (x_T * table.prior_scale(table.sigma_max) - mu) / (s**2 + table.sigma_max**2) ** 0.5
    exact = mu + s**2 / (s**2 + table.sigma_min**2) ** 0.5 * z
    errors = [float((sample_unipc(gaussian_data_net(process, mu, s), process, x_T, num_steps=n, order=order,
                                  schedule="karras", progress=False).sample - exact).abs().max())
              for n in (40, 80)]
    assert errors[0] / errors[1] > 0.8 * 2 ** (order + 1), errors


def exact_x0_net(process, x0):
    """The eps that makes every x_t a noised ``x0``, at fractional times too: x0_hat = x0 exactly."""
    table = process.denoiser(None)

    def denoise(x_t, t, cond=None):
        abar = 1 / (1 + table.t_to_sigma(t.double()) ** 2).view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    return denoise


def test_unipc_exact_denoiser_returns_its_x0():
    process = process_for("linear", 1e-4, 2e-2)
    x0 = randn(34, torch.float64).clamp(-1, 1)
    for schedule in ("discrete", "karras"):
        out = sample_unipc(exact_x0_net(process, x0), process, randn(35, torch.float64), num_steps=8, order=3,
                           schedule=schedule, progress=False)
        torch.testing.assert_close(out.sample, x0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("process", [EDMProcess(), RectifiedFlow()], ids=["edm", "flow"])
def test_unipc_walks_every_process(process):
    """Through ``process.denoiser`` the same code samples EDM and rectified-flow runs."""
    out = sample_unipc(ToyDenoiser(), process, randn(36), num_steps=6, schedule="karras", progress=False,
                       return_intermediates=True)
    assert out.sample.shape == SHAPE and torch.isfinite(out.sample).all() and len(out.intermediates) == 6


def test_unipc_rejects_bad_order():
    with pytest.raises(ValueError):
        sample_unipc(ToyDenoiser(), process_for("linear", 1e-4, 2e-2), randn(37), num_steps=5, order=4)


# ---------------------------------------------------------------- PNDM / PLMS
PSEUDO = [(sample_pndm, False), (sample_plms, True)]  # (ours, diffusers' skip_prk_steps)


@pytest.mark.parametrize("sampler,skip_prk_steps", PSEUDO, ids=["pndm", "plms"])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_pndm_plms_match_diffusers(sampler, skip_prk_steps, spacing, offset, set_alpha_to_one):
    # Step counts that divide T: diffusers steps to t - T // n, which is the next timestep only then.
    # the float64 run reads steps_offset / set_alpha_to_one from the process config (as the registry calls it);
    # the float32 one passes them to a process of default settings
    process = process_for("scaled_linear", 0.00085, 0.012, steps_offset=offset, set_alpha_to_one=set_alpha_to_one)
    for num_steps in (4, 10, 25):
        scheduler = pndm_scheduler(process, num_steps, skip_prk_steps=skip_prk_steps, spacing=spacing,
                                   steps_offset=offset, set_alpha_to_one=set_alpha_to_one)
        x_T = randn(40, torch.float64)
        ref = diffusers_loop(scheduler, ToyDenoiser(dtype=torch.float64), x_T, scheduler.timesteps)
        denoise = ToyDenoiser(dtype=torch.float64)
        ours = sampler(denoise, process, x_T, num_steps=num_steps, spacing=spacing, progress=False)
        assert_near(ours.sample, ref, EXACT)
        assert torch.equal(seen_timesteps(denoise), scheduler.timesteps)  # the Runge-Kutta midpoints too
        ours32 = sampler(ToyDenoiser(), process_for("scaled_linear", 0.00085, 0.012), x_T.float(), num_steps=num_steps, spacing=spacing,
                         steps_offset=offset, set_alpha_to_one=set_alpha_to_one, progress=False)
        assert_near(ours32.sample, ref, FLOAT32)


def test_plms_single_step_matches_diffusers():
    process = process_for("linear", 1e-4, 2e-2, set_alpha_to_one=False)  # PNDMScheduler's default
    scheduler = pndm_scheduler(process, 1, skip_prk_steps=True)
    x_T = randn(41, torch.float64)
    ref = diffusers_loop(scheduler, ToyDenoiser(dtype=torch.float64), x_T, scheduler.timesteps)
    assert_near(sample_plms(ToyDenoiser(dtype=torch.float64), process, x_T, num_steps=1, progress=False).sample,
                ref, EXACT)
    with pytest.raises(ValueError):
        sample_pndm(ToyDenoiser(), process, x_T, num_steps=3)


@pytest.mark.parametrize("sampler,skip_prk_steps", PSEUDO, ids=["pndm", "plms"])
@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_pndm_plms_read_each_output_as_eps(sampler, skip_prk_steps, prediction_type):
    """A v / x0 network is read as eps at its own (x, t), then combined: diffusers' eps loop on that eps.

    (diffusers' own v mode combines the raw v outputs and converts them once
    at the step's start; see test_pndm_v_per_point_is_more_accurate.)
    """
    process = process_for("scaled_linear", 0.00085, 0.012, prediction_type=prediction_type, set_alpha_to_one=False)
    net = ToyDenoiser(dtype=torch.float64)

    def as_eps(x, t, cond=None):
        return process.model_output_to_x0_eps(net(x, t), x, t)[1]

    scheduler = pndm_scheduler(process, 20, skip_prk_steps=skip_prk_steps)
    x_T = randn(42, torch.float64)
    ref = diffusers_loop(scheduler, as_eps, x_T, scheduler.timesteps)
    ours = sampler(ToyDenoiser(dtype=torch.float64), process, x_T, num_steps=20, progress=False)
    assert_near(ours.sample, ref, EXACT)


def test_pndm_v_per_point_is_more_accurate():
    """Why v is converted per point: on Gaussian data (exact ODE known) it is several times closer
    to the solution than diffusers' PNDMScheduler(prediction_type="v_prediction")."""
    process = process_for("scaled_linear", 0.00085, 0.012, prediction_type="v", set_alpha_to_one=False)
    mu, s = randn(43, torch.float64) * 0.3, 0.5
    eps_net = gaussian_data_net(process, mu, s)

    def v_net(x, t, cond=None):
        abar = process.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        eps = eps_net(x, t.double())
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    abar = process.alphas_cumprod.double()
    x_T, t0 = randn(44, torch.float64), 950
    z = (x_T - abar[t0].sqrt() * mu) / (abar[t0] * s**2 + 1 - abar[t0]).sqrt()
    exact = abar[0].sqrt() * mu + (abar[0] * s**2 + 1 - abar[0]).sqrt() * z  # the ODE at abar_0
    scheduler = pndm_scheduler(process, 20, skip_prk_steps=True, prediction="v_prediction")
    theirs = diffusers_loop(scheduler, v_net, x_T, scheduler.timesteps)
    ours = sample_plms(v_net, process, x_T, num_steps=20, progress=False).sample
    assert float((ours - exact).abs().max()) * 3 < float((theirs - exact).abs().max())


@pytest.mark.parametrize("sampler", [sample_pndm, sample_plms])
def test_pndm_plms_refuse_zero_terminal_snr_start(sampler):
    process = process_for("linear", 1e-4, 2e-2, prediction_type="v", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sampler(ToyDenoiser(), process, randn(47), num_steps=10, spacing="trailing", progress=False)
    out = sampler(ToyDenoiser(), process, randn(47), num_steps=10, spacing="leading", progress=False)
    assert torch.isfinite(out.sample).all()


@pytest.mark.parametrize("sampler", [sample_pndm, sample_plms])
def test_pndm_plms_exact_denoiser_returns_its_x0(sampler):
    """With eps consistent with one x0 every transfer is exact (DDIM keeps eps constant)."""
    process = process_for("scaled_linear", 0.00085, 0.012)
    x0 = randn(45, torch.float64).clamp(-1, 1)
    out = sampler(exact_x0_denoiser(process, x0), process, randn(46, torch.float64), num_steps=10,
                  set_alpha_to_one=True, progress=False)
    torch.testing.assert_close(out.sample, x0, atol=1e-5, rtol=0)  # the float32 abar buffers, as DDIM


# ---------------------------------------------------------------- shared behaviour
SAMPLERS = {"unipc": sample_unipc, "pndm": sample_pndm, "plms": sample_plms}
CALLS = {"unipc": lambda n: n, "pndm": lambda n: n + 9, "plms": lambda n: n + 1}  # network calls for n steps


@pytest.mark.parametrize("name", SAMPLERS)
def test_mask_inpainting_keeps_known_region(name):
    process = process_for("linear", 1e-4, 2e-2)
    x0_known = randn(50).clamp(-1, 1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    inputs, toy = [], ToyDenoiser()

    def denoise(x, t, cond=None):
        inputs.append(x)
        return toy(x, t, cond)

    x_T = randn(51)
    out = SAMPLERS[name](denoise, process, x_T, num_steps=10, known_mask=mask, x0_known=x0_known,
                         generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(out.sample[..., :4], x0_known[..., :4])
    assert not torch.allclose(out.sample[..., 4:], x0_known[..., 4:], atol=1e-2)
    # The network first sees q_sample(x0_known, t_0, first noise drawn) in the known region, x_T elsewhere.
    first_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t_0 = int(toy.calls[0][0])
    expected = process.q_sample(x0_known, torch.full((2,), t_0), first_noise)
    torch.testing.assert_close(inputs[0][..., :4], expected[..., :4])
    torch.testing.assert_close(inputs[0][..., 4:], x_T[..., 4:])
    with pytest.raises(ValueError):
        SAMPLERS[name](ToyDenoiser(), process, x_T, num_steps=10, known_mask=mask, progress=False)


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_intermediates_and_calls(name):
    process = process_for("linear", 1e-4, 2e-2)
    record, denoise = [], ToyDenoiser()
    out = SAMPLERS[name](denoise, process, randn(52), num_steps=8, progress=False, return_intermediates=True,
                         callback=lambda i, level, x, pred_x0: record.append((i, level, x, pred_x0.shape)))
    assert [r[0] for r in record] == list(range(8)) and len(out.intermediates) == 8
    assert torch.equal(out.intermediates[-1], out.sample) and torch.equal(record[-1][2], out.sample)
    assert all(r[3] == SHAPE for r in record)
    assert len(denoise.calls) == CALLS[name](8)
    if name == "unipc":  # levels are sigmas
        assert [r[1] for r in record] == make_sigmas(process.denoiser(denoise), 8, "discrete", "leading",
                                                     multistep=True)[:-1].tolist()
    else:
        assert [r[1] for r in record] == make_timesteps(1000, 8, "leading").tolist()


@pytest.mark.parametrize("name", SAMPLERS)
def test_seeded_generator(name):
    """Deterministic samplers: the generator only draws the inpainting noise."""
    process = process_for("linear", 1e-4, 2e-2)
    x_T, x0_known = randn(53), randn(54)
    mask = torch.zeros(1, 3, 8, 8)
    mask[:, 0] = 1.0  # channel 0 known: the toy network mixes channels, not pixels

    def run(seed, masked=True):
        kwargs = {"known_mask": mask, "x0_known": x0_known} if masked else {}
        return SAMPLERS[name](ToyDenoiser(), process, x_T, num_steps=6, generator=torch.Generator().manual_seed(seed),
                              progress=False, **kwargs).sample

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
    assert torch.equal(run(3, masked=False), run(4, masked=False))


@pytest.mark.parametrize("name", SAMPLERS)
def test_clip_denoised_bounds_pred_x0(name):
    process = process_for("linear", 1e-4, 2e-2)
    seen = []
    SAMPLERS[name](lambda x, t, cond=None: 10 * ToyDenoiser()(x, t), process, randn(55), num_steps=5,
                   clip_denoised=True, progress=False, callback=lambda i, level, x, pred_x0: seen.append(pred_x0))
    if name == "unipc":  # the x0 the solver uses is clamped
        assert max(float(p.abs().max()) for p in seen) <= 1.0
    else:  # each eps is re-derived from a clamped x0; the multistep eps combines several of them
        assert len(seen) == 5

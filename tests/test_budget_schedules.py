"""Schedules that follow the run's budget, the EMA warm-up, the command's time budget, the machine line,
and the per-step loss options (min-SNR-gamma weighting, log-normal timesteps)."""

import math
import time
from types import SimpleNamespace

import pytest
import torch

from diffusionforge.budget import FINISH_MARGIN_S, fit_time_limit, format_duration, parse_duration
from diffusionforge.config import load_config
from diffusionforge.config.schema import OptimConfig
from diffusionforge.errors import ConfigError
from diffusionforge.machine import Machine, choose_precision, machine_line
from diffusionforge.optim import (budget_lr_factor, ema_decay_at, ema_initial_share, ema_multi_avg_fn,
                                  lr_scheduler, trainer_progress)
from diffusionforge.processes.gaussian import GaussianDiffusion, GaussianDiffusionConfig
from diffusionforge.processes.loss_weighting import lognormal_timesteps, min_snr_weight, snr


# ------------------------------------------------------------------ budget-clock learning rate
def test_budget_schedule_warms_up_and_decays_on_the_budget_fraction():
    cfg = OptimConfig(schedule="budget", warmup_fraction=0.1, lr_decay="cosine", min_lr_ratio=0.2)
    p = {"now": 0.0}
    factor = budget_lr_factor(cfg, lambda: p["now"])

    def at(fraction):
        p["now"] = fraction
        return factor(12345)  # LambdaLR's step count is ignored: only the fraction matters

    assert at(0.0) == 0.0 and at(0.05) == pytest.approx(0.5) and at(0.1) == pytest.approx(1.0)
    assert at(0.55) == pytest.approx(0.6)  # halfway through the decay: (1 + min) / 2
    assert at(1.0) == pytest.approx(0.2) and at(1.7) == pytest.approx(0.2)  # clamped to the end
    values = [at(f / 100) for f in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_same_fraction_same_rate_on_a_slow_and_a_fast_machine():
    """Two machines at the same share of their budget get the same learning rate, whatever their step."""
    cfg = OptimConfig(schedule="budget", warmup_fraction=0.05, lr_decay="cosine")
    slow = budget_lr_factor(cfg, lambda: 0.3)
    fast = budget_lr_factor(cfg, lambda: 0.3)
    assert slow(120) == fast(900)


def fake_trainer(step, max_steps, elapsed, duration):
    from lightning.pytorch.callbacks import Timer

    timer = Timer(duration=None)
    timer.time_elapsed = lambda stage="train": elapsed
    timer.time_remaining = lambda stage="train": None if duration is None else duration - elapsed
    return SimpleNamespace(global_step=step, max_steps=max_steps, callbacks=[timer])


@pytest.mark.parametrize("step, max_steps, elapsed, duration, expected", [
    (10, 100, 30.0, 60.0, 0.5),     # time binds first
    (80, 100, 30.0, 60.0, 0.8),     # steps bind first
    (10, 100, 30.0, None, 0.1),     # no time limit: steps
    (10, -1, 90.0, 60.0, 1.0),      # past the budget: clamped
])
def test_progress_is_whichever_bound_ends_the_run_first(step, max_steps, elapsed, duration, expected):
    progress = trainer_progress(fake_trainer(step, max_steps, elapsed, duration))
    assert progress() == pytest.approx(expected)


def test_budget_scheduler_reads_progress_and_steps_scheduler_is_unchanged():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    now = {"p": 0.5}
    cfg = OptimConfig(schedule="budget", warmup_fraction=0.0, lr_decay="cosine")
    sched = lr_scheduler(opt, cfg, total_steps=-1, progress=lambda: now["p"])
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="progress"):
        lr_scheduler(opt, cfg, total_steps=10)
    steps = lr_scheduler(torch.optim.SGD([param], lr=1.0), OptimConfig(warmup_steps=4), total_steps=10)
    assert steps.get_last_lr() == [0.25]


def test_budget_schedule_needs_a_time_limit():
    with pytest.raises(ConfigError, match="optim.schedule=budget"):
        load_config("tiny", ["optim.schedule=budget"])
    assert load_config("tiny", ["optim.schedule=budget", "trainer.time_budget=00:00:05:00"])


# ------------------------------------------------------------------------------------- EMA
def test_ema_warmup_follows_the_inverse_power_form():
    cfg = OptimConfig(ema_decay=0.999, ema_power=0.75, ema_inv_gamma=1.0)
    for k in (1, 10, 100, 1000):
        assert ema_decay_at(cfg, k) == pytest.approx(1 - (1 + k) ** -0.75)
    assert ema_decay_at(cfg, 10**7) == 0.999  # capped by ema_decay
    assert ema_decay_at(OptimConfig(ema_decay=0.99), 5) == 0.99  # ema_power=0: constant
    # a warmed-up EMA of a short run has forgotten its random start; a constant one has not
    assert ema_initial_share(cfg, 300) < 1e-4
    assert ema_initial_share(OptimConfig(ema_decay=0.995), 300) == pytest.approx(0.995**300)


def test_ema_update_lerps_by_the_decay_of_each_update():
    cfg = OptimConfig(ema_decay=0.999, ema_power=2 / 3)
    update = ema_multi_avg_fn(cfg)
    ema, cur = [torch.zeros(3)], [torch.ones(3)]
    expected = 0.0
    for k in range(1, 6):
        update(ema, cur, torch.tensor(k))
        d = ema_decay_at(cfg, k)
        expected = d * expected + (1 - d) * 1.0
        assert torch.allclose(ema[0], torch.full((3,), expected), rtol=1e-6)


def test_averaged_model_uses_the_warmup():
    from torch.optim.swa_utils import AveragedModel

    net = torch.nn.Linear(2, 2)
    cfg = OptimConfig(ema_decay=0.9999, ema_power=1.0, ema_inv_gamma=1.0)
    ema = AveragedModel(net, multi_avg_fn=ema_multi_avg_fn(cfg), use_buffers=True)
    ema.update_parameters(net)  # first update copies
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update_parameters(net)  # k = 1: decay 1 - 1/2 = 0.5
    assert torch.allclose(ema.module.weight, net.weight - 0.5)


# ----------------------------------------------------------------------- command's budget
def test_duration_round_trip_and_errors():
    assert parse_duration("00:00:09:30", "k") == 570
    assert parse_duration("1:02:03:04", "k") == 93784
    assert format_duration(570.9) == "00:00:09:30"
    with pytest.raises(ConfigError, match="trainer.time_budget: expected DD:HH:MM:SS"):
        parse_duration("9 minutes", "trainer.time_budget")


def test_fit_gets_the_budget_minus_startup_grid_and_margin():
    model = SimpleNamespace(estimate_grid_seconds=lambda: 40.0)
    started = time.monotonic() - 20.0
    limit, split = fit_time_limit("00:00:09:00", None, model, started)
    fit = parse_duration(limit, "x")
    assert 540 - 20 - 40 - FINISH_MARGIN_S - 2 <= fit <= 540 - 20 - 40 - FINISH_MARGIN_S
    assert split["final_grid_estimate_s"] == 40.0 and split["time_budget_s"] == 540
    limit, _ = fit_time_limit("00:00:09:00", "00:00:01:00", model, started)  # max_time still binds
    assert limit == "00:00:01:00"
    assert fit_time_limit(None, "00:00:01:00", model, started) == ("00:00:01:00", {})
    no_estimate = SimpleNamespace()  # reserves a share of the budget instead
    fit2 = parse_duration(fit_time_limit("00:00:10:00", None, no_estimate, time.monotonic())[0], "x")
    assert fit2 == pytest.approx(600 * 0.9 - FINISH_MARGIN_S, abs=2)
    with pytest.raises(ConfigError, match="leaves no time to train"):
        fit_time_limit("00:00:00:30", None, model, started)


# --------------------------------------------------------------------------- machine line
def test_machine_line_and_precision_choice():
    laptop = Machine(device="cpu", cpu="AMD EPYC 7B13", threads=2, isa="AVX2", native_bf16=False)
    server = Machine(device="cpu", cpu="AMD EPYC 9B14", threads=2, isa="AVX512", native_bf16=True)
    assert choose_precision("auto", laptop)[0] == "32-true"
    assert choose_precision("auto", server)[0] == "bf16-mixed"
    assert choose_precision("16-mixed", laptop) == ("16-mixed", "as configured")
    line = machine_line(laptop, *choose_precision("auto", laptop), "00:00:09:00")
    assert "\n" not in line
    for part in ("AMD EPYC 7B13", "2 threads", "AVX2", "no native bf16", "32-true", "00:00:09:00"):
        assert part in line


def test_train_prints_the_machine_line_and_records_it(tiny_run):
    import json

    summary = json.loads((tiny_run / "train_summary.json").read_text())
    assert summary["machine"]["threads"] >= 1 and summary["machine"]["cpu"]
    assert summary["precision"] in ("32-true", "bf16-mixed") and summary["steps_per_s"] > 0


# ------------------------------------------------------------- min-SNR and log-normal t
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_min_snr_weight_makes_every_target_the_clamped_x0_loss(prediction_type):
    """w_t * ||pred - target||^2 == min(SNR_t, gamma) * ||x0_hat - x0||^2 for every prediction type.

    The targets and the x0 reconstructions are written out here in float64 from abar alone
    (Ho Eq. 4, Salimans & Ho's v), independently of the process's tables.
    """
    abar_table = GaussianDiffusion(GaussianDiffusionConfig(beta_schedule="cosine")).alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 50, 300, 600, 900, 999])
    x0, eps, out = (torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    a = abar_table[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target, x0_hat = {
        "eps": (eps, (x_t - (1 - a).sqrt() * out) / a.sqrt()),
        "x0": (x0, out),
        "v": (a.sqrt() * eps - (1 - a).sqrt() * x0, a.sqrt() * x_t - (1 - a).sqrt() * out),
    }[prediction_type]
    mse_pred = ((out - target) ** 2).flatten(1).mean(1)
    mse_x0 = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    s = snr(abar_table, t)
    weighted = min_snr_weight(s, 5.0, prediction_type) * mse_pred
    torch.testing.assert_close(weighted, s.clamp(max=5.0) * mse_x0, rtol=1e-9, atol=0)


def test_min_snr_weight_is_finite_at_zero_snr_and_off_by_default():
    w = min_snr_weight(torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64), 5.0, "eps")
    assert torch.equal(w, torch.tensor([1.0, 1.0, 0.05], dtype=torch.float64))
    process = GaussianDiffusion(GaussianDiffusionConfig())
    assert torch.equal(process.loss_weights(torch.tensor([1, 2])), torch.ones(2))


def test_lognormal_timesteps_follow_edm_sigma_distribution():
    process = GaussianDiffusion(GaussianDiffusionConfig(beta_schedule="cosine", timestep_sampling="lognormal"))
    t = process.sample_timesteps(20000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    abar = process.alphas_cumprod.double()[t]
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    assert float(log_sigma.median()) == pytest.approx(-1.2, abs=0.05)
    inside = log_sigma[(log_sigma > -3.5) & (log_sigma < 1.0)]  # where the cosine grid is fine
    assert float(inside.std()) == pytest.approx(1.2, rel=0.15)
    # nearest step in log sigma
    one = lognormal_timesteps(process.alphas_cumprod, 1, mean=0.0, std=1e-9)
    table = 0.5 * torch.log((1 - process.alphas_cumprod.double()) / process.alphas_cumprod.double())
    assert int(one) == int(table.abs().argmin())


def test_training_loss_applies_the_weights_to_l_simple():
    config = GaussianDiffusionConfig(beta_schedule="cosine", prediction_type="v", snr_gamma=5.0)
    process = GaussianDiffusion(config)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([3, 400, 990])
    x0, eps, out = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    losses = process.training_loss(out, x0, process.q_sample(x0, t, eps), t, eps)
    weights = min_snr_weight(snr(process.alphas_cumprod, t), 5.0, "v").float()
    torch.testing.assert_close(losses.loss, (weights * losses.loss_simple).mean())
    assert not torch.allclose(losses.loss, losses.loss_simple.mean())  # the weights do something here

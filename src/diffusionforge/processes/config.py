"""Process settings, torch-free: ``GaussianDiffusionConfig``, ``EDMConfig``,
``RectifiedFlowConfig`` and ``BridgeMatchingConfig``.

``config/schema.py`` composes them without importing torch; ``gaussian.py``,
``edm.py``, ``flow.py`` and ``bridge.py`` build the processes from them and
re-export them. The
``Literal`` aliases are the accepted values; ``__post_init__`` checks every
field and raises a one-line ``ConfigError`` naming it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

from diffusionforge.errors import ConfigError
from diffusionforge.utils.checks import is_int, is_number

__all__ = ["BetaScheduleName", "BridgeMatchingConfig", "EDMConfig", "FlowTimeSampling", "GaussianDiffusionConfig",
           "Objective", "RectifiedFlowConfig"]

Objective = Literal["ddpm", "edm", "flow"]  # model.objective: which process config (process | edm | flow) trains the run

BetaScheduleName = Literal["linear", "scaled_linear", "cosine"]  # the keys of schedules.BETA_SCHEDULES
PredictionType = Literal["eps", "x0", "v"]
VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["l2", "l1"]
TimestepSampling = Literal["uniform", "lognormal"]


@dataclass
class GaussianDiffusionConfig:
    """Schedule, parametrisation and loss of a discrete Gaussian diffusion."""

    num_timesteps: int = 1000  # T, number of diffusion steps
    beta_schedule: BetaScheduleName = "linear"  # linear | scaled_linear | cosine (schedules.BETA_SCHEDULES)
    linear_start: float = 1e-4  # first beta of the (scaled_)linear schedules
    linear_end: float = 2e-2  # last beta of the (scaled_)linear schedules
    cosine_s: float = 8e-3  # offset s of the cosine schedule (N&D Eq. 17)
    prediction_type: PredictionType = "eps"  # what the backbone predicts: eps, x0 or v
    variance_type: VarianceType = "fixed_small"  # sigma_t^2: beta_tilde, beta, or learned (N&D Eq. 15)
    loss_type: LossType = "l2"  # distance of the simple loss
    v_posterior: float = 0.0  # LDM: sigma^2 = (1-v) * beta_tilde + v * beta
    l_simple_weight: float = 1.0  # weight of mean L_simple
    original_elbo_weight: float = 0.0  # weight of L_vlb = lvlb_weights[t] * L_simple (LDM)
    timestep_sampling: TimestepSampling = "uniform"  # how training draws t: uniform, or EDM's log-normal sigma mapped to the nearest step
    lognormal_mean: float = -1.2  # timestep_sampling=lognormal: P_mean of ln(sigma) (Karras et al. 2022)
    lognormal_std: float = 1.2  # timestep_sampling=lognormal: P_std of ln(sigma)
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023), in its form for the prediction type; 0 = off
    offset_noise: float = 0.0  # training noise eps + s * N(0, 1) per (B, C, 1, 1) (Guttenberg 2023); 0 = off
    rescale_betas_zero_snr: bool = False  # rescale the betas to zero terminal SNR (Lin et al. 2024, Alg. 1); needs v, sample with spacing=trailing
    steps_offset: int = 0  # DDIM, PNDM/PLMS and the sigma samplers (not DDPM): added to the timesteps of spacing=leading (diffusers' steps_offset; Stable Diffusion: 1)
    set_alpha_to_one: bool = True  # DDIM, PNDM/PLMS: the last step lands on abar = 1 (True), or on abar_0 (diffusers' set_alpha_to_one=False, Stable Diffusion)

    def __post_init__(self) -> None:
        _validate_config(self)


def _check_choice(name: str, value: object, alias: object) -> None:
    choices = get_args(alias)
    if value not in choices:
        raise ConfigError(f"GaussianDiffusionConfig.{name}: expected one of {list(choices)}, got {value!r}")


def _check(ok: bool, name: str, requirement: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"GaussianDiffusionConfig.{name}: must be {requirement}, got {value!r}")


def _validate_config(c: GaussianDiffusionConfig) -> None:
    _check(is_int(c.num_timesteps) and c.num_timesteps >= 1, "num_timesteps", "an int >= 1", c.num_timesteps)
    for field in dataclasses.fields(c):
        value = getattr(c, field.name)
        if field.type == "float":
            _check(is_number(value), field.name, "a number", value)
    _check_choice("beta_schedule", c.beta_schedule, BetaScheduleName)
    _check(0.0 < c.linear_start < 1.0, "linear_start", "in (0, 1)", c.linear_start)
    _check(c.linear_start < c.linear_end < 1.0, "linear_end", "in (linear_start, 1)", c.linear_end)
    _check(c.cosine_s > 0.0, "cosine_s", "> 0", c.cosine_s)
    _check_choice("prediction_type", c.prediction_type, PredictionType)
    _check_choice("variance_type", c.variance_type, VarianceType)
    _check_choice("loss_type", c.loss_type, LossType)
    _check_choice("timestep_sampling", c.timestep_sampling, TimestepSampling)
    _check(0.0 <= c.v_posterior <= 1.0, "v_posterior", "in [0, 1]", c.v_posterior)
    _check(c.snr_gamma >= 0.0, "snr_gamma", ">= 0 (0 = off)", c.snr_gamma)
    _check(c.lognormal_std > 0.0, "lognormal_std", "> 0", c.lognormal_std)
    _check(c.l_simple_weight >= 0.0, "l_simple_weight", ">= 0", c.l_simple_weight)
    _check(c.original_elbo_weight >= 0.0, "original_elbo_weight", ">= 0", c.original_elbo_weight)
    _check(c.offset_noise >= 0.0, "offset_noise", ">= 0 (0 = off)", c.offset_noise)
    _check(isinstance(c.rescale_betas_zero_snr, bool), "rescale_betas_zero_snr", "true or false",
           c.rescale_betas_zero_snr)
    _check(is_int(c.steps_offset) and 0 <= c.steps_offset < c.num_timesteps, "steps_offset",
           "an int in 0..num_timesteps-1", c.steps_offset)
    _check(isinstance(c.set_alpha_to_one, bool), "set_alpha_to_one", "true or false", c.set_alpha_to_one)
    if c.rescale_betas_zero_snr:  # at abar_{T-1} = 0 only v determines x0 (Lin et al. 2024, Sec. 3.2)
        _check(c.prediction_type == "v", "prediction_type", "v with rescale_betas_zero_snr", c.prediction_type)
        _check(c.num_timesteps >= 2, "num_timesteps", ">= 2 with rescale_betas_zero_snr", c.num_timesteps)
        _check(c.variance_type != "learned_range", "variance_type", "fixed with rescale_betas_zero_snr",
               c.variance_type)
    if c.variance_type == "learned_range":
        requirement = "0 with learned_range (its hybrid loss has its own VLB term)"
        _check(c.original_elbo_weight == 0.0, "original_elbo_weight", requirement, c.original_elbo_weight)


# --- EDM (Karras et al. 2022) ----------------------------------------------


@dataclass
class EDMConfig:
    """EDM preconditioning, training noise levels and loss weight (YAML ``model.edm``, ``objective: edm``)."""

    sigma_data: float = 0.5  # sigma_data: expected std of the training data (Table 1)
    p_mean: float = -1.2  # P_mean: mean of ln(sigma) at training (Table 1)
    p_std: float = 1.2  # P_std: std of ln(sigma) at training (Table 1)
    sigma_min: float = 0.002  # smallest noise level a sampler visits (Table 1)
    sigma_max: float = 80.0  # largest noise level, where sampling starts (Table 1)

    def __post_init__(self) -> None:
        for name in ("sigma_data", "p_mean", "p_std", "sigma_min", "sigma_max"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                raise ConfigError(f"model.edm.{name}: must be a finite number, got {value!r}")
        for name in ("sigma_data", "p_std", "sigma_min"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.edm.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.sigma_max <= self.sigma_min:
            raise ConfigError(f"model.edm.sigma_max: must be > sigma_min ({self.sigma_min}), got {self.sigma_max!r}")


# --- rectified flow / flow matching (Liu et al. 2023; Esser et al. 2024) ----

FlowTimeSampling = Literal["uniform", "logit_normal", "mode"]


@dataclass
class RectifiedFlowConfig:
    """Time distribution, shift and time scale of rectified flow (YAML ``model.flow``, ``objective: flow``)."""

    num_train_timesteps: int = 1000  # T: the training time grid k / T and the backbone's time scale (it sees t * T)
    time_sampling: FlowTimeSampling = "logit_normal"  # uniform | logit_normal | mode (Esser et al. 2024, Sec. 3.1)
    logit_mean: float = 0.0  # logit_normal: mean m of the normal (> 0 favours low noise: the draw indexes a descending grid)
    logit_std: float = 1.0  # logit_normal: its std s
    mode_scale: float = 1.29  # mode: the scale s of f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u), in [-1, 2/(pi-2)]
    shift: float = 1.0  # SD3 shift s: t' = s t / (1 + (s - 1) t), at training and sampling (1 = none)

    def __post_init__(self) -> None:
        if self.time_sampling not in get_args(FlowTimeSampling):
            raise ConfigError(f"model.flow.time_sampling: must be one of {list(get_args(FlowTimeSampling))}, "
                              f"got {self.time_sampling!r}")
        if not is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise ConfigError(f"model.flow.num_train_timesteps: must be an integer >= 1, "
                              f"got {self.num_train_timesteps!r}")
        for name in ("logit_mean", "logit_std", "mode_scale", "shift"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                raise ConfigError(f"model.flow.{name}: must be a finite number, got {value!r}")
        if self.logit_std <= 0:
            raise ConfigError(f"model.flow.logit_std: must be > 0, got {self.logit_std!r}")
        if self.shift <= 0:
            raise ConfigError(f"model.flow.shift: must be > 0, got {self.shift!r}")
        if not -1.0 <= self.mode_scale <= MODE_SCALE_MAX:  # f_mode stays monotone (Esser et al. 2024, Eq. 20)
            raise ConfigError(f"model.flow.mode_scale: must be in [-1, {MODE_SCALE_MAX:.4f}], got {self.mode_scale!r}")


MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)  # the largest s for which f_mode(u; s) is monotone


# --- bridge matching (Chadebec et al. 2025) ----------------------------------

BridgeTimestepSampling = Literal["uniform", "log_normal", "custom_timesteps"]
LatentLossType = Literal["l2", "l1"]
PixelLossType = Literal["l2", "l1", "lpips"]
PixelLossWindow = Literal["crop", "resize"]
PROB_TOLERANCE = 1e-6


@dataclass
class BridgeMatchingConfig:
    """The bridge, its training-time distribution and its losses (YAML ``bridge.process``)."""

    bridge_noise_sigma: float = 0.005  # sigma_b: std of the bridge noise at t = 1/2 is sigma_b / 2
    num_train_timesteps: int = 1000  # T: the time grid of training and the backbone's time scale
    timestep_sampling: BridgeTimestepSampling = "uniform"  # uniform | log_normal | custom_timesteps
    logit_mean: float = 0.0  # log_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # log_normal: its std
    selected_timesteps: Optional[list[float]] = None  # custom_timesteps: times in (0, T], e.g. [250, 500, 750, 1000]
    prob: Optional[list[float]] = None  # custom_timesteps: their probabilities (sum 1); None = equal
    latent_loss_type: LatentLossType = "l2"  # distance between predicted and true velocity
    latent_loss_weight: float = 1.0  # weight of the latent loss
    pixel_loss_type: PixelLossType = "l2"  # distance of the decoded prediction to the target image
    pixel_loss_weight: float = 0.0  # weight of the pixel loss (0 = off: no decoder in the training step)
    pixel_loss_max_size: int = 512  # the pixel loss sees at most this many pixels per side ...
    pixel_loss_window: PixelLossWindow = "crop"  # ... of a random crop, or of the image resized to it

    def __post_init__(self) -> None:
        _validate(self)


def _fail(name: str, requirement: str, value: object) -> None:
    raise ConfigError(f"bridge.process.{name}: must be {requirement}, got {value!r}")


def _validate(c: BridgeMatchingConfig) -> None:
    for name, alias in (("timestep_sampling", BridgeTimestepSampling), ("latent_loss_type", LatentLossType),
                        ("pixel_loss_type", PixelLossType), ("pixel_loss_window", PixelLossWindow)):
        if getattr(c, name) not in get_args(alias):
            _fail(name, f"one of {list(get_args(alias))}", getattr(c, name))
    for name in ("bridge_noise_sigma", "logit_mean", "logit_std", "latent_loss_weight", "pixel_loss_weight"):
        if not is_number(getattr(c, name)) or not math.isfinite(getattr(c, name)):
            _fail(name, "a finite number", getattr(c, name))
    for name in ("bridge_noise_sigma", "latent_loss_weight", "pixel_loss_weight"):
        if getattr(c, name) < 0:
            _fail(name, ">= 0", getattr(c, name))
    if c.logit_std <= 0:
        _fail("logit_std", "> 0", c.logit_std)
    if not is_int(c.num_train_timesteps) or c.num_train_timesteps < 1:
        _fail("num_train_timesteps", "an integer >= 1", c.num_train_timesteps)
    if not isinstance(c.pixel_loss_max_size, int) or c.pixel_loss_max_size < 1:
        _fail("pixel_loss_max_size", "an integer >= 1", c.pixel_loss_max_size)
    if c.latent_loss_weight == 0 and c.pixel_loss_weight == 0:
        _fail("latent_loss_weight", "> 0 when pixel_loss_weight is 0 (nothing to train)", c.latent_loss_weight)
    if c.timestep_sampling == "custom_timesteps":
        _validate_custom(c)
    elif c.selected_timesteps is not None or c.prob is not None:
        name = "selected_timesteps" if c.selected_timesteps is not None else "prob"
        _fail(name, "unset unless timestep_sampling=custom_timesteps", getattr(c, name))


def _validate_custom(c: BridgeMatchingConfig) -> None:
    steps, prob = c.selected_timesteps, c.prob
    if not steps:
        _fail("selected_timesteps", "a non-empty list with timestep_sampling=custom_timesteps", steps)
    steps = list(steps)
    if not all(is_number(s) and 0 < s <= c.num_train_timesteps for s in steps):
        _fail("selected_timesteps", f"numbers in (0, {c.num_train_timesteps}] (num_train_timesteps)", steps)
    if prob is None:
        return
    prob = list(prob)
    if len(prob) != len(steps):
        raise ConfigError(f"bridge.process.prob: has {len(prob)} entries but selected_timesteps has "
                          f"{len(steps)}; they must have the same length")
    if not all(is_number(p) and p >= 0 for p in prob):
        _fail("prob", "non-negative numbers", prob)
    if abs(sum(prob) - 1.0) > PROB_TOLERANCE:
        raise ConfigError(f"bridge.process.prob: must sum to 1, sums to {sum(prob):.6g} ({prob})")

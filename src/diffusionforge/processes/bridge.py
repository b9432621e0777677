"""Latent Bridge Matching: a stochastic bridge from a source latent to a target latent.

Chadebec et al. 2025, "LBM: Latent Bridge Matching for Fast Image-to-Image
Translation" (Eq. 4-7; gojasper/LBM ``LBMModel``). Time ``t`` is a float in
[0, 1]: ``t = 0`` is the target (the clean image's latent), ``t = 1`` the
source (the degraded image's latent). Unlike Gaussian diffusion there is no
noise at either end: sampling starts from the source itself.

    ==============  ===========================================================
    z0, z1          target and source latents, (B, C, H, W)
    sigma_b         ``bridge_noise_sigma``, the Brownian bridge's noise scale
    x_t             (1 - t) z0 + t z1 + sigma_b sqrt(t (1 - t)) eps     (Eq. 4)
                    mean (1 - t) z0 + t z1, variance sigma_b^2 t (1 - t)
    v               z1 - z0, the velocity the backbone regresses          (Eq. 6)
    z0_hat          x_t - t v_hat, the target the prediction implies
    T               ``num_train_timesteps``: the backbone sees ``t * T``, and
                    training draws t on the grid {1/T, ..., 1} as LBM's
                    FlowMatchEulerDiscreteScheduler does (sigma = t, shift 1)
    ==============  ===========================================================

Timestep sampling (``timestep_sampling``), as LBM ``_timestep_sampling``:

- ``uniform``: ``t = k / T`` with ``k`` uniform in ``1..T``;
- ``log_normal``: ``u = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)``; LBM
  takes the descending schedule's entry at index ``floor(u T)``, so
  ``t = 1 - floor(u T) / T``;
- ``custom_timesteps``: ``t = s / T`` with ``s`` drawn from
  ``selected_timesteps`` with probabilities ``prob`` (LBM's
  ``[250, 500, 750, 1000]`` trains exactly the times the 1/2/4-step samplers
  visit).

The latent loss is the per-sample mean of ``|v_hat - v|^p`` (``l2``: p = 2,
``l1``: p = 1) times ``latent_loss_weight``; the optional pixel loss on the
decoded ``z0_hat`` is ``losses.pixel.PixelLoss`` (it needs the decoder, which
a process never imports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch
from torch import Tensor, nn

from diffusionforge.errors import ConfigError

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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate(c: BridgeMatchingConfig) -> None:
    for name, alias in (("timestep_sampling", BridgeTimestepSampling), ("latent_loss_type", LatentLossType),
                        ("pixel_loss_type", PixelLossType), ("pixel_loss_window", PixelLossWindow)):
        if getattr(c, name) not in get_args(alias):
            _fail(name, f"one of {list(get_args(alias))}", getattr(c, name))
    for name in ("bridge_noise_sigma", "logit_mean", "logit_std", "latent_loss_weight", "pixel_loss_weight"):
        if not _is_number(getattr(c, name)) or not math.isfinite(getattr(c, name)):
            _fail(name, "a finite number", getattr(c, name))
    for name in ("bridge_noise_sigma", "latent_loss_weight", "pixel_loss_weight"):
        if getattr(c, name) < 0:
            _fail(name, ">= 0", getattr(c, name))
    if c.logit_std <= 0:
        _fail("logit_std", "> 0", c.logit_std)
    if not isinstance(c.num_train_timesteps, int) or isinstance(c.num_train_timesteps, bool) \
            or c.num_train_timesteps < 1:
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
    if not all(_is_number(s) and 0 < s <= c.num_train_timesteps for s in steps):
        _fail("selected_timesteps", f"numbers in (0, {c.num_train_timesteps}] (num_train_timesteps)", steps)
    if prob is None:
        return
    prob = list(prob)
    if len(prob) != len(steps):
        raise ConfigError(f"bridge.process.prob: has {len(prob)} entries but selected_timesteps has "
                          f"{len(steps)}; they must have the same length")
    if not all(_is_number(p) and p >= 0 for p in prob):
        _fail("prob", "non-negative numbers", prob)
    if abs(sum(prob) - 1.0) > PROB_TOLERANCE:
        raise ConfigError(f"bridge.process.prob: must sum to 1, sums to {sum(prob):.6g} ({prob})")


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) in like's dtype."""
    return t.to(like.dtype).reshape(t.shape[0], *([1] * (like.ndim - 1)))


class BridgeMatching(nn.Module):
    """The bridge's algebra; holds no parameters (an ``nn.Module`` only to move with the model)."""

    def __init__(self, config: BridgeMatchingConfig):
        super().__init__()
        self.config = config
        self.num_train_timesteps = config.num_train_timesteps
        self.sigma = float(config.bridge_noise_sigma)

    # ---------------------------------------------------------------- time
    def sample_t(self, batch: int, device: torch.device | str = "cpu",
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """(batch,) float32 training times in (0, 1] drawn as ``timestep_sampling`` says."""
        c, T = self.config, self.num_train_timesteps
        if c.timestep_sampling == "uniform":
            k = torch.randint(1, T + 1, (batch,), generator=generator)
            t = k.float() / T
        elif c.timestep_sampling == "log_normal":
            n = torch.randn(batch, generator=generator) * c.logit_std + c.logit_mean
            index = (torch.sigmoid(n) * T).long().clamp_(max=T - 1)  # sigmoid(n) < 1; guards float rounding
            t = 1.0 - index.float() / T
        else:
            steps = torch.tensor(c.selected_timesteps, dtype=torch.float64)
            prob = torch.tensor(c.prob if c.prob is not None else [1.0] * len(steps), dtype=torch.float64)
            index = torch.multinomial(prob, batch, replacement=True, generator=generator)
            t = (steps[index] / T).float()
        return t.to(device)

    def model_time(self, t: Tensor) -> Tensor:
        """The time the backbone sees: ``t * T`` (LBM passes the scheduler's timestep sigma * 1000)."""
        return t * self.num_train_timesteps

    def noise_std(self, t: Tensor | float) -> Tensor | float:
        """sigma_b sqrt(t (1 - t)): the bridge noise at time t."""
        if torch.is_tensor(t):
            return self.sigma * (t * (1 - t)).clamp(min=0).sqrt()
        return self.sigma * math.sqrt(max(t * (1 - t), 0.0))

    # ---------------------------------------------------------------- the bridge
    def interpolate(self, z_target: Tensor, z_source: Tensor, t: Tensor,
                    noise: Optional[Tensor] = None) -> Tensor:
        """x_t = (1 - t) z0 + t z1 + sigma_b sqrt(t (1 - t)) eps (Eq. 4); t: (B,)."""
        if z_target.shape != z_source.shape:
            raise ValueError(f"source latents {tuple(z_source.shape)} and target latents "
                             f"{tuple(z_target.shape)} must have the same shape")
        tt = _per_sample(t, z_target)
        noise = torch.randn_like(z_target) if noise is None else noise
        return (1 - tt) * z_target + tt * z_source + self.noise_std(tt) * noise

    @staticmethod
    def velocity(z_target: Tensor, z_source: Tensor) -> Tensor:
        """The regression target v = z1 - z0 (Eq. 6)."""
        return z_source - z_target

    @staticmethod
    def predict_target(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """z0_hat = x_t - t v: where an Euler step from t straight to 0 lands."""
        return x_t - _per_sample(t, x_t) * v

    def latent_loss(self, v_pred: Tensor, v_target: Tensor) -> Tensor:
        """(B,) per-sample mean distance of the velocities, times ``latent_loss_weight``."""
        diff = (v_pred.float() - v_target.float()).flatten(1)
        per_sample = diff.pow(2).mean(1) if self.config.latent_loss_type == "l2" else diff.abs().mean(1)
        return self.config.latent_loss_weight * per_sample

    def sampling_times(self, num_steps: int) -> list[float]:
        """The K+1 times an Euler sampler of K steps visits: linspace(1, 1/K, K), then 0 (LBM ``sample``)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {num_steps!r}")
        return [1.0 - i / num_steps for i in range(num_steps)] + [0.0]

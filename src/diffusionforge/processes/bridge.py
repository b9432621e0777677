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

The straight path, its velocity and the time grid are ``flow.py``'s (a bridge
from noise with ``sigma_b = 0`` is rectified flow); ``uniform`` and
``log_normal`` are its ``uniform`` and ``logit_normal`` draws.

The latent loss is the per-sample mean of ``|v_hat - v|^p`` (``l2``: p = 2,
``l1``: p = 1) times ``latent_loss_weight``; the optional pixel loss on the
decoded ``z0_hat`` is ``losses.pixel.PixelLoss`` (it needs the decoder, which
a process never imports).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from diffusionforge.processes.config import BridgeMatchingConfig
from diffusionforge.processes.flow import path_endpoint, path_velocity, per_sample, sample_grid_times, straight_path

# timestep_sampling -> the kind of flow.sample_grid_times (LBM calls the logit-normal draw log_normal)
GRID_SAMPLING = {"uniform": "uniform", "log_normal": "logit_normal"}


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
        if c.timestep_sampling in GRID_SAMPLING:
            t = sample_grid_times(GRID_SAMPLING[c.timestep_sampling], batch, T, logit_mean=c.logit_mean,
                                  logit_std=c.logit_std, generator=generator)
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
        tt = per_sample(t, z_target)
        noise = torch.randn_like(z_target) if noise is None else noise
        return straight_path(z_target, z_source, t) + self.noise_std(tt) * noise

    @staticmethod
    def velocity(z_target: Tensor, z_source: Tensor) -> Tensor:
        """The regression target v = z1 - z0 (Eq. 6)."""
        return path_velocity(z_target, z_source)

    @staticmethod
    def predict_target(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """z0_hat = x_t - t v: where an Euler step from t straight to 0 lands."""
        return path_endpoint(x_t, v, t)

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

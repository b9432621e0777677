"""Discrete Gaussian diffusion: forward process, posterior, eps/x0/v algebra, losses.

Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM: cosine schedule,
learned variance, hybrid loss), Salimans & Ho 2022 (v-prediction), Rombach
et al. 2022 (LDM buffers, ``v_posterior``, ``lvlb_weights``).

Notation (time is an integer ``t`` in ``0 .. T-1``, a LongTensor ``(B,)``)

    ==============  =====================================================
    x0, x_t         clean data and its noised version, (B, C, H, W)
    eps             standard normal noise, (B, C, H, W)
    beta_t          forward step variance;  alpha_t = 1 - beta_t
    abar_t          prod_{s<=t} alpha_s;  abar_{-1} = 1
    beta_tilde_t    posterior variance (1 - abar_{t-1}) / (1 - abar_t) beta_t
    sigma_t^2       sampling variance: (1 - v) beta_tilde_t + v beta_t (LDM)
    coef1, coef2    posterior mean = coef1_t x0 + coef2_t x_t  (Ho Eq. 7)
    v               Salimans & Ho velocity sqrt(abar) eps - sqrt(1-abar) x0
    ==============  =====================================================

Schedule buffers are computed in float64 and registered as float32,
non-persistent (the config determines them; checkpoints do not carry them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from diffusionforge.processes.config import GaussianDiffusionConfig
from diffusionforge.processes.schedules import (make_beta_schedule, rescale_zero_terminal_snr, schedule_tables,
                                                vlb_weights)
from diffusionforge.processes.loss_weighting import lognormal_timesteps, min_snr_weight, snr
from diffusionforge.processes.vlb import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class PMeanVariance(NamedTuple):
    """Reverse step p(x_{t-1} | x_t); every field ``(B, C, H, W)``."""

    mean: Tensor  # posterior mean at the predicted x0 (Ho Eq. 7)
    variance: Tensor  # sigma_t^2
    log_variance: Tensor  # log sigma_t^2
    pred_x0: Tensor  # predicted x0 (clipped when asked)
    pred_eps: Tensor  # eps consistent with pred_x0 and x_t


class LossOutput(NamedTuple):
    """Training loss: ``loss`` is the scalar to minimise, the others ``(B,)`` per sample."""

    loss: Tensor  # ()
    loss_simple: Tensor  # (B,) mean over C, H, W of |pred - target|^p
    loss_vlb: Tensor  # (B,) lvlb_weights[t] * L_simple, or the hybrid VLB term (bits/dim)


def _extract(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """``table[t]`` as ``(B, 1, ..., 1)`` in x's dtype, broadcastable against ``x: (B, ...)``."""
    return table[t].to(x.dtype).reshape(t.shape[0], *([1] * (x.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """A discrete Gaussian diffusion over ``T`` steps; owns the maths, no network.

    Args:
        config: schedule, parametrisation and loss.
        betas: float64 ``(T,)`` overriding the named schedule (used by ``respaced``).
        timestep_map: ``(T,)`` original timestep of each step (identity if None).
    """

    def __init__(
        self,
        config: Optional[GaussianDiffusionConfig] = None,
        *,
        betas: Optional[Tensor] = None,
        timestep_map: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        self.config = config = config or GaussianDiffusionConfig()
        if betas is None:
            betas = make_beta_schedule(
                config.beta_schedule, config.num_timesteps, config.linear_start, config.linear_end, config.cosine_s
            )
            if config.rescale_betas_zero_snr:  # Lin et al. 2024, Algorithm 1
                betas = rescale_zero_terminal_snr(betas)
        self._betas64 = betas.detach().to("cpu", torch.float64)  # exact source for respacing
        self.num_timesteps = len(self._betas64)
        tables = schedule_tables(self._betas64, config.v_posterior)
        tables["lvlb_weights"] = vlb_weights(tables, config.prediction_type)
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.register_buffer("timestep_map", timestep_map.long().clone(), persistent=False)

    def _abar_roots(self, t: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))``, each ``(B, 1, ..., 1)``."""
        return _extract(self.sqrt_alphas_cumprod, t, x), _extract(self.sqrt_one_minus_alphas_cumprod, t, x)

    def _recip_roots(self, t: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(sqrt(1 / abar_t), sqrt(1 / abar_t - 1))``, each ``(B, 1, ..., 1)``."""
        return _extract(self.sqrt_recip_alphas_cumprod, t, x), _extract(self.sqrt_recipm1_alphas_cumprod, t, x)

    # ---- forward process ------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, all ``(B, C, H, W)`` (Ho Eq. 4)."""
        sqrt_abar, sqrt_1m_abar = self._abar_roots(t, x0)
        return sqrt_abar * x0 + sqrt_1m_abar * noise

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Mean ``(B, C, H, W)``, variance and log-variance ``(B, 1, 1, 1)`` of q(x_t | x0) (Ho Eq. 4)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x0) * x0
        return mean, _extract(1.0 - self.alphas_cumprod, t, x0), _extract(self.log_one_minus_alphas_cumprod, t, x0)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Mean ``(B, C, H, W)``, variance and clipped log-variance ``(B, 1, 1, 1)`` of q(x_{t-1} | x_t, x0).

        Ho et al. 2020, Eqs. 6-7; the variance includes ``v_posterior``.
        """
        coef1, coef2 = _extract(self.posterior_mean_coef1, t, x_t), _extract(self.posterior_mean_coef2, t, x_t)
        mean = coef1 * x0 + coef2 * x_t
        var = _extract(self.posterior_variance, t, x_t)
        return mean, var, _extract(self.posterior_log_variance_clipped, t, x_t)

    # ---- eps / x0 / v algebra (all (B, C, H, W)) ----------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x0 = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)`` (Ho Eq. 15)."""
        recip, recipm1 = self._recip_roots(t, x_t)
        return recip * x_t - recipm1 * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Inverse of ``predict_x0_from_eps`` for eps; ``x_t`` itself where ``abar_t = 0`` (zero terminal SNR)."""
        recip, recipm1 = self._recip_roots(t, x_t)
        eps = (recip * x_t - x0) / recipm1
        if self.config.rescale_betas_zero_snr:  # inf / inf at abar_t = 0, where x_t = eps
            eps = torch.where(_extract(self.alphas_cumprod, t, x_t) == 0, x_t, eps)
        return eps

    def get_v(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``v = sqrt(abar_t) eps - sqrt(1-abar_t) x0`` (Salimans & Ho 2022, Sec. 4)."""
        sqrt_abar, sqrt_1m_abar = self._abar_roots(t, x0)
        return sqrt_abar * eps - sqrt_1m_abar * x0

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``x0 = sqrt(abar_t) x_t - sqrt(1-abar_t) v`` (Salimans & Ho 2022, App. D)."""
        sqrt_abar, sqrt_1m_abar = self._abar_roots(t, x_t)
        return sqrt_abar * x_t - sqrt_1m_abar * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``eps = sqrt(abar_t) v + sqrt(1-abar_t) x_t`` (Salimans & Ho 2022, App. D)."""
        sqrt_abar, sqrt_1m_abar = self._abar_roots(t, x_t)
        return sqrt_abar * v + sqrt_1m_abar * x_t

    def split_model_output(self, model_output: Tensor, x_t: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``(prediction (B, C, H, W), variance values in [-1, 1] (B, C, H, W) or None)``.

        With ``learned_range`` the backbone returns ``2C`` channels: the first
        C are the eps/x0/v prediction, the last C the interpolation ``v``.
        """
        channels = x_t.shape[1]
        if self.config.variance_type != "learned_range":
            return model_output, None
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"learned_range needs {2 * channels} output channels, got {model_output.shape[1]}")
        prediction, var_values = torch.chunk(model_output, 2, dim=1)
        return prediction, var_values

    def prediction_to_x0_eps(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """``(x0, eps)`` from a C-channel eps/x0/v ``prediction``."""
        kind = self.config.prediction_type
        if kind == "eps":
            return self.predict_x0_from_eps(x_t, t, prediction), prediction
        if kind == "x0":
            return prediction, self.predict_eps_from_x0(x_t, t, prediction)
        return self.predict_x0_from_v(x_t, t, prediction), self.predict_eps_from_v(x_t, t, prediction)

    def model_output_to_x0_eps(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False, clip_range: float = 1.0
    ) -> Tuple[Tensor, Tensor]:
        """``(x0, eps)``, each ``(B, C, H, W)``, from the raw backbone output.

        ``clip_denoised`` clamps x0 to ``[-clip_range, clip_range]`` and
        re-derives eps from the clamped x0 (improved-diffusion DDIM).
        """
        prediction, _ = self.split_model_output(model_output, x_t)
        x0, eps = self.prediction_to_x0_eps(prediction, x_t, t)
        if clip_denoised:
            x0 = x0.clamp(-clip_range, clip_range)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        return x0, eps

    # ---- reverse process ------------------------------------------------
    def model_variance(self, var_values: Optional[Tensor], x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """``(sigma_t^2, log sigma_t^2)``, each ``(B, C, H, W)``, per ``variance_type``."""
        kind = self.config.variance_type
        if kind == "learned_range":  # Eq. 15, Nichol & Dhariwal 2021
            frac = (var_values + 1.0) / 2.0
            max_log = _extract(torch.log(self.betas), t, x_t)
            log_var = frac * max_log + (1.0 - frac) * _extract(self.posterior_log_variance_clipped, t, x_t)
            return torch.exp(log_var), log_var
        if kind == "fixed_large":  # beta_t, with beta_tilde_1 at t=0 (improved-diffusion)
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]]) if self.num_timesteps > 1 else self.betas
            var, log_var = _extract(large, t, x_t), _extract(torch.log(large), t, x_t)
        else:
            var = _extract(self.posterior_variance, t, x_t)
            log_var = _extract(self.posterior_log_variance_clipped, t, x_t)
        return var.expand_as(x_t), log_var.expand_as(x_t)

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False, clip_range: float = 1.0
    ) -> PMeanVariance:
        """Reverse step p(x_{t-1} | x_t) from the raw backbone output ``(B, C or 2C, H, W)``.

        The mean is the posterior mean at the predicted x0 (Ho Eq. 7);
        ``clip_denoised`` clamps x0 to ``[-clip_range, clip_range]`` first and
        re-derives eps from the clamped x0.
        """
        _, var_values = self.split_model_output(model_output, x_t)
        pred_x0, pred_eps = self.model_output_to_x0_eps(model_output, x_t, t, clip_denoised, clip_range)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        variance, log_variance = self.model_variance(var_values, x_t, t)
        return PMeanVariance(mean, variance, log_variance, pred_x0, pred_eps)

    # ---- training -------------------------------------------------------
    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """``t: (B,)`` LongTensor in ``0 .. T-1``: uniform, or log-normal in sigma (``loss_weighting``)."""
        if self.config.timestep_sampling == "lognormal":
            return lognormal_timesteps(self.alphas_cumprod, batch_size, self.config.lognormal_mean,
                                       self.config.lognormal_std, generator).to(device)
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def sample_noise(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """eps ``(B, C, H, W)``: N(0, I), plus ``offset_noise * N(0, 1)`` per (B, C, 1, 1) (Guttenberg 2023)."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.config.offset_noise > 0:  # drawn only when on: the plain path's random numbers are unchanged
            offset = torch.randn((*x0.shape[:2], *([1] * (x0.ndim - 2))), generator=generator, device=x0.device,
                                 dtype=x0.dtype)
            noise = noise + self.config.offset_noise * offset
        return noise

    def loss(self, net_fn, x0: Tensor, cond=None, generator: Optional[torch.Generator] = None) -> LossOutput:
        """One training loss of ``net_fn(x_t, t, cond) -> output`` on ``x0: (B, C, H, W)`` (Ho Algorithm 1).

        ``t ~ sample_timesteps``, ``eps ~ sample_noise``, ``x_t = q_sample(x0, t, eps)``, then ``training_loss``.
        """
        t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = self.sample_noise(x0, generator)
        x_t = self.q_sample(x0, t, noise)
        return self.training_loss(net_fn(x_t, t, cond), x0, x_t, t, noise)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target ``(B, C, H, W)``: eps, x0 or v per ``prediction_type``."""
        kind = self.config.prediction_type
        if kind == "eps":
            return noise
        return x0 if kind == "x0" else self.get_v(x0, noise, t)

    def training_loss(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> LossOutput:
        """Loss of a backbone output ``(B, C or 2C, H, W)`` at ``x_t = q_sample(x0, t, noise)``.

        Fixed variance (LDM): ``loss = l_simple_weight * mean(L_simple)
        + original_elbo_weight * mean(lvlb_weights[t] * L_simple)``.
        ``learned_range``: the hybrid loss of Nichol & Dhariwal 2021 (Sec. 3.1,
        ``L_simple + 0.001 L_vlb`` with ``L_vlb`` the sum of 1000 terms, i.e.
        ``L_simple + L_t`` for one uniform t, as improved-diffusion with
        LossType.MSE and DiT compute it): ``loss = l_simple_weight *
        mean(L_simple) + mean(L_t)``; ``L_t`` sees the detached prediction so
        it only trains the variance. ``x0`` must lie on the 8-bit grid of
        [-1, 1] for the t = 0 decoder term.
        """
        prediction, var_values = self.split_model_output(model_output, x_t)
        error = prediction - self.training_target(x0, noise, t)
        loss_simple = mean_flat(error.abs() if self.config.loss_type == "l1" else error**2)  # (B,)
        simple = self.config.l_simple_weight * (self.loss_weights(t) * loss_simple).mean()
        if var_values is None:
            loss_vlb = self.lvlb_weights[t].to(loss_simple.dtype) * loss_simple  # (B,)
            return LossOutput(simple + self.config.original_elbo_weight * loss_vlb.mean(), loss_simple, loss_vlb)
        frozen = torch.cat([prediction.detach(), var_values], dim=1)  # stop-gradient on the mean
        loss_vlb = self.vb_bits_per_dim(frozen, x0, x_t, t)
        return LossOutput(simple + loss_vlb.mean(), loss_simple, loss_vlb)

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-sample weights ``(B,)`` of L_simple: min-SNR-gamma when ``snr_gamma > 0``, else ones."""
        if self.config.snr_gamma <= 0:
            return torch.ones(t.shape, device=t.device)
        weights = min_snr_weight(snr(self.alphas_cumprod, t), self.config.snr_gamma, self.config.prediction_type)
        return weights.float()

    def vb_bits_per_dim(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """VLB term ``L_t`` in bits/dim, ``(B,)`` (Ho et al. 2020, Eq. 5).

        ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` for t > 0 and the
        discretised decoder NLL ``-log p(x0 | x_1)`` (Ho Eq. 13) for t == 0.
        """
        p = self.p_mean_variance(model_output, x_t, t)
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
        log_lik = discretized_gaussian_log_likelihood(x0, means=p.mean, log_scales=0.5 * p.log_variance)
        decoder_nll = -mean_flat(log_lik) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    # ---- the samplers' view -----------------------------------------------
    def denoiser(self, net_fn):
        """``samplers.denoiser.Denoiser``: ``D(x, sigma, cond) -> x0_hat`` of ``net_fn`` (x, original t, cond).

        ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the net sees ``x / sqrt(sigma^2 + 1)``
        (k-diffusion ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``).
        """
        from diffusionforge.samplers.denoiser import VPDenoiser

        abar64 = torch.cumprod(1.0 - self._betas64, dim=0)  # the float64 source of the float32 buffers
        return VPDenoiser(net_fn, abar64, self.config.prediction_type,
                          learned_variance=self.config.variance_type == "learned_range",
                          timestep_map=self.timestep_map)

    # ---- respacing ------------------------------------------------------
    def respaced(self, use_timesteps: Sequence[int]) -> "GaussianDiffusion":
        """A process over the kept steps only (improved-diffusion ``SpacedDiffusion``).

        The kept steps keep their ``abar``; the new betas are
        ``1 - abar_k / abar_{k_prev}``. ``timestep_map`` of the result maps its
        indices to the original timesteps that backbones are called with.
        """
        keep = sorted({int(s) for s in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{self.num_timesteps - 1}")
        abar = torch.cumprod(1.0 - self._betas64, dim=0)[keep]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        config = dataclasses.replace(self.config, num_timesteps=len(keep))
        new_map = self.timestep_map.cpu()[keep]
        spaced = GaussianDiffusion(config, betas=1.0 - abar / abar_prev, timestep_map=new_map)
        return spaced.to(self.betas.device)

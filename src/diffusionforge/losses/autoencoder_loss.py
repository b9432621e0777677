"""The training objective of LDM's KL autoencoder (Rombach et al. 2022, Sec. 3 and App. G).

A reconstruction term with a learned scalar output log-variance, a weak KL
pull of the posterior towards N(0, I), and a PatchGAN adversarial term whose
weight adapts to the ratio of gradient norms at the decoder's last layer
(Esser et al. 2021, Eq. 7). The equations are those of CompVis
``LPIPSWithDiscriminator``.

Notation
--------
==============  ==============================================================
``x, xhat``     input and reconstruction ``(B, C, H, W)`` in [-1, 1]
``rec``         ``pixel_weight |x - xhat| + perceptual_weight LPIPS(x, xhat)``,
                ``(B, C, H, W)`` (LPIPS ``(B,)`` broadcast over pixels)
``s``           ``logvar``, a learned scalar (LDM: ``logvar_init = 0``)
``L_nll``       ``sum(rec / exp(s) + s) / B``    (Laplace NLL up to constants)
``L_kl``        ``sum_b KL(q(z|x_b) || N(0, I)) / B``
``L_G``         ``-mean D(xhat)``                 (generator's adversarial loss)
``lambda``      ``||grad_L L_nll|| / (||grad_L L_G|| + 1e-4)``, clamped to
                [0, 1e4], times ``disc_weight``; ``L`` = decoder's last weight
``f(t)``        ``disc_factor`` from batch ``disc_start`` on, 0 before
==============  ==============================================================

Generator (autoencoder) loss:  ``L_nll + kl_weight L_kl + lambda f(t) L_G``.
Discriminator loss:            ``f(t) L_D(D(x), D(xhat))``, hinge or vanilla.

LPIPS is a fixed metric loaded from its own files (``losses.lpips``): it is
left out of this module's state dict, so checkpoints stay small and resume
whether or not LPIPS weights are present.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor, nn

from .config import AutoencoderLossConfig
from .discriminator import D_LOSSES, NLayerDiscriminator, adopt_weight
from .lpips import LPIPS

__all__ = ["AutoencoderLossConfig", "LPIPSWithDiscriminator", "GeneratorLoss",
           "DiscriminatorLoss", "Posterior"]

ADAPTIVE_EPS = 1e-4  # delta in the denominator of lambda (taming code; 1e-6 in the paper)
ADAPTIVE_MAX = 1e4  # lambda is clamped to [0, ADAPTIVE_MAX]
PERCEPTUAL_KEY = "perceptual."  # submodule prefix left out of the state dict


class Posterior(Protocol):
    """What the loss needs of q(z|x): ``kl() -> (B,)``, KL to N(0, I) per sample."""

    def kl(self) -> Tensor: ...


class GeneratorLoss(NamedTuple):
    """Terms of the autoencoder's loss; ``loss`` carries the graph, the rest are for logging."""

    loss: Tensor  # L_nll (weighted) + kl_weight L_kl + lambda f(t) L_G
    nll: Tensor  # L_nll (unweighted)
    rec: Tensor  # mean of rec over all elements
    kl: Tensor  # L_kl
    g_loss: Tensor  # L_G
    d_weight: Tensor  # lambda (0 when f(t) = 0 or gradients are unavailable)
    disc_factor: float  # f(t)
    logvar: Tensor  # s

    def log(self, split: str) -> dict[str, Tensor]:
        terms = {"total_loss": self.loss, "nll_loss": self.nll, "rec_loss": self.rec,
                 "kl": self.kl, "g_loss": self.g_loss, "d_weight": self.d_weight,
                 "disc_factor": torch.tensor(float(self.disc_factor)), "logvar": self.logvar}
        return {f"{split}/{k}": v.detach() for k, v in terms.items()}


class DiscriminatorLoss(NamedTuple):
    loss: Tensor  # f(t) L_D
    logits_real: Tensor  # mean D(x)
    logits_fake: Tensor  # mean D(xhat)

    def log(self, split: str) -> dict[str, Tensor]:
        terms = {"disc_loss": self.loss, "logits_real": self.logits_real,
                 "logits_fake": self.logits_fake}
        return {f"{split}/{k}": v.detach() for k, v in terms.items()}


class LPIPSWithDiscriminator(nn.Module):
    """L1 (+ LPIPS) NLL with learned variance, KL, and an adaptive-weight PatchGAN."""

    def __init__(self, config: AutoencoderLossConfig, lpips: Optional[LPIPS] = None):
        super().__init__()
        self.config = config
        self.perceptual = lpips.requires_grad_(False) if lpips is not None else None
        self.logvar = nn.Parameter(torch.tensor(float(config.logvar_init)),
                                   requires_grad=config.learn_logvar)
        self.discriminator = NLayerDiscriminator(config.disc_in_channels, config.disc_ndf,
                                                 config.disc_num_layers)
        self.d_loss = D_LOSSES[config.disc_loss]
        if lpips is None and config.perceptual_weight > 0:
            warnings.warn(f"no LPIPS weights: the autoencoder trains without its perceptual term "
                          f"(perceptual_weight={config.perceptual_weight} is unused)", stacklevel=2)
        self.register_state_dict_post_hook(_drop_perceptual)
        self.register_load_state_dict_pre_hook(_keep_perceptual)

    def reconstruction_loss(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """rec = pixel_weight |x - xhat| + perceptual_weight LPIPS(x, xhat): (B, C, H, W)."""
        cfg = self.config
        rec = cfg.pixel_weight * (x - x_hat).abs()
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p = self.perceptual(x, x_hat)  # (B,)
            rec = rec + cfg.perceptual_weight * p.view(-1, 1, 1, 1)
        return rec

    def adaptive_weight(self, nll: Tensor, g_loss: Tensor, last_layer: Optional[Tensor]) -> Tensor:
        """lambda = ||grad_L L_nll|| / (||grad_L L_G|| + delta), clamped, times disc_weight.

        Esser et al. 2021, Eq. 7. Zero when there is no graph to differentiate
        (no_grad, validation) or ``last_layer`` is None.
        """
        zero = torch.zeros((), device=nll.device)
        if last_layer is None or not torch.is_grad_enabled():
            return zero
        if not (nll.requires_grad and g_loss.requires_grad):
            return zero
        (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True, allow_unused=True)
        (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)
        if nll_grad is None or g_grad is None:
            return zero
        ratio = nll_grad.norm() / (g_grad.norm() + ADAPTIVE_EPS)
        return ratio.clamp(0.0, ADAPTIVE_MAX).detach() * self.config.disc_weight

    def generator_loss(self, x: Tensor, x_hat: Tensor, posterior: Posterior, global_step: int,
                       last_layer: Optional[Tensor] = None,
                       weights: Optional[Tensor] = None) -> GeneratorLoss:
        """The autoencoder's loss at training batch ``global_step``.

        x, x_hat: (B, C, H, W); last_layer: the decoder's last weight (for
        lambda); weights: optional, broadcastable to (B, C, H, W), multiplies
        the per-element NLL in ``loss`` (not in lambda), as in LDM.
        """
        cfg = self.config
        batch = x.shape[0]
        rec = self.reconstruction_loss(x, x_hat)
        nll_map = rec / torch.exp(self.logvar) + self.logvar  # (B, C, H, W)
        nll = nll_map.sum() / batch
        weighted_nll = nll if weights is None else (weights * nll_map).sum() / batch
        kl = posterior.kl().sum() / batch
        g_loss = -self.discriminator(x_hat).mean()
        factor = adopt_weight(cfg.disc_factor, global_step, threshold=cfg.disc_start)
        # lambda costs two extra backward passes; before disc_start it would be multiplied by 0
        d_weight = self.adaptive_weight(nll, g_loss, last_layer) if factor > 0 else nll.new_zeros(())
        loss = weighted_nll + cfg.kl_weight * kl + d_weight * factor * g_loss
        return GeneratorLoss(loss, nll, rec.mean(), kl, g_loss, d_weight, factor, self.logvar)

    def discriminator_loss(self, x: Tensor, x_hat: Tensor, global_step: int) -> DiscriminatorLoss:
        """f(t) L_D on real x and (detached) fake x_hat: (B, C, H, W) each."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_hat.detach())
        factor = adopt_weight(self.config.disc_factor, global_step, threshold=self.config.disc_start)
        loss = factor * self.d_loss(logits_real, logits_fake)
        return DiscriminatorLoss(loss, logits_real.mean(), logits_fake.mean())


def _drop_perceptual(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: LPIPS weights are not part of the loss's state."""
    for key in [k for k in state_dict if k.startswith(prefix + PERCEPTUAL_KEY)]:
        del state_dict[key]


def _keep_perceptual(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load pre-hook: the loaded LPIPS keeps its own weights (the state dict has none)."""
    if module.perceptual is not None:
        for key, value in module.perceptual.state_dict(prefix=prefix + PERCEPTUAL_KEY).items():
            state_dict.setdefault(key, value)

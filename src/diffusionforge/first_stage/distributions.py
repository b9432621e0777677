"""The diagonal Gaussian posterior of the KL autoencoder.

The encoder of the LDM first stage (Rombach et al. 2022, Sec. 3 and App. G)
outputs the parameters of ``q(z | x) = N(z; mu, diag(sigma^2))``; the
KL-regularised autoencoder is a VAE (Kingma & Welling 2014) with a small
weight on the KL term. Layout, clamping and reductions follow LDM's
``DiagonalGaussianDistribution`` so that losses computed with it match.

Notation
--------
==============  ==========================================================
``parameters``  encoder output ``(B, 2C, h, w)``: ``[mu, log sigma^2]`` on dim 1
``mean``        ``mu``, ``(B, C, h, w)``
``logvar``      ``log sigma^2`` clamped to ``[-30, 20]`` (LDM), ``(B, C, h, w)``
``std, var``    ``sigma = exp(logvar / 2)``, ``sigma^2 = exp(logvar)``
==============  ==========================================================

Equations (all sums over the dims ``C, h, w``, one value per sample):

* ``sample``: ``z = mu + sigma * eps``, ``eps ~ N(0, I)`` (reparameterisation,
  Kingma & Welling 2014, Eq. 10).
* ``kl()``: ``KL(q || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)``
  (Kingma & Welling 2014, App. B).
* ``kl(p)``: ``KL(q || p) = 1/2 sum((mu - mu_p)^2 / sigma_p^2 + sigma^2 / sigma_p^2
  - 1 - log sigma^2 + log sigma_p^2)`` for another diagonal Gaussian ``p``.
* ``nll(z)``: ``-log q(z) = 1/2 sum(log 2 pi + log sigma^2 + (z - mu)^2 / sigma^2)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["DiagonalGaussianDistribution", "reparameterise"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's clamp on log sigma^2, keeps exp() finite


def reparameterise(mean: Tensor, std: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``z = mean + std * eps``, ``eps ~ N(0, I)`` drawn from ``generator`` (Kingma & Welling 2014, Eq. 10).

    The one place a posterior sample is drawn: ``DiagonalGaussianDistribution.sample`` and a latent
    cache's stored moments (``LatentFirstStage.from_posterior``) give the same ``z`` for the same
    random state.
    """
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


class DiagonalGaussianDistribution:
    """``N(mean, diag(var))`` from ``parameters: (B, 2C, h, w)`` split on dim 1 into ``mean, logvar``.

    ``deterministic=True`` makes it a point mass at ``mean`` (``std = var = 0``,
    ``kl = nll = 0``), as LDM's flag of the same name.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False):
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(f"parameters must have shape (B, 2C, ...), got {tuple(parameters.shape)}")
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """``z = mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``; ``(B, C, h, w)``."""
        return reparameterise(self.mean, self.std, generator)

    def mode(self) -> Tensor:
        """The most likely latent, ``mean``; ``(B, C, h, w)``."""
        return self.mean

    def kl(self, other: Optional[DiagonalGaussianDistribution] = None) -> Tensor:
        """``KL(self || other)`` (``other=None``: the standard normal), summed over ``C, h, w``; ``(B,)``."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        terms = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * torch.sum(terms, dim=dims)

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """``-log N(sample; mean, var)`` summed over ``dims``; ``(B,)`` for the default dims."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=tuple(dims))

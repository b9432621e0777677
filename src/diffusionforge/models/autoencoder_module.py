"""AutoencoderModule: LDM's KL autoencoder trained against a PatchGAN by Lightning.

Each training batch ``x: (B, C, H, W)`` in [-1, 1] makes two optimiser steps
(Rombach et al. 2022, App. G; CompVis ``AutoencoderKL.training_step``):

    xhat, q = autoencoder(x)                     posterior sample z ~ q(z|x)
    0. generator:      L_nll + kl_weight L_kl + lambda f(t) L_G    (Adam on the autoencoder)
    1. discriminator:  f(t) L_D(D(x), D(sg[xhat]))                 (Adam on the PatchGAN)

with ``t`` the number of training batches done. The maths lives in
``losses.LPIPSWithDiscriminator``; this module steps the two optimisers
by hand and logs. The discriminator step reuses the generator step's
reconstruction (LDM recomputes it after the generator update). The
learning-rate schedules and the validation grid (inputs over their
reconstructions, ``recon_step_*.png``) are ``BaseModule``'s (``base.py``).

Lightning counts every ``optimizer.step()`` as a global step, so
``global_step`` is twice the number of training batches; ``max_steps``
counts the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio

from ..config.schema import OptimConfig
from ..first_stage.autoencoder import AutoencoderKL
from ..losses.autoencoder_loss import AutoencoderLossConfig, LPIPSWithDiscriminator
from ..losses.lpips import LPIPS
from .base import BaseModule

__all__ = ["AutoencoderModule"]

ADAM_BETAS = (0.5, 0.9)  # Adam (beta1, beta2) of both optimisers in LDM
STEPS_PER_BATCH = 2  # optimiser steps per training batch: generator, then discriminator
DATA_RANGE = 2.0  # max - min of images in [-1, 1], for PSNR
GRID_COLUMNS = 8  # validation images shown in the reconstruction grid


class AutoencoderModule(BaseModule):
    loss_names = ("train/total_loss", "train/disc_loss")  # logged loss of each optimiser (divergence messages)
    grid_prefix = "recon_"

    def __init__(self, autoencoder: AutoencoderKL, loss_config: AutoencoderLossConfig, lr: float,
                 lpips: Optional[LPIPS] = None, sample_dir: Optional[Path] = None,
                 grad_clip: float = 0.0, optim: Optional[OptimConfig] = None):
        # optim: warm-up and decay of both learning rates, per training batch (None: constant lr)
        super().__init__(optim, sample_dir)
        self.autoencoder = autoencoder
        self.loss = LPIPSWithDiscriminator(loss_config, lpips)
        self.lr = lr  # learning rate of both Adam optimisers
        self.grad_clip = grad_clip  # clip each optimiser's gradient norm to this (0 = off)
        self.automatic_optimization = False
        self.val_psnr = PeakSignalNoiseRatio(data_range=DATA_RANGE)
        self._grid_inputs: Optional[Tensor] = None  # (n, C, H, W): the first validation images seen

    @property
    def batch_step(self) -> int:
        """Training batches done (the ``t`` of ``disc_start``)."""
        return self.global_step // STEPS_PER_BATCH

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]  # (B, C, H, W) in [-1, 1]
        opt_g, opt_d = self.optimizers()
        t = self.batch_step
        x_hat, posterior = self.autoencoder(x)

        self.toggle_optimizer(opt_g)  # the discriminator gets no gradient from L_G
        g = self.loss.generator_loss(x, x_hat, posterior, t, self.autoencoder.get_last_layer())
        self._optimizer_step(opt_g, g.loss)
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        d = self.loss.discriminator_loss(x, x_hat.detach(), t)
        self._optimizer_step(opt_d, d.loss)
        self.untoggle_optimizer(opt_d)

        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] * bool(schedulers):
            scheduler.step()

        logs = {**g.log("train"), **d.log("train")}
        self.log("train/rec_loss", logs.pop("train/rec_loss"), prog_bar=True)
        self.log_dict(logs)

    def _optimizer_step(self, optimizer, loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip,
                                gradient_clip_algorithm="norm")
        optimizer.step()

    def configure_optimizers(self):
        params = list(self.autoencoder.parameters())
        if self.loss.config.learn_logvar:
            params.append(self.loss.logvar)
        opt_g = torch.optim.Adam(params, lr=self.lr, betas=ADAM_BETAS)
        opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=self.lr, betas=ADAM_BETAS)
        if self.optim_config is None:
            return [opt_g, opt_d]
        batches = self.trainer.max_steps // STEPS_PER_BATCH  # the schedules count training batches
        return [opt_g, opt_d], [self.lr_schedule(opt, batches) for opt in (opt_g, opt_d)]

    # --------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]  # (B, C, H, W) in [-1, 1]
        x_hat, _ = self.autoencoder(x, sample_posterior=False)  # decode the posterior mode
        rec = self.loss.reconstruction_loss(x, x_hat).mean()
        self.val_psnr.update(x_hat.clamp(-1, 1), x)
        self.log("val/rec_loss", rec, sync_dist=True)
        self.log("val/psnr", self.val_psnr, prog_bar=True)
        if batch_idx == 0:
            self._grid_inputs = x[:GRID_COLUMNS].detach()

    @torch.no_grad()
    def reconstruction_grid(self, images: Tensor) -> Tensor:
        """``images`` (N, C, H, W) in [-1, 1] over their posterior-mode reconstructions: (2N, C, H, W)."""
        was_training = self.autoencoder.training
        self.autoencoder.eval()
        try:
            x_hat, _ = self.autoencoder(images.to(self.device), sample_posterior=False)
        finally:
            self.autoencoder.train(was_training)
        return torch.cat([images.cpu(), x_hat.clamp(-1, 1).float().cpu()])

    def write_sample_grid(self, path: Path, seed: int = 0, images: Optional[Tensor] = None) -> Path:
        """Inputs over reconstructions: ``images``, else the first validation batch's, else ``grid_source``'s.

        ``seed`` is unused (decoding the posterior mode draws no noise).
        """
        if images is None:
            images = self._grid_inputs
        if images is None:
            images = torch.stack([item["image"] for item in self.grid_items(GRID_COLUMNS)])
        grid = self.reconstruction_grid(images)
        return self.save_sample_grid(grid, path, nrow=len(images))

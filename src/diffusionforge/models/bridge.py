"""BridgeModel: image-to-image translation by Latent Bridge Matching (task=bridge).

The ``NetworkModule`` machinery (first stage, conditioner, backbone, EMA,
optimiser, grids) with the bridge process in place of Gaussian diffusion
(Chadebec et al. 2025, Algorithm 1; gojasper/LBM ``LBMModel``):

    z0 = E(x_target)                  first-stage encode (identity in pixel space)
    z1 = E(x_source)                  the degraded image, resized to the target's size
    c  = C(batch, first_stage)        e.g. the inpainting mask on the latent grid
    t ~ timestep_sampling, eps ~ N(0, I)
    x_t = (1 - t) z0 + t z1 + sigma_b sqrt(t (1 - t)) eps
    loss = w_lat |v_theta(x_t, t T, c) - (z1 - z0)|^p  [+ w_pix d(D(x_t - t v_theta), x_target)]

``translate`` runs the Euler sampler from ``z1`` to ``z0_hat`` and decodes it.
With a mask in the batch (1 = the hole to fill) the known pixels are taken
from the source, so they are preserved exactly. A bridge has no ``sample``
(it starts from a source, not from noise), no ``inpaint`` (inpainting is a
bridge from masked sources) and no guidance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate

from ..conditioning import ConditionerWrapper
from ..conditioning.labels import LabelConditioning
from ..config.schema import OptimConfig, SampleConfig
from ..processes.bridge import BridgeMatching
from ..samplers import autocast_denoise
from ..samplers.registry import sampler_entry
from .base import NetworkModule

GRID_PAIRS = 8  # pairs shown in the sample grids (rows: source, translation, target)


class BridgeLoss(NamedTuple):
    loss: Tensor  # () the scalar to minimise
    latent: Tensor  # (B,) weighted latent velocity loss
    pixel: Tensor  # (B,) unweighted pixel loss (zeros when off)


class BridgeModel(NetworkModule):
    """Source -> target translation by a latent bridge: ``translate`` and grids of validation pairs.

    ``sample`` (the diffusion runs' ``SampleConfig``) is accepted so that one
    set of parts builds every model, and unused: translation takes
    ``sample_steps`` Euler steps and no guidance.
    """

    def __init__(self, backbone: nn.Module, process: BridgeMatching, conditioner: ConditionerWrapper,
                 first_stage: nn.Module, latent_shape: tuple[int, int, int], optim: OptimConfig,
                 sample: Optional[SampleConfig] = None, labels: Optional[LabelConditioning] = None,
                 sample_dir: Optional[Path] = None, *, source_key: str = "source", target_key: str = "image",
                 paste_key: Optional[str] = "mask", sample_steps: int = 1, pixel_loss=None):
        super().__init__(backbone=backbone, process=process, conditioner=conditioner, first_stage=first_stage,
                         latent_shape=latent_shape, optim=optim, labels=labels, sample_dir=sample_dir)
        self.source_key = source_key
        self.target_key = target_key
        self.paste_key = paste_key  # batch key of the hole mask whose outside is kept from the source
        self.sample_steps = sample_steps
        self.pixel_loss = pixel_loss  # losses.pixel.PixelLoss or None

    @property
    def bridge(self) -> BridgeMatching:
        return self.process

    # ----------------------------------------------------------------- training
    def source_images(self, batch: dict, size: tuple[int, int]) -> Tensor:
        """batch[source_key] at ``size`` (bilinear when it differs, as LBM resizes its source)."""
        if self.source_key not in batch:
            raise KeyError(f"a bridge model needs the source images in batch['{self.source_key}']")
        source = batch[self.source_key]
        if tuple(source.shape[-2:]) != tuple(size):
            source = F.interpolate(source, size=size, mode="bilinear", align_corners=False)
        return source

    def bridge_loss(self, batch: dict) -> BridgeLoss:
        target = batch[self.target_key]
        source = self.source_images(batch, target.shape[-2:])
        with torch.no_grad():
            z0 = self.first_stage.encode(target)
            z1 = self.first_stage.encode(source, sample=False)
        conditioner = self.net["conditioner"]
        cond = conditioner(batch, first_stage=self.first_stage) if len(conditioner) else None
        t = self.bridge.sample_t(z0.shape[0], z0.device)
        x_t = self.bridge.interpolate(z0, z1, t)
        v = self.net["backbone"](x_t, self.bridge.model_time(t), cond)
        latent = self.bridge.latent_loss(v, self.bridge.velocity(z0, z1))
        loss = latent
        pixel = torch.zeros_like(latent)
        weight = self.bridge.config.pixel_loss_weight
        if self.pixel_loss is not None and weight > 0:
            z0_hat = self.bridge.predict_target(x_t, v, t)
            pixel = self.pixel_loss(lambda z: self.first_stage.decode(z, grad=True), z0_hat, target)
            loss = loss + weight * pixel
        return BridgeLoss(loss.mean(), latent, pixel)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.bridge_loss(batch)
        self.log("train/loss", losses.loss, prog_bar=True)
        self.log("train/latent_loss", losses.latent.mean())
        if self.pixel_loss is not None:
            self.log("train/pixel_loss", losses.pixel.mean())
        return losses.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.bridge_loss(batch).loss, sync_dist=True)

    # -------------------------------------------------------------- translation
    @torch.no_grad()
    def translate(self, batch: dict, steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
                  use_ema: bool = True, precision: str = "fp32", paste: bool = True,
                  progress: bool = False, callback: Optional[Callable] = None) -> Tensor:
        """Translate ``batch[source_key]`` (B, C, H, W) in [-1, 1] to target images (B, C, H, W).

        ``steps`` Euler steps (default: the run's ``bridge.steps``); with
        ``paste`` and a hole mask in the batch, pixels outside the hole are
        the source's. ``callback(i, t, x)`` after each step (the sampler's).
        """
        steps = self.sample_steps if steps is None else steps
        net = self.sampling_net(use_ema)
        was_training = net.training
        net.eval()
        try:
            source = batch[self.source_key].to(self.device)
            z1 = self.first_stage.encode(source, sample=False)
            conditioner = net["conditioner"]
            cond = conditioner(batch, first_stage=self.first_stage) if len(conditioner) else None
            denoise = net["backbone"]
            if precision == "bf16":
                denoise = autocast_denoise(denoise, self.device.type)
            walk = sampler_entry("bridge_euler", "bridge").fn  # the registry's one bridge sampler
            out = walk(denoise, self.bridge, z1, cond, num_steps=steps, generator=generator, progress=progress,
                       callback=callback)
            images = self.first_stage.decode(out.sample).clamp(-1, 1)
        finally:
            net.train(was_training)
        if paste and self.paste_key is not None and self.paste_key in batch:
            hole = batch[self.paste_key].to(images)
            images = hole * images + (1 - hole) * source
        return images

    def grid_rows(self, batch: dict, seed: int = 0) -> tuple[Tensor, int]:
        """Rows of a grid: source, translation at 1 step (and at ``sample_steps`` if more), target."""
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}  # captions stay lists
        target = batch[self.target_key]
        rows = [self.source_images(batch, target.shape[-2:])]
        for steps in sorted({1, self.sample_steps}):
            generator = torch.Generator(self.device).manual_seed(seed)
            rows.append(self.translate(batch, steps=steps, generator=generator))
        rows.append(target)
        return torch.cat(rows), len(target)

    def grid_batch(self) -> dict:
        """The first GRID_PAIRS pairs of ``grid_source`` (the validation pairs, fixed by the data's seed)."""
        return default_collate(self.grid_items(GRID_PAIRS))

    def write_sample_grid(self, path: Path, seed: int = 0, batch: Optional[dict] = None) -> Path:
        """Grid of ``batch`` (default: ``grid_batch()``); the base's validation hook calls it."""
        batch = self.grid_batch() if batch is None else batch
        images, nrow = self.grid_rows(batch, seed)
        return self.save_sample_grid(images, path, nrow)

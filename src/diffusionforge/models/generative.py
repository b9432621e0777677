"""GenerativeModel: first stage + conditioner + backbone + process, trained by Lightning.

Training step (Ho et al. 2020, Algorithm 1, in the first stage's space):

    z0 = E(x)            first-stage encode (identity in pixel space; a latent cache's stored posterior)
    c  = C(batch)        cond dict; each conditioner may drop itself (CFG)
    t ~ U{0..T-1}, eps ~ N(0, I), z_t = q_sample(z0, t, eps)
    loss = process.training_loss(backbone(z_t, t, c), z0, z_t, t, eps)

Sampling walks the process with a sampler of the ``samplers.SAMPLERS`` registry and the
EMA weights by default, with classifier-free guidance as a wrapper around
the denoise callable. The module is thin: the maths lives in the process,
the loop in the sampler, the networks in the backbone and conditioners;
the EMA, optimiser, first stage and grid machinery are ``NetworkModule``'s
(``base.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import Cond, ConditionerWrapper
from ..conditioning.labels import LabelConditioning
from ..config.schema import OptimConfig, SampleConfig
from ..data.latent_cache import LATENT_MEAN, LATENT_STD
from ..processes.gaussian import GaussianDiffusion
from ..processes.registry import OBJECTIVES
from ..samplers import SamplePrecision, autocast_denoise, classifier_free_guidance, sampler_entry
from .base import NetworkModule


@dataclass
class SampleRequest:
    """What to sample: a batch of conditioning inputs and how to walk the process."""
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "leading"  # which discrete timesteps (ddpm, ddim, and the sigma samplers' discrete schedule)
    schedule: str = "discrete"  # sigma schedule of the sigma samplers: discrete | karras | exponential
    s_churn: float = 0.0  # euler / heun: stochasticity of Karras et al. 2022, Algorithm 2 (0 = the ODE)
    s_tmin: float = 0.0  # churn only for sigma in [s_tmin, s_tmax]
    s_tmax: float = float("inf")
    s_noise: float = 1.0  # scale of the fresh noise (churn, ancestral and SDE samplers)
    guidance: float = 1.0
    guidance_channels: Optional[int] = None  # first k channels guided; None = all prediction channels
    clip_denoised: bool = True
    use_ema: bool = True
    precision: SamplePrecision = "fp32"  # bf16: the network runs under autocast, the sampler in fp32
    progress: bool = False
    callback: Optional[Callable] = None  # callback(i, level, x, pred_x0) after each step (samplers/loop.py)


def strength_start(num_steps: int, strength: float) -> int:
    """The step an image-to-image walk of ``num_steps`` begins at, as diffusers' img2img ``get_timesteps``:
    ``init_timestep = min(int(num_steps * strength), num_steps)``, ``t_start = max(num_steps - init_timestep, 0)``."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(num_steps * strength), num_steps)
    return max(num_steps - init_timestep, 0)


class GenerativeModel(NetworkModule):
    """Gaussian diffusion (DDPM / DDIM / LDM / DiT): ``sample``, ``inpaint`` and class grids."""

    def __init__(self, backbone: nn.Module, process: GaussianDiffusion,
                 conditioner: ConditionerWrapper, first_stage: nn.Module,
                 latent_shape: tuple[int, int, int], optim: OptimConfig,
                 sample: SampleConfig, labels: Optional[LabelConditioning] = None,
                 sample_dir: Optional[Path] = None):
        super().__init__(backbone=backbone, process=process, conditioner=conditioner, first_stage=first_stage,
                         latent_shape=latent_shape, optim=optim, labels=labels, sample_dir=sample_dir)
        self.sample_config = sample  # the validation / final grids' sampler (grid_request)

    # ----------------------------------------------------------------- training
    def diffusion_loss(self, batch: dict) -> Tensor:
        with torch.no_grad():
            z0 = self.latents_of(batch)
        conditioner = self.net["conditioner"]
        cond = conditioner(batch, first_stage=self.first_stage) if len(conditioner) else None
        return self.process.loss(self.net["backbone"], z0, cond)  # the objective's: ddpm, edm or flow

    def latents_of(self, batch: dict) -> Tensor:
        """``z0`` of a batch: its images encoded by the first stage, or a latent cache's stored posterior
        sampled (``data/latent_cache.py``: the same ``z0`` for the same random state, no encoder pass)."""
        if LATENT_MEAN in batch:
            return self.first_stage.from_posterior(batch[LATENT_MEAN], batch[LATENT_STD])
        return self.first_stage.encode(batch["image"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.diffusion_loss(batch)
        self.log("train/loss", losses.loss, prog_bar=True, sync_dist=False)
        self.log("train/loss_simple", losses.loss_simple.mean())
        if torch.is_tensor(losses.loss_vlb):
            self.log("train/loss_vlb", losses.loss_vlb.mean())
        return losses.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.diffusion_loss(batch).loss, sync_dist=True)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, batch: dict, num: int, request: SampleRequest,
               generator: Optional[torch.Generator] = None,
               known_mask: Optional[Tensor] = None,
               x0_known: Optional[Tensor] = None,
               noise: Optional[Tensor] = None,
               negative: Optional[dict] = None,
               x_init: Optional[Tensor] = None,
               start: int = 0,
               known_noise: Optional[Tensor] = None) -> Tensor:
        """Generate ``num`` images (num, C, H, W) in [-1, 1].

        batch: conditioning inputs keyed like a training batch (e.g.
        ``{"class_label": (num,)}``); empty for an unconditional model.
        noise: the starting noise ``(num, *latent_shape)``; by default drawn
        from ``generator`` on the model's device. ``generator`` may also be a
        list of ``num`` generators, one per sample, for the samplers' fresh
        noise (``samplers.loop.randn``; then give ``noise``).
        negative: batch entries the unconditional branch of classifier-free
        guidance encodes instead of dropping them (``{"caption": negative
        prompts}``: diffusers' ``negative_prompt``).
        x_init, start: image-to-image in the diffusion space (``img2img``):
        begin at step ``start`` of the walk from ``x_init`` noised with ``noise``.
        known_noise: the known region's fixed noise (``samplers.loop``; diffusers' inpainting).
        """
        net = self.sampling_net(request.use_ema)
        was_training = net.training
        net.eval()
        try:
            cond, uncond = self._conditions(net, batch, self.first_stage, negative)
            denoise = net["backbone"]
            if request.precision == "bf16":
                denoise = autocast_denoise(denoise, self.device.type)
            if cond is not None and request.guidance != 1.0:
                denoise = classifier_free_guidance(denoise, request.guidance, uncond,
                                                   guided_channels=self.guided_channels(request))
            if noise is None:
                x_T = torch.randn((num, *self.latent_shape), generator=generator, device=self.device)
            elif tuple(noise.shape) != (num, *self.latent_shape):
                raise ValueError(f"noise must have shape {(num, *self.latent_shape)}, got {tuple(noise.shape)}")
            else:
                x_T = noise.to(self.device)
            entry = sampler_entry(request.sampler, self.objective)
            options = {name: getattr(request, name) for name in entry.options}
            if x_init is not None or start:  # only then: every other sampler call is unchanged
                options.update(start=start, x_init=None if x_init is None else x_init.to(x_T))
            if known_noise is not None:
                options.update(known_noise=known_noise.to(x_T))
            out = entry.fn(denoise, self.process, x_T, cond, num_steps=request.steps, generator=generator,
                           known_mask=known_mask, x0_known=x0_known, progress=request.progress,
                           callback=request.callback, **options)
            return self.first_stage.decode(out.sample).clamp(-1, 1)
        finally:
            net.train(was_training)

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the diffusion space: a posterior sample drawn from ``generator``
        in latent space (diffusers' ``retrieve_latents``, ``sample_mode="sample"``), the images in pixel space."""
        images = images.to(self.device)
        autoencoder = getattr(self.first_stage, "autoencoder", None)
        if autoencoder is None:
            return self.first_stage.encode(images)
        posterior = autoencoder.encode(images)
        posterior = getattr(posterior, "latent_dist", posterior)  # a diffusers AutoencoderKL's output
        return posterior.sample(generator) * self.first_stage.scale_factor

    @torch.no_grad()
    def img2img(self, batch: dict, images: Tensor, request: SampleRequest, strength: float = 0.8,
                generator: Optional[torch.Generator] = None, mask: Optional[Tensor] = None,
                noise: Optional[Tensor] = None, z_init: Optional[Tensor] = None,
                negative: Optional[dict] = None, paste: bool = True) -> Tensor:
        """SDEdit (Meng et al. 2022) and mask inpainting from ``images`` (1 or B, C, H, W) in [-1, 1].

        As diffusers' ``StableDiffusionImg2ImgPipeline``: the images are encoded
        (``encode_images``; ``z_init`` skips that), noised to step ``start =
        strength_start(request.steps, strength)`` of the sampler's walk with
        ``noise`` (drawn from ``generator`` after the posterior sample when not
        given) and the remaining steps walked. ``strength = 1`` starts at the
        first step (still mixing the image in, as diffusers' img2img); ``0``
        takes no step and returns the decoded latents.

        ``mask`` (1 or B, 1, H, W): 1 = repaint (white), 0 = keep, as diffusers'
        ``StableDiffusionInpaintPipeline`` with a 4-channel UNet (the legacy
        inpainting): binarised at 0.5, resized to the latent grid by nearest
        neighbour, the kept latents noised with the same ``noise`` to the level
        each step reaches and pasted after it (``known_noise``); at ``strength = 1``
        the walk starts from pure noise. ``paste``: the kept pixels are then
        pasted back after decoding (diffusers does not). Returns (B, C, H, W) in
        [-1, 1], B = len(noise) or len(images).
        """
        start = strength_start(request.steps, strength)
        images = images.to(self.device)
        z = self.encode_images(images, generator) if z_init is None else z_init.to(self.device)
        num = len(noise) if noise is not None else len(images)
        if noise is None:
            noise = torch.randn((num, *self.latent_shape), generator=generator, device=self.device)
        noise = noise.to(self.device)
        if tuple(z.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"the images encode to {tuple(z.shape[1:])}, the model samples {self.latent_shape}")
        z = z.expand(num, *z.shape[1:]) if len(z) == 1 else z
        if mask is None:
            return self.sample(batch, num, request, generator=generator, noise=noise, negative=negative,
                               x_init=z, start=start)
        repaint = (mask.to(images.dtype) >= 0.5).to(images.dtype)  # diffusers' mask_processor: binarize
        repaint_z = F.interpolate(repaint, size=z.shape[-2:])  # nearest, as diffusers' prepare_mask_latents
        known = (1.0 - repaint_z).expand(num, *z.shape[1:])
        pure_noise = strength == 1.0  # diffusers' is_strength_max: latents = noise * init_noise_sigma
        out = self.sample(batch, num, request, generator=generator, known_mask=known, x0_known=z, noise=noise,
                          negative=negative, x_init=None if pure_noise else z, start=start, known_noise=noise)
        return repaint * out + (1 - repaint) * images if paste else out

    @property
    def objective(self) -> str:
        """``model.objective`` of the process (``processes.registry.OBJECTIVES``): which samplers fit."""
        return next(name for name, entry in OBJECTIVES.items() if isinstance(self.process, entry.process))

    def guided_channels(self, request: SampleRequest) -> Optional[int]:
        """Output channels guidance mixes: the request's k, else every prediction channel.

        A learned variance (``2C`` outputs) keeps its last C channels from the
        conditional branch; ``k = 3`` on 4-channel latents reproduces the
        published DiT sampler (``forward_with_cfg``), which guides 3 of 4.
        """
        channels = self.latent_shape[0]
        k = request.guidance_channels
        if k is not None and not 1 <= k <= channels:
            raise ValueError(f"guidance_channels must be in 1..{channels} (the prediction's channels), got {k}")
        learned = getattr(self.process.config, "variance_type", None) == "learned_range"  # EDM / flow: never
        return k if k is not None else (channels if learned else None)

    @torch.no_grad()
    def inpaint(self, batch: dict, images: Tensor, mask: Tensor, request: SampleRequest,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """Fill the holes of ``images`` (B, C, H, W) where ``mask`` (B, 1, H, W) is 0; keep mask == 1.

        The known region goes through the sampler's mask path (RePaint-style
        replacement, Lugmayr et al. 2022) in the diffusion space: a latent is
        known only where its whole f x f pixel patch is. The known pixels are
        pasted back exactly after decoding.
        """
        if mask.shape != (images.shape[0], 1, *images.shape[2:]):
            raise ValueError(f"mask must have shape (B, 1, H, W) = {(images.shape[0], 1, *images.shape[2:])}, "
                             f"got {tuple(mask.shape)}")
        mask = mask.to(images.dtype)
        z_known = self.first_stage.encode(images, sample=False)
        f = images.shape[-1] // z_known.shape[-1]
        known = -F.max_pool2d(-mask, f) if f > 1 else mask  # (B, 1, h, w): 1 where the patch is all known
        filled = self.sample(batch, len(images), request, generator=generator,
                             known_mask=known.expand_as(z_known), x0_known=z_known)
        return mask * images + (1 - mask) * filled

    @staticmethod
    def _conditions(net: nn.ModuleDict, batch: dict, first_stage: Optional[nn.Module] = None,
                    negative: Optional[dict] = None) -> tuple[Optional[Cond], Optional[Cond]]:
        """``(cond, uncond)``; ``negative`` entries replace the batch's in uncond and are encoded, not dropped."""
        conditioner = net["conditioner"]
        if not len(conditioner):
            return None, None
        negative = negative or {}
        return (conditioner(batch, first_stage=first_stage),
                conditioner({**batch, **negative}, force_uncond=True, first_stage=first_stage,
                            keep_keys=tuple(negative)))

    def grid_batch(self, per_class: int) -> tuple[dict, int, int]:
        """Conditioning for a grid: one row per class, else one row per validation item's conditioning inputs
        (its caption, ...) when the model has a grid source, else 8x8 unconditional."""
        if self.num_classes:
            labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(per_class)
            return self.label_batch(labels), len(labels), per_class
        keys = self.net["conditioner"].input_keys if len(self.net["conditioner"]) else []
        if keys and self.grid_source is not None:  # e.g. a captioned folder: a row per validation item's inputs
            items = self.grid_items(per_class)
            batch = {key: [item[key] for item in items for _ in range(per_class)] for key in keys}
            batch = {key: torch.stack(v) if torch.is_tensor(v[0]) else v for key, v in batch.items()}
            return batch, len(items) * per_class, per_class
        return {}, per_class * per_class, per_class

    def grid_request(self) -> SampleRequest:
        """How the validation / final grids are sampled: the run's ``sample`` section."""
        cfg = self.sample_config
        return SampleRequest(sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta, spacing=cfg.spacing,
                             schedule=cfg.schedule, guidance=cfg.guidance, guidance_channels=cfg.guidance_channels,
                             clip_denoised=cfg.clip_denoised)

    @torch.no_grad()
    def estimate_grid_seconds(self) -> Optional[float]:
        """Seconds ``write_sample_grid`` will take on this machine (for ``trainer.time_budget``).

        One sampler step of the grid batch is timed after a warm-up call (which
        pays for allocations and kernel selection) and multiplied by the grid's
        steps; decoding is counted once per step, so latent runs over-estimate.
        """
        batch, num, _ = self.grid_batch(self.sample_config.per_class)
        request = self.grid_request()
        one_step = replace(request, steps=1)
        self.sample(batch, num, one_step)
        start = time.perf_counter()
        self.sample(batch, num, one_step)
        self.grid_seconds = (time.perf_counter() - start) * request.steps
        return self.grid_seconds

    def write_sample_grid(self, path: Path, seed: int = 0) -> Path:
        batch, num, nrow = self.grid_batch(self.sample_config.per_class)
        request = self.grid_request()
        generator = torch.Generator(self.device).manual_seed(seed)
        images = self.sample(batch, num, request, generator=generator)
        return self.save_sample_grid(images, path, nrow)

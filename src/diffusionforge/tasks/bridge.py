"""task=bridge: Latent Bridge Matching from degraded images to clean ones (LBM), used by `dforge translate`.

`dforge train fashion-lbm-sr` builds a ``BridgeModel`` on the pairs of
``data.degradation`` (super-resolution, inpainting, denoising, deblurring);
the run exports the same weight files as a diffusion run. `dforge translate`
reads an input image as the run's training sources were made, and
`dforge evaluate` scores the translations of the test pairs beside the
degraded inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..config.schema import ExperimentConfig
from ..errors import ConfigError, DataError
from ..models.bridge import BridgeModel
from ..processes.bridge import BridgeMatching
from ..utils.images import load_image
from .base import EvalOptions
from .network import NetworkTask
from .parts import check_num_classes, model_parts


def build_bridge_model(config: ExperimentConfig, num_classes: Optional[int] = None,
                       sample_dir: Optional[Path] = None, autoencoder=None) -> BridgeModel:
    """The BridgeModel of a task=bridge config, on the (source, target) pairs of ``data.degradation``."""
    check_num_classes(config, num_classes)
    bridge = config.bridge
    if config.data.degradation is None and config.data.name != "paired-folder":  # its source/ folder: the pairs
        raise ConfigError("data.degradation: task=bridge trains on (source, target) pairs; set "
                          "data.degradation.kind (super_resolution, inpainting, denoising, deblurring) "
                          "or data.name=paired-folder")
    process = bridge.process
    pixel_loss = None
    if process.pixel_loss_weight > 0:
        from ..losses.pixel import PixelLoss

        lpips = None
        if process.pixel_loss_type == "lpips":
            from ..losses.lpips import load_lpips

            lpips = load_lpips(bridge.lpips_vgg, bridge.lpips_lin)
            if lpips is None:
                raise ConfigError("bridge.process.pixel_loss_type=lpips: no LPIPS weights found; set "
                                  "bridge.lpips_vgg and bridge.lpips_lin (or use l2 / l1)")
        pixel_loss = PixelLoss(process.pixel_loss_type, process.pixel_loss_max_size,
                               process.pixel_loss_window, lpips)
    paste_key = bridge.paste_key if getattr(config.data.degradation, "kind", None) == "inpainting" else None
    return BridgeModel(process=BridgeMatching(process), source_key=bridge.source_key, paste_key=paste_key,
                       sample_steps=bridge.steps, pixel_loss=pixel_loss,
                       **model_parts(config, autoencoder, sample_dir))


def source_batch(config: ExperimentConfig, input_path: str, mask_path: Optional[str]) -> dict:
    """The batch translate() needs: source (1, C, S, S) in [-1, 1] (+ mask (1, 1, S, S), 1 = hole).

    An image of the run's size is the source as is; for super-resolution, an
    image ``scale`` times smaller is brought up to size as the training sources
    were; inpainting needs the mask (white = fill), whose hole is filled as in
    training.
    """
    from ..data.degradations import upsample

    data, degradation = config.data, config.data.degradation
    size = data.image_size
    image = load_image(input_path, data.channels)
    height, width = image.shape[-2:]
    if degradation is None:  # a paired-folder run (data.name=paired-folder): the input is a source as is
        if mask_path is not None:
            raise ConfigError("--mask: not supported for a paired-folder run (its masks came from mask/)")
        if (height, width) != (size, size):
            raise DataError(f"{input_path}: is {width}x{height}; this run translates {size}x{size} images")
        return {config.bridge.source_key: image}
    if (height, width) != (size, size):
        scale = degradation.scale if degradation.kind == "super_resolution" else None
        if scale is not None and (height * scale, width * scale) == (size, size):
            image = upsample(image, (size, size), degradation.upsample)
        else:
            low = f" or {size // scale}x{size // scale} (low resolution, x{scale})" if scale else ""
            raise DataError(f"{input_path}: is {width}x{height}; this run translates {size}x{size} images{low}")
    batch = {config.bridge.source_key: image}
    if degradation.kind == "inpainting":
        if mask_path is None:
            raise ConfigError("--mask: this run inpaints; give the mask of the region to fill (white = fill)")
        mask = (load_image(mask_path, 1, any_mode=True) > 0).float()  # white (255) -> 1, black -> 0
        if mask.shape[-2:] != image.shape[-2:]:
            raise DataError(f"{mask_path}: is {mask.shape[-1]}x{mask.shape[-2]}, the input is "
                            f"{image.shape[-1]}x{image.shape[-2]}; they must be the same size")
        batch[config.bridge.source_key] = image * (1 - mask) + degradation.fill * mask
        batch["mask"] = mask
    elif mask_path is not None:
        raise ConfigError(f"--mask: this run does {degradation.kind}, which takes no mask")
    return batch


def translate_image(model: BridgeModel, batch: dict, class_label: Optional[int] = None,
                    steps: Optional[int] = None, seed: int = 0, precision: str = "fp32",
                    callback: Optional[Callable] = None) -> torch.Tensor:
    """The translation (1, C, H, W) in [-1, 1] of ``source_batch``'s batch (with its class, for
    class-conditional runs); ``callback(i, t, x)`` after each step."""
    if model.num_classes is not None:
        if class_label is None or not 0 <= class_label < model.num_classes:
            raise ConfigError(f"--class: this run is class-conditional; give a class in 0..{model.num_classes - 1}")
        batch = {**batch, **model.label_batch(torch.tensor([class_label]))}
    elif class_label is not None:
        raise ConfigError("--class given but the run is not class-conditional")
    generator = torch.Generator().manual_seed(seed)
    return model.translate(batch, steps=steps, generator=generator, precision=precision, callback=callback)


class BridgeTask(NetworkTask):
    """Image-to-image translation by a bridge from the degraded image to the clean one."""

    name = "bridge"
    commands = frozenset({"translate"})
    usage = "`dforge translate`"

    def build_model(self, config: ExperimentConfig, num_classes: Optional[int] = None,
                    sample_dir: Optional[Path] = None, autoencoder=None):
        return build_bridge_model(config, num_classes, sample_dir, autoencoder)

    def evaluate(self, run_dir: Path, config: ExperimentConfig, options: EvalOptions) -> dict:
        """PSNR, SSIM, FID and KID of the translations of the test pairs at each of ``options.steps``."""
        from ..evaluation.paired import evaluate_bridge_run

        model = self.load(run_dir, config, options.use_ema)
        return evaluate_bridge_run(model, config, options.num, options.steps or [config.bridge.steps],
                                   batch_size=options.batch_size, features=options.features, seed=options.seed,
                                   use_ema=options.use_ema, precision=options.precision)

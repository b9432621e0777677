"""Images and masks as ``concat`` channels in latent space (LBM ``LatentsConcatEmbedder``).

Image keys (``(B, C, H, W)`` in [-1, 1], e.g. a masked image or a reference)
are encoded by the model's first stage (the posterior mode, scaled like the
diffusion latents); mask keys (``(B, 1, H, W)`` in [0, 1], e.g. the region to
inpaint) are resized to the latent grid ``(H / f, W / f)`` by area
averaging, so a latent cell holds exactly the fraction of its f x f pixel
patch that is masked (LBM resizes bilinearly with antialiasing, whose
triangle filter also spreads a patch into its neighbours). All inputs must share one spatial size. The
output is, along channels, the masks in ``mask_keys`` order and then the
image latents in ``image_keys`` order (LBM's order): ``len(mask_keys) +
len(image_keys) * c`` channels for c latent channels. A dropped sample
(classifier-free guidance) or a forced-zero conditioner gives zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Conditioner
from .config import LatentsConcatConfig


class LatentsConcat(Conditioner):
    kind = "concat"
    needs_first_stage = True

    def __init__(self, config: LatentsConcatConfig, latent_channels: int):
        keys = list(config.mask_keys) + list(config.image_keys)
        super().__init__(keys[0], config.ucg_rate)
        self.mask_keys = tuple(config.mask_keys)
        self.image_keys = tuple(config.image_keys)
        self.latent_channels = latent_channels

    @property
    def input_keys(self) -> tuple[str, ...]:
        return self.mask_keys + self.image_keys

    @property
    def dim(self) -> int:
        """Channels added to the backbone's input."""
        return len(self.mask_keys) + len(self.image_keys) * self.latent_channels

    def read(self, batch: dict) -> dict[str, Tensor]:
        missing = [key for key in self.input_keys if key not in batch]
        if missing:
            raise KeyError(f"conditioner needs batch keys {missing}")
        return {key: batch[key] for key in self.input_keys}

    def encode(self, value: dict[str, Tensor], drop: Tensor, first_stage: nn.Module) -> Tensor:
        sizes = {key: tuple(v.shape[-2:]) for key, v in value.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"latents_concat inputs must share their spatial size, got {sizes}")
        for key in self.mask_keys:
            if value[key].ndim != 4 or value[key].shape[1] != 1:
                raise ValueError(f"batch['{key}'] must be a mask (B, 1, H, W), got {tuple(value[key].shape)}")
        height, width = next(iter(sizes.values()))
        f = getattr(first_stage, "downsample_factor", 1)
        if height % f or width % f:
            raise ValueError(f"latents_concat inputs of size {height}x{width} are not divisible by the "
                             f"first stage's factor {f}")
        latent_size = (height // f, width // f)
        parts = []
        for key in self.mask_keys:
            mask = value[key].float()
            if mask.shape[-2:] != latent_size:
                mask = F.interpolate(mask, size=latent_size, mode="area")
            parts.append(mask)
        for key in self.image_keys:
            with torch.no_grad():
                parts.append(first_stage.encode(value[key].float(), sample=False).float())
        out = torch.cat(parts, dim=1)
        return out * (~drop).to(out.dtype).view(-1, 1, 1, 1)

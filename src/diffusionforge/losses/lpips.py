"""LPIPS, the learned perceptual image patch similarity (Zhang et al. 2018).

Eq. 1 of the paper: both images go through a fixed VGG16 trunk; at each of
five layers the features are unit-normalised along channels, their squared
difference is weighted per channel by a learned 1x1 conv ``w_l`` (no bias),
averaged over space, and the five layers are summed:

    d(x, x0) = sum_l 1 / (H_l W_l) sum_{h,w} || w_l * (yhat^l_hw - yhat0^l_hw) ||_2^2

Notation
--------
==========  =================================================================
``x, x0``   images ``(B, C, H, W)`` in [-1, 1], C = 3 (C = 1 is repeated to 3)
``y^l``     VGG16 features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
``yhat^l``  ``y^l / (||y^l||_channels + eps)``
``w_l``     ``lin{l}.model.1.weight``: ``(1, C_l, 1, 1)``, non-negative in the
            released weights
==========  =================================================================

Weights are never downloaded. The trunk loads a torchvision ``vgg16`` state
dict (``features.N.weight`` / ``.bias``; ``classifier.*`` is ignored), the
linear layers the ``vgg.pth`` of richzhang/PerceptualSimilarity (the same
file taming-transformers fetches as ``vgg_lpips``). Both are looked up in
the given paths, then ``$DFORGE_LPIPS_VGG`` / ``$DFORGE_LPIPS_LIN``, then
the torch hub cache (torchvision's file name) and an installed ``lpips``
package; when either is absent ``load_lpips`` returns None. Files are read
as safetensors or with ``torch.load(weights_only=True)``, never as pickled code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
from pathlib import Path
from typing import Optional, Union

import torch
from einops import repeat
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import CheckpointError
from ..weights import check_state_fits

__all__ = ["LPIPS", "VGG16Features", "ScalingLayer", "NetLinLayer", "load_lpips",
           "lpips_search_paths", "VGG_ENV", "LIN_ENV"]

log = logging.getLogger(__name__)

VGG_ENV = "DFORGE_LPIPS_VGG"  # path of a torchvision vgg16 state dict
LIN_ENV = "DFORGE_LPIPS_LIN"  # path of the LPIPS linear-layer weights (lpips v0.1 vgg.pth)
VGG_HUB_FILE = "vgg16-397923af.pth"  # torchvision's vgg16 file in <torch hub>/checkpoints
LIN_PACKAGE_FILE = ("weights", "v0.1", "vgg.pth")  # inside the installed `lpips` package

# torchvision vgg16 "D" configuration: conv widths, "M" = 2x2 max-pool. The trunk
# stops after relu5_3 (features.29), so the last pool is not built.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # features.N after which relu1_2 .. relu5_3 are read
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # ScalingLayer of LPIPS: ImageNet mean in [-1, 1] units
SCALE = (0.458, 0.448, 0.450)  # ... and ImageNet std in [-1, 1] units
NORM_EPS = 1e-10  # eps of the channel normalisation (lpips.normalize_tensor)

PathLike = Union[str, os.PathLike]


class ScalingLayer(nn.Module):
    """[-1, 1] RGB -> ImageNet-normalised input of VGG: ``(x - shift) / scale``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features[:30]`` with the same module indices."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in VGG16_LAYOUT:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, 3, H, W) -> the five tapped activations, (B, C_l, H_l, W_l)."""
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    """The learned 1x1 conv ``w_l``; ``model.0`` is lpips's Dropout slot, an Identity here."""

    def __init__(self, channels: int):
        super().__init__()
        # A frozen metric never drops out; the Identity keeps the key ``model.1.weight``.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def normalize_channels(y: Tensor) -> Tensor:
    """yhat = y / (||y||_2 over channels + eps), (B, C, H, W)."""
    return y / (y.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


class LPIPS(nn.Module):
    """Perceptual distance ``d(x, x0)``: (B, C, H, W) x 2 -> (B,).

    Frozen (no parameter requires grad; gradients still flow to the images).
    It has no train-mode behaviour, so a parent's ``.train()`` changes nothing.
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for l, channels in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{l}", NetLinLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def lins(self) -> list[NetLinLayer]:
        return [getattr(self, f"lin{l}") for l in range(len(TAP_CHANNELS))]

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        """Eq. 1 of Zhang et al. 2018. x, x0: (B, C, H, W) in [-1, 1] -> (B,)."""
        if x.shape[1] not in (1, 3) or x.shape != x0.shape:
            raise ValueError(f"LPIPS needs two (B, 1 or 3, H, W) images of one shape, "
                             f"got {tuple(x.shape)} and {tuple(x0.shape)}")
        both = torch.cat([x, x0])  # (2B, C, H, W): one pass through the trunk
        if both.shape[1] == 1:
            both = repeat(both, "b 1 h w -> b 3 h w")
        taps = self.net(self.scaling_layer(both))
        d = x.new_zeros(x.shape[0])
        for y, lin in zip(taps, self.lins()):
            y, y0 = normalize_channels(y).chunk(2)
            d = d + lin((y - y0).pow(2)).mean(dim=(1, 2, 3))  # (B,): spatial average
        return d


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a tensors-only torch file; a one-line error otherwise."""
    if not path.is_file():
        raise CheckpointError(f"{path}: LPIPS weights file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable weights file ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_vgg_features(trunk: VGG16Features, path: Path) -> None:
    """Strictly load torchvision vgg16 weights (``features.*``; ``classifier.*`` dropped)."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("classifier.")}
    check_state_fits(trunk, state, path)
    trunk.load_state_dict(state)


def load_lins(model: LPIPS, path: Path) -> None:
    """Strictly load ``lin0..lin4.model.1.weight`` into the model's linear layers."""
    state = read_state_dict(path)
    lins = nn.ModuleDict({f"lin{l}": lin for l, lin in enumerate(model.lins())})
    check_state_fits(lins, state, path)
    lins.load_state_dict(state)


def lpips_search_paths(kind: str) -> list[Path]:
    """Candidate files for ``kind`` ("vgg" or "lin"): env variable, then the usual caches."""
    env = VGG_ENV if kind == "vgg" else LIN_ENV
    paths = [Path(os.environ[env])] if os.environ.get(env) else []
    if kind == "vgg":
        paths.append(Path(torch.hub.get_dir()) / "checkpoints" / VGG_HUB_FILE)
    else:
        spec = importlib.util.find_spec("lpips")  # locates the package without importing it
        if spec is not None and spec.origin is not None:
            paths.append(Path(spec.origin).parent.joinpath(*LIN_PACKAGE_FILE))
    return paths


def _resolve(given: Optional[PathLike], kind: str) -> Optional[Path]:
    if given is not None:
        return Path(given)  # an explicit path must exist: read_state_dict says so if not
    return next((p for p in lpips_search_paths(kind) if p.is_file()), None)


def load_lpips(vgg_path: Optional[PathLike] = None,
               lin_path: Optional[PathLike] = None) -> Optional[LPIPS]:
    """A frozen LPIPS from local weights, or None when the trunk or linear weights are absent.

    Explicit paths win over ``$DFORGE_LPIPS_VGG`` / ``$DFORGE_LPIPS_LIN`` and
    the caches; an explicit path that does not load is a ``CheckpointError``.
    """
    vgg, lin = _resolve(vgg_path, "vgg"), _resolve(lin_path, "lin")
    if vgg is None or lin is None:
        missing = " and ".join(n for n, p in (("VGG16 trunk", vgg), ("linear layers", lin)) if p is None)
        log.info("LPIPS unavailable: no %s weights found (set $%s / $%s)", missing, VGG_ENV, LIN_ENV)
        return None
    model = LPIPS()
    load_vgg_features(model.net, vgg)
    load_lins(model, lin)
    return model.requires_grad_(False).eval()

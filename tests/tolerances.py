"""Tolerances for comparing network outputs that hold on every CPU.

oneDNN and MKL choose other kernels (AVX-512, AVX2, SSE4.1; other blockings
and summation orders) on other CPUs, so float32 results differ in the last
bits, and the difference grows with the number of rounded operations that
feed one output and with the size of the values. A fixed ``atol`` fitted on
one machine fails on the next (issue 15: 1.3e-5 against 1e-5 on AVX2).

Two ways out, used throughout tests/:

* **float64** where exactness is the point (ours vs diffusers, converted or
  reloaded weights vs their source): ``.double()`` both models and the
  inputs (``float64_group_norm()`` lets ``GroupNorm32`` follow) and compare
  with ``assert_close_scaled``. Its tolerance then sits near 1e-13 of the
  output scale, so a wrong mapping fails even where float32 rounding would
  hide it (swapping q and k of the tiny UNet's attention moves the output by
  5e-10, far under the old 1e-5): the mapping is proved, not the tolerance
  loosened.
* **scaled float32** where float32 behaviour itself is the point (a batch of
  two vs a batch of three, an all-True mask vs none: other kernels on the
  same weights): ``assert_close_scaled`` on float32.

The tolerance (a random-walk bound: rounding errors of ``depth`` accumulated
operations add like independent signs)::

    tol = SAFETY * eps(dtype) * sqrt(depth) * scale

==========  ==============================================================
eps         machine epsilon of the compared dtype (float32 1.2e-7,
            float64 2.2e-16)
depth       rounded operations accumulated along the longest path to one
            output: the sum over layers of each reduction length (a conv
            k x k over C channels adds k*k*C); ``reduction_depth(model)``
            sums the fan-in of every weight, an upper bound
scale       magnitude of the values rounded on the way: max |expected| by
            default; pass the activation size when outputs are much smaller
SAFETY      4: the largest error seen on AVX-512, AVX2 and SSE4.1 kernels
            (float32 VAE, ours vs diffusers) was 1/25 of the bound
==========  ==============================================================

Every element must satisfy ``|actual - expected| <= tol`` (``rtol=0``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from diffusionforge.backbones.blocks import GroupNorm32

SAFETY = 4.0


def reduction_depth(*modules: torch.nn.Module) -> int:
    """Sum of the fan-in of every weight with two or more dimensions (linear, conv, attention)."""
    return sum(p[0].numel() for m in modules for p in m.parameters() if p.dim() >= 2)


def scaled_tolerance(expected: torch.Tensor, depth: int, scale: float | None = None) -> float:
    """``SAFETY * eps * sqrt(depth) * scale`` for ``expected``'s dtype (see the module docstring)."""
    if scale is None:
        scale = float(expected.detach().abs().max())
    return SAFETY * torch.finfo(expected.dtype).eps * math.sqrt(max(depth, 1)) * scale


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, *, depth: int,
                        scale: float | None = None, msg: str | None = None) -> None:
    """``assert_close`` with ``atol = scaled_tolerance(...)``, ``rtol = 0``; dtypes must agree."""
    atol = scaled_tolerance(expected, depth, scale)
    note = None if msg is None else (lambda text: f"{msg}: {text}")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=note)


@contextmanager
def float64_group_norm():
    """Let ``GroupNorm32`` run in float64 while a float64 comparison is under way.

    ``GroupNorm32`` upcasts to float32 for bf16/fp16 stability, which fails on
    float64 parameters; for float32 inputs the promotion below is the same
    operation, so the code under test is unchanged where it matters.
    """
    original = GroupNorm32.forward

    def promoted(self, x: torch.Tensor) -> torch.Tensor:
        return nn.GroupNorm.forward(self, x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)

    GroupNorm32.forward = promoted
    try:
        yield
    finally:
        GroupNorm32.forward = original

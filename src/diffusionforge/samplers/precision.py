"""Reduced-precision network arithmetic while sampling.

``autocast_denoise`` wraps a denoise callable ``(x, t, cond) -> out`` so the
network runs under ``torch.autocast`` in bfloat16 while the sampler's update
(the process algebra) stays in float32: the output is cast back to the dtype
of ``x``. On CPUs with AVX512-BF16 and on recent GPUs this roughly halves
sampling time; results differ from fp32 in the last bits, so the precision is
part of the recorded evaluation protocol.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

SamplePrecision = Literal["fp32", "bf16"]


def autocast_denoise(denoise: Callable, device_type: str,
                     dtype: torch.dtype = torch.bfloat16) -> Callable:
    """denoise under autocast(device_type, dtype); returns float outputs like x."""

    def wrapped(x, t, cond=None):
        with torch.autocast(device_type, dtype=dtype):
            out = denoise(x, t, cond)
        return out.to(x.dtype)

    return wrapped

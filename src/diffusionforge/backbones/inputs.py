"""The input contract every backbone checks: ``x``, ``t`` and the ``cond`` dict.

``check_inputs`` validates shapes against what the backbone's config uses and
returns ``(x [+ concat channels], t (B,), vector, context, mask)``. A key the
config needs must be present and a key it does not use is an error, so
conditioning is never silently ignored; messages name the key and the
expected shape.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

COND_KEYS = ("vector", "crossattn", "crossattn_mask", "concat")  # keys a backbone understands


def check_inputs(x: Tensor, t: Tensor, cond: dict[str, Tensor], *, vector_dim: Optional[int],
                 context_dim: Optional[int], concat_channels: int, backbone: str):
    """Validate ``t`` and ``cond`` for ``x: (B, C, H, W)`` (whose own shape the backbone checks).

    Returns ``(x with cond["concat"] stacked on, t (B,), vector, context, mask)``.
    """
    batch, _, height, width = x.shape
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(batch) if t.ndim == 0 else t
    if t.shape != (batch,):
        raise ValueError(f"t must have shape (B,) = ({batch},) or be a scalar, got {tuple(t.shape)}")
    unknown = set(cond) - set(COND_KEYS)
    if unknown:
        raise ValueError(f"unknown cond key(s) {sorted(unknown)}; a {backbone} understands {list(COND_KEYS)}")
    vector = take(cond, "vector", vector_dim is not None, (batch, vector_dim), "(B, vector_dim)")
    context = take(cond, "crossattn", context_dim is not None, (batch, None, context_dim), "(B, L, context_dim)")
    mask = None
    if "crossattn_mask" in cond:
        if context is None:
            raise ValueError("cond['crossattn_mask'] given without cond['crossattn']")
        mask = take(cond, "crossattn_mask", True, (batch, context.shape[1]), "(B, L)")
        if mask.dtype != torch.bool:
            raise ValueError(f"cond['crossattn_mask'] must be bool (True = may attend), got {mask.dtype}")
    concat_shape = (batch, concat_channels, height, width)
    concat = take(cond, "concat", concat_channels > 0, concat_shape, "(B, concat_channels, H, W)")
    if concat is not None:
        x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, in + concat, H, W)
    return x, t, vector, context, mask


def take(cond: dict[str, Tensor], key: str, used: bool, shape: tuple, names: str) -> Optional[Tensor]:
    """Return ``cond[key]`` checked against ``shape`` (None = any size), or None when unused.

    Raises ValueError when a used key is missing, an unused key is present,
    or the shape differs; messages name the key and the expected shape.
    """
    expected = "(" + ", ".join("L" if s is None else str(s) for s in shape) + ")"
    if not used:
        if key in cond:
            raise ValueError(f"cond[{key!r}] given but this backbone's config does not use it")
        return None
    if key not in cond:
        raise ValueError(f"cond[{key!r}] is required: expected shape {names} = {expected}")
    value = cond[key]
    ok = value.ndim == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape))
    if not ok or (shape[1] is None and value.shape[1] == 0):
        raise ValueError(f"cond[{key!r}] must have shape {names} = {expected}, got {tuple(value.shape)}")
    return value

"""The conditioning protocol: conditioners and the wrapper that merges them.

A ``Conditioner`` reads one key of the batch and returns a tensor that is
injected into the backbone in one of three ways (its ``kind``), as in the
Stability-AI ``sgm`` and gojasper ``LBM`` code:

| kind       | shape          | how the backbone uses it                       |
|------------|----------------|------------------------------------------------|
| vector     | (B, D)         | added to the time embedding / adaLN input      |
| crossattn  | (B, L, D)      | a sequence attended by cross-attention         |
| concat     | (B, C, H, W)   | channels stacked onto x_t                      |

For classifier-free guidance (Ho & Salimans 2022) each conditioner may drop
itself per sample with its own rate ``ucg_rate`` during training; how it is
dropped (a learned null class, a zero embedding, an empty caption) is the
conditioner's business, through ``unconditional``/``drop``.

Independently of dropping, a conditioner can be *forced to zero*: its output
replaced by zeros of the same shape (LBM / SGM ``ucg_keys``: the wrapper
zeroes the conditioners whose input keys are listed, e.g. to train or sample
without a source image). ``set_ucg_rate_zero`` turns every drop rate off,
as samplers of those codebases do before inference.

A ``crossattn`` conditioner may also say which of its L tokens are real (not
padding) by returning ``MaskedCond(value, mask)`` with ``mask: (B, L)`` bool,
True = may be attended.

A conditioner may read several keys (``input_keys``; the latents-concat
conditioner reads image and mask keys) and may need the model's first stage
(``needs_first_stage``: it VAE-encodes images); the wrapper hands the first
stage over at call time, as LBM passes its ``vae``, so the frozen
autoencoder is never a sub-module of the trained (and EMA-averaged) network.

``ConditionerWrapper`` runs every conditioner and concatenates outputs of the
same kind: ``vector`` and ``crossattn`` along the feature dimension
(the last), ``concat`` along channels (dim 1). When any crossattn conditioner
gives a mask, the cond dict also holds ``"crossattn_mask"`` (B, L): the
logical AND of the parts' masks (a part without a mask counts as all True),
since the parts share their L token positions.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

ConditionKind = Literal["vector", "crossattn", "concat"]
CONCAT_DIMS: dict[str, int] = {"vector": -1, "crossattn": -1, "concat": 1}
MASKED_KINDS = ("crossattn",)  # kinds whose conditioners may return a token mask

# The cond dict: kind (and "crossattn_mask") -> tensor, as the wrapper returns it; the third
# argument of backbones and samplers (which take None for an unconditional model). One definition:
# samplers.loop imports it.
Cond = dict[str, Tensor]


class MaskedCond(NamedTuple):
    """A conditioner output with a token mask."""

    value: Tensor  # (B, L, D)
    mask: Tensor  # (B, L) bool, True = the token may be attended to


class Conditioner(nn.Module):
    """One source of conditioning.

    Subclasses set ``kind`` and implement ``encode(value, drop)`` where
    ``value`` is ``batch[input_key]`` (a tensor, or any sequence of B items
    such as a list of captions) and ``drop`` is a (B,) bool tensor of the
    samples to make unconditional. ``encode`` returns a tensor, or a
    ``MaskedCond`` for ``crossattn`` conditioners with padding.
    """

    kind: ConditionKind
    needs_first_stage: bool = False  # encode() takes the first stage as its third argument

    def __init__(self, input_key: str, ucg_rate: float = 0.0):
        super().__init__()
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1], got {ucg_rate}")
        self.input_key = input_key
        self.ucg_rate = ucg_rate

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Every batch key this conditioner reads."""
        return (self.input_key,)

    def read(self, batch: dict) -> Any:
        """The input ``encode`` receives: ``batch[input_key]``."""
        if self.input_key not in batch:
            raise KeyError(f"conditioner needs batch key '{self.input_key}'")
        return batch[self.input_key]

    def encode(self, value: Any, drop: Tensor) -> Union[Tensor, MaskedCond]:
        raise NotImplementedError

    def forward(self, batch: dict, *, force_uncond: bool = False, force_zero: bool = False,
                generator: Optional[torch.Generator] = None,
                first_stage: Optional[nn.Module] = None) -> Union[Tensor, MaskedCond]:
        """The encoded input; ``force_zero`` returns zeros of its shape (mask kept)."""
        value = self.read(batch)
        batch_size, device = self._batch_size(value), self._device_for(value)
        extra = ()
        if self.needs_first_stage:
            if first_stage is None:
                raise ValueError(f"the conditioner reading {list(self.input_keys)} needs the first stage "
                                 "(pass first_stage=...)")
            extra = (first_stage,)
        if force_zero:
            out = self.encode(value, torch.zeros(batch_size, dtype=torch.bool, device=device), *extra)
            return MaskedCond(torch.zeros_like(out.value), out.mask) if isinstance(out, MaskedCond) \
                else torch.zeros_like(out)
        if force_uncond:
            drop = torch.ones(batch_size, dtype=torch.bool, device=device)
        elif self.training and self.ucg_rate > 0:
            u = torch.rand(batch_size, generator=generator, device=device)
            drop = u < self.ucg_rate
        else:
            drop = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return self.encode(value, drop, *extra)

    @staticmethod
    def _batch_size(value: Any) -> int:
        if isinstance(value, dict):  # several keys: each holds the batch
            return len(next(iter(value.values())))
        return len(value)

    def _device_for(self, value: Any) -> torch.device:
        """The device of a tensor input, else of this module's first parameter or buffer (else CPU)."""
        if isinstance(value, dict):
            value = next(iter(value.values()))
        if isinstance(value, Tensor):
            return value.device
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device


class ConditionerWrapper(nn.Module):
    """Runs conditioners and merges their outputs by kind into a cond dict."""

    def __init__(self, conditioners: list[Conditioner]):
        super().__init__()
        self.conditioners = nn.ModuleList(conditioners)

    def forward(self, batch: dict, *, force_uncond: bool = False, ucg_keys: Sequence[str] = (),
                first_stage: Optional[nn.Module] = None, keep_keys: Sequence[str] = ()) -> Cond:
        """The merged cond dict; conditioners reading a key in ``ucg_keys`` give zeros.

        ``first_stage`` goes to the conditioners that encode images with it.
        ``keep_keys``: with ``force_uncond``, the conditioners reading these keys
        still encode their input (a negative prompt replaces the empty caption).
        """
        unknown = sorted(set(ucg_keys) - set(self.input_keys))
        if unknown:
            raise ValueError(f"ucg_keys {unknown} name no conditioner input key (have {self.input_keys})")
        outputs: dict[str, list[Tensor]] = {}
        masks: dict[str, list[Optional[Tensor]]] = {}
        for conditioner in self.conditioners:
            zero = any(key in ucg_keys for key in conditioner.input_keys)
            drop = force_uncond and not any(key in keep_keys for key in conditioner.input_keys)
            out = conditioner(batch, force_uncond=drop, force_zero=zero, first_stage=first_stage)
            mask = None
            if isinstance(out, tuple):
                if conditioner.kind not in MASKED_KINDS:
                    raise ValueError(f"conditioner for '{conditioner.input_key}' returned a mask, but only "
                                     f"{list(MASKED_KINDS)} outputs may have one (it is '{conditioner.kind}')")
                out, mask = out
            outputs.setdefault(conditioner.kind, []).append(out)
            masks.setdefault(conditioner.kind, []).append(mask)
        cond = {kind: torch.cat(parts, dim=CONCAT_DIMS[kind]) for kind, parts in outputs.items()}
        for kind, parts in masks.items():
            if any(m is not None for m in parts):
                cond[f"{kind}_mask"] = _and_masks(parts, outputs[kind])
        return cond

    def set_ucg_rate_zero(self) -> None:
        """Turn every conditioner's drop rate off (before sampling)."""
        for conditioner in self.conditioners:
            conditioner.ucg_rate = 0.0

    @property
    def input_keys(self) -> list[str]:
        return [key for c in self.conditioners for key in c.input_keys]

    def __len__(self) -> int:
        return len(self.conditioners)


def _and_masks(masks: list[Optional[Tensor]], values: list[Tensor]) -> Tensor:
    """AND of the (B, L) masks of parts concatenated along features; a None mask is all True."""
    merged = torch.ones(values[0].shape[:2], dtype=torch.bool, device=values[0].device)  # (B, L)
    for mask, value in zip(masks, values):
        if mask is None:
            continue
        if mask.shape != value.shape[:2]:
            raise ValueError(f"a crossattn mask must have shape (B, L) = {tuple(value.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        merged = merged & mask.bool()
    return merged

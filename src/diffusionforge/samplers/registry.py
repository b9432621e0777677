"""``SAMPLERS``: sampler name -> ``SamplerEntry`` (the format is in the package docstring).

One entry per name of ``names.SAMPLER_NAMES``; ``GenerativeModel.sample`` and
the CLI read only this table.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Tuple

from diffusionforge.samplers.ddim import sample_ddim
from diffusionforge.samplers.ddpm import sample_ddpm
from diffusionforge.samplers.loop import SampleOutput

SamplerFn = Callable[..., SampleOutput]


class SamplerEntry(NamedTuple):
    """A registered sampler: the function and the request fields it takes as keywords."""

    fn: SamplerFn  # the one signature of the package docstring
    options: Tuple[str, ...] = ()  # SampleRequest fields passed by name (spacing, schedule, eta, ...)


SAMPLERS: Dict[str, SamplerEntry] = {
    "ddpm": SamplerEntry(sample_ddpm, ("spacing", "clip_denoised")),
    "ddim": SamplerEntry(sample_ddim, ("spacing", "eta", "clip_denoised")),
}

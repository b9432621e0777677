"""``SAMPLERS``: sampler name -> ``SamplerEntry`` (the format is in the package docstring).

One entry per name of ``names.SAMPLER_NAMES``; ``GenerativeModel.sample`` and
the CLI read only this table.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Tuple

from diffusionforge.samplers.bridge import sample_bridge
from diffusionforge.samplers.ddim import sample_ddim
from diffusionforge.samplers.ddpm import sample_ddpm
from diffusionforge.samplers.dpmpp import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, dpmpp_3m_sde
from diffusionforge.samplers.flow_euler import sample_flow_euler
from diffusionforge.samplers.k_samplers import euler, euler_ancestral, heun
from diffusionforge.samplers.loop import SampleOutput
from diffusionforge.samplers.pndm import sample_plms, sample_pndm
from diffusionforge.samplers.sigma_sampler import registry_sampler
from diffusionforge.samplers.unipc import sample_unipc

SamplerFn = Callable[..., SampleOutput]


ALL_OBJECTIVES = ("ddpm", "edm", "flow")  # processes.config.Objective: every process has a denoiser


class SamplerEntry(NamedTuple):
    """A registered sampler: the function, the request fields it takes, the processes it walks."""

    fn: SamplerFn  # the one signature of the package docstring
    options: Tuple[str, ...] = ()  # SampleRequest fields passed by name (spacing, schedule, eta, ...)
    objectives: Tuple[str, ...] = ("ddpm",)  # model.objective values whose process fn takes


SAMPLERS: Dict[str, SamplerEntry] = {  # the discrete Gaussian process's own samplers
    "ddpm": SamplerEntry(sample_ddpm, ("spacing", "clip_denoised")),
    "ddim": SamplerEntry(sample_ddim, ("spacing", "eta", "clip_denoised")),
    "pndm": SamplerEntry(sample_pndm, ("spacing", "clip_denoised")),  # at least 4 steps
    "plms": SamplerEntry(sample_plms, ("spacing", "clip_denoised")),
}

SIGMA_OPTIONS = ("schedule", "spacing", "clip_denoised")  # every sigma sampler (sigma_sampler.registry_sampler)
CHURN_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise")  # Karras et al. 2022, Algorithm 2
SAMPLERS.update({  # the sigma samplers: any process, through process.denoiser
    "euler": SamplerEntry(registry_sampler(euler), SIGMA_OPTIONS + CHURN_OPTIONS, ALL_OBJECTIVES),
    "euler_ancestral": SamplerEntry(registry_sampler(euler_ancestral), SIGMA_OPTIONS + ("s_noise",), ALL_OBJECTIVES),
    "heun": SamplerEntry(registry_sampler(heun), SIGMA_OPTIONS + CHURN_OPTIONS, ALL_OBJECTIVES),
    "dpmpp_2m": SamplerEntry(registry_sampler(dpmpp_2m, multistep=True), SIGMA_OPTIONS, ALL_OBJECTIVES),
    "dpmpp_3m": SamplerEntry(registry_sampler(dpmpp_3m, multistep=True), SIGMA_OPTIONS, ALL_OBJECTIVES),
    "dpmpp_2m_sde": SamplerEntry(registry_sampler(dpmpp_2m_sde, multistep=True), SIGMA_OPTIONS + ("s_noise",),
                                ALL_OBJECTIVES),
    "dpmpp_3m_sde": SamplerEntry(registry_sampler(dpmpp_3m_sde, multistep=True), SIGMA_OPTIONS + ("s_noise",),
                                ALL_OBJECTIVES),
    "unipc": SamplerEntry(sample_unipc, SIGMA_OPTIONS, ALL_OBJECTIVES),  # bh2, order 2
})
SAMPLERS["flow_euler"] = SamplerEntry(sample_flow_euler, ("clip_denoised",), ("flow",))  # flow time, diffusers' grid
# the LBM bridge: x_T is the (encoded) source image, not noise; its process is BridgeMatching (task=bridge)
SAMPLERS["bridge_euler"] = SamplerEntry(sample_bridge, (), ("bridge",))


def sampler_entry(name: str, objective: str = "ddpm") -> SamplerEntry:
    """The entry of sampler ``name`` for a run of ``objective``; ValueError naming the samplers that fit."""
    fitting = [n for n, entry in SAMPLERS.items() if objective in entry.objectives]
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; the samplers of objective {objective}: {', '.join(fitting)}")
    if objective not in SAMPLERS[name].objectives:
        raise ValueError(f"sampler {name} walks {'/'.join(SAMPLERS[name].objectives)} runs, not objective "
                         f"{objective}; its samplers: {', '.join(fitting)}")
    return SAMPLERS[name]

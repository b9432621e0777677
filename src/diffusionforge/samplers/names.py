"""The names of the samplers and sigma schedules (torch-free).

``dforge sample --sampler``/``--schedule`` choices and ``SampleConfig``
validation need the names without importing torch; the functions live in
``samplers.registry.SAMPLERS`` (keyed by exactly these names, a test checks).
To add a sampler: its name here, its ``SamplerEntry`` in ``registry.py``.
"""

from __future__ import annotations

from typing import Literal, get_args

SamplerName = Literal[
    "ddpm", "ddim",  # the process's own ancestral / DDIM steps (timestep spacing)
    "euler", "euler_ancestral", "heun",  # Karras et al. 2022; k-diffusion
    "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde",  # DPM-Solver++ multistep (Lu et al. 2022)
    "unipc",  # UniPC bh2 (Zhao et al. 2023)
    "pndm", "plms",  # Liu et al. 2022 (PNDM); PLMS = its linear multistep part (LDM)
    "flow_euler",  # Euler in flow time for rectified-flow processes (diffusers FlowMatchEulerDiscreteScheduler)
    "bridge_euler",  # LBM: Euler from the source image along the bridge, its noise between steps (task=bridge)
]
ScheduleName = Literal["discrete", "karras", "exponential"]

SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)

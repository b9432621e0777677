"""``OBJECTIVES``: ``model.objective`` -> the process that trains it and the config section it reads.

    ========  ====================  ==============  ===================================
    name      process               section         time the backbone sees
    ========  ====================  ==============  ===================================
    ddpm      GaussianDiffusion     model.process   integer step t in 0 .. T-1
    edm       EDMProcess            model.edm       c_noise = ln(sigma) / 4
    flow      RectifiedFlow         model.flow      t * T, t in (0, 1]
    ========  ====================  ==============  ===================================

Every process offers ``loss(net_fn, x0, cond, generator) -> LossOutput`` (the
training step) and ``denoiser(net_fn)`` (the sigma samplers' view).
"""

from __future__ import annotations

from typing import Dict, NamedTuple

from torch import nn

from diffusionforge.processes.config import Objective
from diffusionforge.processes.edm import EDMProcess
from diffusionforge.processes.flow import RectifiedFlow
from diffusionforge.processes.gaussian import GaussianDiffusion


class ObjectiveEntry(NamedTuple):
    process: type  # the nn.Module built from the section's config
    section: str  # the field of ModelConfig holding that config


OBJECTIVES: Dict[str, ObjectiveEntry] = {
    "ddpm": ObjectiveEntry(GaussianDiffusion, "process"),
    "edm": ObjectiveEntry(EDMProcess, "edm"),
    "flow": ObjectiveEntry(RectifiedFlow, "flow"),
}


def build_process(model_config, objective: Objective | None = None) -> nn.Module:
    """The process of ``model_config.objective`` (or ``objective``), built from its section."""
    entry = OBJECTIVES[objective or model_config.objective]
    return entry.process(getattr(model_config, entry.section))

"""Processes: the mathematics of diffusion, no networks.

``GaussianDiffusion`` (discrete time ``t`` in ``0 .. T-1``) owns the beta
schedule, ``q_sample``, the posterior, the eps/x0/v conversions, the VLB
terms and the training loss. ``EDMProcess`` (Karras et al. 2022) and
``RectifiedFlow`` are the other training objectives (``registry.OBJECTIVES``,
picked by ``model.objective``); ``BridgeMatching`` shares the flow's straight
path. Samplers in ``diffusionforge.samplers`` walk them.
The settings dataclasses live in the torch-free ``config.py``; every name here
is imported on first use, so ``import diffusionforge.processes.config`` does
not import torch.
"""

from diffusionforge.utils.lazy import lazy_attributes

__all__ = [
    "BETA_SCHEDULES",
    "EDMConfig",
    "EDMProcess",
    "GaussianDiffusion",
    "GaussianDiffusionConfig",
    "LossOutput",
    "OBJECTIVES",
    "PMeanVariance",
    "RectifiedFlow",
    "RectifiedFlowConfig",
    "approx_standard_normal_cdf",
    "build_process",
    "discretized_gaussian_log_likelihood",
    "make_beta_schedule",
    "mean_flat",
    "normal_kl",
    "rescale_zero_terminal_snr",
    "schedule_tables",
    "vlb_weights",
]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "BETA_SCHEDULES": ".schedules",
    "EDMConfig": ".config",
    "EDMProcess": ".edm",
    "GaussianDiffusion": ".gaussian",
    "GaussianDiffusionConfig": ".config",
    "LossOutput": ".gaussian",
    "OBJECTIVES": ".registry",
    "PMeanVariance": ".gaussian",
    "RectifiedFlow": ".flow",
    "RectifiedFlowConfig": ".config",
    "approx_standard_normal_cdf": ".vlb",
    "build_process": ".registry",
    "discretized_gaussian_log_likelihood": ".vlb",
    "make_beta_schedule": ".schedules",
    "mean_flat": ".vlb",
    "normal_kl": ".vlb",
    "rescale_zero_terminal_snr": ".schedules",
    "schedule_tables": ".schedules",
    "vlb_weights": ".schedules",
})

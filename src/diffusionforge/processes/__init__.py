"""Processes: the mathematics of diffusion, no networks.

``GaussianDiffusion`` (discrete time ``t`` in ``0 .. T-1``) owns the beta
schedule, ``q_sample``, the posterior, the eps/x0/v conversions, the VLB
terms and the training loss. Samplers in ``diffusionforge.samplers`` walk it.
The settings dataclasses live in the torch-free ``config.py``; every name here
is imported on first use, so ``import diffusionforge.processes.config`` does
not import torch.
"""

from diffusionforge.utils.lazy import lazy_attributes

__all__ = [
    "BETA_SCHEDULES",
    "GaussianDiffusion",
    "GaussianDiffusionConfig",
    "LossOutput",
    "PMeanVariance",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "make_beta_schedule",
    "mean_flat",
    "normal_kl",
    "schedule_tables",
    "vlb_weights",
]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "BETA_SCHEDULES": ".schedules",
    "GaussianDiffusion": ".gaussian",
    "GaussianDiffusionConfig": ".config",
    "LossOutput": ".gaussian",
    "PMeanVariance": ".gaussian",
    "approx_standard_normal_cdf": ".vlb",
    "discretized_gaussian_log_likelihood": ".vlb",
    "make_beta_schedule": ".schedules",
    "mean_flat": ".vlb",
    "normal_kl": ".vlb",
    "schedule_tables": ".schedules",
    "vlb_weights": ".schedules",
})

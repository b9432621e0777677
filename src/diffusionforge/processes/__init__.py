"""Processes: the mathematics of diffusion, no networks.

``GaussianDiffusion`` (discrete time ``t`` in ``0 .. T-1``) owns the beta
schedule, ``q_sample``, the posterior, the eps/x0/v conversions, the VLB
terms and the training loss. Samplers in ``diffusionforge.samplers`` walk it.
"""

from diffusionforge.processes.gaussian import (
    GaussianDiffusion,
    GaussianDiffusionConfig,
    LossOutput,
    PMeanVariance,
)
from diffusionforge.processes.schedules import BETA_SCHEDULES, make_beta_schedule, schedule_tables, vlb_weights
from diffusionforge.processes.vlb import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)

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

"""Samplers: plain functions that walk a trained process, behind one registry.

The registry (``registry.py``)
------------------------------
``SAMPLERS: dict[str, SamplerEntry]`` maps each name of ``names.SAMPLER_NAMES``
(torch-free, what the CLI and ``SampleConfig`` offer) to a ``SamplerEntry``:

    SamplerEntry(fn, options=("spacing", "schedule", ...), objectives=("ddpm",))

``fn`` has the one signature every sampler shares::

    fn(denoise, process, x_T, cond=None, *, num_steps, generator=None,
       known_mask=None, x0_known=None, callback=None, progress=True,
       return_intermediates=False, **{option: value for option in options}
    ) -> SampleOutput

    =====================  ==================================================
    denoise                DenoiseFn, the network as the process trained it:
                           (x_native (B, C, H, W), model time (B,), cond)
                           -> raw output; guidance / autocast wrap it first
    process                the run's process (GaussianDiffusion, EDM, flow)
    x_T                    (B, C, H, W) standard normal; the sampler scales it
                           to its start (``Denoiser.prior_scale``)
    cond                   Cond dict or None
    known_mask, x0_known   mask inpainting: 1 = keep x0_known there
    callback               callback(i, t, x, pred_x0) after each step
    =====================  ==================================================

``options`` names the further keywords ``fn`` takes, each the field of
``models.generative.SampleRequest`` with the same name: ``spacing``,
``schedule`` (``names.SCHEDULE_NAMES``), ``eta``, ``clip_denoised``,
``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``. ``GenerativeModel.sample``
passes exactly those, so a sampler never sees a keyword it does not take.
``objectives`` lists the ``model.objective`` values (``ddpm``, ``edm``,
``flow``: which process) ``fn`` can walk; the default is ``("ddpm",)``, the
sigma samplers take all three, and a request for another is refused with the
names that fit.

DDPM and DDIM walk ``GaussianDiffusion`` in its own discrete time; the sigma
samplers (``k_samplers.py``: Euler, Heun, DPM-Solver++, ...) walk
``process.denoiser(denoise)``, the ``Denoiser`` of ``denoiser.py``, over a
sigma schedule of ``sigmas.py``. Names are imported on first use (PEP 562,
``utils/lazy.py``), so ``samplers.names`` stays torch-free.
"""

from diffusionforge.utils.lazy import lazy_attributes

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SCHEDULE_NAMES",
    "Callback",
    "Cond",
    "DenoiseFn",
    "Denoiser",
    "SampleOutput",
    "SamplePrecision",
    "SamplerEntry",
    "Spacing",
    "StepOutput",
    "autocast_denoise",
    "classifier_free_guidance",
    "ddim_invert_step",
    "ddim_step",
    "ddpm_step",
    "invert_ddim",
    "make_timesteps",
    "sample_ddim",
    "sample_ddpm",
    "sampler_entry",
    "sampling_loop",
]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "SAMPLERS": ".registry",
    "SamplerEntry": ".registry",
    "sampler_entry": ".registry",
    "SAMPLER_NAMES": ".names",
    "SCHEDULE_NAMES": ".names",
    "Callback": ".loop",
    "Cond": ".loop",
    "DenoiseFn": ".loop",
    "SampleOutput": ".loop",
    "StepOutput": ".loop",
    "sampling_loop": ".loop",
    "Denoiser": ".denoiser",
    "SamplePrecision": ".precision",
    "autocast_denoise": ".precision",
    "Spacing": ".spacing",
    "make_timesteps": ".spacing",
    "classifier_free_guidance": ".guidance",
    "ddim_invert_step": ".ddim",
    "ddim_step": ".ddim",
    "invert_ddim": ".ddim",
    "sample_ddim": ".ddim",
    "ddpm_step": ".ddpm",
    "sample_ddpm": ".ddpm",
})

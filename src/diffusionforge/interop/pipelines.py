"""Whole pretrained pipelines: what a diffusers pipeline folder, an official DiT or a CompVis SD file holds.

``tasks/imported.py`` turns what this module reads into a run directory;
nothing here knows about runs (interop sits below ``tasks``).

===============================================  ==============================================
SRC                                              read as
===============================================  ==============================================
folder, ``model_index.json`` ``_class_name``     ``unet/`` + ``vae/`` + ``text_encoder/`` +
``StableDiffusionPipeline``                      ``tokenizer/`` (CLIP) + ``scheduler/``
folder, ``model_index.json`` ``DiTPipeline``     ``transformer/`` + ``vae/`` + ``scheduler/``; class
                                                 names from ``id2label`` (model_index or transformer)
``.pt`` / ``.pth`` with DiT keys                 an official facebookresearch/DiT checkpoint (+ ``--vae``)
``.ckpt`` / ``.safetensors`` with                a CompVis Stable Diffusion v1 checkpoint (v1 inference
``model.diffusion_model.`` keys                  config); the text encoder's tokenizer from ``--text-encoder``
===============================================  ==============================================

The scheduler's ``scheduler_config.json`` becomes the process
(``scheduler_settings``): betas (``beta_start`` / ``beta_end`` /
``beta_schedule``: linear, scaled_linear, squaredcos_cap_v2 = cosine),
``prediction_type`` (epsilon -> eps, v_prediction -> v, sample -> x0),
``steps_offset``, ``set_alpha_to_one``, ``timestep_spacing``,
``clip_sample`` and ``rescale_betas_zero_snr``; the scheduler's class picks
the run's sampler (``scheduler_sampler``). One known difference: with
``clip_sample: true`` our DDIM (``sample.clip_denoised``) re-derives eps from
the clamped x0 (improved-diffusion), diffusers' DDIMScheduler keeps the raw eps;
Stable Diffusion's schedulers do not clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

from torch import Tensor, nn

from ..errors import CheckpointError
from .files import DIFFUSERS_CONFIG_NAME, read_json

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
SD_PIPELINE, DIT_PIPELINE = "StableDiffusionPipeline", "DiTPipeline"
PIPELINE_PARTS = {SD_PIPELINE: ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
                  DIT_PIPELINE: ("transformer", "vae", "scheduler")}
COMPVIS_TEXT_PREFIX = "cond_stage_model.transformer."  # OpenAI CLIP (HF CLIPTextModel keys) in a CompVis SD file
SD_V1_TOKENS = 77

# diffusers scheduler classes whose config describes a discrete Gaussian process, and the sampler a run
# imported with one samples with by default (``sample.sampler``; ``--sampler`` picks another). Every one
# reads steps_offset from the process (and DDIM / PNDM / PLMS set_alpha_to_one), so the run walks the
# pipeline scheduler's own timesteps. Where ours has no counterpart (DDPM's and LMS's, DPM-Solver's
# non-"++" and bh1 variants) the run samples with DDIM.
KNOWN_SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                    "UniPCMultistepScheduler", "LMSDiscreteScheduler")
_SAMPLERS = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
             "HeunDiscreteScheduler": "heun"}
_DPM_SOLVERS = {("dpmsolver++", 2): "dpmpp_2m", ("dpmsolver++", 3): "dpmpp_3m",
                ("sde-dpmsolver++", 2): "dpmpp_2m_sde", ("sde-dpmsolver++", 3): "dpmpp_3m_sde"}
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SPACINGS = ("leading", "trailing", "linspace")


class SchedulerSettings(NamedTuple):
    """What a diffusers scheduler config says, as our config fields."""

    process: dict[str, Any]  # GaussianDiffusionConfig fields
    sample: dict[str, Any]  # SampleConfig fields


def scheduler_settings(config: Mapping[str, Any], source: Any = "scheduler config") -> SchedulerSettings:
    """Our process and sample fields of a diffusers ``scheduler_config.json``; one-line errors naming the key."""
    name = config.get("_class_name")
    if name not in KNOWN_SCHEDULERS:
        raise CheckpointError(f"{source}: unknown scheduler class {name!r} (known: {', '.join(sorted(KNOWN_SCHEDULERS))})")
    if config.get("trained_betas") is not None:
        raise CheckpointError(f"{source}: trained_betas (an explicit beta table) is not supported")
    schedule = config.get("beta_schedule", "linear")
    if schedule not in _BETA_SCHEDULES:
        raise CheckpointError(f"{source}: beta_schedule {schedule!r} is not one of {sorted(_BETA_SCHEDULES)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise CheckpointError(f"{source}: prediction_type {prediction!r} is not one of {sorted(_PREDICTIONS)}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in _SPACINGS:
        raise CheckpointError(f"{source}: timestep_spacing {spacing!r} is not one of {list(_SPACINGS)}")
    if config.get("thresholding", False):
        raise CheckpointError(f"{source}: thresholding (dynamic thresholding) is not supported")
    if float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: clip_sample_range {config['clip_sample_range']} is not supported (only 1.0)")
    process = dict(
        num_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_schedule=_BETA_SCHEDULES[schedule],
        linear_start=float(config.get("beta_start", 0.0001)),
        linear_end=float(config.get("beta_end", 0.02)),
        prediction_type=_PREDICTIONS[prediction],
        steps_offset=int(config.get("steps_offset", 0)),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
    )
    sample = dict(sampler="ddim", spacing=spacing,
                  clip_denoised=bool(config.get("clip_sample", name in ("DDIMScheduler", "DDPMScheduler"))))
    return SchedulerSettings(process, {**sample, **scheduler_sampler(name, config)})


def scheduler_sampler(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sample.sampler`` (and ``sample.schedule``) of our samplers that walk as scheduler class ``name``
    with ``config`` does; empty where DDIM stands in (see ``KNOWN_SCHEDULERS``)."""
    if name == "PNDMScheduler":
        return {"sampler": "plms" if config.get("skip_prk_steps", False) else "pndm"}
    if name == "DPMSolverMultistepScheduler":
        sampler = _DPM_SOLVERS.get((config.get("algorithm_type", "dpmsolver++"), int(config.get("solver_order", 2))))
    elif name == "UniPCMultistepScheduler":
        ours = (config.get("solver_type", "bh2") == "bh2" and int(config.get("solver_order", 2)) == 2
                and config.get("predict_x0", True))
        sampler = "unipc" if ours else None
    else:
        sampler = _SAMPLERS.get(name)
    if sampler is None:
        return {}
    schedule = ("karras" if config.get("use_karras_sigmas") else
                "exponential" if config.get("use_exponential_sigmas") else "discrete")
    return {"sampler": sampler, "schedule": schedule}


def sd_v1_scheduler_settings() -> SchedulerSettings:
    """Stable Diffusion v1's scheduler (CompVis ``v1-inference.yaml`` + diffusers' SD v1 scheduler config)."""
    return scheduler_settings({"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                               "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                               "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon"})


def sd_v1_text_config() -> dict[str, Any]:
    """``transformers.CLIPTextConfig`` fields of Stable Diffusion v1's text encoder (OpenAI CLIP ViT-L/14's text
    tower, 123,060,480 parameters): what ``cond_stage_model.transformer.*`` of a CompVis v1 file holds."""
    return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=SD_V1_TOKENS, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)


# ------------------------------------------------------------------ pipeline folders
def read_model_index(src: Path) -> dict[str, Any]:
    """``model_index.json`` of a pipeline folder, with its parts checked to be there."""
    data = read_json(src / MODEL_INDEX)
    name = data.get("_class_name")
    if name not in PIPELINE_PARTS:
        raise CheckpointError(f"{src / MODEL_INDEX}: unknown pipeline class {name!r} "
                              f"(known: {', '.join(sorted(PIPELINE_PARTS))})")
    for part in PIPELINE_PARTS[name]:
        if not (src / part).is_dir():
            raise CheckpointError(f"{src}: missing subfolder {part}/ of a {name}")
    return data


def read_scheduler(src: Path, stable_diffusion: bool = False) -> SchedulerSettings:
    """The scheduler of a pipeline folder. ``stable_diffusion``: as ``StableDiffusionPipeline.__init__`` fixes
    outdated configs, ``steps_offset`` becomes 1 and ``clip_sample`` False."""
    path = src / "scheduler" / SCHEDULER_CONFIG
    config = read_json(path)
    if stable_diffusion:
        config = {**config, "steps_offset": 1, "clip_sample": False}
    return scheduler_settings(config, path)


def vae_scaling_factor(vae_dir: Path) -> float:
    """The latent scale of a diffusers ``AutoencoderKL`` folder (``scaling_factor``; SD v1's 0.18215 when absent)."""
    return float(read_json(vae_dir / DIFFUSERS_CONFIG_NAME).get("scaling_factor", 0.18215))


def class_names(index: Mapping[str, Any], transformer_config: Mapping[str, Any], num_classes: int) -> Optional[list[str]]:
    """The class names of a DiT pipeline (``id2label``), one per class index; None when it has none."""
    id2label = index.get("id2label") or transformer_config.get("id2label")
    if not id2label:
        return None
    try:
        table = {int(key): str(value) for key, value in dict(id2label).items()}
    except (TypeError, ValueError):
        raise CheckpointError(f"{MODEL_INDEX}: id2label must map class indices to names") from None
    if sorted(table) != list(range(num_classes)):
        raise CheckpointError(f"{MODEL_INDEX}: id2label has {len(table)} classes, the transformer {num_classes}")
    return [table[i] for i in range(num_classes)]


def clip_text_folders(src: Path) -> tuple[Path, Path]:
    """``(text_encoder/, tokenizer/)`` of a pipeline folder, or of a folder holding both (``--text-encoder``)."""
    if (src / "text_encoder").is_dir():
        encoder, tokenizer = src / "text_encoder", src / "tokenizer"
    else:
        encoder = tokenizer = src
    if not (encoder / DIFFUSERS_CONFIG_NAME).is_file():
        raise CheckpointError(f"{encoder}: no {DIFFUSERS_CONFIG_NAME} (expected a CLIP text encoder folder)")
    config = read_json(encoder / DIFFUSERS_CONFIG_NAME)
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if config.get("model_type", "clip_text_model") != "clip_text_model" or architectures[0] != "CLIPTextModel":
        raise CheckpointError(f"{encoder}: text encoder {architectures[0]} ({config.get('model_type')}) is not a "
                              "CLIPTextModel (Stable Diffusion v1's)")
    if not any((tokenizer / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        raise CheckpointError(f"{tokenizer}: no CLIP tokenizer (vocab.json / tokenizer.json)")
    return encoder, tokenizer


def tokenizer_max_length(tokenizer: Path) -> int:
    """``model_max_length`` of a tokenizer folder (77, Stable Diffusion's, when absent)."""
    path = tokenizer / "tokenizer_config.json"
    value = read_json(path).get("model_max_length", SD_V1_TOKENS) if path.is_file() else SD_V1_TOKENS
    return int(value) if isinstance(value, int) and value < 10**6 else SD_V1_TOKENS


def compvis_text_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The CLIP text tower inside a CompVis SD checkpoint, prefix stripped (empty when it holds none)."""
    return {key[len(COMPVIS_TEXT_PREFIX):]: value for key, value in state.items() if key.startswith(COMPVIS_TEXT_PREFIX)}


def _align_text_key(key: str, expected: Mapping[str, Any]) -> str:
    """A CompVis CLIP key as ``expected`` spells it: with or without the ``text_model.`` level (transformers
    versions differ; SD v1.4+ files have it)."""
    if key in expected:
        return key
    bare = key[len("text_model."):] if key.startswith("text_model.") else key
    for candidate in (bare, "text_model." + bare):
        if candidate in expected:
            return candidate
    return key


def load_compvis_text(encoder: nn.Module, state: Mapping[str, Tensor], source: Any) -> nn.Module:
    """``encoder`` (a CLIPTextModel) with the CLIP weights of a CompVis checkpoint; position_ids may be absent."""
    expected = encoder.state_dict()
    state = {_align_text_key(k, expected): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        what = "missing" if missing else "unexpected"
        raise CheckpointError(f"{source}: {what} text encoder key {COMPVIS_TEXT_PREFIX + key!r} for the "
                              "--text-encoder config")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: text encoder key {COMPVIS_TEXT_PREFIX + key!r} has shape "
                                  f"{tuple(value.shape)}, the --text-encoder config {tuple(expected[key].shape)}")
    encoder.load_state_dict(state, strict=False)
    return encoder

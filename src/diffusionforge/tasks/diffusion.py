"""task=diffusion: Gaussian diffusion in pixel or latent space (DDPM, LDM, DiT), sampled as images.

`dforge train` builds a ``GenerativeModel`` from the shared parts
(``tasks/parts.py``) and the ``GaussianDiffusion`` process; the run exports
``model.safetensors`` (EMA), ``model_raw.safetensors`` and, in latent space,
``first_stage.safetensors``; `dforge sample` draws images from it and
`dforge evaluate` scores them (FID, KID, class accuracy).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from ..config.schema import ExperimentConfig
from ..data.config import FOLDERS
from ..errors import CheckpointError, ConfigError
from ..models.generative import GenerativeModel, SampleRequest
from ..processes.registry import build_process  # model.objective: ddpm | edm | flow
from .base import EvalOptions
from .network import NetworkTask
from .parts import check_num_classes, first_stage_network, label_conditioning, model_parts


def build_diffusion_model(config: ExperimentConfig, num_classes: Optional[int] = None,
                          sample_dir: Optional[Path] = None, autoencoder=None) -> GenerativeModel:
    """The GenerativeModel of a task=diffusion config; ``autoencoder`` overrides loading model.latent.run_dir."""
    check_num_classes(config, num_classes)
    if config.data.story is not None:
        raise ConfigError("data.story: stories are trained by task=story (set task=story)")
    ddpm = config.model.objective == "ddpm"
    learned = ddpm and config.model.process.variance_type == "learned_range"  # EDM and flow predict C channels
    return GenerativeModel(process=build_process(config.model),
                           **model_parts(config, autoencoder, sample_dir, learned_variance=learned))


def sample_request(config: ExperimentConfig, sampler: Optional[str] = None, steps: int = 50, eta: float = 0.0,
                   guidance: Optional[float] = None, use_ema: bool = True, precision: str = "fp32",
                   progress: bool = False, schedule: Optional[str] = None) -> SampleRequest:
    """How to walk the run's process: the given settings, the rest (sampler, schedule, guidance, spacing)
    from the run's ``sample`` section."""
    from ..samplers.registry import sampler_entry

    sampler = config.sample.sampler if sampler is None else sampler
    schedule = config.sample.schedule if schedule is None else schedule
    try:
        entry = sampler_entry(sampler, config.model.objective)
    except ValueError as err:
        raise ConfigError(f"--sampler: {err}") from None
    discrete = config.model.objective == "ddpm" and ("schedule" not in entry.options or schedule == "discrete")
    if discrete and steps > config.model.process.num_timesteps:
        raise ConfigError(f"--steps {steps} exceeds the process's {config.model.process.num_timesteps} timesteps")
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"--eta: must be a number >= 0, got {eta}")
    if guidance is not None and not math.isfinite(guidance):
        raise ConfigError(f"--guidance: must be a finite number, got {guidance}")
    return SampleRequest(
        sampler=sampler, steps=steps, eta=eta, spacing=config.sample.spacing, schedule=schedule,
        guidance=config.sample.guidance if guidance is None else guidance,
        guidance_channels=config.sample.guidance_channels, clip_denoised=config.sample.clip_denoised,
        use_ema=use_ema, precision=precision, progress=progress)


def class_labels(num: int, num_classes: Optional[int], class_label: Optional[int]) -> Optional[torch.Tensor]:
    """The label of each of ``num`` samples: ``class_label``, or the classes in turn (None: unconditional)."""
    if num_classes is None:
        if class_label is not None:
            raise ConfigError("--class given but the model is not class-conditional")
        return None
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ConfigError(f"--class must be in 0..{num_classes - 1}, got {class_label}")
    if class_label is not None:
        return torch.full((num,), class_label, dtype=torch.long)
    return torch.arange(num) % num_classes


MAX_LISTED = 30  # class names an unknown --class lists
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_names(config: ExperimentConfig, run_dir: Optional[Path] = None) -> Optional[tuple[str, ...]]:
    """The name of each class of the run's labels, where the run knows them (None otherwise).

    Recorded names first: ``data.class_names`` (a folder's class sub-folders, written by `dforge train`),
    then the run's ``class_names.json`` (an imported DiT's ``id2label``); else Fashion-MNIST's class names
    (``T-shirt/top`` ...), MNIST's digits, or the class sub-folders of a folder run's ``data.root`` when
    it is still there (runs trained before the names were recorded).
    """
    import json

    from ..data.embedded import CLASS_NAMES
    from ..runs import CLASS_NAMES_FILE

    recorded = getattr(config.data, "class_names", None)
    if recorded:
        return tuple(recorded)
    if run_dir is not None and (Path(run_dir) / CLASS_NAMES_FILE).is_file():
        try:
            names = json.loads((Path(run_dir) / CLASS_NAMES_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{Path(run_dir) / CLASS_NAMES_FILE}: cannot read the class names ({err})") from None
        return tuple(str(name) for name in names)
    name = config.data.name
    if name in ("fashion-mnist-embedded", "fashion-mnist"):
        return CLASS_NAMES
    if name == "mnist":
        return tuple(str(digit) for digit in range(10))
    if name == "folder" and config.data.root is not None and Path(config.data.root).is_dir():
        folders = sorted(p.name for p in Path(config.data.root).iterdir() if p.is_dir() and not p.name.startswith("."))
        return tuple(folders) or None
    return None


def class_aliases(config: ExperimentConfig, names: tuple[str, ...]) -> dict[str, int]:
    """Lower-cased names -> label: the class names (with spaces for underscores), their caption names with and
    without the article, and the digit words of MNIST."""
    from ..data.captions import FAMILY, caption_names

    aliases: dict[str, int] = {}
    spellings = [names]
    if config.data.name in FAMILY:
        captions = caption_names(config.data.name)
        spellings += [captions, tuple(c.split(" ", 1)[1] if " " in c else c for c in captions)]
    if config.data.name == "mnist":
        spellings.append(DIGITS)
    for table in spellings:
        for label, alias in enumerate(table):
            aliases.setdefault(alias.lower(), label)
    for label, name in enumerate(names):  # ImageNet's id2label: "tench, Tinca tinca" -> "tench", "tinca tinca"
        for synonym in name.split(","):
            if synonym.strip():
                aliases.setdefault(synonym.strip().lower(), label)
    for alias, label in list(aliases.items()):  # a folder's "blue_square" as its captions say it: "blue square"
        aliases.setdefault(alias.replace("_", " "), label)
    return aliases


def resolve_class(config: ExperimentConfig, value, run_dir: Optional[Path] = None) -> Optional[int]:
    """``--class``: an integer label, or a class name of the run (case-insensitive; ``class_names``);
    None stays None."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    labels = label_conditioning(config)
    num_classes = None if labels is None else labels.num_classes
    if num_classes is None:
        raise ConfigError("--class given but the model is not class-conditional")
    names = class_names(config, run_dir)
    if names is None or len(names) != num_classes:
        raise ConfigError(f"--class {text!r}: this run does not record its class names; "
                          f"give a label 0..{num_classes - 1}")
    label = class_aliases(config, names).get(text.lower())
    if label is None:
        shown = ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")
        raise ConfigError(f"--class {text!r}: unknown class; the run's classes: {shown}")
    return label


def text_key(model: GenerativeModel) -> Optional[str]:
    """The batch key of the model's text conditioner (None: not text-conditioned)."""
    from ..conditioning.text import TextConditioner

    texts = [c for c in model.net["conditioner"].conditioners if isinstance(c, TextConditioner)]
    return texts[0].input_key if texts else None


def conditioning_batches(model: GenerativeModel, num: int, class_label: Optional[int] = None,
                         prompt: Optional[str] = None, negative_prompt: Optional[str] = None
                         ) -> tuple[Optional[torch.Tensor], Callable[[int, int], tuple[dict, Optional[dict]]]]:
    """The labels of the ``num`` samples and ``batch_of(start, n)`` -> (batch, negative) for samples
    ``start .. start + n``: class labels as ``class_labels``, the caption ``prompt`` for every sample of a
    text-conditioned run (instead of captions made from class names), ``negative_prompt`` for the
    unconditional branch of guidance."""
    key = text_key(model)
    if (prompt is not None or negative_prompt is not None) and key is None:
        raise ConfigError("--prompt / --negative-prompt: this run is not text-conditioned "
                          "(no model.conditioning.text)")
    if negative_prompt is not None and prompt is None:
        raise ConfigError("--negative-prompt needs --prompt")
    labels = class_labels(num, model.num_classes, class_label)
    templated = model.labels is not None and model.labels.caption_template is not None
    if key is not None and prompt is None and not templated:
        raise ConfigError("this run is text-conditioned without captions made from class names: "
                          "give --prompt \"...\"")
    uses_labels = model.labels is not None and model.labels.class_key is not None
    if prompt is not None and not uses_labels:
        if class_label is not None:
            raise ConfigError("--class and --prompt: this run's classes are captions; give one of them")
        labels = None  # the prompt alone conditions the run

    def batch_of(start: int, n: int) -> tuple[dict, Optional[dict]]:
        batch = {} if labels is None else model.label_batch(labels[start:start + n])
        if prompt is None:
            return batch, None
        batch[key] = [prompt] * n
        return batch, (None if negative_prompt is None else {key: [negative_prompt] * n})

    return labels, batch_of


def load_image(path, channels: int, size: tuple[int, int], what: str, mode: Optional[str] = None) -> torch.Tensor:
    """The PNG/JPEG at ``path`` as (1, C, H, W) in [-1, 1]; ConfigError naming the file when it cannot be read
    or its size / channels do not fit the run (``mode``: convert to "L" first, for masks)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"{what} {path}: cannot read the image ({err.__class__.__name__})") from None
    if (image.height, image.width) != size:
        raise ConfigError(f"{what} {path}: {image.width}x{image.height} pixels, the run samples "
                          f"{size[1]}x{size[0]}")
    if mode is not None:
        image = image.convert(mode)
    else:
        bands = {"L": 1, "LA": 1, "I;16": 1, "RGB": 3, "RGBA": 3}.get(image.mode)
        if bands != channels:
            raise ConfigError(f"{what} {path}: mode {image.mode} ({bands or '?'} channels), the run samples "
                              f"{channels} channel{'s' if channels > 1 else ''} "
                              f"({'grey' if channels == 1 else 'RGB'})")
        image = image.convert("L" if channels == 1 else "RGB")
    pixels = np.asarray(image, dtype=np.float32).reshape(size[0], size[1], -1)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def check_strength(strength: Optional[float], init_image) -> None:
    """``--strength`` is a number in [0, 1] and comes with ``--init-image``."""
    if strength is not None and init_image is None:
        raise ConfigError("--strength needs --init-image")
    if strength is not None and not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ConfigError(f"--strength: must be a number in [0, 1], got {strength}")


def load_image_inputs(config: ExperimentConfig, init_image=None, mask=None, strength: Optional[float] = None
                      ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``--init-image`` (1, C, H, W) in [-1, 1] and ``--mask`` (1, 1, H, W) in [0, 1] (white = 1 = repaint) of the run's
    image size; ConfigError (one line naming the file) on a misfit."""
    check_strength(strength, init_image)
    if mask is not None and init_image is None:
        raise ConfigError("--mask needs --init-image (the image whose black region is kept)")
    if init_image is None:
        return None, None
    size = (config.data.image_size, config.data.image_size)
    image = load_image(init_image, config.data.channels, size, "--init-image")
    if mask is None:
        return image, None
    grey = load_image(mask, 1, size, "--mask", mode="L")
    return image, (grey + 1) / 2  # in [0, 1]; GenerativeModel.img2img repaints >= 0.5, as diffusers binarizes


def sample_images(model: GenerativeModel, num: int, request: SampleRequest, class_label: Optional[int] = None,
                  seed: int = 0, batch_size: int = 256, progress: bool = True, *, prompt: Optional[str] = None,
                  negative_prompt: Optional[str] = None, init_image: Optional[torch.Tensor] = None,
                  strength: Optional[float] = None, mask: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, Optional[int]]:
    """``num`` samples (num, C, H, W) in [-1, 1] and the grid's row length (one column per class when the
    classes are taken in turn).

    The noise is drawn as diffusers' pipelines draw it on the CPU: one
    ``torch.randn((num, C, h, w), generator=torch.Generator().manual_seed(seed))`` for the whole request,
    then split into batches of ``batch_size``. Samplers that draw fresh noise at each step (ddpm, DDIM
    with eta > 0, ancestral, SDE, churn) draw sample i's from its own generator (``row_generators``), so
    ``batch_size`` changes no image. ``prompt`` / ``negative_prompt``:
    captions of a text-conditioned run (``conditioning_batches``). ``init_image`` (1, C, H, W) in
    [-1, 1]: image-to-image at ``strength`` (default 0.8; with ``mask`` 1.0), the image encoded (its
    posterior sample drawn before the noise, as diffusers' img2img does) and noised to the sampler's step
    ``strength_start(steps, strength)``; ``mask`` (1, 1, H, W), 1 = repaint: inpainting
    (``GenerativeModel.img2img``).
    """
    check_strength(strength, init_image)
    if mask is not None and init_image is None:
        raise ConfigError("--mask needs --init-image (the image whose black region is kept)")
    labels, batch_of = conditioning_batches(model, num, class_label, prompt, negative_prompt)
    if negative_prompt is not None and request.guidance == 1.0:
        raise ConfigError("--negative-prompt acts through classifier-free guidance: give --guidance other than 1")
    generator = torch.Generator().manual_seed(seed)
    z_init = None
    if init_image is not None:
        strength = (1.0 if mask is not None else 0.8) if strength is None else strength
        z_init = model.encode_images(init_image, generator)
    noise = torch.randn((num, *model.latent_shape), generator=generator)  # diffusers: one draw, on the CPU
    rows = row_generators(seed, num)
    chunks = []
    for start in tqdm(range(0, num, batch_size), desc="sampling", file=sys.stderr, disable=not progress):
        n = min(batch_size, num - start)
        batch, negative = batch_of(start, n)
        if init_image is None:
            chunks.append(model.sample(batch, n, request, generator=rows[start:start + n],
                                       noise=noise[start:start + n], negative=negative))
        else:
            chunks.append(model.img2img(batch, init_image, request, strength, generator=rows[start:start + n],
                                        mask=mask, noise=noise[start:start + n], z_init=z_init, negative=negative))
    nrow = model.num_classes if labels is not None and class_label is None else None
    return torch.cat(chunks), nrow


def reference_data(config: ExperimentConfig, data: Optional[str]) -> ExperimentConfig:
    """The run's config with ``--data DIR`` as ``data.root`` (the images `dforge evaluate` scores against); a
    folder run without a folder (an imported pipeline) is a one-line error saying what to give."""
    if data is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=data))
    if config.data.name in FOLDERS and config.data.root is None:
        what = "a caption folder" if config.model.conditioning.text is not None else "a folder of images"
        raise ConfigError(f"dforge evaluate: this run records no data.root: give --data DIR, {what} to score "
                          "its samples against (FID / KID)")
    return config


def row_generators(seed: int, num: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with the first ``num`` 63-bit integers drawn from ``seed``: sample
    i's step noise depends on the seed and i only (not on the batch size, nor on the request's size)."""
    seeds = torch.randint(2**63 - 1, (num,), generator=torch.Generator().manual_seed(seed))
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def one_step_count(steps: Optional[list[int]], default: int, what: str) -> int:
    """The single step count of ``--steps`` (a Gaussian run is scored at one)."""
    if steps is not None and len(steps) > 1:
        raise ConfigError(f"--steps: a {what} run is scored at one step count, got {steps}")
    return default if steps is None else steps[0]


class DiffusionTask(NetworkTask):
    """Gaussian diffusion of images or latents, conditioned on classes, captions or maps."""

    name = "diffusion"
    commands = frozenset({"sample"})
    usage = "`dforge sample`"
    trains_from_cache = True  # latent runs: data.cache (tasks/latent_cache.py)

    def build_model(self, config: ExperimentConfig, num_classes: Optional[int] = None,
                    sample_dir: Optional[Path] = None, autoencoder=None):
        return build_diffusion_model(config, num_classes, sample_dir, autoencoder)

    def evaluate(self, run_dir: Path, config: ExperimentConfig, options: EvalOptions) -> dict:
        """FID, KID and class accuracy of ``options.num`` samples against the test split."""
        from ..evaluation import evaluate_run, metrics_record

        steps = one_step_count(options.steps, 50, "diffusion")
        request = sample_request(config, options.sampler, steps, options.eta, options.guidance,
                                 options.use_ema, options.precision, schedule=options.schedule)
        config = reference_data(config, options.data)
        model = self.load(run_dir, config, options.use_ema)
        templated = model.labels is not None and model.labels.caption_template is not None
        result, protocol = evaluate_run(model, config, request, options.num, options.seed,
                                        features=options.features, batch_size=options.batch_size,
                                        caption_key=None if templated else text_key(model))
        return metrics_record(result, protocol)

    def network(self, run_dir: Path, config: ExperimentConfig, kind: str):
        """vae: the latent run's first stage; unet / dit: the backbone with its EMA weights."""
        if kind == "vae":
            return first_stage_network(run_dir, config, kind)
        if config.model.backbone != kind:
            raise CheckpointError(f"{run_dir}: kind mismatch: this run's backbone is a {config.model.backbone} "
                                  f"(pass --kind {config.model.backbone})")
        model = self.load(run_dir, config)
        net = model.sampling_net()
        if config.model.lora.rank:  # a LoRA run converts with its adapters merged into the weights
            from ..backbones.lora import merged_backbone

            net["backbone"] = merged_backbone(net["backbone"])
        if kind == "dit":
            return label_dit_of_run(run_dir, net), "diffusion run (EMA weights)"
        net["backbone"].sample_size = model.latent_shape[-1]  # the latent (or image) side the run samples
        return net["backbone"], "diffusion run (EMA weights)"


def label_dit_of_run(run_dir: Path, net):
    """The published DiT layout (``LabelDiT``) of a class-conditional DiT run: its table joins the backbone."""
    from ..backbones.dit import LabelDiT, LabelDiTConfig
    from ..conditioning.class_label import ClassEmbedder

    backbone, conditioners = net["backbone"], list(net["conditioner"].conditioners)
    if len(conditioners) != 1 or not isinstance(conditioners[0], ClassEmbedder) or \
            conditioners[0].dim != backbone.config.hidden_size:
        raise CheckpointError(f"{run_dir}: only a DiT conditioned on class labels alone, with "
                              f"class_label.embed_dim = hidden_size, has the published DiT layout")
    fields = dataclasses.asdict(backbone.config)
    label_dit = LabelDiT(LabelDiTConfig(**fields, num_classes=conditioners[0].num_classes))
    state = dict(backbone.state_dict(), **{"y_embedder.embedding_table.weight": conditioners[0].embedding.weight})
    label_dit.load_state_dict(state)
    return label_dit.eval()

"""The experiment config: one typed dataclass tree.

YAML files and ``key.sub=value`` overrides are merged onto it by
``config.loader.load_config`` and validated before any work starts. Every
component owns the dataclass of its own settings (``UNetConfig`` beside the
UNet, ``GaussianDiffusionConfig`` beside the process, ...); this module only
composes them, from each package's torch-free ``config.py``, so loading a config
imports neither torch nor Lightning (``tests/test_startup.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..backbones.config import DiTConfig, LoRAConfig, UNetConfig
from ..conditioning.config import (ClassLabelConfig, ConcatConditionerConfig, LatentsConcatConfig,
                                   StoryConditionerConfig, TextConditionerConfig)
from ..data.config import DataConfig
from ..first_stage.config import AutoencoderConfig
from ..losses.config import AutoencoderLossConfig
from ..processes.config import BridgeMatchingConfig, EDMConfig, GaussianDiffusionConfig, Objective, RectifiedFlowConfig
from ..samplers.names import SamplerName, ScheduleName
from .trainer_values import check_trainer_values


@dataclass
class ConditioningConfig:
    class_label: Optional[ClassLabelConfig] = None   # class-conditional model (vector)
    text: Optional[TextConditionerConfig] = None     # captions: crossattn tokens, or vector (adm mode)
    concat: Optional[ConcatConditionerConfig] = None  # spatial map stacked onto x_t (concat; + text = hybrid)
    latents_concat: Optional[LatentsConcatConfig] = None  # images VAE-encoded + masks resized to the latent grid (LBM)
    story: Optional[StoryConditionerConfig] = None  # AR-LDM: caption + causal (caption, frame) history (crossattn)


@dataclass
class LatentConfig:
    """The frozen first stage of latent diffusion (model.first_stage=autoencoder)."""

    run_dir: Optional[str] = None          # a finished autoencoder run (`dforge train fashion-vae`)
    vae_dir: Optional[str] = None          # or a pretrained diffusers AutoencoderKL folder (e.g. an SD vae/); its scaling_factor is the scale
    scale_factor: Optional[float] = None   # z = scale_factor * E(x); None: the autoencoder's, else 1/std estimated on training latents
    scale_images: int = 1024               # training images used to estimate the scale (LDM uses one batch)
    sample_posterior: bool = True          # train on z ~ q(z|x) (LDM); False uses its mean


@dataclass
class FreezeConfig:
    """Which parts of the network train (``model.freeze``); frozen parameters have requires_grad False, are left out
    of the optimiser and end training bit-identical. The defaults are what every run did before this section."""

    first_stage: bool = True               # a latent run's autoencoder: always frozen (train it as a task=autoencoder run)
    text_encoder: Optional[bool] = None    # pretrained caption encoders (text, story): None = each conditioner's own `freeze` (frozen by default); false trains them (ARLDM freeze_clip=false)
    token_embeddings: bool = False         # with a frozen text encoder, its input token embeddings still train (new character tokens; ARLDM freeze_clip=true)
    backbone: bool = False                 # the whole UNet / DiT
    backbone_resnets: bool = False         # the UNet / DiT outside its attention blocks (ARLDM freeze_resnet: only attention trains)
    history_encoder: bool = False          # story: the history encoder (fusion layers, or the BLIP projection; BLIP's towers are always frozen)

    def __post_init__(self) -> None:
        if self.first_stage is not True:
            raise ValueError("model.freeze.first_stage: the first stage is always frozen; train an autoencoder as a "
                             "task=autoencoder run")


@dataclass
class ModelConfig:
    backbone: Literal["unet", "dit"] = "unet"        # which backbone config below is used
    unet: UNetConfig = field(default_factory=UNetConfig)  # in/out channels and vector_dim are derived
    dit: DiTConfig = field(default_factory=DiTConfig)     # the transformer; input size and channels derived
    objective: Objective = "ddpm"                    # what the run trains: ddpm (model.process), edm (model.edm) or flow (model.flow)
    process: GaussianDiffusionConfig = field(default_factory=GaussianDiffusionConfig)  # objective=ddpm: the discrete Gaussian process
    edm: EDMConfig = field(default_factory=EDMConfig)  # objective=edm: Karras et al. 2022 preconditioning and loss
    flow: RectifiedFlowConfig = field(default_factory=RectifiedFlowConfig)  # objective=flow: rectified flow / flow matching
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    first_stage: Literal["identity", "autoencoder"] = "identity"  # pixel space, or latent diffusion
    latent: LatentConfig = field(default_factory=LatentConfig)  # used when first_stage=autoencoder
    freeze: FreezeConfig = field(default_factory=FreezeConfig)  # which parts train (fine-tuning)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # low-rank adapters on the backbone's attention (fine-tuning)


@dataclass
class OptimConfig:
    lr: float = 2e-4                       # peak AdamW learning rate
    weight_decay: float = 0.0              # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2)
    schedule: Literal["steps", "budget"] = "steps"  # the clock of warm-up and decay: optimizer steps (to trainer.max_steps), or the fraction of the budget used, max(step/max_steps, time/max_time)
    warmup_steps: int = 200                # schedule=steps: linear warm-up from 0 to lr over this many optimizer steps
    warmup_fraction: float = 0.05          # schedule=budget: linear warm-up over this fraction of the budget
    lr_decay: Literal["none", "cosine"] = "none"  # after warm-up: constant, or cosine to min_lr_ratio*lr at the end of the run
    min_lr_ratio: float = 0.0              # floor of the cosine decay as a fraction of lr
    grad_clip: float = 1.0                 # clip the gradient norm to this (0 = off)
    ema_decay: float = 0.999               # EMA of the weights used for sampling (0 = EMA is a copy); the cap when ema_power > 0
    ema_power: float = 0.0                 # EMA warm-up: decay_k = min(ema_decay, 1 - (1 + k/ema_inv_gamma)^-ema_power) (k-diffusion); 0 = constant ema_decay
    ema_inv_gamma: float = 1.0             # EMA warm-up time scale in updates (see ema_power)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.ema_power < 0 or self.ema_inv_gamma <= 0:
            raise ValueError(f"optim.ema_power must be >= 0 and optim.ema_inv_gamma > 0, "
                             f"got {self.ema_power} and {self.ema_inv_gamma}")


@dataclass
class TrainerConfig:
    max_steps: int = 3000                  # optimizer steps to train for
    max_time: Optional[str] = None         # optional wall-clock limit of the fit "DD:HH:MM:SS"
    time_budget: Optional[str] = None      # optional wall-clock limit of the whole `dforge train` command "DD:HH:MM:SS": the fit gets what start-up and the final grid leave
    accelerator: str = "auto"              # cpu | gpu | auto (Lightning)
    devices: str = "1"                     # number of devices, a list "0,1", or "auto"
    strategy: str = "auto"                 # auto | ddp | fsdp (FSDP2: parameters, gradients, optimiser state and EMA sharded across processes) | ... (Lightning)
    activation_checkpointing: bool = False  # recompute the backbone's blocks in backward instead of keeping their activations (less memory, ~1/3 more compute)
    num_nodes: int = 1                     # nodes for multi-node DDP/FSDP
    precision: str = "32-true"             # 32-true | bf16-mixed | 16-mixed | auto (bf16 where native)
    accumulate_grad_batches: int = 1       # gradient accumulation
    log_every_n_steps: int = 50            # how often metrics go to logs/metrics.csv
    val_every_n_steps: int = 1000          # validation loss + a sample grid every N steps
    checkpoint_every_n_steps: int = 250    # checkpoints/last.ckpt is refreshed every N steps
    limit_val_batches: int = 4             # validation batches per validation run
    logger: Literal["csv", "tensorboard"] = "csv"  # csv: logs/version_N/metrics.csv; tensorboard: also TensorBoard event files beside it (pip install -e ".[tensorboard]")
    max_nonfinite_steps: int = 0           # optimizer steps with a non-finite loss or gradient skipped before the run stops (0 = stop at the first)

    def __post_init__(self) -> None:
        check_trainer_values(self)  # what Lightning's Trainer would reject, as a one-line config error


@dataclass
class SampleConfig:
    sampler: SamplerName = "ddim"          # sampler for grids and the default of `dforge sample` (samplers.names)
    steps: int = 50                        # sampling steps (ddpm: None-equivalent when = num_timesteps)
    eta: float = 0.0                       # DDIM eta (0 = deterministic)
    spacing: Literal["leading", "trailing", "linspace"] = "leading"  # timestep spacing (ddpm, ddim, the discrete schedule)
    schedule: ScheduleName = "discrete"    # sigma schedule of the sigma samplers (euler, heun, dpmpp_*): discrete | karras | exponential
    guidance: float = 2.0                  # classifier-free guidance scale (1 = off)
    guidance_channels: Optional[int] = None  # guide the first k output channels; None = all C prediction channels (DiT's published sampler: 3)
    clip_denoised: bool = True             # clip predicted x0 to [-1, 1] while sampling
    per_class: int = 8                     # samples per class in the validation grids


@dataclass
class AutoencoderTaskConfig:
    """task=autoencoder: the KL autoencoder trained with L1 (+ LPIPS) + KL + PatchGAN (LDM)."""

    network: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # in/out channels and resolution derived from data
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)  # disc_in_channels derived from data
    lpips_vgg: Optional[str] = None        # local VGG16 weights for LPIPS (else $DFORGE_LPIPS_VGG / caches)
    lpips_lin: Optional[str] = None        # local LPIPS linear-layer weights (else $DFORGE_LPIPS_LIN)


@dataclass
class BridgeTaskConfig:
    """task=bridge: Latent Bridge Matching from data.degradation's source images to the clean ones."""

    process: BridgeMatchingConfig = field(default_factory=BridgeMatchingConfig)
    source_key: str = "source"             # batch key of the source (degraded) images
    paste_key: Optional[str] = "mask"      # batch key of a hole mask (1 = fill): translations keep the source outside it
    steps: int = 1                         # Euler steps of the grids and the default of translate / evaluate
    lpips_vgg: Optional[str] = None        # local VGG16 weights for pixel_loss_type=lpips (else $DFORGE_LPIPS_VGG)
    lpips_lin: Optional[str] = None        # local LPIPS linear-layer weights (else $DFORGE_LPIPS_LIN)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"bridge.steps: must be an integer >= 1, got {self.steps!r}")


@dataclass
class StoryTaskConfig:
    """task=story: AR-LDM on data.story stories, conditioned by model.conditioning.story."""

    mode: Literal["visualisation", "continuation"] = "visualisation"  # generate every frame, or frames 1.. after a given frame 0

    def __post_init__(self) -> None:
        if self.mode not in ("visualisation", "continuation"):
            raise ValueError(f"story.mode: must be visualisation or continuation, got {self.mode!r}")


@dataclass
class ExperimentConfig:
    name: str = "fashion-ddpm"             # run name; the default run dir is runs/<name>-<time>
    task: Literal["diffusion", "autoencoder", "bridge", "story"] = "diffusion"  # what `dforge train` trains
    seed: int = 0                          # seeds data split, init and sampling
    run_dir: Optional[str] = None          # where config, checkpoints, samples and logs go
    init_from: Optional[str] = None        # fine-tune: a run directory (ours or `dforge import`ed) whose EMA weights (model.safetensors) start the network and whose first_stage.safetensors is the first stage
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder: AutoencoderTaskConfig = field(default_factory=AutoencoderTaskConfig)  # task=autoencoder
    bridge: BridgeTaskConfig = field(default_factory=BridgeTaskConfig)  # task=bridge
    story: StoryTaskConfig = field(default_factory=StoryTaskConfig)  # task=story

    def __post_init__(self) -> None:
        # rules that depend on the task (e.g. optimiser steps per batch) are the task's: tasks/base.py Task.check
        if self.optim.schedule == "budget" and self.trainer.max_time is None and self.trainer.time_budget is None:
            raise ValueError("optim.schedule=budget follows trainer.max_time or trainer.time_budget; set one "
                             "(or use optim.schedule=steps)")

"""What the package's LightningModules share: schedules, sample grids, a trained network and its EMA.

Two layers, so that each module takes only what applies to it:

==================  ==================================================================
``BaseModule``      every module (the autoencoder's too): the learning-rate schedule
                    of ``optim`` (``optim.py``), and the sample grid written after each
                    validation into ``sample_dir`` when it fits the fit's time budget
                    (``grid_fits_in_time``; ``budget.py`` reads ``estimate_grid_seconds``)
``NetworkModule``   the diffusion-family modules (Gaussian, bridge, story): the trained
                    network ``net`` (backbone + conditioner) and its EMA copy ``ema``
                    (k-diffusion's inverse-power warm-up, ``optim.ema_multi_avg_fn``),
                    the process, the frozen first stage, class labels, AdamW
==================  ==================================================================

Grid inputs come from the data side through ``grid_source``: a callable
``n -> list of dataset items`` that the code building the model sets (the
tasks give the first validation items, training items when
``data.val_size`` is 0). A module never
reads ``self.trainer.datamodule``; one whose grid needs data and has no
source skips its validation grids with a warning, and ``write_sample_grid``
without inputs raises ``NoGridSource``. Class-conditional and unconditional
grids need no data.

State-dict keys are those of the modules before this base existed
(``net.*``, ``first_stage.*``, ``ema.*``; ``autoencoder.*``, ``loss.*``), so
old runs load and old checkpoints resume.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, ClassVar, Optional

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from ..conditioning import ConditionerWrapper
from ..conditioning.labels import LabelConditioning
from ..config.schema import OptimConfig
from ..optim import ema_initial_share, ema_multi_avg_fn, lr_scheduler, trainer_progress
from ..utils.images import save_grid

__all__ = ["BaseModule", "GridSource", "NetworkModule", "NoGridSource"]

GridSource = Callable[[int], list[dict]]  # n -> up to n dataset items (dicts of tensors) for a grid
EMA_STALE_SHARE = 0.05  # warn when the EMA would end holding more of the random initial weights


class NoGridSource(RuntimeError):
    """A grid that needs dataset items was asked for, and no ``grid_source`` is set."""


class BaseModule(L.LightningModule):
    """Learning-rate schedule and sample grids; subclasses implement ``write_sample_grid``."""

    grid_prefix: ClassVar[str] = ""  # grid files: {prefix}step_0001000.png and {prefix}latest.png

    def __init__(self, optim: Optional[OptimConfig], sample_dir: Optional[Path] = None) -> None:
        super().__init__()
        self.optim_config = optim  # None: constant learning rate (the autoencoder's default)
        self.sample_dir = sample_dir  # where validation writes its grids (None: no grids)
        self.grid_source: Optional[GridSource] = None  # dataset items for grids that need data
        self.grid_seconds: Optional[float] = None  # measured cost of a grid (estimate_grid_seconds)

    # ---------------------------------------------------------------- optimiser
    def lr_schedule(self, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """``optim``'s schedule of ``optimizer`` over ``total_steps`` scheduler steps (or the budget)."""
        progress = trainer_progress(self.trainer) if self._trainer is not None else None
        return lr_scheduler(optimizer, self.optim_config, total_steps, progress)

    # -------------------------------------------------------------------- grids
    def grid_items(self, n: int) -> list[dict]:
        """Up to ``n`` dataset items from ``grid_source`` (fixed by the data's seed)."""
        if self.grid_source is None:
            raise NoGridSource(f"{type(self).__name__}.grid_source is not set: its grids show dataset "
                               "items, which the code building the model provides through it")
        items = self.grid_source(n)
        if not items:
            raise NoGridSource(f"{type(self).__name__}.grid_source gave no items")
        return items

    def write_sample_grid(self, path: Path, seed: int = 0) -> Path:
        """Write the module's grid PNG to ``path`` (and ``{grid_prefix}latest.png`` beside it)."""
        raise NotImplementedError

    def save_sample_grid(self, images: Tensor, path: Path, nrow: int) -> Path:
        """``images`` (N, C, H, W) in [-1, 1] as a grid at ``path`` and as the latest grid."""
        save_grid(images, path, nrow=nrow)
        save_grid(images, Path(path).parent / f"{self.grid_prefix}latest.png", nrow=nrow)
        return path

    def estimate_grid_seconds(self) -> Optional[float]:
        """Seconds a grid takes on this machine, or None (the budget then reserves a share)."""
        return None

    def grid_fits_in_time(self) -> bool:
        """False when a time-limited fit has less time left than a grid takes (it would overrun)."""
        if self.grid_seconds is None:
            return True
        left = [c.time_remaining() for c in self.trainer.callbacks if isinstance(c, Timer)]
        return all(r is None or r > self.grid_seconds for r in left)

    def on_validation_epoch_end(self) -> None:
        """Rank 0 writes the grid. Under FSDP (a device mesh) every rank holds only a shard of the network, so
        every rank samples in step (rank 0's time check decides for all) and the other ranks' copies are dropped."""
        sharded = self.device_mesh is not None
        if self.sample_dir is None or not (sharded or self.trainer.is_global_zero):
            return
        fits = self.grid_fits_in_time()
        if not (self.trainer.strategy.broadcast(fits) if sharded else fits):
            return
        path = Path(self.sample_dir) / f"{self.grid_prefix}step_{self.global_step:07d}.png"
        with ExitStack() as scratch:
            if not self.trainer.is_global_zero:
                path = Path(scratch.enter_context(tempfile.TemporaryDirectory())) / path.name
            try:
                self.write_sample_grid(path)
            except NoGridSource as err:
                rank_zero_warn(f"no validation grid: {err}")
        if sharded:
            from ..sharding import reshard

            reshard(self)


class NetworkModule(BaseModule):
    """A network (backbone + conditioner) trained with AdamW in a frozen first stage's space, with its EMA.

    ``net``: ``ModuleDict(backbone, conditioner)``; ``ema``: its
    ``AveragedModel`` (sampling uses it by default); ``process``: the maths
    the subclass trains and samples with.
    """

    def __init__(self, backbone: nn.Module, process: nn.Module, conditioner: ConditionerWrapper,
                 first_stage: nn.Module, latent_shape: tuple[int, int, int], optim: OptimConfig,
                 labels: Optional[LabelConditioning] = None, sample_dir: Optional[Path] = None) -> None:
        super().__init__(optim, sample_dir)
        self.net = nn.ModuleDict({"backbone": backbone, "conditioner": conditioner})
        self.process = process
        self.first_stage = first_stage.requires_grad_(False)
        self.latent_shape = tuple(latent_shape)  # (C, H, W) of what the process runs on
        self.labels = labels  # how class labels become conditioning (None: no class labels)
        self.start_step = 0  # global step at which the latest fit started (or resumed)
        self.initial_weights = "random"  # what the network starts from: random, or a run's (init_from, tasks/init.py)
        self.ema = AveragedModel(self.net, multi_avg_fn=ema_multi_avg_fn(optim), use_buffers=True)
        self.ema.requires_grad_(False)
        self.activation_checkpointing = False  # recompute the backbone's blocks in backward (trainer.*, sharding.py)
        self.checkpointed_blocks = 0  # how many blocks configure_model wrapped for that

    @property
    def num_classes(self) -> Optional[int]:
        return self.labels.num_classes if self.labels is not None else None

    def label_batch(self, labels: Tensor) -> dict:
        """(B,) class labels -> the conditioning batch for them ({} for a model without labels)."""
        return self.labels.batch(labels) if self.labels is not None else {}

    def sampling_net(self, use_ema: bool = True) -> nn.ModuleDict:
        return self.ema.module if use_ema else self.net

    # ----------------------------------------------------------------- training
    def sharded_parts(self) -> tuple[nn.Module, nn.Module]:
        """(trained network, its EMA copy): what ``trainer.strategy=fsdp`` shards, block by block."""
        return self.net, self.ema.module

    def configure_model(self) -> None:
        """Lightning's hook: activation checkpointing and FSDP sharding of the network (``sharding.py``)."""
        from ..sharding import prepare_network

        prepare_network(self, self.activation_checkpointing)

    def on_train_start(self) -> None:
        self.start_step = self.global_step
        cfg = self.optim_config
        if cfg.schedule == "budget" or cfg.ema_power > 0:
            return  # a budget has no known step count; a warmed-up EMA forgets its start by design
        remaining = self.trainer.max_steps - self.global_step
        left = ema_initial_share(cfg, remaining) if remaining > 0 else 0.0
        if left > EMA_STALE_SHARE:  # the EMA starts at the initial weights and never fully forgets them
            rank_zero_warn(f"optim.ema_decay={cfg.ema_decay}: after {remaining} steps the EMA "
                           f"weights still hold {left:.0%} of the initial ({self.initial_weights}) weights; "
                           f"lower it or warm it up (optim.ema_power)")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.net)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters of ``net`` that train: frozen ones (a pretrained text encoder, ``model.freeze``) are not
        handed to the optimiser."""
        return [p for p in self.net.parameters() if p.requires_grad]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints written when the optimiser held every parameter of ``net`` (frozen ones too: they had no
        gradient and no state) resume with the trainable parameters only."""
        states = checkpoint.get("optimizer_states") or []
        params = list(self.net.parameters())
        keep = [i for i, p in enumerate(params) if p.requires_grad]
        for state in states:
            groups = state.get("param_groups") or []
            if len(groups) != 1 or len(groups[0]["params"]) != len(params) or len(keep) == len(params):
                continue
            index = {old: new for new, old in enumerate(keep)}
            state["state"] = {index[k]: v for k, v in state["state"].items() if k in index}
            groups[0]["params"] = list(range(len(keep)))

    def configure_optimizers(self):
        cfg = self.optim_config
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                      weight_decay=cfg.weight_decay)
        total = self.trainer.max_steps if self._trainer is not None else -1
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_schedule(optimizer, total), "interval": "step"}}

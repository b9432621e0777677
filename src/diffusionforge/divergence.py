"""Stop a diverging run cleanly: a non-finite loss or gradient never reaches the weights.

``NonFiniteGuard`` looks at every loss handed to backward and, just before each
optimiser step, at the total gradient norm ``||g||_2`` of that optimiser's
parameters (one host sync per step). When either is NaN or inf the step is
skipped: every gradient is set to ``None``, so AdamW leaves the weights and
its moments alone, and the EMA that follows averages the unchanged (good)
weights. Up to ``trainer.max_nonfinite_steps`` such steps are skipped and
counted as ``train/nonfinite_skipped``; the next one raises ``TrainingError``
(exit status 3) before the step, so neither the weights in memory nor the
checkpoints written so far ever hold a non-finite value.

Under fp16 mixed precision the GradScaler owns overflowing gradients (it
skips those steps and lowers its scale), so only non-finite losses count.
Works for automatic and manual optimisation: modules with several
optimisers name the loss of each in ``loss_names`` (default ``train/loss``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch import Tensor

from .errors import ConfigError, TrainingError

DEFAULT_LOSS_NAMES = ("train/loss",)  # the training_step output of automatic optimisation


class NonFiniteGuard(L.Callback):
    def __init__(self, max_skipped: int = 0):
        if max_skipped < 0:
            raise ConfigError(f"trainer.max_nonfinite_steps must be >= 0, got {max_skipped}")
        self.max_skipped = max_skipped  # skipped steps allowed before the run stops
        self.skipped = 0  # non-finite steps skipped so far in this fit
        self.saved_step: Optional[int] = None  # global step of the newest checkpoint (or the resumed one)
        self._loss: Optional[Tensor] = None  # first non-finite loss since the last step, else the last loss
        self._loss_ok: Optional[Tensor] = None  # bool tensor: every loss since the last step was finite

    # ------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None:
            self.saved_step = trainer.global_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        if self._loss_ok is None:
            self._loss_ok, self._loss = finite, loss.detach()
        else:  # gradient accumulation: several losses per step; keep the first bad one
            self._loss = torch.where(self._loss_ok, loss.detach(), self._loss)
            self._loss_ok = self._loss_ok & finite

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss_ok, loss = self._loss_ok, self._loss
        self._loss_ok = self._loss = None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads_ok = torch.ones((), dtype=torch.bool) if scaler is not None else torch.isfinite(norm)
        ok = grads_ok.cpu() & (loss_ok.cpu() if loss_ok is not None else True)
        bad = trainer.strategy.reduce_boolean_decision(not bool(ok), all=False)  # any rank
        if bad:
            self._skip(optimizer, scaled=scaler is not None)
            if self.skipped > self.max_skipped:
                what = self._describe(trainer, pl_module, optimizer, loss_ok, loss, norm)
                raise TrainingError(self._message(trainer, what))
        if self.max_skipped > 0:
            pl_module.log("train/nonfinite_skipped", float(self.skipped))

    # ------------------------------------------------------------------ helpers
    def _skip(self, optimizer, scaled: bool) -> None:
        """Drop this step's gradients (the GradScaler skips fp16 steps by itself)."""
        self.skipped += 1
        if not scaled:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    @staticmethod
    def _describe(trainer, pl_module, optimizer, loss_ok, loss, norm) -> str:
        if loss_ok is not None and not bool(loss_ok):
            index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
            names = getattr(pl_module, "loss_names", DEFAULT_LOSS_NAMES)
            name = names[index] if index < len(names) else f"the loss of optimizer {index}"
            return f"{name} is {_value(loss)}"
        if not math.isfinite(float(norm)):
            return f"the gradient norm is {_value(norm)}"
        return "another process's loss or gradient is non-finite"

    def _message(self, trainer, what: str) -> str:
        skipped = (f" after skipping {self.skipped - 1} non-finite step(s)" if self.max_skipped else "")
        kept = (f"{_last_checkpoint_name(trainer)} (step {self.saved_step}) is kept and no weights were exported"
                if self.saved_step is not None else "no checkpoint was written and no weights were exported")
        return (f"training diverged at step {trainer.global_step}: {what}{skipped}; {kept} "
                "(lower optim.lr, or let trainer.max_nonfinite_steps skip isolated steps)")


def _last_checkpoint_name(trainer) -> str:
    """'checkpoints/last.ckpt' (the newest checkpoint of this run), or 'the last checkpoint'."""
    path = getattr(trainer.checkpoint_callback, "last_model_path", "")
    return str(Path(path).relative_to(Path(path).parents[1])) if path else "the last checkpoint"


def _value(x: Tensor) -> str:
    """'nan', 'inf' or '-inf' of the first non-finite entry of x."""
    x = x.detach().float().flatten().cpu()
    bad = x[~torch.isfinite(x)]
    return str(float(bad[0])) if bad.numel() else str(float(x[0]))


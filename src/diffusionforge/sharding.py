"""Sharded data parallelism (``trainer.strategy=fsdp``) and activation checkpointing of the backbone's blocks.

``trainer.strategy=fsdp`` is Lightning's ``ModelParallelStrategy`` used as
pure FSDP2 (``torch.distributed.fsdp.fully_shard``): data parallel over every
process of every node, tensor parallel 1. Lightning's older ``FSDPStrategy``
(FSDP1) is not used: Lightning refuses it on CPU accelerators ("The strategy
`fsdp` requires a GPU accelerator"), so it could not be tested here, and its
flat parameters mix the frozen first stage, the trained network and the EMA
copy in one unit. FSDP2 shards parameter by parameter and runs on CPU (gloo).

What ``NetworkModule.configure_model`` does through ``prepare_network``:

=========================  ==========================================================
activation checkpointing   each block of the backbone (UNet: the
(``trainer.activation_     ``TimestepEmbedSequential`` levels; DiT: ``DiTBlock``)
checkpointing``, any       wrapped by torch's non-reentrant ``checkpoint_wrapper``:
strategy)                  a block keeps only its input for backward and recomputes
                           the rest (state-dict keys are unchanged)
FSDP (``strategy=fsdp``)   rank 0's weights broadcast to every rank (as DDP does at
                           its start); ``fully_shard`` on each block of ``net`` and
                           of its EMA copy, then on the backbone and the conditioner
                           of each.
                           Parameters, gradients, AdamW state and the EMA are split
                           across the ranks (DTensors, dim 0); the frozen first stage
                           and the process's buffers stay whole on every rank
=========================  ==========================================================

Checkpoints are consolidated on rank 0 into one ``last.ckpt``
(``save_distributed_checkpoint=False``) with the optimiser state keyed by
parameter index, the format DDP and one process write: a run resumes with
any world size and either strategy. A validation grid is sampled by every
rank (each holds a shard of the EMA; rank 0 writes it), after which
``reshard`` frees the gathered EMA weights. After the fit every rank takes
part in gathering the full weights (``full_state``), which rank 0 exports.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from .backbones.dit import DiTBlock
from .backbones.unet import TimestepEmbedSequential
from .errors import ConfigError

SHARDED = "fsdp"  # the trainer.strategy value that shards
BLOCK_TYPES = (TimestepEmbedSequential, DiTBlock)  # the units of sharding and of activation checkpointing


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all processes: the data-parallel mesh dimension is the world, the tensor-parallel one is 1."""

    def __init__(self) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def make_strategy(strategy: str):
    """What ``L.Trainer(strategy=...)`` gets for ``trainer.strategy``."""
    return FullyShardedStrategy() if strategy.lower() == SHARDED else strategy


def check_shardable(trainer, model: nn.Module) -> None:
    """One line before any work when ``trainer`` (a TrainerConfig) asks for sharding or activation checkpointing
    and the task's module has no blocks for it (the autoencoder, with its two optimisers)."""
    if hasattr(model, "sharded_parts"):
        return
    for asked, what, instead in (
            (trainer.strategy.lower() == SHARDED, "trainer.strategy=fsdp", "use trainer.strategy=ddp"),
            (trainer.activation_checkpointing, "trainer.activation_checkpointing", "set it to false")):
        if asked:
            raise ConfigError(f"{what}: {type(model).__name__} (this task's module) has no backbone blocks to "
                              f"shard or recompute; {instead}")


def blocks(module: nn.Module) -> list[nn.Module]:
    """The outermost ``BLOCK_TYPES`` modules inside ``module`` (a block inside a block is not listed twice)."""
    found: list[nn.Module] = []
    for child in module.children():
        found.extend([child] if isinstance(child, BLOCK_TYPES) else blocks(child))
    return found


def checkpoint_blocks(module: nn.Module) -> int:
    """Wrap every block of ``module`` for activation checkpointing (once); the number wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    todo = {id(b) for b in blocks(module)}
    if todo:
        wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        apply_activation_checkpointing(module, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: id(m) in todo)
    return len(todo)


def broadcast_from_rank0(module: nn.Module) -> None:
    """Every rank's parameters and buffers set to rank 0's, as DDP does at its start: all ranks shard the same
    weights whatever each built."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def shard(trained: nn.Module, ema: nn.Module, mesh) -> None:
    """``fully_shard`` the blocks, then the rest, of the trained network and of its EMA copy, identically (the
    EMA update lerps shard into shard)."""
    from torch.distributed.fsdp import fully_shard

    for module in (trained, ema):
        for block in blocks(module):
            fully_shard(block, mesh=mesh)
        for root in roots(module):
            fully_shard(root, mesh=mesh)


def roots(module: nn.Module) -> list[nn.Module]:
    """``module``, or the modules inside a container without a forward of its own (``net`` is a ModuleDict of
    backbone and conditioner, which ``fully_shard`` takes one by one)."""
    if isinstance(module, (nn.ModuleDict, nn.ModuleList)):
        return [r for child in module.children() for r in roots(child)]
    return [module]


def prepare_network(module, activation_checkpointing: bool) -> None:
    """``configure_model`` of a module with ``sharded_parts() -> (trained, ema)``: activation checkpointing of
    the trained network's blocks, and FSDP when the strategy gave a device mesh. Runs once per module."""
    if getattr(module, "_network_prepared", False):
        return
    trained, ema = module.sharded_parts()
    mesh = module.device_mesh
    if mesh is not None:
        module.to(module.trainer.strategy.root_device)  # NCCL broadcasts device tensors (a no-op on CPU)
        broadcast_from_rank0(module)
    if activation_checkpointing:
        module.checkpointed_blocks = checkpoint_blocks(trained)
    if mesh is not None:
        shard(trained, ema, mesh["data_parallel"])
        unsharded = [name for name, p in module.named_parameters() if p.requires_grad and not is_sharded(p)]
        if unsharded:
            raise ConfigError(f"trainer.strategy=fsdp: trained parameters outside the sharded network: "
                              f"{', '.join(unsharded[:3])}")
    module._network_prepared = True


def reshard(module: nn.Module) -> None:
    """Free the gathered weights of every FSDP unit in ``module``. FSDP keeps a root unit's weights gathered
    after a forward without backward (sampling a grid from the EMA), and the EMA update lerps shards only."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_state(module: nn.Module) -> Optional[dict]:
    """The whole state dict of a sharded module on rank 0 (None on the others); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None

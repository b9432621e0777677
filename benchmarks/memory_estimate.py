"""Per-rank training memory of DiT-XL/2 and the Stable Diffusion v1 UNet on 8 ranks, DDP against FSDP.

Nothing is allocated: the networks are built under torch's ``FakeTensorMode``
(tensors with shapes, dtypes and a device but no storage) and one training
forward runs on them, under CPU autocast for bf16-mixed. Per rank:

=================  ==================================================================
params             P * 4 bytes (fp32 weights; bf16-mixed keeps fp32 weights and casts)
grads              P * 4
AdamW              P * 8 (exp_avg and exp_avg_sq, fp32)
EMA                P * 4 (the EMA copy ``NetworkModule.ema``)
frozen             the frozen first stage (SD's kl-f8 VAE) and, for SD, the CLIP text
                   encoder: fp32, whole on every rank under both strategies (dforge
                   shards only the trained network and its EMA, ``sharding.py``)
activations        bytes autograd saves for backward in one forward at the batch per
                   rank (``saved_tensors_hooks`` on the fake forward, measured, not
                   modelled), deduplicated by storage, parameters excluded. Under
                   bf16-mixed this includes autocast's bf16 copies of the weights that
                   backward needs (``cast weights``): P * 2 bytes on every rank, under
                   FSDP too, because Lightning's precision is autocast, not FSDP2's
                   ``MixedPrecisionPolicy``
act. ckpt          the same with ``trainer.activation_checkpointing``: what is saved
                   outside the blocks, plus every block's inputs, plus the largest
                   single block's saved tensors (recomputed one block at a time)
FSDP gather        a sharded rank gathers one block's full fp32 weights at a time, with
                   the next prefetched: 2 x the largest block (FSDP only)
=================  ==================================================================

FSDP divides params, grads, AdamW and EMA by the number of ranks; DDP keeps
all of them on each rank (DDP's gradient buckets add up to one more gradient
copy, not counted). Activations do not shrink with FSDP: they depend on the
batch per rank only. Not counted: the CUDA context, allocator fragmentation,
temporary buffers of single kernels, the data.

    python benchmarks/memory_estimate.py [--ranks 8] [--dit-batch 32] [--unet-batch 8]

Defaults: DiT-XL/2 as in facebookresearch/DiT (256 px -> 32x32x4 latents,
1000 classes, learned sigma: 8 output channels), 256 images per step over 8
ranks = 32 per rank; the SD v1 UNet (CompVis ``v1-inference.yaml``) at 512 px
-> 64x64x4 latents with 77 CLIP tokens of width 768, 8 per rank.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

GB = 1024 ** 3


@dataclass
class Network:
    name: str
    trained: nn.Module
    frozen_params: int  # parameters of the frozen first stage / text encoder
    step: Callable[[int], torch.Tensor]  # batch -> loss of one training forward on fake inputs
    note: str


@dataclass
class Activations:
    total: int  # bytes saved for backward
    cast_weights: int  # of which autocast's low-precision copies of the weights
    checkpointed: int  # with activation checkpointing of the blocks


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def frozen_sd_parts(text: bool) -> int:
    """Parameters of SD v1's kl-f8 VAE (+ its CLIP text encoder), counted on the meta device by
    ``sd_import_size.py`` (which checks them against the published counts)."""
    from sd_import_size import build_counts

    counts = build_counts()
    return counts["VAE (AutoencoderKL)"] + (counts["CLIP text encoder"] if text else 0)


def dit_xl_2() -> Network:
    from diffusionforge.backbones.config import LabelDiTConfig
    from diffusionforge.backbones.dit import LabelDiT

    net = LabelDiT(LabelDiTConfig(name="DiT-XL/2", input_size=32, in_channels=4, out_channels=8, num_classes=1000))

    def step(batch: int) -> torch.Tensor:
        x, t = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,))
        out = net(x, t, torch.randint(0, 1000, (batch,)))
        return (out[:, :4].float() - x).square().mean() + out[:, 4:].float().mean()  # eps MSE + a sigma term

    return Network("DiT-XL/2", net, frozen_sd_parts(text=False), step,
                   "32x32x4 latents, 1000 classes, learned sigma; frozen: SD kl-f8 VAE")


def sd_v1_unet() -> Network:
    from diffusionforge.backbones.unet import UNet
    from diffusionforge.interop.unet import sd_v1_unet_config

    net = UNet(sd_v1_unet_config())

    def step(batch: int) -> torch.Tensor:
        x, t = torch.randn(batch, 4, 64, 64), torch.randint(0, 1000, (batch,))
        out = net(x, t, {"crossattn": torch.randn(batch, 77, 768)})
        return (out.float() - x).square().mean()

    return Network("SD v1 UNet", net, frozen_sd_parts(text=True), step,
                   "64x64x4 latents (512 px), 77 x 768 context; frozen: kl-f8 VAE + CLIP text encoder")


def measure_activations(network: Network, batch: int, dtype: Optional[torch.dtype]) -> Activations:
    """One fake training forward: bytes saved for backward, in total, per block and outside the blocks."""
    from diffusionforge.sharding import blocks

    weights = {p.untyped_storage()._cdata: tuple(p.shape) for p in network.trained.parameters()}
    weight_shapes = {*weights.values(), *(s[::-1] for s in weights.values())}  # linear saves weight.t()
    seen: set[int] = set()
    saved = {"outside": 0, "cast": 0}
    per_block: dict[int, int] = {}
    inputs: dict[int, int] = {}
    current: list[Optional[int]] = [None]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        if key in seen or key in weights:
            return tensor
        seen.add(key)
        size = tensor.untyped_storage().nbytes()
        if dtype is not None and tensor.dtype == dtype and tuple(tensor.shape) in weight_shapes:
            saved["cast"] += size  # autocast's copy of a weight (an activation has no weight's shape here)
        if current[0] is None:
            saved["outside"] += size
        else:
            per_block[current[0]] = per_block.get(current[0], 0) + size
        return tensor

    def enter(index: int):
        def hook(module, args, kwargs):
            current[0] = index
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            inputs[index] = sum(a.untyped_storage().nbytes() for a in tensors[:1])  # x; t/context are shared
        return hook

    handles = []
    for index, block in enumerate(blocks(network.trained)):
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda *_: current.__setitem__(0, None)))
    with ExitStack() as stack:
        if dtype is not None:
            stack.enter_context(torch.autocast("cpu", dtype=dtype))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        network.step(batch)
    for handle in handles:
        handle.remove()
    total = saved["outside"] + sum(per_block.values())
    checkpointed = saved["outside"] + sum(inputs.values()) + max(per_block.values(), default=0)
    return Activations(total, saved["cast"], checkpointed)


def largest_block(network: Network) -> int:
    from diffusionforge.sharding import blocks

    return max(count(b) for b in blocks(network.trained))


def table(network: Network, ranks: int, batch: int) -> list[str]:
    params = count(network.trained)
    frozen = network.frozen_params * 4
    gather = 2 * largest_block(network) * 4
    rows = [f"### {network.name}: {params / 1e6:,.1f} M trained parameters, {network.frozen_params / 1e6:,.1f} M "
            f"frozen ({network.note}); batch {batch} per rank, {ranks} ranks", "",
            "| strategy | precision | params | grads | AdamW | EMA | frozen | FSDP gather | activations "
            "(cast weights) | total | total, act. ckpt |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for precision, dtype in (("fp32", None), ("bf16-mixed", torch.bfloat16)):
        act = measure_activations(network, batch, dtype)
        for strategy, share in (("DDP", 1), ("FSDP", ranks)):
            state = [params * 4 / share, params * 4 / share, params * 8 / share, params * 4 / share]
            extra = gather if strategy == "FSDP" else 0
            fixed = sum(state) + frozen + extra
            cells = [f"{v / GB:.2f}" for v in state]
            rows.append(f"| {strategy} | {precision} | {' | '.join(cells)} | {frozen / GB:.2f} | "
                        f"{extra / GB:.2f} | {act.total / GB:.2f} ({act.cast_weights / GB:.2f}) | "
                        f"{(fixed + act.total) / GB:.2f} | {(fixed + act.checkpointed) / GB:.2f} |")
    return rows + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--dit-batch", type=int, default=32, help="DiT-XL/2 images per rank (DiT: 256 over 8)")
    parser.add_argument("--unet-batch", type=int, default=8, help="SD UNet images per rank")
    args = parser.parse_args()
    with FakeTensorMode(allow_non_fake_inputs=False):
        torch.manual_seed(0)
        networks = [(dit_xl_2(), args.dit_batch), (sd_v1_unet(), args.unet_batch)]
        lines = [line for network, batch in networks for line in table(network, args.ranks, batch)]
    print("GiB per rank\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""A LoRA run's UNet adapters in the diffusers LoRA format (``pytorch_lora_weights.safetensors``).

``StableDiffusionPipeline.load_lora_weights(DIR)`` reads this file: peft-style
keys ``unet.<diffusers module>.lora_A.weight`` ``(r, d_in)`` and
``unet.<diffusers module>.lora_B.weight`` ``(d_out, r)``, the module named as
in ``UNet2DConditionModel`` (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``;
our LDM names are mapped by ``interop.unet``'s key renamer). It is the layout
of ``get_peft_model_state_dict(unet)`` saved by
``StableDiffusionPipeline.save_lora_weights`` in diffusers 0.42. The file
carries no alpha (diffusers then takes ``lora_alpha = r``), so the scale
``alpha / r`` is folded into ``lora_B``: the loaded pipeline computes
``W x + B' A x`` with ``B' = (alpha / r) B``, ours exactly.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ..backbones.lora import lora_layers
from ..errors import CheckpointError
from .unet import _key_renamer

DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
UNET_PREFIX = "unet"  # diffusers' StableDiffusionLoraLoaderMixin.unet_name


def unet_lora_to_diffusers(unet: nn.Module) -> dict[str, Tensor]:
    """The adapters of our LoRA UNet (``backbones.lora.add_lora``) under diffusers' LoRA keys, scale folded in."""
    layers = lora_layers(unet)
    if not layers:
        raise CheckpointError("the UNet has no LoRA adapters (a run trained with model.lora.rank > 0 has)")
    rename = _key_renamer(unet.config, to_diffusers=True)
    state = {}
    for name, (lora_a, lora_b, scale) in layers.items():
        module = rename(f"{name}.weight").removesuffix(".weight")
        state[f"{UNET_PREFIX}.{module}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
        state[f"{UNET_PREFIX}.{module}.lora_B.weight"] = (scale * lora_b.detach()).cpu().contiguous()
    return state


def save_diffusers_lora(unet: nn.Module, directory: Path) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` (atomically) from a LoRA UNet; return its path."""
    from safetensors.torch import save_file

    from ..utils.atomic import atomic_path

    path = Path(directory) / DIFFUSERS_LORA_WEIGHTS
    state = unet_lora_to_diffusers(unet)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path

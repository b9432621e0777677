"""LoRA on a backbone's attention projections, through peft (``model.lora``).

Hu et al. 2022, Eq. 3: an adapted projection computes

    h = W x + (alpha / r) B A x,     A: (r, d_in) (peft's Kaiming-uniform init),  B: (d_out, r) = 0 at the start

so a fresh adapter leaves the network unchanged. ``peft.inject_adapter_in_model``
wraps each target ``nn.Linear`` in place: its weight moves to
``<target>.base_layer.weight`` and the adapter is ``<target>.lora_A.default.weight``
/ ``lora_B.default.weight`` (so a LoRA run's ``model.safetensors`` holds both,
and ``tasks/init.py`` reads a plain run's ``<target>.weight`` into
``base_layer``). Targets (``config.LORA_TARGETS``):

=======  =======================================================================
unet     ``attn1`` / ``attn2`` of every ``BasicTransformerBlock``: ``to_q``, ``to_k``, ``to_v``,
         ``to_out.0`` (diffusers' names; the ADM ``AttentionBlock`` runs its 1x1 convs as
         functions of their weights and is not adapted)
dit      ``blocks.N.attn``: the fused ``qkv`` and ``proj``
=======  =======================================================================
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from ..errors import ConfigError
from .config import LORA_TARGETS, LoRAConfig

ADAPTER = "default"  # peft's adapter name, part of the state-dict keys
_ATTENTION = {"unet": r"attn[12]", "dit": r"attn"}  # the attention modules' names in each backbone
_MODULE_NAMES = {"to_out": "to_out.0"}  # target -> the Linear's name inside the attention module


def add_lora(backbone: nn.Module, config: LoRAConfig, kind: str) -> nn.Module:
    """``backbone`` with adapters of ``config`` on its attention projections; only they require grad."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("model.lora: needs peft (pip install 'diffusionforge[lora]')") from None
    allowed = LORA_TARGETS[kind]
    targets = list(allowed) if config.targets is None else config.targets
    wrong = [t for t in targets if t not in allowed]
    if wrong:
        raise ConfigError(f"model.lora.targets: {wrong[0]!r} is not an attention projection of the {kind} backbone "
                          f"(its projections: {', '.join(allowed)})")
    names = "|".join(re.escape(_MODULE_NAMES.get(t, t)) for t in targets)
    pattern = rf"(.*\.)?{_ATTENTION[kind]}\.({names})"
    if not any(re.fullmatch(pattern, name) for name, _ in backbone.named_modules()):
        raise ConfigError(f"model.lora: the {kind} backbone has no attention projection to adapt "
                          f"(model.{kind}: no attention blocks?)")
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.rank if config.alpha is None else config.alpha,
                             lora_dropout=config.dropout, target_modules=pattern, bias="none")
    return inject_adapter_in_model(peft_config, backbone, adapter_name=ADAPTER)


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key or parameter name is an adapter's (``...lora_A.default.weight``)."""
    return ".lora_A." in key or ".lora_B." in key


def base_key(key: str) -> str:
    """The key a plain network has for an adapted layer's own tensor (``to_q.base_layer.weight`` -> ``to_q.weight``)."""
    return key.replace(".base_layer.", ".")


def has_lora(module: nn.Module) -> bool:
    return any(is_lora_key(name) for name, _ in module.named_parameters())


def lora_layers(backbone: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{module name: (A (r, d_in), B (d_out, r), scale)}`` of every adapted projection of ``backbone``."""
    layers = {}
    for name, module in backbone.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            layers[name] = (lora_a[ADAPTER].weight, module.lora_B[ADAPTER].weight, float(module.scaling[ADAPTER]))
    return layers


def merged_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The plain network's state dict with each adapter folded in: ``W + scale B A`` under ``<target>.weight``."""
    layers = lora_layers(backbone)
    state = {base_key(k): v for k, v in backbone.state_dict().items() if not is_lora_key(k)}
    for name, (lora_a, lora_b, scale) in layers.items():
        key = f"{name}.weight"
        state[key] = state[key] + scale * (lora_b.detach().float() @ lora_a.detach().float()).to(state[key].dtype)
    return state


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A plain copy of an adapted UNet / DiT (its class built from its ``config``) with the adapters merged."""
    plain = type(backbone)(backbone.config)
    plain.load_state_dict(merged_state_dict(backbone))
    return plain.eval()

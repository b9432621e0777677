"""DiT: sizes and GMACs of the paper, adaLN-Zero identity at init, conditioning, formats."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusionforge.backbones import DIT_MODELS, DiT, DiTConfig
from diffusionforge.backbones.dit import DiTBlock, LabelDiT, LabelDiTConfig, sincos_pos_embed_2d
from diffusionforge.errors import CheckpointError, ConfigError
from diffusionforge.interop.dit import (dit_config_from_state_dict, load_diffusers_dit, load_official_dit,
                                        save_diffusers_dit)

from tolerances import assert_close_scaled, reduction_depth

# Parameters as the official train.py counts them (pos_embed and the 1001-row label table included)
# at 256x256 (32x32x4 latents), 1000 classes, learned sigma; XL/2 is the published 675,129,632.
PARAMS = {"DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632}
# Gflops of Table 4 in Peebles & Xie 2023 (fvcore, which counts a multiply-add as one).
PAPER_GMACS = {"DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64}


def expected_params(depth: int, dim: int, patch: int, in_ch: int = 4, classes: int = 1000, tokens: int = 256) -> int:
    """The count from the architecture, term by term (independent of the module code)."""
    out_ch = 2 * in_ch
    embed = in_ch * patch * patch * dim + dim  # conv patch embedding
    t_embed = 256 * dim + dim + dim * dim + dim
    block = (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim) \
        + (6 * dim * dim + 6 * dim)
    final = (2 * dim * dim + 2 * dim) + (dim * patch * patch * out_ch + patch * patch * out_ch)
    return embed + t_embed + (classes + 1) * dim + depth * block + final + tokens * dim


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_and_gmacs_match_the_paper(name):
    depth, dim, _, patch = DIT_MODELS[name]
    with torch.device("meta"):
        model = LabelDiT(LabelDiTConfig(name=name, in_channels=4, out_channels=8, input_size=32))
        count = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
        x, t, y = torch.randn(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, y)
    assert count == PARAMS[name] == expected_params(depth, dim, patch)
    gmacs = counter.get_total_flops() / 2e9
    # fvcore also counts the LayerNorms (~0.02 GMAC for XL/2); matmuls, convs and attention agree to 0.1%
    assert gmacs == pytest.approx(PAPER_GMACS[name], rel=1e-3)


def test_named_sizes_and_config_errors():
    assert DIT_MODELS["DiT-XL/2"] == (28, 1152, 16, 2) and DIT_MODELS["DiT-S/8"] == (12, 384, 6, 8)
    cfg = DiTConfig(name="DiT-B/4", input_size=32)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 768, 12, 4)
    with pytest.raises(ConfigError, match="depth=6 contradicts name DiT-B/4"):
        DiTConfig(name="DiT-B/4", depth=6)
    with pytest.raises(ConfigError, match="name 'DiT-M/2'"):
        DiTConfig(name="DiT-M/2")
    with pytest.raises(ConfigError, match="patch_size 2 does not divide the input size 7"):
        DiTConfig(input_size=7)
    with pytest.raises(ConfigError, match="num_heads 5 does not divide hidden_size 64"):
        DiTConfig(hidden_size=64, num_heads=5)


def test_sincos_pos_embed_matches_the_reference_formula():
    dim, grid = 8, 3
    emb = sincos_pos_embed_2d(dim, grid)
    omega = [1 / 10000 ** (k / 2) for k in range(2)]
    for n in range(grid * grid):
        row, col = divmod(n, grid)
        want = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega] \
            + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
        assert emb[n].tolist() == pytest.approx(want, abs=1e-6)


def small(**kw) -> DiT:
    cfg = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=3, out_channels=3, input_size=8)
    cfg.update(kw)
    return DiT(DiTConfig(**cfg))


def test_adaln_zero_makes_every_block_the_identity_at_init():
    torch.manual_seed(0)
    model = small(vector_dim=32, context_dim=16)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    context = torch.randn(2, 5, 16)
    for block in model.blocks:
        assert torch.equal(block(x, c, context), x)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]),
                {"vector": torch.randn(2, 32), "crossattn": context})
    assert torch.equal(out, torch.zeros_like(out))  # the final layer starts at zero too


def test_conditioning_reaches_the_output_once_trained_weights_are_nonzero():
    torch.manual_seed(0)
    model = small(vector_dim=12, context_dim=16, concat_channels=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    cond = {"vector": torch.randn(2, 12), "crossattn": torch.randn(2, 5, 16), "concat": torch.randn(2, 2, 8, 8)}
    base = model(x, t, cond)
    assert base.shape == (2, 3, 8, 8)
    for key in cond:
        changed = dict(cond, **{key: cond[key] + 1.0})
        assert not torch.allclose(model(x, t, changed), base), key
    masked = dict(cond, crossattn_mask=torch.tensor([[True] * 5, [True, True, False, False, False]]))
    out = model(x, t, masked)
    # an all-True mask takes another attention kernel: equal up to float32 rounding of the network's depth
    assert_close_scaled(out[0], base[0], depth=reduction_depth(model))
    assert not torch.allclose(out[1], base[1])
    with pytest.raises(ValueError, match=r"cond\['vector'\] is required"):
        model(x, t, {k: v for k, v in cond.items() if k != "vector"})
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 6, 6), t, cond)


def test_vector_of_the_hidden_width_is_added_without_a_projection():
    model = small(vector_dim=32)
    assert not hasattr(model, "vector_proj")
    assert hasattr(small(vector_dim=12), "vector_proj")


def random_label_dit(**kw) -> LabelDiT:
    torch.manual_seed(0)
    cfg = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=4, out_channels=8, input_size=8,
               num_classes=10)
    cfg.update(kw)
    model = LabelDiT(LabelDiTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def test_official_state_dict_loads_one_to_one_and_its_config_is_read_off_the_shapes():
    model = random_label_dit()
    state = model.state_dict()
    assert "y_embedder.embedding_table.weight" in state and "blocks.1.adaLN_modulation.1.weight" in state
    config = dit_config_from_state_dict(state, num_heads=2)
    assert (config.depth, config.hidden_size, config.patch_size, config.input_size, config.num_classes) == \
        (2, 32, 2, 8, 10)
    loaded = load_official_dit({"ema": state, "model": {}, "args": None}, config)  # a train.py checkpoint
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([1, 9, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    with pytest.raises(CheckpointError, match="no named DiT size"):
        dit_config_from_state_dict(state)  # depth 2 / width 32 is not S/B/L/XL: the heads are unknown
    with pytest.raises(CheckpointError, match="unexpected key 'extra'"):
        load_official_dit({**state, "extra": torch.zeros(1)}, config)


def diffusers_dit(double: bool = True):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:  # one shared embedder, as the conversion script writes it
            block.norm1.emb.load_state_dict(first.state_dict())
    return model.eval()


def test_diffusers_dit_loads_into_ours_with_equal_outputs_and_round_trips(tmp_path):
    theirs = diffusers_dit()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_diffusers_dit(tmp_path / "theirs")
    assert ours.config.timestep_freq_shift == 1 and ours.config.mlp_norm_eps == 1e-5
    x, t, y = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    depth = reduction_depth(ours)
    with torch.no_grad():  # float64: a ~1e-13 tolerance proves the mapping on every CPU (tests/tolerances.py)
        ref = theirs.double()(x, t, y).sample
        assert_close_scaled(ours.double()(x, t, y), ref, depth=depth)
    save_diffusers_dit(ours.float(), tmp_path / "back")
    again = load_diffusers_dit(tmp_path / "back")
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    from diffusers import DiTTransformer2DModel

    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert_close_scaled(reloaded.double()(x, t, y).sample, ref, depth=depth)


def test_diffusers_blocks_with_different_embedders_are_refused(tmp_path):
    theirs = diffusers_dit()
    with torch.no_grad():
        theirs.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.raises(CheckpointError, match="differs from block 0's copy"):
        load_diffusers_dit(tmp_path / "theirs")


def test_export_of_an_official_dit_warns_about_the_timestep_shift(tmp_path):
    with pytest.warns(UserWarning, match="downscale_freq_shift=1"):
        save_diffusers_dit(random_label_dit(), tmp_path / "out")
    with pytest.raises(CheckpointError, match="no cross-attention"):
        save_diffusers_dit(random_label_dit(context_dim=8), tmp_path / "out2")


def test_block_without_context_has_no_cross_attention_parameters():
    block = DiTBlock(32, 2, 4.0)
    assert not hasattr(block, "cross_attn")
    dim = 32  # qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, adaLN 6D^2+6D
    assert sum(p.numel() for p in block.parameters()) == 18 * dim * dim + 15 * dim


# ------------------------------------------------------------ in the shared GenerativeModel
PIXEL_DIT = ["model.backbone=dit", "model.dit.depth=2", "model.dit.hidden_size=32", "model.dit.num_heads=2",
             "model.dit.patch_size=4", "model.process.variance_type=learned_range",
             "model.conditioning.class_label.embed_dim=32"]


def pixel_dit_model(*extra):
    from diffusionforge.tasks import build_model
    from diffusionforge.config import load_config

    config = load_config("tiny", [*PIXEL_DIT, *extra])
    return build_model(config), config


def test_a_dit_run_derives_its_sizes_and_trains_the_hybrid_loss():
    model, config = pixel_dit_model()
    dit = model.net["backbone"]
    assert isinstance(dit, DiT)
    assert (dit.config.in_channels, dit.config.out_channels, dit.config.input_size) == (1, 2, 28)
    assert dit.config.vector_dim == 32 and not hasattr(dit, "vector_proj")  # the label table is DiT's y_embedder
    batch = {"image": torch.rand(4, 1, 28, 28) * 2 - 1, "class_label": torch.tensor([0, 1, 2, 3])}
    losses = model.diffusion_loss(batch)
    assert torch.is_tensor(losses.loss_vlb) and losses.loss_vlb.shape == (4,)
    losses.loss.backward()
    assert all(p.grad is not None for p in dit.parameters())
    with pytest.raises(ConfigError, match="model.dit: DiTConfig.patch_size 3 does not divide the input size 28"):
        pixel_dit_model("model.dit.patch_size=3")


def test_guidance_mixes_the_prediction_channels_and_keeps_the_variance_conditional():
    from diffusionforge.models.generative import SampleRequest

    model, _ = pixel_dit_model()
    assert model.guided_channels(SampleRequest(guidance=4.0)) == 1  # C = 1 of the 2C outputs
    assert model.guided_channels(SampleRequest(guidance=4.0, guidance_channels=1)) == 1
    with pytest.raises(ValueError, match="guidance_channels must be in 1..1"):
        model.guided_channels(SampleRequest(guidance=4.0, guidance_channels=3))
    fixed, _ = pixel_dit_model("model.process.variance_type=fixed_small")
    assert fixed.guided_channels(SampleRequest(guidance=4.0)) is None  # every output channel
    images = model.sample({"class_label": torch.tensor([0, 5])}, 2, SampleRequest(steps=3, guidance=4.0),
                          generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


def test_learned_variance_of_a_dit_stays_between_beta_tilde_and_beta():
    model, _ = pixel_dit_model()
    dit, process = model.net["backbone"], model.process
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.02)
        x, t = torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 50, 99])  # tiny: 100 steps
        out = dit(x, t, model.net["conditioner"]({"class_label": torch.tensor([0, 1, 2, 3])}))
        p = process.p_mean_variance(out, x, t)
    low = process.posterior_log_variance_clipped[t].view(-1, 1, 1, 1)
    high = torch.log(process.betas[t]).view(-1, 1, 1, 1)
    assert out[:, 1:].abs().max() < 1  # v in [-1, 1] for these weights
    assert bool(((p.log_variance >= low - 1e-5) & (p.log_variance <= high + 1e-5)).all())

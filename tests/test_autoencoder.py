"""The KL autoencoder and its posterior: closed forms, shapes, LDM key names, config errors."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusionforge.errors import ConfigError
from diffusionforge.first_stage.autoencoder import (
    AttnBlock,
    AutoencoderConfig,
    AutoencoderKL,
    Downsample,
    LinAttnBlock,
)
from diffusionforge.first_stage.distributions import DiagonalGaussianDistribution

from tolerances import assert_close_scaled, float64_group_norm, reduction_depth


def _params(seed: int, shape=(3, 8, 5, 6)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _tiny(**overrides) -> AutoencoderConfig:
    kw = dict(base_channels=16, norm_groups=8, channel_mult=(1, 2, 2), resolution=28)
    return AutoencoderConfig(**{**kw, **overrides})


# ------------------------------------------------------------ distribution
def test_kl_to_standard_normal_matches_torch_distributions():
    q = DiagonalGaussianDistribution(_params(0))
    expected = kl_divergence(Normal(q.mean, q.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert q.kl().shape == (3,)
    torch.testing.assert_close(q.kl(), expected)


def test_kl_between_two_gaussians_matches_torch_distributions():
    q, p = DiagonalGaussianDistribution(_params(1)), DiagonalGaussianDistribution(_params(2))
    expected = kl_divergence(Normal(q.mean, q.std), Normal(p.mean, p.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.kl(p), expected)
    torch.testing.assert_close(q.kl(q), torch.zeros(3, dtype=torch.float64))


def test_nll_is_the_gaussian_negative_log_density():
    q = DiagonalGaussianDistribution(_params(3))
    z = _params(4, q.mean.shape)
    direct = 0.5 * (math.log(2 * math.pi) + q.logvar + (z - q.mean) ** 2 / q.var).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.nll(z), direct)
    torch.testing.assert_close(q.nll(z), -Normal(q.mean, q.std).log_prob(z).sum(dim=(1, 2, 3)))
    assert q.nll(z, dims=(1,)).shape == (3, 5, 6)


def test_mode_std_var_and_logvar_clamp():
    params = _params(5)
    params[:, 4:, 0, 0] = 100.0
    params[:, 4:, 0, 1] = -100.0
    q = DiagonalGaussianDistribution(params)
    assert torch.equal(q.mode(), params[:, :4])
    assert (q.logvar[:, :, 0, 0] == 20.0).all() and (q.logvar[:, :, 0, 1] == -30.0).all()
    torch.testing.assert_close(q.std**2, q.var)
    torch.testing.assert_close(q.var, q.logvar.exp())


def test_sample_is_reparameterised_and_deterministic_with_a_generator():
    q = DiagonalGaussianDistribution(_params(6))
    a = q.sample(torch.Generator().manual_seed(7))
    b = q.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, q.mean + q.std * eps)
    assert not torch.equal(a, q.sample(torch.Generator().manual_seed(8)))


def test_deterministic_posterior_is_a_point_mass():
    q = DiagonalGaussianDistribution(_params(9), deterministic=True)
    assert torch.equal(q.sample(), q.mean)
    assert torch.equal(q.kl(), torch.zeros(3, dtype=torch.float64))


def test_odd_parameter_channels_are_rejected():
    with pytest.raises(ValueError, match=r"\(B, 2C"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


# ---------------------------------------------------------------- network
@pytest.mark.parametrize(
    "overrides, size, latent",
    [
        (dict(), 28, 7),  # f = 4: 28 -> 14 -> 7 -> 14 -> 28
        (dict(channel_mult=(1, 2, 2, 2), resolution=32, attn_resolutions=(8, 4)), 32, 4),
        (dict(attn_type="linear", attn_resolutions=(14,)), 28, 7),
        (dict(attn_type="none", in_channels=3, out_channels=2, embed_dim=3, z_channels=5), 28, 7),
    ],
)
def test_shapes(overrides, size, latent):
    torch.manual_seed(0)
    c = _tiny(**overrides)
    model = AutoencoderKL(c).eval()
    x = torch.rand(2, c.in_channels, size, size) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        rec, post = model(x, generator=torch.Generator().manual_seed(0))
        rec_mode, _ = model(x, sample_posterior=False)
    assert posterior.mean.shape == posterior.logvar.shape == (2, c.embed_dim, latent, latent)
    assert rec.shape == (2, c.out_channels, size, size)
    assert post.kl().shape == (2,)
    torch.testing.assert_close(rec_mode, model.decode(posterior.mode()))
    assert model.downsample_factor == size // latent


def test_forward_sample_follows_the_generator():
    torch.manual_seed(0)
    model = AutoencoderKL(_tiny()).eval()
    x = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        a, _ = model(x, generator=torch.Generator().manual_seed(3))
        b, _ = model(x, generator=torch.Generator().manual_seed(3))
        c, _ = model(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_state_dict_uses_compvis_names():
    c = _tiny(attn_resolutions=(7,))
    sd = AutoencoderKL(c).state_dict()
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.attn.0.q.weight",
        "encoder.mid.block_1.conv2.bias",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight",
        "decoder.up.2.block.1.conv1.weight",
        "decoder.up.2.attn.1.v.weight",
        "decoder.up.2.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.conv_out.bias",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in sd, key
    assert "encoder.down.2.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert len([k for k in sd if k.startswith("decoder.up.1.block.") and k.endswith("conv1.weight")]) == 2
    assert sd["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1) and sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    linear = AutoencoderKL(_tiny(attn_type="linear")).state_dict()
    assert linear["encoder.mid.attn_1.to_qkv.weight"].shape == (96, 32, 1, 1)
    assert "encoder.mid.attn_1.to_qkv.bias" not in linear and "decoder.mid.attn_1.to_out.bias" in linear
    assert not any(".attn_1." in k for k in AutoencoderKL(_tiny(attn_type="none")).state_dict())


def test_get_last_layer_is_the_decoder_output_weight():
    model = AutoencoderKL(_tiny())
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_attention_matches_the_ldm_formula():
    torch.manual_seed(0)
    block = AttnBlock(16, norm_groups=4).eval().double()  # float64: see tests/tolerances.py
    x = torch.randn(2, 16, 3, 5).double()
    with torch.no_grad(), float64_group_norm():
        h = block.norm(x)
        q, k, v = (p(h).flatten(2) for p in (block.q, block.k, block.v))  # (B, C, N)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(16), dim=-1)  # (B, N_q, N_k)
        out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 16, 3, 5)
        assert_close_scaled(block(x), x + block.proj_out(out), depth=reduction_depth(block) + 15)


def test_linear_attention_matches_its_formula():
    torch.manual_seed(0)
    block = LinAttnBlock(8).double()  # float64: see tests/tolerances.py
    x = torch.randn(2, 8, 3, 4).double()
    q, k, v = block.to_qkv(x).flatten(2).chunk(3, dim=1)  # (B, C, N) each
    out = v @ k.softmax(dim=-1).transpose(1, 2) @ q  # (B, C, N)
    assert_close_scaled(block(x), block.to_out(out.reshape(2, 8, 3, 4)), depth=reduction_depth(block) + 2 * 12)


def test_downsample_pads_right_and_bottom():
    torch.manual_seed(0)
    down = Downsample(4)
    x = torch.randn(1, 4, 7, 7)
    padded = torch.zeros(1, 4, 8, 8)
    padded[..., :7, :7] = x
    expected = torch.nn.functional.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), expected)
    assert down(torch.randn(1, 4, 28, 28)).shape == (1, 4, 14, 14)


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("channel_mult", dict(channel_mult=())),
        ("channel_mult", dict(channel_mult=(1, 0))),
        ("base_channels", dict(base_channels=0)),
        ("resolution", dict(resolution=30)),
        ("attn_resolutions", dict(attn_resolutions=(4,))),
        ("norm_groups", dict(norm_groups=12)),
        ("attn_type", dict(attn_type="softmax")),
        ("dropout", dict(dropout=1.0)),
        ("scaling_factor", dict(scaling_factor=0.0)),
        ("embed_dim", dict(embed_dim=0)),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_field(field, overrides):
    with pytest.raises(ConfigError, match=rf"^AutoencoderConfig\.{field} ") as err:
        _tiny(**overrides)
    assert "\n" not in str(err.value)


def test_autoencoder_kl_needs_double_z():
    with pytest.raises(ConfigError, match=r"^AutoencoderConfig\.double_z "):
        AutoencoderKL(_tiny(double_z=False))


@pytest.mark.parametrize("shape", [(1, 1, 30, 28), (1, 3, 28, 28), (1, 28, 28)])
def test_encode_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="divisible by f=4"):
        AutoencoderKL(_tiny()).encode(torch.zeros(shape))


def test_decode_rejects_wrong_latent_channels():
    with pytest.raises(ValueError, match="embed_dim=4"):
        AutoencoderKL(_tiny()).decode(torch.zeros(1, 3, 7, 7))

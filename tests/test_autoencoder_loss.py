"""LDM autoencoder objective: PatchGAN, d-losses, NLL/KL/adaptive weight, and the Lightning module."""

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from diffusionforge.errors import ConfigError
from diffusionforge.first_stage.autoencoder import AutoencoderConfig, AutoencoderKL
from diffusionforge.losses import (AutoencoderLossConfig, LPIPSWithDiscriminator, NLayerDiscriminator,
                                   adopt_weight, hinge_d_loss, vanilla_d_loss)
from diffusionforge.models.autoencoder_module import AutoencoderModule


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyDecoder(nn.Module):
    """Stands in for an autoencoder's decoder: z -> xhat, with a last layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, z):
        return self.conv_out(torch.tanh(self.body(z)))

    def get_last_layer(self):
        return self.conv_out.weight


class FixedPosterior:
    def __init__(self, kl):
        self._kl = kl

    def kl(self):
        return self._kl


class HalfL1Perceptual(nn.Module):
    """An LPIPS stand-in with a parameter: d(x, x0) = 0.5 * mean |x - x0| per sample."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5), requires_grad=False)

    def forward(self, x, x0):
        return self.w * (x - x0).abs().mean(dim=(1, 2, 3))


def make_loss(lpips=None, **overrides) -> LPIPSWithDiscriminator:
    settings = dict(disc_start=0, perceptual_weight=0.0, disc_in_channels=1, disc_ndf=8,
                    disc_num_layers=2)
    settings.update(overrides)
    torch.manual_seed(0)
    return LPIPSWithDiscriminator(AutoencoderLossConfig(**settings), lpips)


def batch(seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, size, size, generator=g) * 2 - 1, torch.randn(2, 1, size, size, generator=g)


# ------------------------------------------------------------- discriminator
def test_hinge_and_vanilla_d_loss_hand_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 1.5]: 0.5 * (2.5/3 + 2.5/3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(5 / 6)
    assert vanilla_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(math.log(2))
    expected = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0)))
    assert vanilla_d_loss(torch.tensor([1.0]), torch.tensor([2.0])).item() == pytest.approx(expected)


def test_adopt_weight_switches_on_at_threshold():
    assert adopt_weight(0.7, global_step=9, threshold=10) == 0.0
    assert adopt_weight(0.7, global_step=10, threshold=10) == 0.7
    assert adopt_weight(0.7, global_step=3, threshold=10, value=0.1) == 0.1
    assert adopt_weight(0.7, global_step=0) == 0.7


@pytest.mark.parametrize("size, n_layers, out", [(28, 3, 1), (28, 2, 5), (32, 3, 2), (32, 2, 6)])
def test_patchgan_output_shape(size, n_layers, out):
    d = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=n_layers)
    assert d(torch.zeros(2, 1, size, size)).shape == (2, 1, out, out)


def test_patchgan_layout_and_init_statistics():
    torch.manual_seed(0)
    d = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3)
    convs, norms = [0, 2, 5, 8, 11], [3, 6, 9]  # taming's main.N indices
    expected = {f"main.{i}.weight" for i in convs} | {"main.0.bias", "main.11.bias"}
    for i in norms:
        expected |= {f"main.{i}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                "num_batches_tracked")}
    assert set(d.state_dict()) == expected
    assert [d.main[i].weight.shape[0] for i in convs] == [64, 128, 256, 512, 1]
    assert [d.main[i].stride for i in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    w = d.main[8].weight  # 2M entries
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.01)
    gamma = torch.cat([d.main[i].weight for i in norms])
    assert gamma.mean().item() == pytest.approx(1.0, abs=0.01) and gamma.std().item() == pytest.approx(0.02, rel=0.15)
    assert all((d.main[i].bias == 0).all() for i in norms)


# ------------------------------------------------------------------ the loss
def test_nll_with_logvar_zero_is_l1_sum_over_batch_and_logvar_rescales():
    x, x_hat = batch()
    kl = FixedPosterior(torch.zeros(2))
    out = make_loss(disc_factor=0.0).generator_loss(x, x_hat, kl, global_step=0)
    l1_sum = (x - x_hat).abs().sum() / 2
    torch.testing.assert_close(out.nll, l1_sum)
    torch.testing.assert_close(out.loss, l1_sum)
    s = math.log(2.0)
    out = make_loss(disc_factor=0.0, logvar_init=s).generator_loss(x, x_hat, kl, global_step=0)
    torch.testing.assert_close(out.nll, l1_sum / 2 + s * x[0].numel())


def test_kl_term_is_batch_mean_times_kl_weight():
    x, x_hat = batch()
    posterior = FixedPosterior(torch.tensor([3.0, 5.0]))
    without = make_loss(disc_factor=0.0, kl_weight=0.0).generator_loss(x, x_hat, posterior, 0)
    weighted = make_loss(disc_factor=0.0, kl_weight=0.1).generator_loss(x, x_hat, posterior, 0)
    assert weighted.kl.item() == pytest.approx(4.0)
    assert (weighted.loss - without.loss).item() == pytest.approx(0.4, abs=1e-4)


def test_perceptual_term_is_added_per_sample_and_left_out_of_the_state_dict():
    x, x_hat = batch()
    loss = make_loss(HalfL1Perceptual(), perceptual_weight=2.0, pixel_weight=3.0)
    per_sample = 0.5 * (x - x_hat).abs().mean(dim=(1, 2, 3)).view(2, 1, 1, 1)
    torch.testing.assert_close(loss.reconstruction_loss(x, x_hat), 3 * (x - x_hat).abs() + 2 * per_sample)
    state = loss.state_dict()
    assert "logvar" in state and not any(k.startswith("perceptual") for k in state)
    loss.load_state_dict(state)  # strict, with LPIPS present
    make_loss().load_state_dict(state)  # and without
    assert loss.perceptual.w.item() == 0.5


def test_adaptive_weight_is_the_gradient_norm_ratio():
    loss = make_loss(disc_weight=0.7, disc_factor=0.9)
    decoder = TinyDecoder()
    x, z = batch(1)
    x_hat = decoder(z)
    out = loss.generator_loss(x, x_hat, FixedPosterior(torch.zeros(2)), 5, decoder.get_last_layer())
    last = decoder.get_last_layer()
    nll = (x - x_hat).abs().sum() / 2  # logvar = 0, no perceptual term
    g = -loss.discriminator(x_hat).mean()
    (grad_nll,) = torch.autograd.grad(nll, last, retain_graph=True)
    (grad_g,) = torch.autograd.grad(g, last, retain_graph=True)
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4) * 0.7
    torch.testing.assert_close(out.d_weight, expected)
    torch.testing.assert_close(out.loss, nll + expected * 0.9 * g)
    assert out.disc_factor == 0.9 and not out.d_weight.requires_grad


def test_adaptive_weight_is_zero_without_gradients():
    loss = make_loss()
    decoder = TinyDecoder()
    x, z = batch(2)
    with torch.no_grad():
        out = loss.generator_loss(x, decoder(z), FixedPosterior(torch.zeros(2)), 5, decoder.get_last_layer())
    assert out.d_weight.item() == 0.0 and torch.isfinite(out.loss)
    out = loss.generator_loss(x, decoder(z), FixedPosterior(torch.zeros(2)), 5, last_layer=None)
    assert out.d_weight.item() == 0.0


def test_gan_terms_are_off_before_disc_start():
    loss = make_loss(disc_start=10, disc_factor=1.0)
    decoder = TinyDecoder()
    x, z = batch(3)
    posterior = FixedPosterior(torch.zeros(2))
    before = loss.generator_loss(x, decoder(z), posterior, 9, decoder.get_last_layer())
    assert before.disc_factor == 0.0 and before.d_weight.item() == 0.0
    torch.testing.assert_close(before.loss, before.nll)
    assert loss.discriminator_loss(x, decoder(z), 9).loss.item() == 0.0
    after = loss.generator_loss(x, decoder(z), posterior, 10, decoder.get_last_layer())
    assert after.disc_factor == 1.0 and after.d_weight.item() > 0
    d = loss.discriminator_loss(x, decoder(z), 10)
    real, fake = loss.discriminator(x), loss.discriminator(decoder(z))
    assert d.loss.item() > 0 and d.logits_real.shape == ()
    torch.testing.assert_close(d.loss, hinge_d_loss(real, fake), rtol=0.05, atol=0.05)  # BN batch stats


def test_warns_once_when_lpips_is_missing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = make_loss(perceptual_weight=1.0)
        x, x_hat = batch()
        for step in range(2):
            loss.generator_loss(x, x_hat, FixedPosterior(torch.zeros(2)), step)
        make_loss(perceptual_weight=0.0)
        make_loss(HalfL1Perceptual(), perceptual_weight=1.0)
    messages = [str(w.message) for w in caught if "perceptual" in str(w.message)]
    assert len(messages) == 1 and "LPIPS" in messages[0]


@pytest.mark.parametrize("field, value", [("kl_weight", -1.0), ("disc_loss", "wgan"), ("disc_num_layers", 0),
                                          ("disc_start", 1.5), ("learn_logvar", "yes"),
                                          ("logvar_init", float("nan"))])
def test_config_errors_name_the_field_in_one_line(field, value):
    with pytest.raises(ConfigError) as info:
        AutoencoderLossConfig(**{field: value})
    assert str(info.value).startswith(f"AutoencoderLossConfig.{field}:") and "\n" not in str(info.value)


# --------------------------------------------------------- Lightning module
def tiny_autoencoder() -> AutoencoderKL:
    return AutoencoderKL(AutoencoderConfig(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2),
                                           num_res_blocks=1, attn_resolutions=(), z_channels=2, embed_dim=2,
                                           norm_groups=4, resolution=8))


@pytest.mark.parametrize("disc_start, grad_clip, learn_logvar", [(0, 1.0, True), (100, 0.0, False)])
def test_module_steps_both_optimisers(tmp_path, disc_start, grad_clip, learn_logvar):
    torch.manual_seed(0)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    data = [{"image": image} for image in images]
    config = AutoencoderLossConfig(disc_start=disc_start, disc_in_channels=1, disc_ndf=8, disc_num_layers=1,
                                   perceptual_weight=0.0, learn_logvar=learn_logvar)
    module = AutoencoderModule(tiny_autoencoder(), config, lr=1e-3, sample_dir=tmp_path / "samples",
                               grad_clip=grad_clip)
    ae_before = [p.detach().clone() for p in module.autoencoder.parameters()]
    d_before = {k: p.detach().clone() for k, p in module.loss.discriminator.named_parameters()}
    logvar_before = module.loss.logvar.item()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1)
    trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=4))

    assert trainer.global_step == 6 and module.batch_step == 3  # 3 batches, two optimiser steps each
    assert all(not torch.equal(a, b) for a, b in zip(ae_before, module.autoencoder.parameters()))
    # (the last bias may legitimately stay: its hinge gradients from real and fake patches cancel)
    d_changed = {k: not torch.equal(d_before[k], p) for k, p in module.loss.discriminator.named_parameters()}
    if disc_start == 0:
        assert all(changed for k, changed in d_changed.items() if k.endswith("weight"))
    else:
        assert not any(d_changed.values())  # f(t) = 0 before disc_start: zero gradients, no Adam update
    assert (module.loss.logvar.item() != logvar_before) == learn_logvar
    metrics = trainer.callback_metrics
    for key in ("train/rec_loss", "train/kl", "train/g_loss", "train/d_weight", "train/disc_loss",
                "train/logvar", "val/rec_loss", "val/psnr"):
        assert torch.isfinite(metrics[key]), key
    assert (metrics["train/d_weight"] > 0) == (disc_start == 0)
    assert (tmp_path / "samples" / "recon_latest.png").is_file()
    assert (tmp_path / "samples" / "recon_step_0000006.png").is_file()

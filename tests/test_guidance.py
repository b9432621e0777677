"""Classifier-free guidance wrapper: closed forms and one batched forward."""

from __future__ import annotations

import pytest
import torch

from diffusionforge.processes import GaussianDiffusion, GaussianDiffusionConfig
from diffusionforge.samplers import classifier_free_guidance, sample_ddim

B, C, H, W = 3, 4, 6, 6


class CondDenoiser:
    """A nonlinear toy backbone reading every conditioning kind; records its batch sizes."""

    def __init__(self, out_channels=C):
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(out_channels, C + 2, generator=g)
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        h = torch.cat([x, cond["concat"]], dim=1)  # (B, C + 2, H, W)
        out = torch.einsum("oc,bchw->bohw", self.weight, h)
        scale = 1 + cond["vector"].mean(dim=1).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        shift = cond["crossattn"].pow(2).mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(out * scale + shift + t.float().view(-1, 1, 1, 1) / 1000)


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, C, H, W, generator=g), torch.tensor([10, 500, 999])
    cond = {"vector": torch.randn(B, 8, generator=g), "crossattn": torch.randn(B, 5, 8, generator=g),
            "concat": torch.randn(B, 2, H, W, generator=g)}
    uncond = {"vector": torch.zeros(1, 8), "crossattn": torch.zeros(1, 5, 8), "concat": torch.zeros(1, 2, H, W)}
    return x, t, cond, uncond


def test_scale_one_is_the_conditional_output_in_one_pass():
    x, t, cond, uncond = make_inputs()
    denoise = CondDenoiser()
    out = classifier_free_guidance(denoise, 1.0, uncond)(x, t, cond)
    assert torch.equal(out, CondDenoiser()(x, t, cond))
    assert denoise.batches == [B]


@pytest.mark.parametrize("uncond_batch", [1, B])
def test_guidance_equals_two_separate_passes(uncond_batch):
    x, t, cond, uncond = make_inputs()
    uncond = {k: v.expand(uncond_batch, *v.shape[1:]) + 0.1 for k, v in uncond.items()}
    denoise = CondDenoiser()
    guided = classifier_free_guidance(denoise, 4.0, uncond)(x, t, cond)
    assert denoise.batches == [2 * B]  # one batched forward
    reference = CondDenoiser()
    cond_out = reference(x, t, cond)
    uncond_out = reference(x, t, {k: v.expand(B, *v.shape[1:]) for k, v in uncond.items()})
    torch.testing.assert_close(guided, uncond_out + 4.0 * (cond_out - uncond_out))


def test_guided_channels_leave_the_rest_conditional():
    x, t, cond, uncond = make_inputs()
    denoise = CondDenoiser(out_channels=2 * C)  # e.g. eps + learned variance
    guided = classifier_free_guidance(denoise, 3.0, uncond, guided_channels=3)(x, t, cond)
    cond_out = denoise(x, t, cond)
    uncond_out = denoise(x, t, {k: v.expand(B, *v.shape[1:]) for k, v in uncond.items()})
    torch.testing.assert_close(guided[:, 3:], cond_out[:, 3:])
    torch.testing.assert_close(guided[:, :3], uncond_out[:, :3] + 3.0 * (cond_out[:, :3] - uncond_out[:, :3]))
    assert not torch.allclose(guided[:, :3], cond_out[:, :3])


def test_mismatched_keys_and_missing_cond_raise():
    x, t, cond, uncond = make_inputs()
    del uncond["concat"]
    with pytest.raises(ValueError, match="keys"):
        classifier_free_guidance(CondDenoiser(), 2.0, uncond)(x, t, cond)
    with pytest.raises(ValueError, match="cond"):
        classifier_free_guidance(CondDenoiser(), 2.0, uncond)(x, t, None)


def test_guidance_plugs_into_a_sampler():
    process = GaussianDiffusion(GaussianDiffusionConfig(num_timesteps=100))
    x, _, cond, uncond = make_inputs(2)
    plain = sample_ddim(CondDenoiser(), process, x, cond, num_steps=5, progress=False).sample
    at_one = sample_ddim(classifier_free_guidance(CondDenoiser(), 1.0, uncond), process, x, cond, num_steps=5,
                         progress=False).sample
    at_five = sample_ddim(classifier_free_guidance(CondDenoiser(), 5.0, uncond), process, x, cond, num_steps=5,
                          progress=False).sample
    assert torch.equal(plain, at_one)
    assert not torch.allclose(plain, at_five)

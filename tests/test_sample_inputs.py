"""`dforge sample` inputs: prompts, class names, img2img (SDEdit), inpainting, the whole-request noise draw.

Oracle: an imported tiny StableDiffusionPipeline (`dforge import`, tests/test_import.py) sampled with
--init-image / --strength / --prompt / --negative-prompt gives StableDiffusionImg2ImgPipeline's images,
with --mask StableDiffusionInpaintPipeline's (4-channel UNet).
Library level on tiny random models (the ``tiny`` preset's UNet, a tiny
random CLIP text tower for the text runs), sampler level against diffusers'
schedulers (img2img's ``get_timesteps`` / ``add_noise`` and the remaining
walk with a fixed random network), and the CLI on the shared ``tiny_run``.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from PIL import Image

from diffusionforge.cli.main import main
from diffusionforge.config.loader import load_config
from diffusionforge.errors import ConfigError
from diffusionforge.models.generative import strength_start
from diffusionforge.processes import GaussianDiffusion, GaussianDiffusionConfig
from diffusionforge.samplers import SAMPLERS
from diffusionforge.samplers.ddim import sample_ddim
from diffusionforge.samplers.sigmas import make_sigmas
from diffusionforge.samplers.spacing import make_timesteps
from diffusionforge.tasks.diffusion import build_diffusion_model, resolve_class, sample_images, sample_request
from test_k_samplers import FixedNet  # a fixed random 3x3 convolution, smooth in t (float64 inside)

SHAPE = (2, 3, 8, 8)



def randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_near(ours, reference, tol=1e-4):
    err = (ours.double() - reference.double()).abs().max() / (1 + reference.double().abs().max())
    assert float(err) <= tol, float(err)


def diffusers_img2img(scheduler, net, num_steps, strength, x0, noise):
    """diffusers' img2img loop (``get_timesteps``, ``add_noise`` at ``timesteps[:1]``, the remaining steps)."""
    scheduler.set_timesteps(num_steps)
    timesteps, remaining = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu")
    x = scheduler.add_noise(x0, noise, timesteps[:1])
    for t in timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x, timesteps, remaining


# ---- img2img against diffusers ------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps,strength", [(10, 1.0), (10, 0.75), (10, 0.5), (50, 0.8), (25, 0.3),
                                                (7, 0.99), (4, 0.1), (10, 0.0)])
def test_first_step_matches_diffusers_get_timesteps(num_steps, strength):
    start = strength_start(num_steps, strength)
    for cls, spacing in ((DDIMScheduler, "leading"), (DDIMScheduler, "trailing"), (EulerDiscreteScheduler, "leading")):
        scheduler = cls(timestep_spacing=spacing)
        scheduler.set_timesteps(num_steps)
        timesteps, remaining = StableDiffusionImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu")
        ours = make_timesteps(1000, num_steps, spacing)
        assert num_steps - start == remaining == len(timesteps)
        if remaining:
            assert int(ours[start]) == int(timesteps[0])
        if cls is EulerDiscreteScheduler and remaining:  # its add_noise level: sigmas[begin_index]
            process = GaussianDiffusion(GaussianDiffusionConfig(beta_schedule="linear", linear_start=1e-4,
                                                                linear_end=2e-2))
            sigmas = make_sigmas(process.denoiser(FixedNet()), num_steps, "discrete", spacing)
            torch.testing.assert_close(sigmas[start].float(), scheduler.sigmas[scheduler.begin_index], rtol=1e-5,
                                       atol=0)


def linear_process():
    return GaussianDiffusion(GaussianDiffusionConfig(beta_schedule="linear", linear_start=1e-4, linear_end=2e-2))


@pytest.mark.parametrize("strength", [1.0, 0.6, 0.25])
def test_ddim_img2img_matches_diffusers(strength):
    net, x0, noise = FixedNet(), randn(0).clamp(-1, 1), randn(1)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2, clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    theirs, _, _ = diffusers_img2img(scheduler, net, 10, strength, x0, noise)
    ours = sample_ddim(net, linear_process(), noise, num_steps=10, spacing="leading", progress=False,
                       start=strength_start(10, strength), x_init=x0).sample
    assert_near(ours, theirs)


@pytest.mark.parametrize("sampler,cls,spacing", [("euler", EulerDiscreteScheduler, "leading"),
                                                 ("dpmpp_2m", DPMSolverMultistepScheduler, "trailing")])
@pytest.mark.parametrize("strength", [1.0, 0.7, 0.3])
def test_sigma_sampler_img2img_matches_diffusers(sampler, cls, spacing, strength):
    """diffusers' Euler / DPM++ 2M img2img: noised to sigmas[begin_index], multistep history starting empty.
    (DPM-Solver's own "leading" grid is not ours, tests/test_k_samplers.py: it is compared "trailing".)"""
    net, x0, noise = FixedNet(), randn(0).clamp(-1, 1), randn(1)
    scheduler = cls(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2, timestep_spacing=spacing)
    theirs, _, _ = diffusers_img2img(scheduler, net, 12, strength, x0, noise)
    ours = SAMPLERS[sampler].fn(net, linear_process(), noise, num_steps=12, schedule="discrete", spacing=spacing,
                                progress=False, start=strength_start(12, strength), x_init=x0).sample
    assert_near(ours, theirs, tol=2e-4)


def test_strength_one_is_not_plain_sampling_but_sampling_from_the_noised_image():
    """diffusers' semantics: strength 1 still noises the image to the first timestep (sqrt(abar) x0 + ...),
    so it equals plain sampling from q_sample(x0, t_0, noise), not from the noise alone."""
    net, process, x0, noise = FixedNet(), linear_process(), randn(0).clamp(-1, 1), randn(1)
    first = make_timesteps(1000, 10, "leading")[:1].expand(len(x0))
    img2img = sample_ddim(net, process, noise, num_steps=10, progress=False, start=0, x_init=x0).sample
    plain_from_noised = sample_ddim(net, process, process.q_sample(x0, first, noise), num_steps=10,
                                    progress=False).sample
    plain = sample_ddim(net, process, noise, num_steps=10, progress=False).sample
    torch.testing.assert_close(img2img, plain_from_noised)
    assert not torch.allclose(img2img, plain)


@pytest.mark.parametrize("sampler", sorted(name for name, entry in SAMPLERS.items() if "ddpm" in entry.objectives))
def test_every_ddpm_sampler_walks_img2img_and_keeps_the_known_latents(sampler):
    """start / x_init reach every registered sampler; inpainting keeps the known region of the diffusion
    space exactly (the latent grid of a latent run); strength 0 returns x_init."""
    net, process, x0, noise = FixedNet(), linear_process(), randn(0).clamp(-1, 1), randn(1)
    known = torch.zeros(1, 1, 8, 8)
    known[..., 4:] = 1
    fn = SAMPLERS[sampler].fn
    out = fn(net, process, noise, num_steps=6, progress=False, generator=torch.Generator().manual_seed(0),
             start=strength_start(6, 0.5), x_init=x0, known_mask=known.expand_as(x0), x0_known=x0).sample
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., 4:], x0[..., 4:])
    assert not torch.allclose(out[..., :4], x0[..., :4])
    same = fn(net, process, noise, num_steps=6, progress=False, start=6, x_init=x0).sample
    assert torch.equal(same, x0)


# ---- the model and sample_images ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = load_config("tiny")
    return config, build_diffusion_model(config).eval()


def test_noise_is_one_whole_request_draw_whatever_the_batch_size(tiny_model):
    config, model = tiny_model
    request = sample_request(config, "ddim", 4, guidance=2.0)
    a, _ = sample_images(model, 5, request, seed=3, batch_size=5, progress=False)
    b, _ = sample_images(model, 5, request, seed=3, batch_size=2, progress=False)
    assert torch.equal(a, b)
    noise = torch.randn((5, *model.latent_shape), generator=torch.Generator().manual_seed(3))  # diffusers' draw
    labels = torch.arange(5) % 10
    direct = model.sample(model.label_batch(labels), 5, request, noise=noise)
    assert torch.equal(a, direct)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0), ("euler_ancestral", 0.0),
                                          ("dpmpp_2m_sde", 0.0)])
def test_stochastic_samplers_do_not_depend_on_the_batch_size(tiny_model, sampler, eta):
    """Fresh step noise: sample i's from its own generator (``row_generators``), seeded from the seed and i."""
    config, model = tiny_model
    request = sample_request(config, sampler, 4, eta=eta, guidance=2.0)
    a, _ = sample_images(model, 5, request, seed=3, batch_size=5, progress=False)
    b, _ = sample_images(model, 5, request, seed=3, batch_size=2, progress=False)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    c, _ = sample_images(model, 3, request, seed=3, batch_size=1, progress=False)
    torch.testing.assert_close(c, a[:3], atol=1e-6, rtol=0)  # a shorter request: the same first samples
    d, _ = sample_images(model, 5, request, seed=4, batch_size=5, progress=False)
    assert (a - d).abs().amax(dim=(1, 2, 3)).min() > 0.1  # another seed: other noise
    deterministic, _ = sample_images(model, 5, sample_request(config, "ddim", 4, guidance=2.0), seed=3,
                                     progress=False)
    assert (a - deterministic).abs().max() > 0.1  # the step noise acts
    image = randn(5, (1, 1, 28, 28)).clamp(-1, 1)
    mask = (torch.arange(28) < 14).float().expand(1, 1, 28, 28)
    e, _ = sample_images(model, 4, request, seed=3, batch_size=4, progress=False, init_image=image, mask=mask)
    f, _ = sample_images(model, 4, request, seed=3, batch_size=3, progress=False, init_image=image, mask=mask)
    torch.testing.assert_close(e, f, atol=1e-6, rtol=0)


def test_row_noise_draws_row_i_from_generator_i():
    from diffusionforge.samplers.loop import randn as sampler_randn

    x = torch.zeros(3, 2, 4, 4)
    rows = sampler_randn(x, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    assert torch.equal(rows[1], torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sampler_randn(x, [torch.Generator(), torch.Generator()])


def test_img2img_strength_zero_returns_the_image_and_mask_keeps_pixels(tiny_model):
    config, model = tiny_model
    request = sample_request(config, "ddim", 5, guidance=2.0)
    image = randn(5, (1, 1, 28, 28)).clamp(-1, 1)
    same, _ = sample_images(model, 2, request, seed=0, progress=False, init_image=image, strength=0.0)
    torch.testing.assert_close(same, image.expand(2, -1, -1, -1))
    edited, _ = sample_images(model, 2, request, seed=0, progress=False, init_image=image, strength=0.6)
    assert not torch.allclose(edited, same)
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :, :14] = 1  # white: repaint the left half
    filled, _ = sample_images(model, 2, request, seed=0, progress=False, init_image=image, mask=mask)
    assert torch.equal(filled[..., 14:], image[..., 14:].expand(2, -1, -1, -1))
    assert not torch.allclose(filled[..., :14], image[..., :14].expand(2, -1, -1, -1))
    again, _ = sample_images(model, 2, request, seed=0, batch_size=1, progress=False, init_image=image, mask=mask)
    assert torch.equal(filled, again)


def test_class_names_resolve(tiny_model):
    config, _ = tiny_model
    assert resolve_class(config, "Sneaker") == resolve_class(config, "sneaker") == resolve_class(config, "7") == 7
    assert resolve_class(config, "a pair of trousers") == resolve_class(config, "Trouser") == 1
    assert resolve_class(config, "ankle boot") == 9
    with pytest.raises(ConfigError, match="unknown class.*T-shirt/top, Trouser"):
        resolve_class(config, "unicorn")
    mnist = load_config("tiny", ["data.name=mnist", "data.root=/nonexistent"])
    assert resolve_class(mnist, "seven") == resolve_class(mnist, "7") == 7


def test_recorded_class_names_resolve(tiny_model, tmp_path):
    """A folder run's data.class_names (recorded by `dforge train`) and an imported run's class_names.json."""
    import json

    config, _ = tiny_model
    names = [f"cat{i}" for i in range(8)] + ["blue_square", "dog"]
    folder = dataclasses.replace(config, data=dataclasses.replace(config.data, class_names=names))
    assert resolve_class(folder, "Dog") == 9 and resolve_class(folder, "cat2") == 2
    assert resolve_class(folder, "blue square") == resolve_class(folder, "Blue_Square") == 8  # as captions say it
    with pytest.raises(ConfigError, match="cat0, cat1"):
        resolve_class(folder, "unicorn")
    table = [f"class {i}, synonym {i}" for i in range(10)]
    (tmp_path / "class_names.json").write_text(json.dumps(table))
    assert resolve_class(config, "class 4, synonym 4", tmp_path) == 4
    assert resolve_class(config, "synonym 6", tmp_path) == resolve_class(config, "CLASS 6", tmp_path) == 6


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from test_text_conditioner import _tiny_clip

    path = _tiny_clip(tmp_path_factory.mktemp("clip"))
    config = load_config("tiny", ["model.conditioning.class_label=null", "model.conditioning.text.encoder=clip",
                                  f"model.conditioning.text.path={path}", "model.conditioning.text.max_length=16",
                                  "data.caption_template=a photo of {}"])
    torch.manual_seed(0)
    model = build_diffusion_model(config).eval()
    with torch.no_grad():  # a fresh UNet zeroes its attention outputs: make the text reach the prediction
        for param in model.sampling_net()["backbone"].parameters():
            param.add_(0.05 * torch.randn_like(param))
    return config, model


def test_prompt_and_negative_prompt_change_the_output(text_model):
    config, model = text_model
    request = sample_request(config, "ddim", 4, guidance=3.0)

    def draw(**kwargs):
        return sample_images(model, 2, request, seed=1, progress=False, **kwargs)[0]

    bag, shoe = draw(prompt="a photo of a bag"), draw(prompt="a red shoe")
    assert not torch.allclose(bag, shoe)
    assert torch.equal(bag, draw(prompt="a photo of a bag"))
    negative = draw(prompt="a photo of a bag", negative_prompt="a red shoe")
    assert not torch.allclose(bag, negative)
    # the empty negative prompt is the unconditional branch itself
    assert torch.equal(bag, draw(prompt="a photo of a bag", negative_prompt=""))
    with pytest.raises(ConfigError, match="--negative-prompt acts through classifier-free guidance"):
        sample_images(model, 1, sample_request(config, "ddim", 2, guidance=1.0), progress=False, prompt="a bag",
                      negative_prompt="a shoe")
    with pytest.raises(ConfigError, match="--negative-prompt needs --prompt"):
        draw(negative_prompt="a shoe")
    with pytest.raises(ConfigError, match="classes are captions"):
        draw(prompt="a bag", class_label=3)


def test_a_run_without_class_captions_needs_a_prompt(text_model):
    config, model = text_model
    saved = model.labels
    model.labels = dataclasses.replace(saved, caption_template=None)
    try:
        with pytest.raises(ConfigError, match="give --prompt"):
            sample_images(model, 1, sample_request(config, "ddim", 2), progress=False)
        assert sample_images(model, 1, sample_request(config, "ddim", 2), progress=False, prompt="a bag")[0].shape \
            == (1, 1, 28, 28)
    finally:
        model.labels = saved


def test_prompt_refused_for_a_run_without_text(tiny_model):
    config, model = tiny_model
    with pytest.raises(ConfigError, match="not text-conditioned"):
        sample_images(model, 1, sample_request(config, "ddim", 2), progress=False, prompt="a bag")


# ---- the CLI --------------------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("dforge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_class_names_prompts_and_images(tiny_run, tmp_path, capsys):
    outs = {}
    for name in ("7", "Sneaker"):
        outs[name] = tmp_path / f"{name}.png"
        code, err = run_cli(capsys, "sample", str(tiny_run), "--num", "2", "--steps", "3", "--class", name,
                            "--out", str(outs[name]))
        assert code == 0, err
    assert np.array_equal(*(np.asarray(Image.open(p)) for p in outs.values()))
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--class", "unicorn", "--out", str(tmp_path / "x.png")),
                   "--class 'unicorn'", "Ankle boot")
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--prompt", "a bag", "--out", str(tmp_path / "x.png")),
                   "--prompt", "not text-conditioned")

    image = tmp_path / "init.png"
    Image.fromarray((np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28), "L").save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(28)[None, :] < 14, 255, 0).repeat(28, 0).astype(np.uint8), "L").save(mask)
    for extra in (["--strength", "0.5"], ["--mask", str(mask)]):
        out = tmp_path / "edit.png"
        code, err = run_cli(capsys, "sample", str(tiny_run), "--num", "2", "--steps", "4", "--init-image", str(image),
                            *extra, "--out", str(out))
        assert code == 0, err
    kept = np.asarray(Image.open(out))  # the grid of 2 inpainted images: each keeps its right half
    source = np.asarray(Image.open(image))
    assert np.array_equal(kept[2:30, 2 + 14:30], source[:, 14:])

    big, rgb = tmp_path / "big.png", tmp_path / "rgb.png"
    Image.new("L", (32, 32)).save(big)
    Image.new("RGB", (28, 28)).save(rgb)
    out = str(tmp_path / "x.png")
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--init-image", str(big), "--out", out),
                   str(big), "32x32", "28x28")
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--init-image", str(rgb), "--out", out),
                   str(rgb), "1 channel")
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--init-image", str(image), "--mask", str(big),
                            "--out", out), "--mask", str(big))
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--mask", str(mask), "--out", out), "--mask needs")
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--strength", "0.5", "--out", out), "--strength")
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--init-image", str(image), "--strength", "1.5",
                            "--out", out), "--strength", "[0, 1]")
    one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--init-image", str(tmp_path / "none.png"),
                            "--out", out), "none.png", "not found")


def test_latent_img2img_draws_the_posterior_then_the_noise_and_keeps_pixels():
    """A latent run: the image is encoded to a posterior sample drawn first from the seeded generator, then
    the whole request's noise (diffusers' img2img order); strength 0 decodes that latent; an inpainting mask
    is taken to the latent grid (a latent is kept where its whole patch is) and the kept pixels pasted back."""
    from test_latent_diffusion import latent_model

    model, config = latent_model()
    model.eval()
    request = sample_request(config, "ddim", 4, guidance=2.0)
    image = randn(5, (1, 1, 28, 28)).clamp(-1, 1)
    generator = torch.Generator().manual_seed(2)
    z = model.first_stage.autoencoder.encode(image).sample(generator) * model.first_stage.scale_factor
    noise = torch.randn((2, *model.latent_shape), generator=generator)
    labels = model.label_batch(torch.tensor([0, 1]))
    for strength in (0.0, 0.5):
        ours, _ = sample_images(model, 2, request, seed=2, progress=False, init_image=image, strength=strength)
        direct = model.sample(labels, 2, request, noise=noise, x_init=z.expand(2, -1, -1, -1),
                              start=strength_start(4, strength))
        torch.testing.assert_close(ours, direct, rtol=0, atol=0)
    unchanged, _ = sample_images(model, 1, request, seed=2, progress=False, init_image=image, strength=0.0)
    torch.testing.assert_close(unchanged, model.first_stage.decode(z).clamp(-1, 1))
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :, :12] = 1
    filled, _ = sample_images(model, 2, request, seed=2, progress=False, init_image=image, mask=mask)
    assert torch.equal(filled[..., 12:], image[..., 12:].expand(2, -1, -1, -1))


@pytest.mark.parametrize("objective,sampler", [("flow", "flow_euler"), ("flow", "euler"), ("edm", "heun"),
                                               ("edm", "dpmpp_2m")])
def test_img2img_on_edm_and_flow_runs(objective, sampler):
    torch.manual_seed(0)
    config = load_config("tiny", [f"model.objective={objective}"])
    model = build_diffusion_model(config).eval()
    request = sample_request(config, sampler, 6, guidance=2.0)
    image = randn(5, (1, 1, 28, 28)).clamp(-1, 1)
    same, _ = sample_images(model, 2, request, seed=0, progress=False, init_image=image, strength=0.0)
    torch.testing.assert_close(same, image.expand(2, -1, -1, -1))
    edited, _ = sample_images(model, 2, request, seed=0, progress=False, init_image=image, strength=0.5)
    assert torch.isfinite(edited).all() and not torch.allclose(edited, same)
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :, :14] = 1
    filled, _ = sample_images(model, 2, request, seed=0, progress=False, init_image=image, mask=mask)
    assert torch.equal(filled[..., 14:], image[..., 14:].expand(2, -1, -1, -1))


# ---- oracle: an imported tiny Stable Diffusion against StableDiffusionImg2ImgPipeline ----------------------

from test_import import TOL, sd_pipeline  # noqa: E402,F401  (the tiny pipeline fixture of `dforge import`)


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning")  # one image, duplicated
@pytest.mark.parametrize("strength,negative", [(0.6, None), (0.8, "a red shoe"), (1.0, None)])
def test_img2img_of_an_imported_pipeline_matches_diffusers(sd_pipeline, tmp_path, strength, negative):  # noqa: F811
    """`dforge sample RUN --init-image X --strength S --prompt P [--negative-prompt N]` of an imported
    StableDiffusionPipeline gives StableDiffusionImg2ImgPipeline's images (same components, seed, DDIM steps,
    guidance), decoded pixels within 2/255, two images per request (one posterior draw, then the noise)."""
    import diffusers

    from diffusionforge.runs import open_run
    from diffusionforge.tasks.diffusion import DiffusionTask, load_image_inputs
    from diffusionforge.tasks.imported import import_pipeline

    pipe, src = sd_pipeline
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    path = tmp_path / "init.png"
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    prompt, seed, steps, guidance = "a photo", 5, 5, 4.0
    theirs = img2img(prompt, image=Image.open(path), strength=strength, num_inference_steps=steps,
                     guidance_scale=guidance, negative_prompt=negative, num_images_per_prompt=2,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images
    run = tmp_path / "run"
    import_pipeline(src, run)
    run, config = open_run(run)
    model = DiffusionTask().load(run, config)
    image, _ = load_image_inputs(config, path)
    ours, _ = sample_images(model, 2, sample_request(config, steps=steps, guidance=guidance), seed=seed,
                            progress=False, prompt=prompt, negative_prompt=negative, init_image=image,
                            strength=strength)
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    assert abs(ours - theirs).max() <= TOL
    assert abs(theirs[0] - theirs[1]).max() > 10 * TOL  # the noise differs per image: not a vacuous match


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning")
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_of_an_imported_pipeline_matches_diffusers(sd_pipeline, tmp_path, strength):  # noqa: F811
    """`--init-image X --mask M` of an imported SD: StableDiffusionInpaintPipeline with its 4-channel UNet (the
    legacy inpainting: mask binarised and resized nearest to the latent grid, the kept latents noised with the
    request's noise after each step, pure noise at strength 1) within 2/255, without the pixel paste; with it
    (the default) the kept pixels are the image's."""
    import diffusers

    from diffusionforge.runs import open_run
    from diffusionforge.tasks.diffusion import DiffusionTask, load_image_inputs
    from diffusionforge.tasks.imported import import_pipeline

    pipe, src = sd_pipeline
    inpaint = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image_path, mask_path = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(image_path)
    hole = np.zeros((16, 16), dtype=np.uint8)
    hole[3:11, 5:13] = 255
    Image.fromarray(hole, "L").save(mask_path)
    prompt, seed, steps, guidance = "a photo", 4, 5, 4.0
    theirs = inpaint(prompt, image=Image.open(image_path), mask_image=Image.open(mask_path), strength=strength,
                     num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=2,
                     height=16, width=16, generator=torch.Generator().manual_seed(seed), output_type="np").images
    run = tmp_path / "run"
    import_pipeline(src, run)
    run, config = open_run(run)
    model = DiffusionTask().load(run, config)
    image, mask = load_image_inputs(config, image_path, mask_path)
    request = sample_request(config, steps=steps, guidance=guidance)
    generator = torch.Generator().manual_seed(seed)
    z = model.encode_images(image, generator)
    noise = torch.randn((2, *model.latent_shape), generator=generator)
    raw = model.img2img({"caption": [prompt] * 2}, image, request, strength, mask=mask, noise=noise, z_init=z,
                        paste=False)
    raw = ((raw + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert raw.shape == theirs.shape == (2, 16, 16, 3)
    assert abs(raw - theirs).max() <= TOL
    assert abs(theirs[0] - theirs[1]).max() > 10 * TOL
    pasted, _ = sample_images(model, 2, request, seed=seed, progress=False, prompt=prompt, init_image=image,
                              strength=strength, mask=mask)
    keep = torch.from_numpy(hole == 0)
    assert torch.equal(pasted[:, :, keep], image.expand(2, -1, -1, -1)[:, :, keep])
    pasted = ((pasted + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(pasted - theirs)[:, hole > 0].max() <= TOL  # the repainted region is diffusers'

"""`dforge import`: tiny randomly initialised diffusers pipelines become runs that sample as diffusers does.

Oracle: a tiny ``StableDiffusionPipeline`` (UNet2DConditionModel, AutoencoderKL,
a tiny CLIPTextModel + CLIPTokenizer, DDIMScheduler as Stable Diffusion's:
scaled_linear betas, steps_offset 1, set_alpha_to_one False) and a tiny
``DiTPipeline`` are saved with ``save_pretrained``, imported with
``dforge import``, and sampled through the run (``DiffusionTask.load`` +
``GenerativeModel.sample``) with the same prompt / classes, seed, DDIM steps
and guidance as the diffusers pipeline: decoded pixels agree within 2/255.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
import transformers

from diffusionforge.cli.main import main
from diffusionforge.errors import CheckpointError
from diffusionforge.interop.pipelines import scheduler_settings
from diffusionforge.runs import CLASS_NAMES_FILE, open_run
from diffusionforge.tasks.diffusion import DiffusionTask, sample_request
from diffusionforge.tasks.imported import import_pipeline
from test_text_conditioner import write_clip_vocab

HIDDEN = 32
TOL = 2 / 255
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


def _tokenizer(directory) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer over test_text_conditioner's tiny vocabulary of letters and two merges."""
    write_clip_vocab(directory)
    return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                      model_max_length=77)


def _vae() -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                   up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32],
                                   layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=16,
                                   scaling_factor=0.3).eval()


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=HIDDEN, attention_head_dim=2, norm_num_groups=16)
    tokenizer = _tokenizer(root / "vocab")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipe")
    return pipe, root / "pipe"


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(1)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000)  # DiTPipeline's null class is 1000
    with torch.no_grad():  # adaLN-Zero starts at zero: randomise so every block matters
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for block in transformer.transformer_blocks[1:]:  # the published conversion copies block 0's embedders
            block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=_vae(),
                                 scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipe")
    index_path = root / "pipe" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["id2label"] = {str(i): f"class {i}" for i in range(1000)}
    index_path.write_text(json.dumps(index))
    return pipe, root / "pipe"


def _ours(run_dir, batch, num, seed, steps, guidance):
    run_dir, config = open_run(run_dir)
    model = DiffusionTask().load(run_dir, config)
    request = sample_request(config, steps=steps, guidance=guidance)
    images = model.sample(batch, num, request, generator=torch.Generator().manual_seed(seed))
    return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # as diffusers' output_type="np"


def test_sd_pipeline_import_samples_as_diffusers(sd_pipeline, tmp_path):
    pipe, src = sd_pipeline
    run = tmp_path / "sd-run"
    assert main(["import", str(src), "--out", str(run)]) == 0
    assert (run / "text_encoder" / "config.json").is_file()
    _, config = open_run(run)
    assert "path: text_encoder\n" in (run / "config.yaml").read_text()  # relative to the run ...
    assert config.model.conditioning.text.path == str(run.resolve() / "text_encoder")  # ... resolved on opening it
    assert config.model.conditioning.text.sd_padding
    assert config.model.process.beta_schedule == "scaled_linear" and config.model.process.steps_offset == 1
    assert config.model.process.set_alpha_to_one is False and config.model.latent.scale_factor == pytest.approx(0.3)
    prompt, seed, steps, guidance = "a photo", 3, 4, 5.0
    theirs = pipe(prompt, num_images_per_prompt=2, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images
    ours = _ours(run, {"caption": [prompt] * 2}, 2, seed, steps, guidance)
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    assert abs(ours - theirs).max() <= TOL
    assert abs(theirs[0] - theirs[1]).max() > 10 * TOL  # the noise differs per image: not a vacuous match


def _with_scheduler(pipe, src, scheduler, tmp_path):
    """``src`` saved again with ``scheduler`` (its other parts linked), imported as ``tmp_path / "run"``;
    returns the diffusers pipeline with that scheduler and the run's config."""
    variant = tmp_path / "variant"
    variant.mkdir()
    for part in ("unet", "vae", "text_encoder", "tokenizer", "model_index.json"):
        (variant / part).symlink_to(src / part)
    scheduler.save_pretrained(variant / "scheduler")
    import_pipeline(variant, tmp_path / "run")
    other = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    other.set_progress_bar_config(disable=True)
    return other, open_run(tmp_path / "run")[1]


@pytest.mark.parametrize("change", [
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": True},
    {"steps_offset": 0, "clip_sample": True, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
])
def test_other_scheduler_settings_sample_as_diffusers(sd_pipeline, tmp_path, change):
    """v-prediction, trailing spacing, set_alpha_to_one and linear betas reach our DDIM as diffusers' DDIM;
    an outdated steps_offset / clip_sample is fixed up as StableDiffusionPipeline does (offset 1, no clipping)."""
    pipe, src = sd_pipeline
    other, config = _with_scheduler(pipe, src, diffusers.DDIMScheduler(**{**SD_SCHEDULER, **change}), tmp_path)
    process = config.model.process
    assert process.steps_offset == 1 and process.linear_end == change.get("beta_end", 0.012)
    theirs = other("a photo", num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(1), output_type="np").images
    ours = _ours(tmp_path / "run", {"caption": ["a photo"] * 2}, 2, 1, 4, 3.0)
    assert abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("cls, options, sampler, schedule", [
    ("EulerDiscreteScheduler", {}, "euler", "discrete"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler", "karras"),
    ("HeunDiscreteScheduler", {}, "heun", "discrete"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m", "discrete"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m", "karras"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpmpp_3m", "discrete"),
    ("UniPCMultistepScheduler", {}, "unipc", "discrete"),
    ("PNDMScheduler", {"skip_prk_steps": True}, "plms", None),
    ("PNDMScheduler", {}, "pndm", None),
])
def test_pipeline_schedulers_sample_as_diffusers(sd_pipeline, tmp_path, cls, options, sampler, schedule):
    """A pipeline saved with another scheduler, as users swap them (``X.from_config(pipe.scheduler.config)``:
    steps_offset 1, the class's own spacing), imports with our sampler of that scheduler and samples as the
    diffusers pipeline does, on its timesteps (the multistep grids, Euler's fractional linspace times)."""
    pipe, src = sd_pipeline
    scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **options)
    other, config = _with_scheduler(pipe, src, scheduler, tmp_path)
    assert config.sample.sampler == sampler and config.sample.spacing == scheduler.config.timestep_spacing
    assert schedule is None or config.sample.schedule == schedule
    theirs = other("a photo", num_images_per_prompt=2, num_inference_steps=5, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(2), output_type="np").images
    ours = _ours(tmp_path / "run", {"caption": ["a photo"] * 2}, 2, 2, 5, 3.0)
    assert abs(ours - theirs).max() <= TOL
    ddim = pipe("a photo", num_images_per_prompt=2, num_inference_steps=5, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(2), output_type="np").images
    assert abs(ddim - theirs).max() > 4 * TOL  # the schedulers walk apart: the match above says something


def test_sd_run_moves_and_converts(sd_pipeline, tmp_path):
    """The text encoder path is relative to the run: a moved run still loads; `dforge convert` takes it."""
    run = tmp_path / "a"
    import_pipeline(sd_pipeline[1], run)
    moved = run.rename(tmp_path / "b")
    assert main(["convert", str(moved), "--kind", "unet", "--to", "diffusers", "--out", str(tmp_path / "u")]) == 0
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "u")
    for key, value in sd_pipeline[0].unet.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value), key


def test_dit_pipeline_import_samples_as_diffusers(dit_pipeline, tmp_path):
    pipe, src = dit_pipeline
    run = tmp_path / "dit-run"
    assert main(["import", str(src), "sample.steps=7", f"data.root={tmp_path}", "--out", str(run)]) == 0
    _, config = open_run(run)
    assert config.sample.steps == 7 and config.data.root == str(tmp_path) and config.data.image_size == 16
    names = json.loads((run / CLASS_NAMES_FILE).read_text())
    assert len(names) == 1000 and names[7] == "class 7"
    labels, seed, steps, guidance = [7, 123], 5, 4, 4.0
    theirs = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images
    ours = _ours(run, {"class_label": torch.tensor(labels)}, 2, seed, steps, guidance)
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    assert abs(ours - theirs).max() <= TOL
    assert abs(theirs[0] - theirs[1]).max() > 10 * TOL


def test_official_dit_with_vae(dit_pipeline, tmp_path):
    """An official DiT state dict + a diffusers VAE folder: the same network as the pipeline's transformer."""
    from diffusionforge.interop.dit import load_diffusers_dit

    _, src = dit_pipeline
    official = load_diffusers_dit(src / "transformer")
    torch.save(official.state_dict(), tmp_path / "DiT-tiny.pt")
    with pytest.raises(CheckpointError, match="needs --vae"):
        import_pipeline(tmp_path / "DiT-tiny.pt", tmp_path / "x")
    run = tmp_path / "official"
    with pytest.raises(CheckpointError, match="pass --num-heads"):
        import_pipeline(tmp_path / "DiT-tiny.pt", run, vae=src / "vae")
    assert main(["import", str(tmp_path / "DiT-tiny.pt"), "--vae", str(src / "vae"), "--num-heads", "2",
                 "--out", str(run)]) == 0
    _, config = open_run(run)
    assert config.sample.guidance_channels == 3 and config.model.process.variance_type == "learned_range"
    model = DiffusionTask().load(*open_run(run))
    assert torch.equal(model.sampling_net()["backbone"].blocks[1].attn.qkv.weight, official.blocks[1].attn.qkv.weight)


def test_compvis_checkpoint_with_text_encoder(sd_pipeline, tmp_path):
    """A CompVis single file (UNet, VAE and CLIP keys) + --text-encoder: the CLIP weights come from the file."""
    from diffusionforge.interop.unet import COMPVIS_UNET_PREFIX, load_diffusers_unet, sd_v1_unet_config
    pytest.importorskip("safetensors")

    # the tiny UNet is no SD v1 UNet: check the refusal names the mismatch, then the text-encoder path alone
    pipe, src = sd_pipeline
    unet = load_diffusers_unet(src / "unet")
    state = {COMPVIS_UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    torch.save(state, tmp_path / "sd.ckpt")
    with pytest.raises(CheckpointError, match="needs --text-encoder"):
        import_pipeline(tmp_path / "sd.ckpt", tmp_path / "x")
    with pytest.raises(CheckpointError, match="CompVis UNet state dict"):
        import_pipeline(tmp_path / "sd.ckpt", tmp_path / "x", text_encoder=src)
    assert sd_v1_unet_config().context_dim == 768
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "FancyScheduler"}, "unknown scheduler class 'FancyScheduler'"),
    ({"beta_schedule": "exotic"}, "beta_schedule 'exotic'"),
    ({"prediction_type": "flow"}, "prediction_type 'flow'"),
    ({"timestep_spacing": "odd"}, "timestep_spacing 'odd'"),
])
def test_scheduler_errors_are_one_line(change, message):
    with pytest.raises(CheckpointError, match=message) as info:
        scheduler_settings({"_class_name": "DDIMScheduler", **change})
    assert "\n" not in str(info.value)


def test_scheduler_mapping():
    settings = scheduler_settings({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                                   "timestep_spacing": "trailing", **SD_SCHEDULER})
    assert settings.process["prediction_type"] == "v" and settings.process["beta_schedule"] == "scaled_linear"
    assert settings.sample == {"sampler": "ddim", "spacing": "trailing", "clip_denoised": False}
    samplers = {  # (class, options) -> our sampler; DDIM where we have no counterpart
        ("EulerAncestralDiscreteScheduler", ()): "euler_ancestral",
        ("DPMSolverMultistepScheduler", (("algorithm_type", "sde-dpmsolver++"),)): "dpmpp_2m_sde",
        ("DPMSolverMultistepScheduler", (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3))): "dpmpp_3m_sde",
        ("DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver"),)): "ddim",
        ("UniPCMultistepScheduler", (("solver_type", "bh1"),)): "ddim",
        ("UniPCMultistepScheduler", (("solver_order", 3),)): "ddim",
        ("LMSDiscreteScheduler", ()): "ddim",
        ("DDPMScheduler", ()): "ddim",
    }
    for (name, options), sampler in samplers.items():
        sample = scheduler_settings({"_class_name": name, **SD_SCHEDULER, **dict(options)}).sample
        assert sample["sampler"] == sampler, name
    exponential = scheduler_settings({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True})
    assert exponential.sample["schedule"] == "exponential"


def test_bad_inputs_are_one_line_errors(sd_pipeline, tmp_path, capsys):
    _, src = sd_pipeline
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((src / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (broken / part).symlink_to(src / part)
    assert main(["import", str(broken), "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert "missing subfolder scheduler/" in err and len(err.splitlines()) == 1
    assert main(["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) != 0
    assert "no such file" in capsys.readouterr().err
    assert main(["import", str(src), "sample.bogus=1", "--out", str(tmp_path / "r")]) != 0
    assert "sample.bogus" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_dforge_sample_prompt_matches_diffusers(sd_pipeline, tmp_path):
    """`dforge sample RUN --prompt` of an imported pipeline: the PNG holds diffusers' image (8-bit rounding)."""
    from PIL import Image

    pipe, src = sd_pipeline
    run = tmp_path / "run"
    import_pipeline(src, run)
    prompt, seed, steps, guidance = "a photo", 3, 4, 5.0
    theirs = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    out = tmp_path / "x.png"
    assert main(["sample", str(run), "--prompt", prompt, "--num", "1", "--steps", str(steps), "--guidance",
                 str(guidance), "--seed", str(seed), "--out", str(out)]) == 0
    png = torch.tensor(list(Image.open(out).convert("RGB").getdata()), dtype=torch.float32)
    size = int(len(png) ** 0.5)
    png = png.reshape(size, size, 3) / 255
    pad = (size - 16) // 2  # the grid's border
    assert abs(png[pad:pad + 16, pad:pad + 16].numpy() - theirs).max() <= TOL + 0.5 / 255


def test_compvis_text_weights_map_onto_clip(sd_pipeline):
    """``cond_stage_model.transformer.*`` of a CompVis file (with its position_ids) loads into a CLIPTextModel."""
    from diffusionforge.interop.pipelines import COMPVIS_TEXT_PREFIX, compvis_text_state, load_compvis_text

    pipe, _ = sd_pipeline
    reference = pipe.text_encoder.state_dict()
    spelled = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in reference.items()}  # SD v1.4+
    state = {COMPVIS_TEXT_PREFIX + k: v for k, v in spelled.items()}
    state[COMPVIS_TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # other parts are ignored
    fresh = transformers.CLIPTextModel(pipe.text_encoder.config)
    load_compvis_text(fresh, compvis_text_state(state), "sd.ckpt")
    for key, value in reference.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    del state[COMPVIS_TEXT_PREFIX + "text_model.final_layer_norm.weight"]
    with pytest.raises(CheckpointError, match="missing text encoder key .*final_layer_norm.weight"):
        load_compvis_text(transformers.CLIPTextModel(pipe.text_encoder.config), compvis_text_state(state), "sd.ckpt")


def test_mismatched_sizes_are_named(sd_pipeline, tmp_path):
    _, src = sd_pipeline
    variant = tmp_path / "variant"
    variant.mkdir()
    for part in ("unet", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        (variant / part).symlink_to(src / part)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[32], norm_num_groups=16,
                            latent_channels=8).save_pretrained(variant / "vae")
    with pytest.raises(CheckpointError, match="mismatched sizes: the UNet's in_channels is 4 but the VAE's "
                                              "latent_channels is 8"):
        import_pipeline(variant, tmp_path / "run")
    assert not (tmp_path / "run").exists()

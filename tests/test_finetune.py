"""Fine-tuning (`init_from`, `model.freeze`, `model.latent.vae_dir`) from an imported tiny Stable Diffusion.

The tiny random ``StableDiffusionPipeline`` of ``test_import`` is imported with ``dforge import``, fine-tuned
for ``STEPS`` optimiser steps on a 16-image caption folder with ``dforge train RUN/config.yaml init_from=RUN``,
and checked: loss logged, the frozen VAE and text encoder bit-identical to the imported ones, the UNet
changed, and the UNet exported with ``dforge convert`` loads into diffusers' pipeline and samples.
"""

from __future__ import annotations

import csv
import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusionforge.cli.main import main
from diffusionforge.config.loader import load_config
from diffusionforge.data import ImageDataModule
from diffusionforge.errors import ConfigError
from diffusionforge.runs import open_run
from diffusionforge.tasks.diffusion import DiffusionTask
from diffusionforge.tasks.imported import import_pipeline
from diffusionforge.tasks.parts import load_latent_autoencoder

from test_import import sd_pipeline  # noqa: F401  (the fixture)

STEPS = 30  # optimiser steps of the fine-tuning run, as the issue asks
FAST = ["trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=1000",
        "trainer.checkpoint_every_n_steps=1000", "optim.warmup_steps=0", "optim.lr=1e-3", "sample.steps=2",
        "sample.per_class=2", "data.batch_size=4", "data.num_workers=0"]  # no data.caption_template=null: an import records none


def caption_folder(root, count=16, size=16):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"photo {'abc'[i % 3]}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def imported(sd_pipeline, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("ft") / "sd-run"
    import_pipeline(sd_pipeline[1], run)
    return run


def _train(imported, folder, out, *extra):
    return main(["train", str(imported / "config.yaml"), f"init_from={imported}", f"data.root={folder}",
                 f"run_dir={out}", f"trainer.max_steps={STEPS}", *FAST, *extra])


def test_finetune_imported_sd_and_export_to_diffusers(sd_pipeline, imported, tmp_path):  # noqa: F811
    pipe, _ = sd_pipeline
    folder = caption_folder(tmp_path / "images")
    out = tmp_path / "tuned"
    assert _train(imported, folder, out) == 0
    _, config = open_run(out)
    assert config.init_from == str(imported.resolve())
    assert open_run(imported)[1].data.caption_template is None  # the folder's own captions: no override needed
    assert "init_from: " + str(imported.resolve()) in (out / "config.yaml").read_text()

    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= STEPS // 2 and all(np.isfinite(losses))

    before_vae, after_vae = load_file(imported / "first_stage.safetensors"), load_file(out / "first_stage.safetensors")
    assert before_vae.keys() == after_vae.keys()
    assert all(torch.equal(before_vae[k], after_vae[k]) for k in before_vae)
    before = load_file(imported / "model.safetensors")
    for name in ("model.safetensors", "model_raw.safetensors"):
        after = load_file(out / name)
        assert before.keys() == after.keys()
        text = [k for k in before if ".encoder." in k and k.startswith("conditioner.")]
        assert text and all(torch.equal(before[k], after[k]) for k in text), name
    raw = load_file(out / "model_raw.safetensors")
    changed = [k for k in before if k.startswith("backbone.") and not torch.equal(before[k], raw[k])]
    assert len(changed) > len([k for k in before if k.startswith("backbone.")]) // 2

    unet_dir = tmp_path / "unet"
    assert main(["convert", str(out), "--kind", "unet", "--to", "diffusers", "--out", str(unet_dir)]) == 0
    assert json.loads((unet_dir / "config.json").read_text())["sample_size"] == 8  # the run's latent side
    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_dir).eval()
    tuned = diffusers.StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    tuned.set_progress_bar_config(disable=True)
    image = tuned("photo a", height=16, width=16, num_inference_steps=3, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    differs = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(unet.state_dict()[k], v)]
    assert differs  # the exported UNet is the fine-tuned one


def test_freeze_parts_and_optimiser(imported, tmp_path):
    """model.freeze: frozen parameters have requires_grad False and are left out of AdamW."""
    folder = caption_folder(tmp_path / "images", count=8)
    task = DiffusionTask()

    def built(*overrides):
        config = load_config(str(imported / "config.yaml"), [f"init_from={imported}", f"data.root={folder}",
                                                             *FAST, *overrides])
        datamodule = ImageDataModule(config.data, seed=0)
        datamodule.setup("fit")
        return task.build(config, datamodule)[1]

    model = built()  # defaults: text encoder (and first stage) frozen, UNet trains
    text = model.net["conditioner"].conditioners[0]
    assert not any(p.requires_grad for p in text.encoder.parameters())
    assert all(p.requires_grad for p in model.net["backbone"].parameters())
    assert not any(p.requires_grad for p in model.first_stage.parameters())
    optimised = {id(p) for p in model.trainable_parameters()}
    assert not optimised & {id(p) for p in text.encoder.parameters()}
    assert optimised == {id(p) for p in model.net["backbone"].parameters()}

    model = built("model.freeze.token_embeddings=true", "model.freeze.backbone_resnets=true")
    text = model.net["conditioner"].conditioners[0]
    trainable = [n for n, p in text.encoder.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("embeddings.token_embedding.weight") and not text.fixed
    backbone = [n for n, p in model.net["backbone"].named_parameters() if p.requires_grad]
    assert backbone and all(".transformer_blocks." in n or ".proj_" in n or ".norm." in n for n in backbone)
    ids = model.net["conditioner"].conditioners[0].tokenize(["photo a"])[0]
    loss = text.encode(["photo a"], torch.zeros(1, dtype=torch.bool)).sum()
    loss.backward()
    grad = text.encoder.get_input_embeddings().weight.grad
    assert grad is not None and grad[ids[0]].abs().sum() > 0

    model = built("model.freeze.text_encoder=false", "model.freeze.backbone=true")
    text = model.net["conditioner"].conditioners[0]
    assert all(p.requires_grad for p in text.encoder.parameters())
    assert not any(p.requires_grad for p in model.net["backbone"].parameters())
    with pytest.raises(ConfigError, match="nothing would train"):
        built("model.freeze.backbone=true")
    with pytest.raises(ConfigError, match="first stage is always frozen"):
        load_config(None, ["model.freeze.first_stage=false"])


def error_line(capsys) -> str:
    """The command's one error line (the data summary line may come before it), and nothing after it."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("dforge: error")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_init_from_errors_are_one_line(imported, tmp_path, capsys):
    folder = caption_folder(tmp_path / "images", count=8)
    assert main(["train", str(imported / "config.yaml"), f"init_from={tmp_path / 'nope'}", f"data.root={folder}",
                 f"run_dir={tmp_path / 'a'}", *FAST]) != 0
    err = error_line(capsys)
    assert "init_from" in err and "nope" in err
    assert not (tmp_path / "a").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "first_stage.safetensors", "text_encoder"):
        (broken / name).symlink_to(imported / name)
    assert main(["train", str(imported / "config.yaml"), f"init_from={broken}", f"data.root={folder}",
                 f"run_dir={tmp_path / 'b'}", *FAST]) != 0
    assert "model.safetensors missing" in error_line(capsys)

    state = load_file(imported / "model.safetensors")
    key = "backbone.input_blocks.0.0.weight"
    state[key] = torch.zeros(7, *state[key].shape[1:])
    (broken / "model.safetensors").unlink(missing_ok=True)
    save_file(state, broken / "model.safetensors")
    assert main(["train", str(imported / "config.yaml"), f"init_from={broken}", f"data.root={folder}",
                 f"run_dir={tmp_path / 'c'}", *FAST]) != 0
    err = error_line(capsys)
    shape = tuple(load_file(imported / "model.safetensors")[key].shape)
    assert key in err and str(shape) in err and str((7, *shape[1:])) in err
    assert not (tmp_path / "c").exists()


def test_vae_dir_is_the_first_stage_of_a_latent_run(sd_pipeline, tmp_path):  # noqa: F811
    pipe, src = sd_pipeline
    folder = caption_folder(tmp_path / "images", count=8)
    overrides = [f"data.root={folder}", "data.name=folder", "model.conditioning.class_label=null",
                 "model.first_stage=autoencoder", f"model.latent.vae_dir={src / 'vae'}",
                 "model.unet.channel_mult=[1,2]", "model.unet.model_channels=32", "model.unet.num_res_blocks=1",
                 "model.unet.attention_resolutions=[]", f"run_dir={tmp_path / 'ldm'}", "trainer.max_steps=2", *FAST]
    assert main(["train", "fashion-ddpm", *overrides]) == 0
    run, config = open_run(tmp_path / "ldm")
    assert config.model.latent.scale_factor == pytest.approx(0.3)  # the VAE folder's scaling_factor
    assert config.model.latent.vae_dir == str(src / "vae")
    copy = load_file(run / "first_stage.safetensors")
    vae = DiffusionTask().load(run, config).first_stage.autoencoder
    assert copy.keys() == vae.state_dict().keys()
    assert DiffusionTask().load(run, config).latent_shape == (4, 8, 8)
    ours = vae.decode(torch.zeros(1, 4, 8, 8))
    theirs = pipe.vae.decode(torch.zeros(1, 4, 8, 8)).sample
    assert (ours - theirs).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="give one first stage"):
        load_latent_autoencoder(load_config("fashion-ddpm", ["model.first_stage=autoencoder",
                                                             "model.latent.run_dir=x", "model.latent.vae_dir=y"]))


def test_frozen_parameters_left_out_of_adamw_change_nothing(imported):
    """AdamW over the trainable parameters steps them exactly as the former AdamW over all of ``net`` (frozen
    ones had no gradient), and an optimiser state saved the former way resumes (``on_load_checkpoint``)."""
    import copy

    _, config = open_run(imported)
    model = DiffusionTask().build_model(config, autoencoder=load_latent_autoencoder(
        load_config(str(imported / "config.yaml"), [f"init_from={imported}"])))
    old = copy.deepcopy(model)
    frozen = [p for p in model.net.parameters() if not p.requires_grad]
    assert frozen  # the CLIP text encoder
    before = torch.optim.AdamW(old.net.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                               weight_decay=config.optim.weight_decay)  # the former configure_optimizers
    old.lr_schedule(before, -1)
    after = model.configure_optimizers()["optimizer"]
    assert len(after.param_groups[0]["params"]) == len(before.param_groups[0]["params"]) - len(frozen)

    def step(module, optimizer, seed):
        generator = torch.Generator().manual_seed(seed)
        for p in module.net.parameters():
            p.grad = torch.randn(p.shape, generator=generator) if p.requires_grad else None
        torch.nn.utils.clip_grad_norm_([p for p in module.net.parameters() if p.grad is not None], 1.0)
        optimizer.step()

    def same():
        return all(torch.equal(a, b) for a, b in zip(old.net.parameters(), model.net.parameters()))

    for seed in range(2):
        step(old, before, seed)
        step(model, after, seed)
        assert same(), seed
    checkpoint = {"optimizer_states": [copy.deepcopy(before.state_dict())]}  # as read from a file
    model.on_load_checkpoint(checkpoint)
    after.load_state_dict(checkpoint["optimizer_states"][0])
    step(old, before, 2)
    step(model, after, 2)
    for (name, a), b in zip(old.net.named_parameters(), model.net.parameters()):
        assert torch.equal(a, b), name


def test_story_run_fine_tuned_from_a_story_run(tmp_path):
    """task=story: init_from a tiny AR-LDM run with ARLDM's freeze_resnet (model.freeze.backbone_resnets) and the
    history encoder frozen; the caption encoder stays frozen; what is frozen ends bit-identical."""
    from test_story_run import TINY_STORY
    from test_text_conditioner import _tiny_bert

    (tmp_path / "bert").mkdir()
    text = _tiny_bert(tmp_path / "bert")
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--no-progress", "fashion-arldm", *TINY_STORY, f"model.conditioning.story.path={text}"]
    assert main(["train", *common, f"run_dir={first}"]) == 0
    assert main(["train", *common, f"run_dir={second}", f"init_from={first}", "model.freeze.backbone_resnets=true",
                 "model.freeze.history_encoder=true"]) == 0
    start, end = load_file(first / "model.safetensors"), load_file(second / "model_raw.safetensors")
    assert start.keys() == end.keys()
    same = {k for k in start if torch.equal(start[k], end[k])}
    history = [k for k in start if ".history." in k]
    caption_encoder = [k for k in start if ".text.encoder." in k]
    assert history and caption_encoder and set(history) <= same and set(caption_encoder) <= same
    attention = [k for k in start if k.startswith("backbone.") and ".transformer_blocks." in k]
    resnets = [k for k in start if k.startswith("backbone.") and (".in_layers." in k or ".out_layers." in k)]
    assert resnets and set(resnets) <= same
    assert attention and not set(attention) <= same
    assert [k for k in start if "caption_proj" in k and k not in same]  # the projection trains


def test_bridge_run_on_a_diffusers_vae_fine_tuned_from_a_bridge_run(sd_pipeline, tmp_path):  # noqa: F811
    """task=bridge: model.latent.vae_dir as first stage; a second run init_from the first takes its first stage
    (first_stage.safetensors) and latent scale with no VAE named, and trains only the attention blocks."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for path in caption_folder(tmp_path / "images", count=8).glob("*.png"):
        path.rename(folder / path.name)
    common = ["--no-progress", "fashion-lbm-sr", "data.name=folder", f"data.root={folder}",
              "data.degradation.scale=2", "model.latent.run_dir=null", "model.unet.model_channels=32",
              "model.unet.num_head_channels=16", "model.unet.num_res_blocks=1", "trainer.max_steps=3",
              "trainer.max_time=null", "trainer.accelerator=cpu", "trainer.val_every_n_steps=1000",
              "optim.warmup_steps=0", "data.batch_size=4", "data.num_workers=0"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", *common, f"model.latent.vae_dir={sd_pipeline[1] / 'vae'}", f"run_dir={first}"]) == 0
    assert main(["train", *common, f"init_from={first}", "model.freeze.backbone_resnets=true",
                 f"run_dir={second}"]) == 0
    config = open_run(second)[1]
    assert config.model.latent.scale_factor == pytest.approx(0.3) and config.model.latent.vae_dir is None
    a, b = load_file(first / "first_stage.safetensors"), load_file(second / "first_stage.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start, end = load_file(first / "model.safetensors"), load_file(second / "model_raw.safetensors")
    resnets = [k for k in start if ".in_layers." in k or ".out_layers." in k]
    attention = [k for k in start if ".transformer_blocks." in k or ".qkv." in k or ".proj_out." in k]
    assert resnets and all(torch.equal(start[k], end[k]) for k in resnets)
    assert attention and not all(torch.equal(start[k], end[k]) for k in attention)

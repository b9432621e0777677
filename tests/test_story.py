"""AR-LDM: the story conditioner (causal mask, type / time embeddings, condition dropout, null
segments, new character tokens), the StoryModel (visualisation / continuation training,
autoregressive generation) and the config checks.

Tiny random text encoders (the BERT / CLIP of ``test_text_conditioner``) and a tiny UNet in
pixel space keep every test fast; the weights are randomised (the UNet zero-initialises its
output projections) so that anything the mask lets through moves the output.
"""

from __future__ import annotations

import pytest
import torch

from diffusionforge.backbones import UNet, UNetConfig
from diffusionforge.conditioning.story import StoryConditioner, StoryConditionerConfig, causal_history_mask
from diffusionforge.config.loader import load_config
from diffusionforge.errors import ConfigError
from diffusionforge.first_stage import IdentityFirstStage
from test_text_conditioner import _tiny_bert, _tiny_clip
from tolerances import assert_close_scaled, float64_group_norm, reduction_depth

transformers = pytest.importorskip("transformers")

F = 4  # frames per story
S = 8  # canvas side (pixel space: the "latent" is the frame itself)
CAPTIONS = [["a sneaker at the top", "it moves to the bag", "the same sneaker, now smaller", "it turns"],
            ["a red bag", "the bag moves", "it gets larger", "a photo of a shoe"]]


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return {"minilm": _tiny_bert(tmp_path_factory.mktemp("story-bert")),
            "clip": _tiny_clip(tmp_path_factory.mktemp("story-clip"))}


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module


def _conditioner(tiny_paths, encoder="minilm", **overrides) -> StoryConditioner:
    config = StoryConditionerConfig(encoder=encoder, path=tiny_paths[encoder], max_length=8, dim=16,
                                    heads=2, patch=4, **overrides)
    conditioner = StoryConditioner(config, frames=F, latent_shape=(1, S, S))
    for module in (conditioner.caption_proj, conditioner.type_embedding, conditioner.time_embedding,
                   conditioner.history):
        if module is not None:
            _randomise(module)
    return conditioner.eval()


def _wake(unet: torch.nn.Module) -> torch.nn.Module:
    """Randomise the zero-initialised output projections (else the context has no effect at init)."""
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.copy_(torch.randn_like(p) * 0.1)
    return unet


def _unet() -> UNet:
    config = UNetConfig(in_channels=1, out_channels=1, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[1], num_head_channels=8, norm_groups=8, context_dim=16)
    return _wake(UNet(config).eval())


def _frames(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    frames = torch.rand((len(CAPTIONS), F, 1, S, S), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return frames.to(dtype)


def _cond(conditioner, captions, frames, targets):
    return {k: v for k, v in zip(("crossattn", "crossattn_mask"),
                                 conditioner({"captions": captions, "frames": frames, "targets": targets},
                                             first_stage=IdentityFirstStage()))}


def test_causal_history_mask_is_arldm_triu():
    mask = causal_history_mask([0, 1, 2, 3], 3)
    assert mask.tolist() == [[False, False, False], [True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("j", range(F))
def test_frame_j_does_not_see_frames_or_captions_from_j_on(tiny_paths, j):
    """Perturbing frames >= j and captions > j leaves the UNet output at frame j unchanged.

    In float64, so that "unchanged" holds to ~1e-12 on every CPU (tests/tolerances.py).
    """
    torch.manual_seed(0)
    conditioner, unet = _conditioner(tiny_paths).double(), _unet().double()
    frames = _frames(dtype=torch.float64)
    later = frames.clone()
    later[:, j:] = _frames(seed=1, dtype=torch.float64)[:, j:]
    captions = [story[:j + 1] + ["a bag moves to the photo"] * (F - 1 - j) for story in CAPTIONS]
    x, t = torch.randn(len(CAPTIONS), 1, S, S).double(), torch.full((len(CAPTIONS),), 300)
    with torch.no_grad(), float64_group_norm():
        reference = unet(x, t, _cond(conditioner, CAPTIONS, frames, [j]))
        perturbed = unet(x, t, _cond(conditioner, captions, later, [j]))
        assert_close_scaled(perturbed, reference, depth=reduction_depth(unet, conditioner))
        if j > 0:  # the control: an earlier frame does move it
            earlier = frames.clone()
            earlier[:, j - 1] = _frames(seed=2, dtype=torch.float64)[:, j - 1]
            moved = unet(x, t, _cond(conditioner, CAPTIONS, earlier, [j]))
            assert (moved - reference).abs().max() > 1e-3
        own = [story[:j] + ["a photo of a red shoe"] + story[j + 1:] for story in CAPTIONS]
        assert (unet(x, t, _cond(conditioner, own, frames, [j])) - reference).abs().max() > 1e-3


def test_sequence_layout_and_mask(tiny_paths):
    conditioner = _conditioner(tiny_paths)
    cond = _cond(conditioner, CAPTIONS, _frames(), [0, 2])
    length = conditioner.config.max_length
    assert cond["crossattn"].shape == (2 * 2, F * length, 16)  # caption + F-1 history segments
    mask = cond["crossattn_mask"].view(4, F, length)
    assert mask[:, 0].any(dim=1).all()  # every row sees its own caption
    assert not mask[0::2, 1:].any()  # rows (b, j=0): no history
    assert mask[1::2, 1:3].any(dim=2).all() and not mask[1::2, 3].any()  # (b, 2): segments 0, 1 only


def test_type_and_time_embeddings_are_added_per_segment(tiny_paths):
    conditioner = _conditioner(tiny_paths)
    length, frames = conditioner.config.max_length, _frames()
    with torch.no_grad():
        with_embeddings = _cond(conditioner, CAPTIONS, frames, [3])["crossattn"]
        type_weight = conditioner.type_embedding.weight.clone()
        time_weight = conditioner.time_embedding.weight.clone()
        conditioner.type_embedding.weight.zero_()
        conditioner.time_embedding.weight.zero_()
        without = _cond(conditioner, CAPTIONS, frames, [3])["crossattn"]
    added = (with_embeddings - without).view(len(CAPTIONS), F, length, -1)
    torch.testing.assert_close(added[:, 0], type_weight[0].expand_as(added[:, 0]))  # the caption: type 0 only
    for k in range(F - 1):
        expected = (type_weight[1] + time_weight[k]).expand_as(added[:, k + 1])
        torch.testing.assert_close(added[:, k + 1], expected)  # history k: type 1 + time k


def test_condition_dropout_rate_null_rows_and_eval(tiny_paths):
    conditioner = _conditioner(tiny_paths, ucg_rate=0.3)
    frames = _frames()
    captions = CAPTIONS * 64  # 128 stories x 4 targets = 512 rows
    frames = frames.repeat(64, 1, 1, 1, 1)
    batch = {"captions": captions, "frames": frames}
    with torch.no_grad():
        null = conditioner(batch, force_uncond=True, first_stage=IdentityFirstStage())
        full = conditioner(batch, first_stage=IdentityFirstStage())  # eval mode: nothing dropped
        conditioner.train()
        torch.manual_seed(0)
        trained = conditioner(batch, first_stage=IdentityFirstStage())
    rows_null = (trained.value - null.value).flatten(1).abs().amax(1) < 1e-6
    rows_full = (trained.value - full.value).flatten(1).abs().amax(1) < 1e-6
    assert bool((rows_null ^ rows_full).all())  # each row is either the real or the null condition
    assert abs(rows_null.float().mean().item() - 0.3) < 0.06, rows_null.float().mean()
    assert torch.equal(trained.mask[rows_null], null.mask[rows_null])
    # the null condition: the empty caption and the same null segment for every history frame
    length = conditioner.config.max_length
    segments = null.value.view(-1, F, length, 16)[:, 1:] - conditioner.time_embedding.weight[:F - 1, None]
    torch.testing.assert_close(segments, segments[:, :1].expand_as(segments))


def test_history_off_is_the_history_masked_out(tiny_paths):
    """The captions-only ablation gives what the full sequence gives with its history masked (float64)."""
    torch.manual_seed(0)
    with_history, unet = _conditioner(tiny_paths).double(), _unet().double()
    captions_only = _conditioner(tiny_paths, history=False).double()
    captions_only.load_state_dict(with_history.state_dict(), strict=False)
    frames = _frames(dtype=torch.float64)
    x, t = torch.randn(len(CAPTIONS), 1, S, S).double(), torch.full((len(CAPTIONS),), 500)
    with torch.no_grad(), float64_group_norm():
        full = _cond(with_history, CAPTIONS, frames, [3])
        length = with_history.config.max_length
        full["crossattn_mask"][:, length:] = False
        short = _cond(captions_only, CAPTIONS, frames, [3])
        assert short["crossattn"].shape[1] == length
        assert_close_scaled(unet(x, t, short), unet(x, t, full), depth=reduction_depth(unet, with_history))


def test_clip_caption_encoder(tiny_paths):
    conditioner = _conditioner(tiny_paths, encoder="clip")
    cond = _cond(conditioner, CAPTIONS, _frames(), [1])
    assert cond["crossattn"].shape == (2, F * 8, 16)
    assert torch.isfinite(cond["crossattn"]).all()


def test_new_character_token_starts_as_its_similar_word(tiny_paths):
    conditioner = _conditioner(tiny_paths, characters={"pororo": "sneaker"})
    tokenizer, encoder = conditioner.text.tokenizer, conditioner.text.encoder
    assert len(tokenizer.tokenize("a pororo")) == 2  # one new token, not word pieces
    table = encoder.get_input_embeddings().weight
    new_id = tokenizer.convert_tokens_to_ids("pororo")
    sneaker = tokenizer.convert_tokens_to_ids("sneaker")
    torch.testing.assert_close(table[new_id], table[sneaker])
    with torch.no_grad():
        a, _ = conditioner.text.encode(["a pororo"], torch.zeros(1, dtype=torch.bool))
        b, _ = conditioner.text.encode(["a sneaker"], torch.zeros(1, dtype=torch.bool))
    torch.testing.assert_close(a, b)  # the encoder reads the name as the word it was started from


def test_character_words_are_averaged_and_known_tokens_refused(tiny_paths):
    conditioner = _conditioner(tiny_paths, characters={"loopy": "red bag"})
    tokenizer = conditioner.text.tokenizer
    table = conditioner.text.encoder.get_input_embeddings().weight
    words = tokenizer.convert_tokens_to_ids(["red", "bag"])
    torch.testing.assert_close(table[tokenizer.convert_tokens_to_ids("loopy")], table[words].mean(0))
    with pytest.raises(ConfigError, match="characters"):
        _conditioner(tiny_paths, characters={"bag": "shoe"})


@pytest.mark.parametrize("overrides, key", [
    ({"ucg_rate": 1.5}, "ucg_rate"), ({"dim": 10, "heads": 4}, "dim"), ({"patch": 0}, "patch"),
    ({"fusion_layers": -1}, "fusion_layers"), ({"characters": {"x": ""}}, "characters"),
    ({"encoder": "t5"}, "encoder")])
def test_conditioner_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        StoryConditionerConfig(**overrides)


def test_patch_must_divide_the_latent(tiny_paths):
    with pytest.raises(ConfigError, match="patch"):
        StoryConditioner(StoryConditionerConfig(path=tiny_paths["minilm"], patch=3, dim=16, heads=2),
                         frames=F, latent_shape=(1, S, S))


def test_bad_batches_name_the_key(tiny_paths):
    conditioner = _conditioner(tiny_paths)
    with pytest.raises(ValueError, match="captions"):
        conditioner({"captions": [c[:2] for c in CAPTIONS], "frames": _frames()}, first_stage=IdentityFirstStage())
    with pytest.raises(ValueError, match="targets"):
        conditioner({"captions": CAPTIONS, "frames": _frames(), "targets": [F]}, first_stage=IdentityFirstStage())
    with pytest.raises(ValueError, match="frames"):
        conditioner({"captions": CAPTIONS, "frames": _frames()[:, :2]}, first_stage=IdentityFirstStage())


# --------------------------------------------------------------------------- the model

STORY = ["task=story", "model.first_stage=identity", "data.image_size=16", "data.batch_size=4",
         "data.story.canvas=16", "data.story.item_size=8", "data.story.train_stories=16",
         "data.story.val_stories=4", "data.story.test_stories=4",
         "model.unet.model_channels=16", "model.unet.channel_mult=[1,2]", "model.unet.num_res_blocks=1",
         "model.unet.attention_resolutions=[2]", "model.unet.num_head_channels=16",
         "model.unet.norm_groups=8", "model.process.num_timesteps=100",
         "model.conditioning.story.dim=16", "model.conditioning.story.heads=2",
         "model.conditioning.story.patch=4", "model.conditioning.story.max_length=8"]


def _model(tiny_paths, *overrides):
    from diffusionforge.tasks import build_model

    config = load_config("fashion-ddpm", [*STORY, f"model.conditioning.story.path={tiny_paths['minilm']}",
                                          "model.conditioning.class_label=null", *overrides])
    return build_model(config), config


def test_story_grid_comes_from_the_grid_source_without_a_trainer(tiny_paths, tmp_path):
    from diffusionforge.data.datamodule import ImageDataModule
    from diffusionforge.models.base import NoGridSource
    from diffusionforge.models.story import GRID_STORIES

    model, config = _model(tiny_paths, "sample.steps=2")
    with pytest.raises(NoGridSource):
        model.write_sample_grid(tmp_path / "none.png")
    datamodule = ImageDataModule(config.data)
    datamodule.setup("fit")
    stories, asked = datamodule.val_set, []
    model.grid_source = lambda n: asked.append(n) or [stories[i] for i in range(min(n, len(stories)))]
    assert model._trainer is None
    path = model.write_sample_grid(tmp_path / "grid.png")
    assert path.is_file() and (tmp_path / "latest.png").is_file() and asked == [GRID_STORIES]


@pytest.mark.parametrize("task, rows", [("visualisation", 4 * 4), ("continuation", 4 * 3)])
def test_training_loss_covers_the_target_frames(tiny_paths, task, rows):
    from diffusionforge.data.datamodule import ImageDataModule

    model, config = _model(tiny_paths, f"story.mode={task}")
    _wake(model.net["backbone"])  # so that gradients reach the context
    datamodule = ImageDataModule(config.data)
    batch = next(iter(datamodule.train_dataloader()))
    seen = {}

    def record(module, args, out) -> None:
        seen["x"] = args[0].shape

    handle = model.net["backbone"].register_forward_hook(record)
    loss = model.diffusion_loss(batch)
    handle.remove()
    assert seen["x"][0] == rows and torch.isfinite(loss.loss)
    loss.loss.backward()
    assert model.net["conditioner"].conditioners[0].history.text_proj.weight.grad.abs().sum() > 0


def test_generation_is_autoregressive_and_keeps_a_given_first_frame(tiny_paths):
    from diffusionforge.models.generative import SampleRequest

    model, config = _model(tiny_paths, "story.mode=continuation")
    _randomise(model.ema.module["conditioner"].conditioners[0].history)
    _wake(model.ema.module["backbone"])
    request = SampleRequest(steps=3, guidance=2.0, clip_denoised=True)
    first = torch.rand(2, 1, 16, 16) * 2 - 1
    captions = [["a sneaker", "it moves", "it turns"]] * 2
    stories = model.generate(captions, request, first_frames=first, generator=torch.Generator().manual_seed(0))
    assert stories.shape == (2, 3, 1, 16, 16)
    torch.testing.assert_close(stories[:, 0], first)
    other = model.generate(captions, request, first_frames=-first, generator=torch.Generator().manual_seed(0))
    assert (other[:, 1] - stories[:, 1]).abs().max() > 1e-4  # frame 1 depends on the given frame 0
    with pytest.raises(ValueError, match="first frame"):
        model.generate(captions, request)
    with pytest.raises(ValueError, match="captions"):
        model.generate([["a"] * (F + 1)], request, first_frames=first[:1])


def test_story_config_errors():
    from diffusionforge.tasks import build_model

    with pytest.raises(ConfigError, match="data.image_size"):
        load_config("fashion-ddpm", ["data.story.canvas=32"])
    with pytest.raises(ConfigError, match="data.story"):
        build_model(load_config("fashion-ddpm", ["task=story", "model.conditioning.class_label=null",
                                                 "model.conditioning.story.dim=16"]))
    with pytest.raises(ConfigError, match="model.conditioning.story"):
        build_model(load_config("fashion-ddpm", [*STORY, "model.conditioning.class_label=null",
                                                 "model.conditioning.story=null"]))
    with pytest.raises(ConfigError, match="model.conditioning.class_label"):
        build_model(load_config("fashion-ddpm", STORY))


def _tiny_blip(directory) -> str:
    from test_text_conditioner import WORDS

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    torch.manual_seed(0)
    vision = transformers.BlipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    text = transformers.BlipTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=16,
                                       max_position_embeddings=16)
    config = transformers.BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    transformers.BlipForImageTextRetrieval(config).save_pretrained(directory)
    return str(directory)


def test_blip_history_encoder_from_a_local_folder(tiny_paths, tmp_path):
    blip = _tiny_blip(tmp_path)
    conditioner = _conditioner(tiny_paths, history_encoder="blip", blip_path=blip)
    _randomise(conditioner.history.proj)
    assert not any(p.requires_grad for p in conditioner.history.vision.parameters())
    frames = _frames()
    cond = _cond(conditioner, CAPTIONS, frames, [2])
    assert cond["crossattn"].shape == (2, F * 8, 16)
    later, earlier = frames.clone(), frames.clone()
    later[:, 2:] = _frames(seed=1)[:, 2:]
    earlier[:, 1] = _frames(seed=1)[:, 1]
    mask = cond["crossattn_mask"].unsqueeze(-1)
    torch.testing.assert_close(_cond(conditioner, CAPTIONS, later, [2])["crossattn"] * mask, cond["crossattn"] * mask)
    assert ((_cond(conditioner, CAPTIONS, earlier, [2])["crossattn"] - cond["crossattn"]) * mask).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="blip_path"):
        StoryConditionerConfig(history_encoder="blip")
    from diffusionforge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="BLIP history encoder: .*missing: folder not found"):
        _conditioner(tiny_paths, history_encoder="blip", blip_path=str(tmp_path / "missing"))


def test_a_story_run_refuses_objectives_other_than_ddpm(tiny_paths):
    from diffusionforge.errors import ConfigError
    from diffusionforge.tasks import build_model

    config = load_config("fashion-ddpm", [*STORY, "model.conditioning.class_label=null", "model.objective=flow"])
    with pytest.raises(ConfigError, match="^model.objective=flow: story runs train the DDPM process"):
        build_model(config)

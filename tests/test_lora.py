"""LoRA (`model.lora`): an imported tiny Stable Diffusion fine-tuned with adapters through the CLI.

Only the adapters change (the UNet's own weights, the text encoder and the
VAE stay bit-identical to the imported ones); the run's
``pytorch_lora_weights.safetensors`` has the key names diffusers gives the
same adapters (peft's ``add_adapter`` on ``UNet2DConditionModel`` +
``get_peft_model_state_dict``), loads into a diffusers
``StableDiffusionPipeline`` with ``load_lora_weights``, and the loaded UNet
gives our run's UNet output; ``dforge convert --kind unet`` merges the
adapters into the weights.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffusionforge.backbones.lora import base_key, is_lora_key
from diffusionforge.cli.main import main
from diffusionforge.config.loader import load_config
from diffusionforge.errors import ConfigError
from diffusionforge.interop.lora import DIFFUSERS_LORA_WEIGHTS
from diffusionforge.runs import open_run
from diffusionforge.tasks.diffusion import DiffusionTask

from test_finetune import FAST, caption_folder, error_line, imported  # noqa: F401  (imported: the fixture)
from test_import import sd_pipeline  # noqa: F401  (the fixture)

RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def lora_run(imported, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("lora")
    folder = caption_folder(root / "images", count=8)
    out = root / "run"
    assert main(["train", str(imported / "config.yaml"), f"init_from={imported}", f"data.root={folder}",
                 f"run_dir={out}", "trainer.max_steps=4", *FAST, "optim.lr=1e-2", "optim.ema_decay=0",
                 f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}"]) == 0
    return out


def test_only_the_adapters_train(imported, lora_run):  # noqa: F811
    before = load_file(imported / "model.safetensors")
    for name in ("model.safetensors", "model_raw.safetensors"):
        after = load_file(lora_run / name)
        adapters = [k for k in after if is_lora_key(k)]
        assert adapters and all(".attn1." in k or ".attn2." in k for k in adapters)
        assert {base_key(k) for k in after if not is_lora_key(k)} == set(before)
        assert all(torch.equal(after[k], before[base_key(k)]) for k in after if not is_lora_key(k)), name
        assert any(after[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)  # B starts at 0: it trained
    vae_before, vae_after = load_file(imported / "first_stage.safetensors"), load_file(lora_run / "first_stage.safetensors")
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    model = DiffusionTask().load(lora_run, open_run(lora_run)[1])
    trainable = [n for n, p in model.net.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n in trainable)


def test_diffusers_lora_file_loads_in_the_pipeline(sd_pipeline, lora_run, tmp_path):  # noqa: F811
    _, src = sd_pipeline
    ours_file = load_file(lora_run / DIFFUSERS_LORA_WEIGHTS)
    reference = diffusers.UNet2DConditionModel.from_pretrained(src / "unet")
    reference.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    expected = {f"unet.{k}" for k in get_peft_model_state_dict(reference)}
    assert set(ours_file) == expected  # diffusers' own key names for the same adapters

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    plain = pipe.unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 300])
    context = torch.randn(2, 77, plain.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = plain(x, t, encoder_hidden_states=context).sample
        pipe.load_lora_weights(lora_run)
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample
        model = DiffusionTask().load(lora_run, open_run(lora_run)[1])
        ours = model.sampling_net()["backbone"](x, t, {"crossattn": context})
    assert (theirs - base).abs().max() > 1e-3  # the adapters act: not a vacuous match
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)

    merged = tmp_path / "unet"
    assert main(["convert", str(lora_run), "--kind", "unet", "--to", "diffusers", "--out", str(merged)]) == 0
    unet = diffusers.UNet2DConditionModel.from_pretrained(merged).eval()
    with torch.no_grad():
        assert torch.allclose(unet(x, t, encoder_hidden_states=context).sample, theirs, atol=1e-5, rtol=1e-4)


def test_lora_config_errors_are_one_line(imported, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ConfigError, match="model.lora.rank"):
        load_config(None, ["model.lora.rank=-1"])
    with pytest.raises(ConfigError, match="model.lora.targets"):
        load_config(None, ["model.lora.rank=2", "model.lora.targets=[to_x]"])
    folder = caption_folder(tmp_path / "images", count=4)
    common = ["train", str(imported / "config.yaml"), f"data.root={folder}", *FAST, "model.lora.rank=2"]
    assert main([*common, f"run_dir={tmp_path / 'a'}"]) != 0
    assert "give init_from" in error_line(capsys)
    assert main([*common, f"init_from={imported}", "model.lora.targets=[qkv]", f"run_dir={tmp_path / 'b'}"]) != 0
    assert "'qkv' is not an attention projection of the unet backbone" in error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dit_adapters_on_qkv_and_proj_merge_exactly():
    """DiT: adapters on every block's fused qkv and proj only (not x_embedder.proj); merged = adapted."""
    from diffusionforge.backbones.config import DiTConfig, LoRAConfig
    from diffusionforge.backbones.dit import DiT
    from diffusionforge.backbones.lora import add_lora, lora_layers, merged_backbone

    torch.manual_seed(0)
    dit = DiT(DiTConfig(in_channels=4, out_channels=4, input_size=8, patch_size=2, hidden_size=32, depth=2,
                        num_heads=2))
    with torch.no_grad():  # adaLN-Zero starts at zero: make every block act
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dit = add_lora(dit, LoRAConfig(rank=2, alpha=3.0, targets=["qkv", "proj"]), "dit")
    assert sorted(lora_layers(dit)) == [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("proj", "qkv")]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 500])
    with torch.no_grad():
        before = dit(x, t)
        for _, lora_b, _ in lora_layers(dit).values():
            lora_b.normal_()
        adapted = dit(x, t)
        merged = merged_backbone(dit)(x, t)
    assert (adapted - before).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="'to_q' is not an attention projection of the dit backbone"):
        add_lora(DiT(DiTConfig(in_channels=4, out_channels=4, input_size=8, patch_size=2, hidden_size=32,
                               depth=1, num_heads=2)), LoRAConfig(rank=2, targets=["to_q"]), "dit")

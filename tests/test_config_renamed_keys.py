"""Keys renamed since runs were first written still load: old run directories stay usable."""

from __future__ import annotations

from diffusionforge.config.loader import RENAMED_KEYS, load_config


def test_a_run_config_written_with_the_old_names_loads_under_the_new_ones(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("task: bridge\ndata:\n  degradation:\n    task: inpainting\n    mask: box\nstory:\n  task: continuation\n")
    config = load_config(str(old))
    assert config.task == "bridge"  # the kind of run keeps its name
    assert config.data.degradation.kind == "inpainting" and config.data.degradation.mask == "box"
    assert config.story.mode == "continuation"


def test_old_names_work_as_overrides_and_the_new_name_wins_when_both_are_given(tmp_path):
    assert load_config("fashion-lbm-sr", ["data.degradation.task=denoising"]).data.degradation.kind == "denoising"
    both = tmp_path / "both.yaml"
    both.write_text("story:\n  task: continuation\n  mode: visualisation\n")
    assert load_config(str(both)).story.mode == "visualisation"


def test_every_renamed_key_exists_under_its_new_name():
    config = load_config("fashion-lbm-sr")
    for section, _, new in RENAMED_KEYS:
        node = config
        for part in section.split("."):
            node = getattr(node, part)
        assert hasattr(node, new)

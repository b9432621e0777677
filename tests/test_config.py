"""Config loading: presets, YAML, overrides, and one-line errors naming the key."""

import pytest

from diffusionforge.config import ExperimentConfig, list_presets, load_config
from diffusionforge.errors import ConfigError


def test_presets_load_and_are_typed():
    presets = list_presets()
    assert {"fashion-ddpm", "tiny"} <= set(presets)
    for name in presets:
        config = load_config(name)
        assert isinstance(config, ExperimentConfig)


def test_override_merges_and_converts_types():
    config = load_config("tiny", ["trainer.max_steps=7", "model.unet.channel_mult=[1,2,2]",
                                  "sample.guidance=3"])
    assert config.trainer.max_steps == 7
    assert tuple(config.model.unet.channel_mult) == (1, 2, 2)
    assert config.sample.guidance == 3.0


def test_yaml_file_layer(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: mine\ntrainer:\n  max_steps: 11\n")
    config = load_config(str(path), ["seed=3"])
    assert (config.name, config.trainer.max_steps, config.seed) == ("mine", 11, 3)


def test_a_yaml_file_without_a_name_names_runs_after_itself(tmp_path):
    path = tmp_path / "my-experiment.yaml"
    path.write_text("optim:\n  lr: 0.003\n")
    assert load_config(str(path)).name == "my-experiment"
    assert load_config(str(path), ["name=other"]).name == "other"
    named = tmp_path / "file.yaml"
    named.write_text("name: kept\n")
    assert load_config(str(named)).name == "kept"
    assert load_config("fashion-flow").name == "fashion-flow"


@pytest.mark.parametrize("override, pattern", [
    ("model.unet.nonsense=1", "unknown config key 'model.unet.nonsense'"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("model.process.beta_schedule=quadratic", "model.process.beta_schedule"),
    ("sample.sampler=euler_sde", "sample.sampler"),
    ("sample.schedule=cosine", "sample.schedule"),
    ("max_steps", "key.sub=value"),
])
def test_bad_override_is_one_line_error_naming_key(override, pattern):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert pattern in str(info.value)
    assert "\n" not in str(info.value)


def test_range_error_names_the_nested_key():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["data.batch_size=0"])
    assert "batch_size" in str(info.value) and "\n" not in str(info.value)


def test_unknown_config_file():
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))

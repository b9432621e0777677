"""A run's config.yaml names its data by absolute paths, so the run works from any working directory."""

import yaml

from diffusionforge.config.loader import load_config
from diffusionforge.runs import CONFIG_FILE, create_run_dir


def recorded_data(run_dir, overrides):
    config = load_config("tiny", [*overrides, f"run_dir={run_dir}"])
    run_dir, config = create_run_dir(config)
    return yaml.safe_load((run_dir / CONFIG_FILE).read_text())["data"], config.data


def test_relative_data_folders_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    recorded, data = recorded_data(tmp_path / "run", ["data.name=folder", "data.root=photos"])
    assert recorded["root"] == data.root == str(tmp_path / "photos")


def test_urls_and_missing_paths_are_kept_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k, root in enumerate(("pipe:cat shards/train-000000.tar", "not-here")):
        recorded, _ = recorded_data(tmp_path / "runs" / str(k), ["data.name=folder", f"data.root={root}"])
        assert recorded["root"] == root

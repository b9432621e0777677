"""`dforge train` then `dforge sample` end to end, and one-line errors for bad input."""

import gzip
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from diffusionforge.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("dforge: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_writes_a_complete_run_directory(tiny_run):
    for name in ["config.yaml", "model.safetensors", "model_raw.safetensors",
                 "checkpoints/last.ckpt", "samples/final.png", "samples/latest.png",
                 "logs/version_0/metrics.csv", "train_summary.json"]:
        assert (tiny_run / name).is_file(), name
    summary = json.loads((tiny_run / "train_summary.json").read_text())
    assert summary["global_step"] == 20
    grid = np.asarray(Image.open(tiny_run / "samples" / "final.png"))
    assert grid.ndim == 2 and grid.std() > 0


def test_sample_writes_grid_and_is_seeded(tiny_run, tmp_path, capsys):
    out_a, out_b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (out_a, out_b):
        code, err = run_cli(capsys, "sample", str(tiny_run), "--num", "6", "--steps", "4",
                            "--seed", "3", "--out", str(out), "--class", "7")
        assert code == 0, err
    a, b = np.asarray(Image.open(out_a)), np.asarray(Image.open(out_b))
    assert np.array_equal(a, b)
    code, err = run_cli(capsys, "sample", str(tiny_run), "--num", "4", "--sampler", "ddpm",
                        "--steps", "10", "--guidance", "1", "--out", str(tmp_path / "c.png"))
    assert code == 0, err


def test_sample_with_a_sigma_sampler_and_schedule(tiny_run, tmp_path, capsys):
    outs = [tmp_path / "k1.png", tmp_path / "k2.png"]
    for out in outs:
        code, err = run_cli(capsys, "sample", str(tiny_run), "--num", "4", "--sampler", "dpmpp_2m_sde",
                            "--schedule", "karras", "--steps", "3", "--seed", "2", "--out", str(out))
        assert code == 0, err
    assert np.array_equal(*(np.asarray(Image.open(out)) for out in outs))
    assert_one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--sampler", "flow_euler",
                                   "--out", str(tmp_path / "x.png")), "--sampler", "objective ddpm")
    with pytest.raises(SystemExit):  # argparse: not one of the schedules
        main(["sample", str(tiny_run), "--schedule", "cosine"])


def test_presets_lists_shipped_configs(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "fashion-ddpm" in out and "tiny" in out


def test_unknown_config_key(capsys):
    assert_one_line_error(*run_cli(capsys, "train", "tiny", "model.unet.widht=3"),
                          "unknown config key 'model.unet.widht'")


@pytest.mark.parametrize("argv", [
    ["train", "tiny", "--no-progress", "seed=1", "nonsense_key=1"],
    ["train", "seed=1", "--no-progress", "nonsense_key=1"],
    ["cache", "tiny", "--out", "{tmp}/cache", "nonsense_key=1"],
    ["shard", "tiny", "--out", "{tmp}/shards", "nonsense_key=1"],
])
def test_overrides_may_follow_the_options(capsys, tmp_path, argv):
    """key=value after an option reaches the config (its error names the key), as argparse alone would refuse."""
    code = main([arg.format(tmp=tmp_path) for arg in argv])
    assert_one_line_error(code, capsys.readouterr().err, "nonsense_key")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "shards").exists()


@pytest.mark.parametrize("argv, word", [(["train", "tiny", "--no-progress", "--bogus"], "--bogus"),
                                        (["train", "tiny", "--no-progress", "nokey"], "nokey"),
                                        (["sample", "RUN", "--num", "2", "seed=1"], "seed=1")])
def test_other_leftovers_are_still_refused(capsys, argv, word):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and f"unrecognized arguments: {word}" in capsys.readouterr().err


def test_wrong_value_type(capsys):
    assert_one_line_error(*run_cli(capsys, "train", "tiny", "trainer.max_steps=many"),
                          "trainer.max_steps")


def test_missing_data_path(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_line_error(*run_cli(capsys, "train", "tiny", "data.name=fashion-mnist",
                                   f"data.root={missing}", f"run_dir={tmp_path / 'r'}"),
                          str(missing))
    assert not (tmp_path / "r").exists()


def idx_dir_with(tmp_path, images_bytes):
    root = tmp_path / "fm"
    root.mkdir()
    labels = b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes(4)
    for split in ("train", "t10k"):
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images_bytes))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    return root


def test_truncated_idx_file(capsys, tmp_path):
    header = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (4, 28, 28))
    root = idx_dir_with(tmp_path, header + bytes(100))
    assert_one_line_error(*run_cli(capsys, "train", "tiny", "data.name=fashion-mnist",
                                   f"data.root={root}"), "truncated")


def test_wrong_magic_idx_file(capsys, tmp_path):
    root = idx_dir_with(tmp_path, b"\x12\x34\x56\x78" + bytes(100))
    assert_one_line_error(*run_cli(capsys, "train", "tiny", "data.name=fashion-mnist",
                                   f"data.root={root}"), "magic")


def test_nonexistent_run_directory(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "sample", str(tmp_path / "nope")),
                          "run directory not found")
    assert_one_line_error(*run_cli(capsys, "train", "--resume", str(tmp_path / "nope")),
                          "run directory not found")


def test_checkpoint_from_another_architecture(capsys, tiny_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    config = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(config.replace("model_channels: 16", "model_channels: 24"))
    assert_one_line_error(*run_cli(capsys, "sample", str(other), "--out", str(tmp_path / "x.png")),
                          "model.safetensors", "do not fit")


def test_existing_run_dir_is_not_overwritten(capsys, tiny_run):
    before = (tiny_run / "config.yaml").read_text()
    assert_one_line_error(*run_cli(capsys, "train", "tiny", f"run_dir={tiny_run}"),
                          "already holds a run")
    assert (tiny_run / "config.yaml").read_text() == before


def test_bad_sample_arguments(capsys, tiny_run, tmp_path):
    assert_one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--class", "12"), "--class")
    assert_one_line_error(*run_cli(capsys, "sample", str(tiny_run), "--steps", "5000"), "--steps")

"""Malformed input through the real CLI (issue 15): every case exits with status 2, prints exactly
one line ``dforge: error: ...`` on stderr (no traceback, no warning) and leaves the run directory
byte for byte as it was (paths, sizes, mtimes and sha256 of every file)."""

import hashlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusionforge.cli.main import main
from diffusionforge.config import trainer_values
from test_story_run import TINY_STORY
from test_text_conditioner import _tiny_bert

TINY_BRIDGE = ["model.first_stage=identity", "data.limit_train=32", "data.batch_size=8", "data.val_size=8",
               "model.unet.model_channels=16", "model.unet.channel_mult=[1,2]", "model.unet.num_res_blocks=1",
               "model.unet.attention_resolutions=[2]", "model.unet.num_head_channels=16",
               "model.unet.norm_groups=8", "optim.warmup_steps=1", "trainer.max_steps=1", "trainer.max_time=null",
               "trainer.val_every_n_steps=1", "trainer.checkpoint_every_n_steps=1", "trainer.limit_val_batches=1",
               "trainer.precision=32-true", "bridge.steps=1"]
ONE_STEP_STORY = [o for o in TINY_STORY if not o.startswith(("trainer.max_steps", "trainer.val_every",
                                                               "trainer.checkpoint_every"))] + [
    "trainer.max_steps=1", "trainer.val_every_n_steps=1", "trainer.checkpoint_every_n_steps=1"]
QUICK_TRAIN = ["trainer.max_steps=1", "data.limit_train=32", "data.val_size=8", "--no-progress"]


# ------------------------------------------------------------------ helpers
def snapshot(root: Path) -> dict:
    """Every path under ``root`` -> (size, mtime_ns, sha256) for files, "dir" for folders."""
    state = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_dir():
            state[str(path.relative_to(root))] = "dir"
        else:
            stat = path.stat()
            state[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns,
                                                  hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def refused(capsys, argv, *fragments, unchanged=()) -> str:
    """Run ``dforge argv``; assert exit 2, one ``dforge: error:`` line holding ``fragments``, no
    warning, and no change under any folder of ``unchanged``. Returns the error line."""
    argv = [str(a) for a in argv]
    before = [snapshot(folder) for folder in unchanged]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dforge: error: "), err
    assert not out, out
    assert not caught, [str(w.message) for w in caught]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    for folder, state in zip(unchanged, before):
        assert snapshot(folder) == state, f"{folder} changed"
    return lines[0]


def write_png(path: Path, height: int, width: int, mode: str = "L") -> Path:
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, bands), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode).save(path)
    return path


class Payload:
    """Unpickling this calls Path.touch(marker): proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the session's tiny diffusion run (a case may damage it)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory) -> dict:
    """One-step pixel-space runs of the other kinds: a x4 super-resolution bridge and a story run."""
    root = tmp_path_factory.mktemp("malformed-runs")
    bert = _tiny_bert(tmp_path_factory.mktemp("malformed-bert"))
    runs = {"bridge": root / "bridge", "story": root / "story"}
    assert main(["train", "fashion-lbm-sr", *TINY_BRIDGE, f"run_dir={runs['bridge']}", "--no-progress"]) == 0
    assert main(["train", "fashion-arldm", *ONE_STEP_STORY, f"model.conditioning.story.path={bert}",
                 f"run_dir={runs['story']}", "--no-progress"]) == 0
    return runs


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Input files: right and wrong sizes and modes, a non-image, a truncated PNG."""
    root = tmp_path_factory.mktemp("malformed-images")
    write_png(root / "gray28.png", 28, 28)
    write_png(root / "rgb28.png", 28, 28, "RGB")
    write_png(root / "rgba16.png", 16, 16, "RGBA")
    write_png(root / "gray64.png", 64, 64)
    write_png(root / "gray8.png", 8, 8)
    write_png(root / "rgb16.png", 16, 16, "RGB")
    (root / "text.png").write_text("not an image\n")
    whole = (root / "gray28.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[:len(whole) // 2])
    return root


# ------------------------------------------------------------------ config keys, types, values, YAML
BAD_OVERRIDES = [
    (["trainer.precision=bogus"], ["trainer.precision", "'bogus'", "bf16-mixed", "32-true"]),
    (["trainer.accelerator=quantum"], ["trainer.accelerator", "cpu"]),
    (["trainer.strategy=nope"], ["trainer.strategy", "ddp"]),
    (["trainer.devices=two"], ["trainer.devices"]),
    (["trainer.accelerator=cpu", "trainer.devices=0,1"], ["trainer.devices", "accelerator=cpu"]),
    (["trainer.max_time=90"], ["trainer.max_time", "DD:HH:MM:SS"]),
    (["trainer.val_every_n_steps=0"], ["trainer.val_every_n_steps", ">= 1"]),
    (["trainer.bogus_key=1"], ["unknown config key", "trainer.bogus_key"]),
    (["trainer.max_steps=many"], ["trainer.max_steps"]),
    (["model.backbone=resnet"], ["model.backbone", "resnet"]),
    (["data.batch_size=0"], ["data.batch_size", ">= 1"]),
    (["trainer.max_steps"], ["not of the form key.sub=value"]),
]


@pytest.mark.parametrize("overrides, fragments", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override_is_refused_before_a_run_directory_is_made(capsys, tmp_path, overrides, fragments):
    refused(capsys, ["train", "tiny", f"run_dir={tmp_path / 'new'}", *overrides], *fragments, unchanged=[tmp_path])
    assert not (tmp_path / "new").exists()


BAD_YAML = {
    "syntax": ("trainer:\n  max_steps: [1, 2\n", ["not valid YAML"]),
    "top-level list": ("- trainer\n- data\n", ["expected a mapping"]),
    "unknown key": ("trainer:\n  max_stepz: 5\n", ["unknown config key", "trainer.max_stepz"]),
    "wrong type": ("data:\n  batch_size: lots\n", ["data.batch_size"]),
    "bad precision": ("trainer:\n  precision: fp8\n", ["trainer.precision", "'fp8'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_yaml_file_is_refused(capsys, tmp_path, case):
    text, fragments = BAD_YAML[case]
    config = tmp_path / "config.yaml"
    config.write_text(text)
    refused(capsys, ["train", config, f"run_dir={tmp_path / 'new'}"], *fragments, unchanged=[tmp_path])


def test_missing_config_file_is_refused(capsys, tmp_path):
    refused(capsys, ["train", tmp_path / "nope.yaml"], "neither a file nor a preset", unchanged=[tmp_path])


def test_bad_override_on_resume_leaves_the_run_alone(capsys, run):
    refused(capsys, ["train", "--resume", run, "trainer.precision=bogus"], "trainer.precision", unchanged=[run])


def test_trainer_values_match_lightning():
    """Our copies of Lightning's accepted values (kept so a config error needs no Lightning import)."""
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    precisions = {*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS), "auto"}
    assert set(trainer_values.PRECISIONS) == precisions
    assert set(trainer_values.ACCELERATORS) == {*AcceleratorRegistry.available_accelerators(), "auto", "gpu"}
    assert set(trainer_values.STRATEGIES) == {*StrategyRegistry.available_strategies(), "auto"}


# ------------------------------------------------------------------ data folders
def _folder(root: Path, layout: str) -> Path:
    folder = root / "images"
    folder.mkdir()
    if layout == "corrupt":
        for i in range(40):
            write_png(folder / f"{i:02d}.png", 28, 28)
        (folder / "17.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif layout == "truncated":
        for i in range(40):
            write_png(folder / f"{i:02d}.png", 28, 28)
        whole = (folder / "23.png").read_bytes()
        (folder / "23.png").write_bytes(whole[:len(whole) - 20])
    elif layout == "only text":
        (folder / "readme.txt").write_text("no images here\n")
    elif layout == "empty class":
        (folder / "shoes").mkdir()
        write_png(folder / "shoes" / "a.png", 28, 28)
        (folder / "bags").mkdir()
    return folder


@pytest.mark.parametrize("layout, fragments", [
    ("empty", ["no images"]),
    ("only text", ["no images"]),
    ("empty class", ["bags", "class folder has no images"]),
    ("corrupt", ["17.png", "cannot decode"]),
    ("truncated", ["23.png", "cannot decode"]),
])
def test_bad_image_folder_is_refused(capsys, tmp_path, layout, fragments):
    folder = _folder(tmp_path, layout)
    refused(capsys, ["train", "tiny", "data.name=folder", f"data.root={folder}", "model.conditioning.class_label=null",
                     f"run_dir={tmp_path / 'new'}", *QUICK_TRAIN], *fragments, unchanged=[tmp_path])


def test_undecodable_image_in_a_loader_worker_is_one_line(capsys, tmp_path):
    """A JPEG cut short passes the set-up check; the worker's error is re-raised as one line."""
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    for i in range(16):
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg")
    whole = (folder / "05.jpg").read_bytes()
    (folder / "05.jpg").write_bytes(whole[:len(whole) // 2])
    code = main(["train", "tiny", "data.name=folder", f"data.root={folder}", "model.conditioning.class_label=null",
                 "data.batch_size=16", "data.val_size=0", "data.num_workers=1", f"run_dir={tmp_path / 'new'}",
                 "trainer.max_steps=1", "--no-progress"])
    err = capsys.readouterr().err.splitlines()  # the data line, the machine line, then the error: training had started
    assert code == 2 and err[-1].startswith("dforge: error: ") and "Traceback" not in "\n".join(err), err
    assert "05.jpg: cannot decode image" in err[-1] and len(err) == 3 and err[0].startswith("data: "), err


def test_missing_image_folder_is_refused(capsys, tmp_path):
    refused(capsys, ["train", "tiny", "data.name=folder", f"data.root={tmp_path / 'nowhere'}",
                     f"run_dir={tmp_path / 'new'}"], "nowhere", unchanged=[tmp_path])


# A folder's classes decide the class conditioner (an unlabelled folder trains unconditionally, a folder of
# two classes gets num_classes=2): tests/test_own_images.py.


# ------------------------------------------------------------------ checkpoints for --resume
def _payload_zip(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callbacks": Payload(marker)}, path)


def _payload_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))


def _truncated(path: Path, marker: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _random(path: Path, marker: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize("damage, fragment", [
    (_payload_zip, "not plain tensors"), (_payload_pickle, "not plain tensors"),
    (_truncated, "no previous checkpoint"), (_random, "no previous checkpoint"),
], ids=["payload-zip", "payload-pickle", "truncated", "random-bytes"])
def test_resume_from_a_bad_last_checkpoint_is_refused(capsys, run, tmp_path, damage, fragment):
    marker = tmp_path / "payload-ran"
    (run / "checkpoints" / "last-prev.ckpt").unlink(missing_ok=True)  # no fallback: the run cannot go on
    damage(run / "checkpoints" / "last.ckpt", marker)
    refused(capsys, ["train", "--resume", run, "--no-progress"], "last.ckpt", fragment, unchanged=[run])
    assert not marker.exists(), "the checkpoint's payload ran"


def test_resume_without_a_checkpoint_is_refused(capsys, run):
    (run / "checkpoints" / "last.ckpt").unlink()
    refused(capsys, ["train", "--resume", run], "no checkpoint", unchanged=[run])


def test_resume_of_a_folder_that_is_not_a_run_is_refused(capsys, tmp_path):
    refused(capsys, ["train", "--resume", tmp_path], "not a run directory", unchanged=[tmp_path])


# ------------------------------------------------------------------ exported safetensors for sample
def _st_truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


def _st_random(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(8192))


def _st_other_keys(path: Path) -> None:
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))


def _st_other_shapes(path: Path) -> None:
    from safetensors.torch import load_file

    save_file({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v
               for k, v in load_file(str(path)).items()}, str(path))


def _st_header_only(path: Path) -> None:
    path.write_bytes((2 ** 40).to_bytes(8, "little") + b"{}")


@pytest.mark.parametrize("damage, fragment", [
    (_st_truncated, "model.safetensors"), (_st_random, "model.safetensors"),
    (_st_other_keys, "missing keys"), (_st_other_shapes, "shape mismatches"),
    (_st_header_only, "model.safetensors"),
], ids=["truncated", "random-bytes", "other-keys", "other-shapes", "huge-header"])
def test_sample_with_bad_weights_is_refused(capsys, run, tmp_path, damage, fragment):
    damage(run / "model.safetensors")
    refused(capsys, ["sample", run, "--num", 2, "--steps", 2, "--out", tmp_path / "x.png"], fragment,
            unchanged=[run])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--eta", "nan"], "--eta"), (["--eta", "-1"], "--eta"), (["--guidance", "inf"], "--guidance"),
    (["--steps", "1000"], "exceeds"), (["--class", "10"], "--class"), (["--num", "0"], "--num"),
])
def test_sample_with_bad_flags_is_refused(capsys, tiny_run, tmp_path, flags, fragment):
    refused(capsys, ["sample", tiny_run, *flags, "--out", tmp_path / "x.png"], fragment,
            unchanged=[tiny_run, tmp_path])


def test_sample_with_a_corrupt_run_config_is_refused(capsys, run, tmp_path):
    (run / "config.yaml").write_text("model: {unet: [\n")
    refused(capsys, ["sample", run, "--out", tmp_path / "x.png"], "config.yaml", unchanged=[run])


def test_sample_of_a_folder_that_is_not_a_run_is_refused(capsys, tmp_path):
    refused(capsys, ["sample", tmp_path, "--out", tmp_path / "x.png"], "not a run directory", unchanged=[tmp_path])


# ------------------------------------------------------------------ foreign files for convert
@pytest.mark.parametrize("name, write", [
    ("random.safetensors", lambda p, src: p.write_bytes(np.random.default_rng(2).bytes(2048))),
    ("truncated.safetensors", lambda p, src: p.write_bytes(src.read_bytes()[:1000])),
    ("random.ckpt", lambda p, src: p.write_bytes(np.random.default_rng(3).bytes(2048))),
    ("empty.pt", lambda p, src: p.write_bytes(b"")),
])
def test_convert_of_a_corrupt_file_is_refused(capsys, tiny_run, tmp_path, name, write):
    src = tmp_path / name
    write(src, tiny_run / "model.safetensors")
    refused(capsys, ["convert", src, "--kind", "unet", "--to", "ours", "--out", tmp_path / "dst"], name,
            unchanged=[tmp_path])


def test_convert_of_a_payload_checkpoint_does_not_run_it(capsys, tmp_path):
    marker = tmp_path / "payload-ran"
    src = tmp_path / "payload.ckpt"
    _payload_zip(src, marker)
    refused(capsys, ["convert", src, "--kind", "vae", "--to", "ours", "--out", tmp_path / "dst"], "payload.ckpt",
            "not plain tensors", unchanged=[tmp_path])
    assert not marker.exists()


# ------------------------------------------------------------------ outputs that cannot be written
def test_sample_under_a_file_is_refused_before_sampling(capsys, tiny_run, tmp_path):
    (tmp_path / "file.txt").write_text("a file\n")
    refused(capsys, ["sample", tiny_run, "--out", tmp_path / "file.txt" / "missing" / "x.png"],
            "file.txt is not a folder", unchanged=[tiny_run, tmp_path])


@pytest.mark.parametrize("out, fragment", [
    ("grid.jpg", "must end in .png"),
    ("folder.png/", "is a folder"),
    ("file.txt/x.png", "is not a folder"),
])
def test_sample_to_a_bad_output_is_refused(capsys, tiny_run, tmp_path, out, fragment):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file.txt").write_text("a file\n")
    refused(capsys, ["sample", tiny_run, "--out", f"{tmp_path}/{out}"], fragment, unchanged=[tiny_run, tmp_path])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("out", ["x.png", "missing/dir/x.png"])
def test_sample_into_a_read_only_folder_is_refused(capsys, tiny_run, tmp_path, out):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused(capsys, ["sample", tiny_run, "--out", locked / out], "not writable", unchanged=[tiny_run])


@pytest.mark.parametrize("out, fragment", [("file.txt/m.json", "is not a folder"), ("m.png", "must end in .json")])
def test_evaluate_to_a_bad_output_is_refused(capsys, run, tmp_path, out, fragment):
    (tmp_path / "file.txt").write_text("a file\n")
    refused(capsys, ["evaluate", run, "--num", 2, "--out", tmp_path / out], fragment, unchanged=[run, tmp_path])


def test_translate_story_and_convert_under_a_file_are_refused(capsys, other_runs, images, tiny_run, tmp_path):
    (tmp_path / "file.txt").write_text("a file\n")
    under_file = tmp_path / "file.txt" / "missing"
    refused(capsys, ["translate", other_runs["bridge"], images / "gray28.png", "--out", under_file / "x.png"],
            "is not a folder", unchanged=[other_runs["bridge"], tmp_path])
    refused(capsys, ["story", other_runs["story"], "--captions", "a bag", "--out", under_file / "x.png"],
            "is not a folder", unchanged=[other_runs["story"], tmp_path])
    refused(capsys, ["convert", tiny_run, "--kind", "unet", "--to", "ours", "--out", under_file / "unet"],
            "is not a folder", unchanged=[tiny_run, tmp_path])
    refused(capsys, ["translate", other_runs["bridge"], images / "gray28.png", "--out", tmp_path / "x.jpg"],
            "must end in .png", unchanged=[other_runs["bridge"], tmp_path])
    refused(capsys, ["story", other_runs["story"], "--captions", "a bag", "--out", tmp_path / "x.webp"],
            "must end in .png", unchanged=[other_runs["story"], tmp_path])


# ------------------------------------------------------------------ wrong run kinds
def test_commands_refuse_the_wrong_kind_of_run(capsys, run, other_runs, images, tmp_path):
    out = tmp_path / "x.png"
    bridge, story = other_runs["bridge"], other_runs["story"]
    refused(capsys, ["sample", bridge, "--out", out], "dforge translate", unchanged=[bridge])
    refused(capsys, ["sample", story, "--out", out], "dforge story", unchanged=[story])
    refused(capsys, ["translate", run, images / "gray28.png", "--out", out], "task=diffusion", unchanged=[run])
    refused(capsys, ["translate", story, images / "gray8.png", "--out", out], "task=story", unchanged=[story])
    refused(capsys, ["story", run, "--captions", "a bag", "--out", out], "task=diffusion", unchanged=[run])
    refused(capsys, ["story", bridge, "--captions", "a bag", "--out", out], "task=bridge", unchanged=[bridge])
    refused(capsys, ["convert", run, "--kind", "vae", "--to", "ours", "--out", tmp_path / "vae"], "no vae",
            unchanged=[run])
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("task: diffusion", "task: autoencoder"))
    refused(capsys, ["sample", run, "--out", out], "task=autoencoder", unchanged=[run])
    assert not out.exists()


# ------------------------------------------------------------------ wrong input images
@pytest.mark.parametrize("name, fragment", [
    ("rgb28.png", "mode RGB"), ("rgba16.png", "mode RGBA"), ("gray64.png", "64x64"), ("gray8.png", "8x8"),
    ("text.png", "cannot read image"), ("truncated.png", "cannot read image"), ("missing.png", "not found"),
])
def test_translate_refuses_a_wrong_input_image(capsys, other_runs, images, tmp_path, name, fragment):
    refused(capsys, ["translate", other_runs["bridge"], images / name, "--out", tmp_path / "x.png"], name, fragment,
            unchanged=[other_runs["bridge"], tmp_path])


@pytest.mark.parametrize("name, fragment", [
    ("rgb16.png", "mode RGB"), ("gray28.png", "28x28"), ("text.png", "cannot read image"),
])
def test_story_refuses_a_wrong_first_frame(capsys, other_runs, images, tmp_path, name, fragment):
    refused(capsys, ["story", other_runs["story"], "--first-frame", images / name, "--captions", "a bag", "it moves",
                     "--out", tmp_path / "x.png"], name, fragment, unchanged=[other_runs["story"], tmp_path])


def test_config_file_that_is_not_text_is_refused(capsys, tmp_path):
    config = tmp_path / "binary.yaml"
    config.write_bytes(b"\xff\xfe\x00\x01 not text")
    refused(capsys, ["train", config, f"run_dir={tmp_path / 'new'}"], "binary.yaml", "UTF-8", unchanged=[tmp_path])


@pytest.mark.parametrize("damage", [_st_random, _st_truncated], ids=["random-bytes", "truncated"])
def test_latent_run_with_a_bad_first_stage_copy_is_refused(capsys, run, tmp_path, damage):
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("first_stage: identity", "first_stage: autoencoder"))
    shutil.copyfile(run / "model.safetensors", run / "first_stage.safetensors")
    damage(run / "first_stage.safetensors")
    refused(capsys, ["sample", run, "--out", tmp_path / "x.png"], "first_stage.safetensors", unchanged=[run])

"""`dforge evaluate` on runs of one's own images and on an imported Stable Diffusion.

A folder has no test split: samples are scored against all of the folder's
images, on EfficientNet-Lite0 features by default. A class-folder run samples
its classes in turn; a text-to-image run (an imported tiny SD) is prompted with
the caption folder's captions given by ``--data`` (sample i: caption i mod N),
and without one says in one line what it needs.
"""

from __future__ import annotations

import json
import math

from diffusionforge.cli.main import main
from diffusionforge.data.folder import ImageFolderDataset
from diffusionforge.models.generative import GenerativeModel

from test_finetune import caption_folder, error_line, imported  # noqa: F401  (imported: the fixture)
from test_import import sd_pipeline  # noqa: F401  (the fixture)
from test_own_images import QUICK, class_folder

EVAL = ["--num", "5", "--steps", "2", "--batch-size", "2"]


def _record(path) -> dict:
    record = json.loads(path.read_text())
    assert all(math.isfinite(record["metrics"][k]) for k in ("fid", "kid_mean"))
    return record


def test_class_folder_run_is_scored_against_its_folder(tmp_path):
    root = class_folder(tmp_path / "photos", per_class=3)
    run = tmp_path / "run"
    assert main(["train", "tiny", "data.name=folder", f"data.root={root}", *QUICK, f"run_dir={run}",
                 "--no-progress"]) == 0
    assert main(["evaluate", str(run), *EVAL]) == 0
    protocol = _record(run / "metrics.json")["protocol"]
    assert protocol["reference_split"] == f"folder {root}" and protocol["reference_size"] == 9
    assert protocol["features"] == "efficientnet-lite0" and protocol["num_samples"] == 5


def test_imported_sd_is_scored_against_a_caption_folder(imported, tmp_path, capsys, monkeypatch):  # noqa: F811
    assert main(["evaluate", str(imported), *EVAL]) != 0
    assert "give --data DIR, a caption folder" in error_line(capsys)
    plain = class_folder(tmp_path / "plain", classes=("x",), per_class=2)
    assert main(["evaluate", str(imported), *EVAL, "--data", str(plain)]) != 0
    assert "has no captions" in error_line(capsys)

    folder = caption_folder(tmp_path / "captions", count=4)
    prompts = []
    sample = GenerativeModel.sample

    def spy(self, batch, num, *args, **kwargs):
        prompts.extend(batch["caption"])
        return sample(self, batch, num, *args, **kwargs)

    monkeypatch.setattr(GenerativeModel, "sample", spy)
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(imported), *EVAL, "--data", str(folder), "--out", str(out)]) == 0
    captions = ImageFolderDataset(folder).captions
    assert prompts == [captions[i % 4] for i in range(5)]
    protocol = _record(out)["protocol"]
    assert protocol["reference_split"] == f"folder {folder}" and protocol["reference_size"] == 4

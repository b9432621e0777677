"""What `dforge evaluate` adds to generation on a PororoSV / FlintstonesSV HDF5 run: reading and scoring.

``evaluation/story_hdf5.py`` generates each test story and scores it; the
generation cost is the run's (sampler, steps, guidance, network). This
measures the rest, per story: reading the real story from the HDF5 file
(PNG decode, centre crop, bicubic resize to ``--image-size``), feature
extraction of the real and generated frames (once per frame: its frame
index's FID and the pooled FID / KID share the features) and the final FID /
KID computation. The "model" returns the real stories (zero generation cost), so
its FID is ~0, a check that the scoring is right.

The file is written here in ARLDM's layout: ``--stories`` test stories of 5
frames of 128 x 128, smooth random colour fields stored as PNG (as ARLDM's
``cv2.imencode``), the size of FlintstonesSV's frames.

    python benchmarks/story_hdf5_scoring.py [--stories 100] [--image-size 64] [--features efficientnet]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusionforge.config import load_config
from diffusionforge.evaluation.story_hdf5 import evaluate_hdf5_story_run, hdf5_test_stories
from diffusionforge.machine import describe_machine
from diffusionforge.tasks.diffusion import sample_request

FRAMES, SIDE = 5, 128  # FlintstonesSV: 5 frames of 128 x 128 per story


def smooth_frame(generator: torch.Generator) -> bytes:
    """PNG bytes of a 128 x 128 RGB field: 8 x 8 random colours upsampled bicubically."""
    coarse = torch.rand((1, 3, 8, 8), generator=generator)
    field = F.interpolate(coarse, size=(SIDE, SIDE), mode="bicubic", align_corners=False).clamp(0, 1)
    pixels = (field[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_file(path: Path, stories: int) -> None:
    generator = torch.Generator().manual_seed(0)
    with h5py.File(path, "w") as f:
        for split, count in (("train", 2), ("val", 2), ("test", stories)):
            group = f.create_group(split)
            vlen = h5py.vlen_dtype(np.uint8)
            images = [group.create_dataset(f"image{t}", (count,), dtype=vlen) for t in range(FRAMES)]
            text = group.create_dataset("text", (count,), dtype=h5py.string_dtype(encoding="utf-8"))
            for i in range(count):
                for t in range(FRAMES):
                    images[t][i] = np.frombuffer(smooth_frame(generator), np.uint8)
                text[i] = "|".join(f"{split} story {i} frame {t}" for t in range(FRAMES))


class RealStories:
    """Returns the real test story of each caption list: generation that costs nothing."""

    def __init__(self, stories):
        self.real = {tuple(stories[i]["captions"]): stories[i]["frames"] for i in range(len(stories))}
        self.story_mode, self.device = "visualisation", torch.device("cpu")

    def generate(self, captions, request, first_frames=None, generator=None):
        return torch.stack([self.real[tuple(c)] for c in captions])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--features", default="efficientnet")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/results/story_hdf5_scoring.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stories.h5"
        write_file(path, args.stories)
        config = load_config("fashion-arldm", ["data.story.source=hdf5", f"data.story.root={path}",
                                               f"data.story.frames={FRAMES}", f"data.image_size={args.image_size}",
                                               "data.channels=3", "data.batch_size=2"])
        stories = hdf5_test_stories(config, args.stories)
        model = RealStories(stories)
        stories.close()
        request = sample_request(config, None, 1, 0.0, None, True, "fp32")
        start = time.perf_counter()
        record = evaluate_hdf5_story_run(model, config, args.stories, request, features=args.features,
                                         batch_size=args.batch_size)
        seconds = time.perf_counter() - start
    result = {"stories": args.stories, "frames": FRAMES, "stored_side": SIDE, "image_size": args.image_size,
              "features": record["protocol"]["features"], "threads": torch.get_num_threads(),
              "machine": describe_machine().as_dict(), "scoring_seconds": round(seconds, 2),
              "seconds_per_story": round(seconds / args.stories, 4),
              "fid_real_vs_real": record["metrics"]["fid"],
              "max_fid_frame_real_vs_real": max(v for k, v in record["metrics"].items() if k.startswith("fid_frame_"))}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Images per second read by a training DataLoader: tar shards (data.name=shards) against the folder reader.

The same images are written twice: as one PNG file each in class
sub-folders (data.name=folder) and as webdataset tar shards of those files'
images (``dforge shard`` of that folder). For each reader and DataLoader
worker count, one training epoch is read (decoded to float tensors in
[-1, 1] and batched, as training receives them) after the datamodule is
made, ``--rounds`` times, the readers taking turns; reported: the best
images/s, the least CPU time per image (this process and its DataLoader
workers: what a busy machine does not distort), and the seconds the
datamodule took to start (the folder reader opens every file once; shards
read index.json and the validation samples). Sets: the embedded
Fashion-MNIST images at 28 x 28 grey, and at 64 x 64 RGB (resized copies).
Writes benchmarks/results/shards_throughput.json.

    python benchmarks/shards_throughput.py [--images 4000] [--workers 0 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from diffusionforge.data.config import DataConfig
from diffusionforge.data.datamodule import ImageDataModule
from diffusionforge.data.datasets import build_dataset
from diffusionforge.data.shard_writer import write_shards

SETS = {"28px grey": (28, 1), "64px RGB": (64, 3)}  # name -> (image_size, channels)
BATCH = 64
SHARD_SIZE = 1000


def write_folder(root: Path, count: int, size: int, channels: int) -> None:
    """``count`` embedded training images as root/<class>/<index>.png."""
    dataset = build_dataset("fashion-mnist-embedded", "train", image_size=size, channels=channels)
    for index in range(count):
        item = dataset[index]
        pixels = item["image"].add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = root / f"class_{int(item['class_label'])}" / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def epoch(datamodule) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch of a fresh training loader (workers start inside)."""
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    loader = datamodule.train_dataloader()
    batches = iter(loader)
    for batch in batches:
        images += batch["image"].shape[0]
    wall = time.perf_counter() - wall
    del batches, loader  # workers exit, so their CPU time is counted
    gc.collect()
    return images, wall, cpu_seconds() - cpu


def measure(configs: dict[str, DataConfig], rounds: int) -> dict[str, dict]:
    """Per reader: seconds to make its datamodule (the folder reader opens every file once, shards read
    index.json and the validation samples), best images/s and least CPU ms per image over ``rounds``
    epochs; the readers take turns within each round, so a busy machine slows them alike."""
    results, modules = {}, {}
    for name, config in configs.items():
        start = time.perf_counter()
        modules[name] = ImageDataModule(config, seed=0)
        modules[name].setup("fit")
        results[name] = {"start_s": round(time.perf_counter() - start, 2), "images_per_s": 0.0,
                         "cpu_ms_per_image": float("inf")}
    for _ in range(rounds):
        for name, datamodule in modules.items():
            images, wall, cpu = epoch(datamodule)
            row = results[name]
            row.update(images_per_epoch=images, images_per_s=round(max(row["images_per_s"], images / wall), 1),
                       cpu_ms_per_image=round(min(row["cpu_ms_per_image"], 1000 * cpu / images), 3))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "shards_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"images": args.images, "batch_size": BATCH, "shard_size": SHARD_SIZE,
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread",
               "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (size, channels) in SETS.items():
            folder, shards = Path(tmp) / f"folder{size}", Path(tmp) / f"shards{size}"
            write_folder(folder, args.images, size, channels)
            folder_config = dict(name="folder", root=str(folder), val_size=BATCH, batch_size=BATCH, image_size=size)
            write_shards(ImageDataModule(DataConfig(**folder_config)), shards, "train", SHARD_SIZE)
            configs = {f"{reader}, {workers} workers": DataConfig(**config, num_workers=workers)
                       for workers in args.workers
                       for reader, config in (("folder", folder_config),
                                              ("shards", dict(folder_config, name="shards", root=str(shards))))}
            results["sets"][name] = measure(configs, args.rounds)
            print(name, json.dumps(results["sets"][name]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

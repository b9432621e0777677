"""Streaming tar shards (data/shards.py, shard_plan.py, shard_writer.py, `dforge shard`).

Every sample once per epoch across ranks x workers (real DataLoaders with 2
worker processes, ranks simulated by building each rank's stream), fields
kept through a round trip, a mid-epoch position that a fresh stream (or a
`dforge train --resume`) continues from, and one-line errors for bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffusionforge.cli.main import main
from diffusionforge.data.config import DataConfig
from diffusionforge.data.datamodule import ImageDataModule
from diffusionforge.data.folder import ImageFolderDataset, PairedFolderDataset
from diffusionforge.data.shard_plan import Split, epoch_order, open_positions, taken_per_worker
from diffusionforge.data.shard_writer import write_shards
from diffusionforge.data.shards import Decoder, ShardSet, ShardStream, read_index, read_shard
from diffusionforge.errors import DataError, one_line

QUICK = ["trainer.time_budget=null", "optim.schedule=steps", "optim.warmup_steps=1", "trainer.val_every_n_steps=100"]


def key_of(raw: dict, url: str) -> str:
    """A stream decoder that keeps only the sample's key (module level: DataLoader workers pickle it)."""
    return raw["__key__"]


@pytest.fixture(scope="module")
def fashion_shards(tmp_path_factory) -> Path:
    """120 embedded Fashion-MNIST images in shards of 50, 50 and 20."""
    out = tmp_path_factory.mktemp("shards") / "fashion"
    write_shards(ImageDataModule(DataConfig(limit_train=120)), out, "train", shard_size=50)
    return out


def stream(root: Path, split: Split, rank: int = 0, seed: int = 3) -> ShardStream:
    index = read_index(str(root))
    return ShardStream(index.urls(str(root), "train"), index.counts("train"), key_of, split, rank=rank, seed=seed)


def epoch_keys(root: Path, split: Split, epoch: int = 0) -> list[list[str]]:
    """The keys each rank delivers in ``epoch`` through a DataLoader with split.num_workers workers."""
    ranks = []
    for rank in range(split.world_size):
        data = stream(root, split, rank)
        data.start_epoch(epoch)
        loader = DataLoader(data, batch_size=split.batch_size, num_workers=split.num_workers)
        ranks.append([key for batch in loader for key in batch])
    return ranks


def test_the_index_records_what_the_shards_hold(fashion_shards):
    index = read_index(str(fashion_shards))
    assert index.counts("train") == [50, 50, 20] and index.image_size == 28 and index.channels == 1
    assert index.num_classes == 10 and index.fields == ["class_label"] and index.class_names[7] == "a sneaker"
    keys = [raw["__key__"] for url in index.urls(str(fashion_shards), "train") for raw in read_shard(url)]
    assert sorted(int(k) for k in keys) == list(range(120)) and keys != sorted(keys)  # written in a random order


@pytest.mark.parametrize("batch_size", [4, 7])
def test_two_ranks_of_two_workers_read_every_sample_once_per_epoch(fashion_shards, batch_size):
    ranks = epoch_keys(fashion_shards, Split(2, 2, batch_size, drop_last=False))
    every = [key for keys in ranks for key in keys]
    assert sorted(int(k) for k in every) == list(range(120))  # each sample exactly once
    assert abs(len(ranks[0]) - len(ranks[1])) <= 1
    assert epoch_keys(fashion_shards, Split(2, 2, batch_size, drop_last=False), epoch=1) != ranks  # reshuffled


def test_training_gives_every_rank_the_same_whole_batches(fashion_shards):
    ranks = epoch_keys(fashion_shards, Split(2, 2, 7, drop_last=True))
    every = [key for keys in ranks for key in keys]
    assert len(ranks[0]) == len(ranks[1]) == 56 and len(set(every)) == len(every)  # 8 batches of 7; 8 wait
    assert ranks == epoch_keys(fashion_shards, Split(2, 2, 7, drop_last=True))  # the seed fixes the epoch


def shards_read(root: Path, split: Split, seed: int = 3) -> list[set[int]]:
    """The shards each (rank, worker) reads in epoch 0."""
    index = read_index(str(root))
    order = epoch_order(index.counts("train"), seed, epoch=0)
    open_ = open_positions(order, 0, sum(index.counts("train")), [])
    reading = np.searchsorted(order.starts, order.sigma, side="right") - 1  # reading index of each position's shard
    return [set(order.shard_order[reading[split.worker_positions(open_, r, w)]].tolist())
            for r in range(split.world_size) for w in range(split.num_workers)]


def test_more_slots_than_shards_split_samples_and_many_shards_split_whole_shards(fashion_shards, tmp_path):
    ranks = epoch_keys(fashion_shards, Split(3, 2, 5, drop_last=False))  # 6 slots, 3 shards
    assert sorted(int(k) for keys in ranks for k in keys) == list(range(120))
    out = tmp_path / "many"
    write_shards(ImageDataModule(DataConfig(limit_train=40)), out, "train", shard_size=5)
    slots = shards_read(out, Split(2, 2, 5, drop_last=False))  # 8 shards, 4 slots of 10 samples
    assert all(len(s) == 2 for s in slots) and set().union(*slots) == set(range(8))  # disjoint whole shards
    slots = shards_read(out, Split(1, 3, 4, drop_last=False))  # 10 batches: 3, 3, 4 per worker
    assert all(len(a & b) <= 1 for a, b in zip(slots, slots[1:]))  # neighbours share a boundary shard at most


def test_a_dataloader_hands_out_its_workers_batches_in_turn():
    assert taken_per_worker([3, 1, 2], 4) == [2, 1, 1]
    assert taken_per_worker([3, 1, 2], 6) == [3, 1, 2]
    assert taken_per_worker([2, 2], 3) == [2, 1]


@pytest.mark.parametrize("world_size, workers", [(1, 2), (2, 3), (1, 1)])
def test_a_fresh_stream_continues_mid_epoch_from_the_position(fashion_shards, world_size, workers):
    """Take 3 batches through 2 workers, keep the position, rebuild: the rest of the epoch, each sample once."""
    first = stream(fashion_shards, Split(1, 2, 8, drop_last=False))
    first.start_epoch(2)
    batches = iter(DataLoader(first, batch_size=8, num_workers=2))
    taken = [key for _ in range(3) for key in next(batches)]
    first.advance(3)
    position = first.position()
    assert json.loads(json.dumps(position)) == position  # plain ints and lists: fits a weights-only checkpoint
    split = Split(world_size, workers, 6, drop_last=False)
    rest = []
    for rank in range(world_size):
        resumed = stream(fashion_shards, split, rank)
        resumed.resume(position)
        resumed.start_epoch(2)
        rest += [key for batch in DataLoader(resumed, batch_size=6, num_workers=workers if workers > 1 else 0)
                 for key in batch]
    assert len(taken) == 24 and not set(taken) & set(rest)
    assert sorted(int(k) for k in taken + rest) == list(range(120))  # the rest of the epoch, each once
    same = stream(fashion_shards, Split(1, 2, 8, drop_last=False))
    same.resume(position)
    same.start_epoch(3)  # another epoch starts afresh
    assert len(list(DataLoader(same, batch_size=8, num_workers=2))) == 15


def test_the_rest_of_a_training_epoch_is_what_the_uninterrupted_epoch_had_left(fashion_shards):
    split = Split(1, 2, 8, drop_last=True)
    whole = epoch_keys(fashion_shards, split)[0]
    first = stream(fashion_shards, split)
    first.start_epoch(0)
    taken = [key for _, batch in zip(range(5), DataLoader(first, batch_size=8, num_workers=2)) for key in batch]
    first.advance(5)
    again = stream(fashion_shards, split)
    again.resume(first.position())
    again.start_epoch(0)
    rest = [key for batch in DataLoader(again, batch_size=8, num_workers=2) for key in batch]
    assert sorted(taken + rest) == sorted(whole) and len(taken + rest) == 120


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def round_trip(root: Path, name: str, out: Path) -> tuple[list[dict], list[dict]]:
    """(items of the shards' train split by key order, the folder dataset's items) with the same decoding."""
    datamodule = ImageDataModule(DataConfig(name=name, root=str(root), val_size=1))
    write_shards(datamodule, out, "train", shard_size=3)
    shards = ShardSet(DataConfig(name="shards", root=str(out), val_size=1), seed=0)
    decode = shards.decoder(train=False)
    raws = sorted(((raw, url) for url in shards.index.urls(str(out), "train") for raw in read_shard(url)),
                  key=lambda pair: pair[0]["__key__"])
    return [dict(decode(*pair), key=int(pair[0]["__key__"])) for pair in raws], datamodule.source("train")


def test_a_caption_folder_keeps_images_labels_and_captions(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(7):
        cls = ("cat", "dog")[i % 2]
        write_png(tmp_path / "src" / cls / f"{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        rows.append({"file_name": f"{cls}/{i}.png", "text": f"picture {i} of a {cls}"})
    (tmp_path / "src" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items, folder = round_trip(tmp_path / "src", "folder", tmp_path / "out")
    assert isinstance(folder, ImageFolderDataset) and len(items) == 7
    for item in items:
        expected = folder[item["key"]]
        assert torch.equal(item["image"], expected["image"]) and item["image"].shape == (3, 16, 16)
        assert item["class_label"] == expected["class_label"] and item["caption"] == expected["caption"]
    index = read_index(str(tmp_path / "out"))
    assert index.class_names == ["cat", "dog"] and index.fields == ["class_label", "caption"]


def test_a_paired_folder_keeps_sources_targets_and_masks(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(5):
        for part in ("source", "target"):
            write_png(tmp_path / "src" / part / f"{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
        write_png(tmp_path / "src" / "mask" / f"{i}.png", (rng.random((16, 16)) > 0.5).astype(np.uint8) * 255)
    items, folder = round_trip(tmp_path / "src", "paired-folder", tmp_path / "out")
    assert isinstance(folder, PairedFolderDataset) and len(items) == 5
    for item in items:
        expected = folder[item["key"]]
        for key in ("image", "source", "mask"):
            assert torch.equal(item[key], expected[key]), key
    assert read_index(str(tmp_path / "out")).fields == ["source", "mask"]


def test_split_all_writes_the_runs_train_and_val_images(tmp_path):
    datamodule = ImageDataModule(DataConfig(limit_train=40, val_size=10))
    write_shards(datamodule, tmp_path / "all", "all", shard_size=16)
    index = read_index(str(tmp_path / "all"))
    assert index.counts("train") == [16, 16, 8] and index.counts("val") == [10]
    shards = ShardSet(DataConfig(name="shards", root=str(tmp_path / "all")), seed=0)
    assert shards.config.val_size == 10 and shards.held_out == 0 and shards.train_count == 40
    _, val = datamodule.plain_splits()
    assert sum(torch.equal(a["image"], b["image"]) for a in shards.val for b in val) == 10


def test_training_from_shards_resumes_from_the_data_position(fashion_shards, tmp_path):
    """`dforge train tiny data.name=shards`, then --resume: the epoch goes on where the checkpoint left it."""
    run_dir = tmp_path / "run"
    common = ["data.batch_size=16", "trainer.checkpoint_every_n_steps=3", *QUICK]
    assert main(["train", "tiny", "data.name=shards", f"data.root={fashion_shards}", "trainer.max_steps=3",
                 f"run_dir={run_dir}", *common, "--no-progress"]) == 0
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["ImageDataModule"]["shards"]
    assert main(["train", "--resume", str(run_dir), "trainer.max_steps=6", *common, "--no-progress"]) == 0
    later = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["ImageDataModule"]["shards"]
    data = ShardSet(DataConfig(name="shards", root=str(fashion_shards), batch_size=16), seed=0).stream(0, 1)
    consumed = []
    for position in (first, later):
        data.resume(position)
        consumed.append(len(open_all(data)) - len(data.open_positions()))
    assert first["epoch"] == later["epoch"] == 0 and consumed == [48, 96]  # 3 then 6 batches of 16
    assert all(any(a <= s and e <= b for a, b in later["consumed"]) for s, e in first["consumed"])


def open_all(data: ShardStream) -> np.ndarray:
    return open_positions(data.order(), data.lo, data.hi, [])


def one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dforge: error: "), err
    return err[0]


def test_bad_shard_folders_are_one_line_errors(fashion_shards, tmp_path, capsys):
    train = ["train", "tiny", "data.name=shards", "trainer.max_steps=1", f"run_dir={tmp_path / 'run'}"]
    assert "shard folder not found" in one_error(capsys, train + [f"data.root={tmp_path / 'missing'}"])
    (tmp_path / "empty").mkdir()
    assert "no index.json" in one_error(capsys, train + [f"data.root={tmp_path / 'empty'}"])
    broken = tmp_path / "broken"
    write_shards(ImageDataModule(DataConfig(limit_train=60)), broken, "train", shard_size=30)
    first = broken / "train" / "shard-000000.tar"
    first.write_bytes(b"\x00garbage" * 200 + first.read_bytes()[3000:])
    capsys.readouterr()
    assert "corrupted shard" in one_error(capsys, train + [f"data.root={broken}"])
    assert not (tmp_path / "run").exists()
    assert "already holds shards" in one_error(capsys, ["shard", "tiny", "--out", str(fashion_shards)])


def test_a_shard_corrupted_mid_stream_is_one_line_from_a_worker(tmp_path):
    out = tmp_path / "late"
    write_shards(ImageDataModule(DataConfig(limit_train=60)), out, "train", shard_size=20)
    last = out / "train" / "shard-000002.tar"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    data = stream(out, Split(1, 2, 5, drop_last=False))
    with pytest.raises(DataError) as caught:
        list(DataLoader(data, batch_size=5, num_workers=2))
    message = one_line(caught.value)
    assert "shard-000002.tar" in message and "\n" not in message


def test_a_run_on_shards_degrades_and_captions_its_images_afresh(fashion_shards):
    """data.degradation and data.caption_template apply to the shards' images as to the source's."""
    config = DataConfig(name="shards", root=str(fashion_shards), batch_size=4, caption_template="a photo of {}",
                        degradation={"kind": "inpainting"}, hflip=True)
    datamodule = ImageDataModule(config)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["source"].shape == batch["image"].shape == (4, 1, 28, 28) and batch["mask"].shape == (4, 1, 28, 28)
    assert batch["caption"][0] == f"a photo of {read_index(str(fashion_shards)).class_names[batch['class_label'][0]]}"
    val = datamodule.val_set[0]
    assert set(val) == {"image", "class_label", "caption", "source", "mask"}
    assert torch.equal(val["source"], datamodule.val_set[0]["source"])  # validation pairs are fixed
    assert datamodule.num_classes == 10 and not datamodule.has_captions and datamodule.config.val_size == 6


def test_a_pipe_url_streams_the_same_shards(fashion_shards):
    """data.root may be any URL webdataset's gopen opens; a pipe: command gets each file's path appended."""
    local = ShardSet(DataConfig(name="shards", root=str(fashion_shards)), seed=0)
    piped = ShardSet(DataConfig(name="shards", root=f"pipe:cat {fashion_shards}"), seed=0)
    assert piped.index == local.index and len(piped.val) == len(local.val) == 6
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(piped.val, local.val))
    data = piped.stream(0, 1)
    data.decode = key_of
    held_out = [raw["__key__"] for raw, _ in zip(read_shard(piped.index.urls(str(fashion_shards), "train")[0]),
                                                  range(6))]
    assert sorted(int(k) for k in [*data, *held_out]) == list(range(120))  # one batch of the 114 not held out

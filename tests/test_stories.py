"""Tests of diffusionforge.data.stories and story_hdf5: the story dataset and the HDF5 loader.

Only the embedded Fashion-MNIST files and HDF5 files written into ``tmp_path``
are read. The grammar and the position / size tables are restated here, so
the tests do not check the module against itself.
"""

import io
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionforge.data.embedded import load_embedded
from diffusionforge.data.idx import write_idx
from diffusionforge.data.stories import StoryConfig, StoryDataset, collate_stories, item_box
from diffusionforge.data.story_hdf5 import StoryHDF5Dataset
from diffusionforge.errors import ConfigError, DataError

h5py = pytest.importorskip("h5py")

GRID = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
NOUNS = ["t-shirt", "pair of trousers", "pullover", "dress", "coat",
         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
PLACE = r"(?:at|on|in) the (?P<pos>[a-z ]+)"
INTRO = re.compile(rf"^an? (?:(?P<size>small|large) )?(?P<noun>[a-z -]+?) {PLACE}$")
EVENT_PATTERNS = {  # event -> caption pattern; group "noun" is present iff the class is named
    "move": re.compile(r"^(?:it|the (?P<noun>[a-z -]+?)) moves to the (?P<pos>[a-z ]+)$"),
    "stay": re.compile(rf"^(?:it|the (?P<noun>[a-z -]+?)) stays {PLACE}$"),
    "flip": re.compile(r"^(?:it|the (?P<noun>[a-z -]+?)) turns around$"),
    "resize": re.compile(r"^(?:it gets|the same (?P<noun>[a-z -]+?), now) (?P<change>smaller|larger)$"),
}
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SMALL, NORMAL, LARGE = 0, 1, 2


def small_config(**overrides) -> StoryConfig:
    values = dict(train_stories=64, val_stories=32, test_stories=32, val_instances=500)
    return StoryConfig(**{**values, **overrides})


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def parse(caption: str, frame: int) -> tuple[str, re.Match]:
    """(event, match) of a caption, asserting it is in the grammar."""
    if frame == 0:
        match = INTRO.match(caption)
        assert match, caption
        return "intro", match
    found = [(event, p.match(caption)) for event, p in EVENT_PATTERNS.items() if p.match(caption)]
    assert len(found) == 1, caption
    return found[0]


# --- determinism and splits -------------------------------------------------

def test_same_seed_same_stories_other_seed_differs():
    first, again = StoryDataset(small_config(), "train"), StoryDataset(small_config(), "train")
    other = StoryDataset(small_config(seed=1), "train")
    for index in (0, 5, 63):
        a, b = first[index], again[index]
        assert torch.equal(a["frames"], b["frames"]) and a["captions"] == b["captions"]
        for key in ("position", "size", "flip", "names_identity", "instance"):
            assert torch.equal(a[key], b[key])
    assert not np.array_equal(first.plan.instance, other.plan.instance)
    assert [first.captions(i) for i in range(64)] != [other.captions(i) for i in range(64)]


def test_val_stories_do_not_depend_on_the_train_story_count():
    few, many = small_config(train_stories=8), small_config(train_stories=64)
    val_a, val_b = StoryDataset(few, "val").plan, StoryDataset(many, "val").plan
    np.testing.assert_array_equal(val_a.instance, val_b.instance)


def test_train_and_val_instances_are_disjoint_and_from_the_train_split():
    config = small_config(train_stories=3000, val_stories=500)
    train, val = StoryDataset(config, "train"), StoryDataset(config, "val")
    train_set, val_set = set(train.plan.instance.tolist()), set(val.plan.instance.tolist())
    assert not train_set & val_set
    assert len(val_set) <= config.val_instances and len(train_set) > config.val_instances
    images, labels = load_embedded("train")
    item = val[3]
    assert item["class_label"].tolist() == [int(labels[item["instance"]])] * config.frames
    assert torch.equal(val.images[item["instance"]], torch.from_numpy(images[int(item["instance"])]))


def test_test_stories_show_the_test_image_at_their_instance_index():
    config = small_config(canvas=48, item_size=28)  # normal size = 28 px: the image unresized
    test = StoryDataset(config, "test")
    images, labels = load_embedded("test")
    checked = 0
    for index in range(len(test)):
        item = test[index]
        image = images[int(item["instance"])]
        for t in np.flatnonzero(item["size"].numpy() == NORMAL):
            top, left = item_box(int(item["position"][t]), 28, 48)
            crop = (item["frames"][t, 0, top:top + 28, left:left + 28] + 1) * 127.5
            expected = image[:, ::-1] if item["flip"][t] else image
            np.testing.assert_allclose(crop.numpy(), expected, atol=1e-3)
            checked += 1
        assert int(item["class_label"][0]) == int(labels[int(item["instance"])])
    assert checked > 10


# --- rendering ---------------------------------------------------------------

def expected_box(position: int, side: int, canvas: int) -> tuple[int, int]:
    row, col = divmod(position, 3)
    return [0, (canvas - side) // 2, canvas - side][row], [0, (canvas - side) // 2, canvas - side][col]


def test_the_same_instance_persists_through_moves_resizes_and_flips():
    config = small_config()
    dataset = StoryDataset(config, "train")
    sides = {SMALL: round(16 * 0.6), NORMAL: 16, LARGE: round(16 * 1.4)}
    images, _ = load_embedded("train")
    for index in range(16):
        item = dataset[index]
        frames = item["frames"]  # (F, 1, 32, 32)
        assert frames.shape == (4, 1, 32, 32) and frames.dtype == torch.float32
        assert frames.min() >= -1 and frames.max() <= 1
        crops = {}
        for t in range(config.frames):
            side = sides[int(item["size"][t])]
            top, left = expected_box(int(item["position"][t]), side, 32)
            outside = frames[t, 0].clone()
            crop = outside[top:top + side, left:left + side].clone()
            outside[top:top + side, left:left + side] = -1
            assert torch.all(outside == -1)  # black canvas everywhere else
            crop = crop.flip(-1) if item["flip"][t] else crop
            crops.setdefault(side, crop)
            assert torch.equal(crops[side], crop)  # same size -> identical pixels after un-flipping
        source = Image.fromarray(images[int(item["instance"])])
        for side, crop in crops.items():
            reference = np.asarray(source.resize((side, side), Image.Resampling.BILINEAR), np.float64)
            assert np.corrcoef(crop.numpy().ravel(), reference.ravel())[0, 1] > 0.9


# --- captions -----------------------------------------------------------------

def test_captions_follow_the_grammar_and_the_recorded_changes():
    dataset = StoryDataset(small_config(train_stories=300, frames=5), "train")
    seen = set()
    for index in range(len(dataset)):
        captions, p = dataset.captions(index), dataset.plan
        noun = NOUNS[int(dataset.labels[p.instance[index]])]
        position, size = p.position[index].tolist(), p.size[index].tolist()
        flip, names = p.flip[index].tolist(), p.names_identity[index].tolist()
        for t, caption in enumerate(captions):
            event, match = parse(caption, t)
            seen.add(event)
            assert (match["noun"] is not None) == names[t] and (noun in caption) == names[t]
            if names[t]:
                assert match["noun"] == noun
            if event in ("intro", "move", "stay"):
                assert GRID.index(match["pos"]) == position[t]
            if event == "intro":
                assert {None: NORMAL, "small": SMALL, "large": LARGE}[match["size"]] == size[t]
                assert not flip[t]
                continue
            assert (position[t] != position[t - 1]) == (event == "move")
            assert (flip[t] != flip[t - 1]) == (event == "flip")
            assert abs(size[t] - size[t - 1]) == (event == "resize")
            if event == "resize":
                assert (size[t] < size[t - 1]) == (match["change"] == "smaller")
    assert seen == {"intro", "move", "stay", "flip", "resize"}


def test_omit_identity_prob_is_met_and_frame_zero_always_names():
    dataset = StoryDataset(small_config(train_stories=2000, omit_identity_prob=0.3), "train")
    names = dataset.plan.names_identity  # (2000, 4)
    assert names[:, 0].all()
    assert abs((~names[:, 1:]).mean() - 0.3) < 0.03
    for index in range(0, 2000, 97):
        item = dataset[index]
        noun = NOUNS[int(item["class_label"][0])]
        assert [noun in c for c in item["captions"]] == item["names_identity"].tolist()


def test_no_flips_when_flip_events_are_off():
    dataset = StoryDataset(small_config(train_stories=500, flip_events=False), "train")
    assert not dataset.plan.flip.any()
    assert not any("turns around" in c for i in range(500) for c in dataset.captions(i))


def test_collate_keeps_captions_per_story():
    dataset = StoryDataset(small_config(), "val")
    batch = collate_stories([dataset[i] for i in range(3)])
    assert batch["frames"].shape == (3, 4, 1, 32, 32)
    assert batch["position"].shape == (3, 4) and batch["instance"].shape == (3,)
    assert batch["names_identity"].dtype == torch.bool
    assert batch["captions"] == [dataset.captions(i) for i in range(3)]


def test_default_sizes_build_quickly_and_render_lazily():
    config = StoryConfig()
    assert [len(StoryDataset(config, s)) for s in ("train", "val", "test")] == [10_000, 500, 1_000]


@pytest.mark.parametrize("overrides, key", [
    ({"source": "cifar"}, "source"),
    ({"source": "mnist"}, "root"),
    ({"root": "/tmp"}, "root"),
    ({"frames": 0}, "frames"),
    ({"canvas": 4}, "canvas"),
    ({"item_size": 30}, "item_size"),
    ({"item_size": 2}, "item_size"),
    ({"train_stories": -1}, "train_stories"),
    ({"val_stories": 1.5}, "val_stories"),
    ({"omit_identity_prob": 1.5}, "omit_identity_prob"),
    ({"omit_identity_prob": True}, "omit_identity_prob"),
    ({"flip_events": "yes"}, "flip_events"),
    ({"seed": -1}, "seed"),
    ({"val_instances": 0}, "val_instances"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        StoryConfig(**overrides)
    assert one_line(err).startswith(f"data.story.{key}: ")


def test_mnist_source_reads_root_and_names_digits(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8) % 10)
    config = small_config(source="mnist", root=str(tmp_path), val_instances=10, train_stories=4)
    train, test = StoryDataset(config, "train"), StoryDataset(config, "test")
    assert len(train.images) == 30 and set(test.plan.instance) <= set(range(10))
    label = int(test[0]["class_label"][0])
    assert INTRO.match(test.captions(0)[0])["noun"] == f"digit {DIGITS[label]}"


def test_val_instances_must_leave_train_instances():
    with pytest.raises(ConfigError, match=r"^data\.story\.val_instances: "):
        StoryDataset(small_config(val_instances=10_000), "train")


# --- HDF5 (ARLDM layout) -------------------------------------------------------

def encode(pixels: np.ndarray, fmt: str = "PNG") -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def story_pixels(split_index: int, story: int, frame: int) -> np.ndarray:
    """A 12 x 12 RGB frame of one flat colour that names (split, story, frame)."""
    colour = (40 * split_index + 10 * story, 20 * frame, 200 - 30 * frame)
    return np.broadcast_to(np.array(colour, np.uint8), (12, 12, 3)).copy()


def write_arldm_file(path, splits=("train", "val", "test"), corrupt=None):
    """Two 5-frame stories per split, stored as ARLDM does: RGB arrays encoded as if BGR."""
    with h5py.File(path, "w") as f:
        for s, split in enumerate(splits):
            group = f.create_group(split)
            vlen = h5py.vlen_dtype(np.uint8)
            images = [group.create_dataset(f"image{t}", (2,), dtype=vlen) for t in range(5)]
            text = group.create_dataset("text", (2,), dtype=h5py.string_dtype(encoding="utf-8"))
            for i in range(2):
                for t in range(5):
                    bgr = story_pixels(s, i, t)[..., ::-1]  # what cv2.imencode stores for an RGB array
                    images[t][i] = encode(bgr, "JPEG" if t == 4 else "PNG")
                text[i] = "|".join(f"{split} story {i} frame {t}" for t in range(5))
            if corrupt == split:
                images[2][1] = np.frombuffer(b"not an image", np.uint8)
    return path


def test_hdf5_loader_reads_frames_and_captions(tmp_path):
    path = write_arldm_file(tmp_path / "pororo.h5")
    dataset = StoryHDF5Dataset(path, "val", image_size=8)
    assert len(dataset) == 2
    item = dataset[1]
    assert item["frames"].shape == (5, 3, 8, 8) and item["frames"].dtype == torch.float32
    assert item["captions"] == [f"val story 1 frame {t}" for t in range(5)]
    rgb = (item["frames"] + 1) * 127.5  # (5, 3, 8, 8)
    for t in range(5):
        expected = torch.tensor(story_pixels(1, 1, t)[0, 0], dtype=torch.float32).view(3, 1, 1)
        tolerance = 6 if t == 4 else 1e-3  # frame 4 is JPEG
        assert (rgb[t] - expected).abs().max() <= tolerance
    batch = collate_stories([dataset[0], dataset[1]])
    assert batch["frames"].shape == (2, 5, 3, 8, 8) and len(batch["captions"][1]) == 5
    copy = pickle.loads(pickle.dumps(dataset))  # DataLoader workers get a copy without the open handle
    assert copy._group is None and copy[0]["captions"] == dataset[0]["captions"]
    dataset.close()


def test_hdf5_rgb_order_and_fewer_frames(tmp_path):
    path = write_arldm_file(tmp_path / "f.h5")
    item = StoryHDF5Dataset(path, "train", image_size=12, frames=3, encoded_order="rgb")[0]
    assert item["frames"].shape == (3, 3, 12, 12) and len(item["captions"]) == 3
    stored = (item["frames"][1, :, 0, 0] + 1) * 127.5
    assert torch.allclose(stored, torch.tensor(story_pixels(0, 0, 1)[0, 0][::-1].copy(), dtype=torch.float32))


def test_hdf5_vertical_strip_keeps_one_square_frame(tmp_path):
    path = tmp_path / "flintstones.h5"
    strip = np.concatenate([np.full((6, 6, 3), 50 * k, np.uint8) for k in range(5)])  # (30, 6, 3)
    with h5py.File(path, "w") as f:
        group = f.create_group("test")
        for t in range(5):
            group.create_dataset(f"image{t}", (1,), dtype=h5py.vlen_dtype(np.uint8))[0] = encode(strip)
        group.create_dataset("text", data=["a|b|c|d|e"], dtype=h5py.string_dtype(encoding="utf-8"))
    first = StoryHDF5Dataset(path, "test", image_size=6)[0]["frames"]
    middle = StoryHDF5Dataset(path, "test", image_size=6, strip_frame="middle")[0]["frames"]
    assert torch.allclose(first, torch.full_like(first, -1.0))
    assert torch.allclose((middle + 1) * 127.5, torch.full_like(middle, 100.0))


def test_hdf5_errors_are_one_line_and_name_the_file(tmp_path):
    path = write_arldm_file(tmp_path / "s.h5", splits=("train", "test"), corrupt="test")
    with pytest.raises(DataError) as err:
        StoryHDF5Dataset(tmp_path / "missing.h5", "train", image_size=8)
    assert "missing.h5" in one_line(err) and "not found" in str(err.value)
    with pytest.raises(DataError) as err:
        StoryHDF5Dataset(path, "val", image_size=8)
    assert "s.h5" in one_line(err) and "'val'" in str(err.value)
    dataset = StoryHDF5Dataset(path, "test", image_size=8)
    dataset[0]
    with pytest.raises(DataError) as err:
        dataset[1]
    assert re.search(r"s\.h5: test story 1: image2 does not decode", one_line(err))
    with pytest.raises(DataError, match="no dataset 'image5'"):
        StoryHDF5Dataset(path, "train", image_size=8, frames=6)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="cannot open as HDF5"):
        StoryHDF5Dataset(tmp_path / "text.h5", "train", image_size=8)


def test_hdf5_too_few_captions(tmp_path):
    path = write_arldm_file(tmp_path / "s.h5")
    with h5py.File(path, "a") as f:
        f["train/text"][0] = "only|three|captions"
    with pytest.raises(DataError, match=r"train story 0: 3 captions in text, expected 5"):
        StoryHDF5Dataset(path, "train", image_size=8)[0]


def test_hdf5_without_h5py_says_how_to_install(tmp_path, monkeypatch):
    path = write_arldm_file(tmp_path / "s.h5")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ConfigError) as err:
        StoryHDF5Dataset(path, "train", image_size=8)
    assert "pip install h5py" in one_line(err)

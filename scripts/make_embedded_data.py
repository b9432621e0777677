"""Build the embedded Fashion-MNIST files in ``src/diffusionforge/data/embedded/``.

Reads the full Fashion-MNIST idx files, keeps a class-balanced subset of the
training split (``SUBSET_PER_CLASS`` images per class, drawn with
``SUBSET_SEED``, kept in their original order), copies the test split files
byte for byte, and writes ``README.md`` with the sha256 of every file.

Usage:
    python scripts/make_embedded_data.py                    # first source found
    python scripts/make_embedded_data.py --source /path/to/fashion-mnist
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

from diffusionforge.data.embedded import (
    EMBEDDED_DIR, EMBEDDED_FILES, SUBSET_PER_CLASS, SUBSET_SEED, balanced_subset,
)
from diffusionforge.data.idx import read_idx, write_idx

DEFAULT_SOURCES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist",
    Path("/usr/share/datasets/fashion-mnist"),
)
README_TEMPLATE = """\
# Embedded Fashion-MNIST

The default dataset of diffusionforge (`data.name=fashion-mnist-embedded`).

- Source: Fashion-MNIST, Zalando Research,
  https://github.com/zalandoresearch/fashion-mnist (Xiao, Rasul & Vollgraf
  2017, arXiv:1708.07747); read from the Debian package
  `dataset-fashion-mnist`, whose decoded arrays are the originals.
- License: MIT (Copyright 2017 Zalando SE); the text is at the end of this
  file.
- `fashion-mnist-train10k-*`: {total:,} images of the 60,000-image TRAINING
  split, {per_class:,} per class, drawn without replacement by
  `scripts/make_embedded_data.py` with `numpy.random.default_rng({seed})`
  (`SUBSET_SEED` in `diffusionforge/data/embedded.py`), classes visited in
  label order, kept in their original order. Written as gzip idx files with
  no timestamp, so the script reproduces these bytes.
- `t10k-*`: the full 10,000-image TEST split, copied unchanged.

Train on the first pair, evaluate against the second.

| file | sha256 |
|------|--------|
{rows}

## License of the data files

The MIT License (MIT)

Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in
all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_source(explicit: Path | None) -> Path:
    candidates = (explicit,) if explicit else DEFAULT_SOURCES
    for folder in candidates:
        if (folder / "train-images-idx3-ubyte.gz").is_file():
            return folder
    sys.exit(f"make_embedded_data: no Fashion-MNIST idx files in {', '.join(map(str, candidates))}")


def build(source: Path, out: Path) -> None:
    images = read_idx(source / "train-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(source / "train-labels-idx1-ubyte.gz", ndim=1)
    keep = balanced_subset(labels, SUBSET_PER_CLASS, SUBSET_SEED)
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / EMBEDDED_FILES[("train", "images")], images[keep])
    write_idx(out / EMBEDDED_FILES[("train", "labels")], labels[keep])
    for kind in ("images", "labels"):
        name = EMBEDDED_FILES[("test", kind)]
        shutil.copyfile(source / name, out / name)
    rows = "\n".join(f"| `{name}` | `{sha256(out / name)}` |" for name in EMBEDDED_FILES.values())
    readme = README_TEMPLATE.format(
        total=len(keep), per_class=SUBSET_PER_CLASS, seed=SUBSET_SEED, rows=rows
    )
    (out / "README.md").write_text(readme, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="folder with the full Fashion-MNIST .gz idx files (default: first found of "
                        + ", ".join(map(str, DEFAULT_SOURCES)) + ")")
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    build(find_source(args.source), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

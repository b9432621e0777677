"""Reader and writer for the idx format of MNIST and Fashion-MNIST.

An idx file is a 4-byte magic number, one big-endian uint32 per dimension,
then the array in C order with big-endian items (LeCun et al., "The MNIST
database", http://yann.lecun.com/exdb/mnist/).

| byte | meaning                                                         |
|------|-----------------------------------------------------------------|
| 0, 1 | always zero                                                     |
| 2    | item type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,       |
|      | 0x0D float32, 0x0E float64                                      |
| 3    | number of dimensions (1 for labels, 3 for images)               |

Files may be gzip-compressed; compression is detected from the gzip magic
bytes ``1f 8b``, not from the file name. Every problem with a file raises
``DataError`` with a one-line message that starts with the path.
"""

from __future__ import annotations

import gzip as gzip_module
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

from diffusionforge.errors import DataError

PathLike = Union[str, os.PathLike]

GZIP_MAGIC = b"\x1f\x8b"
HEADER_BYTES = 4  # the magic number; dimensions follow as 4-byte words
DTYPE_CODES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_DIMS = 8  # far above any real file; guards against reading junk as a header


def _read_bytes(path: Path) -> bytes:
    """The decoded content of ``path``: gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror or err})") from None
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip_module.decompress(raw)
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream ({len(raw)} compressed bytes)") from None
    except (gzip_module.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip stream ({err})") from None


def _expected_magic(ndim: Optional[int]) -> str:
    if ndim is None:
        return "expected 0x000008NN: two zero bytes, a type code and a dimension count"
    return f"expected 0x{0x0800 | ndim:08x}"


def _parse_header(path: Path, data: bytes, ndim: Optional[int]) -> tuple[np.dtype, tuple[int, ...]]:
    """Check the magic number and return (item dtype, shape)."""
    if len(data) < HEADER_BYTES:
        raise DataError(f"{path}: not an idx file ({len(data)} bytes, shorter than the 4-byte magic)")
    magic = struct.unpack(">I", data[:HEADER_BYTES])[0]
    zeros, code, dims = data[0:2], data[2], data[3]
    if zeros != b"\x00\x00" or code not in DTYPE_CODES or not 1 <= dims <= MAX_DIMS:
        raise DataError(f"{path}: not an idx file (magic 0x{magic:08x}, {_expected_magic(ndim)})")
    if ndim is not None and dims != ndim:
        raise DataError(
            f"{path}: idx file has {dims} dimension(s), expected {ndim} (magic 0x{magic:08x})"
        )
    end = HEADER_BYTES + 4 * dims
    if len(data) < end:
        raise DataError(f"{path}: truncated idx file: header of {dims} dimensions cut short")
    shape = struct.unpack(f">{dims}I", data[HEADER_BYTES:end])
    return DTYPE_CODES[code], tuple(int(s) for s in shape)


def read_idx(path: PathLike, ndim: Optional[int] = None) -> np.ndarray:
    """Read an idx file (raw or gzip) into a native-endian numpy array.

    Args:
        path: the idx file, e.g. ``train-images-idx3-ubyte.gz``.
        ndim: the required number of dimensions (3 for images, 1 for labels),
            or None to accept any.

    Returns:
        the array with the shape from the header, e.g. (60000, 28, 28) uint8.

    Raises:
        DataError: missing file, bad magic, wrong dimension count, a payload
            shorter or longer than the header says, or a broken gzip stream.
    """
    path = Path(path)
    data = _read_bytes(path)
    dtype, shape = _parse_header(path, data, ndim)
    offset = HEADER_BYTES + 4 * len(shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - offset
    if found != expected:
        problem = "truncated idx file" if found < expected else "idx file has trailing bytes"
        dims = "x".join(str(s) for s in shape)
        raise DataError(f"{path}: {problem}: header says {dims} = {expected} bytes, found {found}")
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=offset)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def _dtype_code(dtype: np.dtype) -> int:
    for code, idx_dtype in DTYPE_CODES.items():
        if np.dtype(dtype).kind == idx_dtype.kind and np.dtype(dtype).itemsize == idx_dtype.itemsize:
            return code
    supported = ", ".join(str(d.newbyteorder("=")) for d in DTYPE_CODES.values())
    raise ValueError(f"write_idx: dtype {dtype} has no idx type code (supported: {supported})")


def write_idx(path: PathLike, array: np.ndarray, gzip: bool = True) -> Path:
    """Write ``array`` as an idx file, gzip-compressed unless ``gzip=False``.

    The gzip header carries no timestamp, so equal arrays give equal bytes
    (the sha256 sums of the embedded dataset depend on it).
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim < 1 or array.ndim > MAX_DIMS:
        raise ValueError(f"write_idx: need 1..{MAX_DIMS} dimensions, got shape {array.shape}")
    code = _dtype_code(array.dtype)
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=DTYPE_CODES[code]).tobytes()
    if not gzip:
        path.write_bytes(payload)
        return path
    with open(path, "wb") as raw, gzip_module.GzipFile(
        filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
    ) as stream:
        stream.write(payload)
    return path

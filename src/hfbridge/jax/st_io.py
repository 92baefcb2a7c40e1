"""Reading safetensors checkpoints tensor by tensor as numpy (bf16 included), and writing them likewise.

The format is a little-endian u64 header length, a JSON header naming each tensor's dtype, shape and byte range,
then the raw bytes; reading a tensor is one ``np.fromfile`` of its range.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items() if k not in ("F8_E4M3", "F8_E5M2")}


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors shards of a Hugging Face folder: from the index file when there is one, in its order."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return [folder / n for n in names]
    if (folder / SINGLE_NAME).exists():
        return [folder / SINGLE_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(
            f"no *.safetensors weights in {folder} (PyTorch .bin checkpoints are not read; re-save with safetensors)"
        )
    return found


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class SafetensorsError(ValueError):
    """A safetensors file whose header does not describe its bytes."""


def _raw_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} is beyond the file ({size} bytes) or the "
                                   f"{MAX_HEADER_BYTES}-byte limit; the file is corrupt or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    return header, 8 + n


def read_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (``{name: {dtype, shape, data_offsets}}``) and where data starts;
    every tensor's dtype, shape and byte range are checked against each other and the file's size."""
    path = Path(path)
    header, start = _raw_header(path)
    header.pop("__metadata__", None)
    data_size = path.stat().st_size - start
    for name, info in header.items():
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            itemsize = np.dtype(_DTYPES[info["dtype"]]).itemsize if info["dtype"] in _DTYPES else None
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
        if not 0 <= begin <= end <= data_size or any(d < 0 for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r} claims bytes {begin}..{end} of a {data_size}-byte data "
                                   "section; the file is truncated or corrupt")
        if itemsize is not None and int(np.prod(shape, dtype=np.int64)) * itemsize != end - begin:
            raise SafetensorsError(f"{path}: tensor {name!r} of shape {shape} and dtype {info['dtype']} does not "
                                   f"fill its {end - begin} bytes")
    return header, start


def iter_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` for each tensor of one safetensors file, in file order, read one at a time.

    Each tensor's byte range is read into its own numpy array (bf16 and fp8 as ``ml_dtypes`` arrays), without
    mapping the file, so only the tensor being converted is in memory, not the whole shard.
    """
    header, start = read_header(path)
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        if info["dtype"] not in _DTYPES:
            raise TypeError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which hfbridge.jax cannot read")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        array = np.fromfile(path, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        yield name, array.reshape(info["shape"])


def save_tensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write a standard safetensors file (bf16 as ``BF16``), converting and writing one tensor at a time.

    ``tensors`` values may be anything ``np.asarray`` accepts (JAX arrays are fetched one by one).
    """
    shapes: dict[str, tuple[str, list[int], int]] = {}
    for name, value in tensors.items():
        dtype = np.dtype(value.dtype)
        if dtype not in _CODES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which this writer does not support")
        shapes[name] = (_CODES[dtype], list(value.shape), int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (code, shape, nbytes) in shapes.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for value in tensors.values():
            f.write(np.ascontiguousarray(np.asarray(value)).tobytes())


def read_metadata(path: str | Path) -> dict:
    return dict(_raw_header(Path(path))[0].get("__metadata__") or {})

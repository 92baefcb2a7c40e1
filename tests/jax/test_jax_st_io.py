"""The JAX face's safetensors reader trusts no header: sizes and byte ranges are checked against the file."""

import json
import struct

import numpy as np
import pytest

from hfbridge.jax.st_io import SafetensorsError, iter_tensors, read_header, save_tensors


def _file(tmp_path, header: dict, data: bytes = b"", length: int | None = None):
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _short(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x00")
    return path


def test_a_good_file_round_trips(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_tensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    (name, array), = iter_tensors(path)
    assert name == "w" and array.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: _file(p, {}, length=1 << 62), "header length 4611686018427387904 is beyond the file"),
    (lambda p: _short(p), "too short"),
    (lambda p: _file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8),
     "claims bytes 0..16 of a 8-byte data section"),
    (lambda p: _file(p, {"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 8]}}, b"\x00" * 8),
     "does not fill its 8 bytes"),
    (lambda p: _file(p, {"w": {"dtype": "F32", "shape": "oops", "data_offsets": [0, 8]}}, b"\x00" * 8),
     "malformed header entry"),
])
def test_a_lying_header_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(SafetensorsError, match=message):
        read_header(make(tmp_path))

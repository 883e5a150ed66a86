"""Safetensors files written by hand (struct + json), as the ``safetensors`` package lays them
out: 8-byte little-endian header length, the JSON header padded with spaces to a multiple of 8,
then the tensors' data back to back in header order. Used by the model and storage tests."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence

SIZES = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3"), 1),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 2),
    **dict.fromkeys(("I32", "U32", "F32"), 4),
    **dict.fromkeys(("I64", "U64", "F64"), 8),
}
"""Bytes per element, written out independently of ``node.models.DTYPE_SIZES``."""


def tensor_bytes(name: str, nbytes: int) -> bytes:
    """Deterministic content for a tensor of ``nbytes`` bytes."""
    out = bytearray()
    k = 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"{name}/{k}".encode()).digest()
        k += 1
    return bytes(out[:nbytes])


def header_dict(
    tensors: Sequence[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[dict[str, object], int]:
    """A header for ``(name, dtype, shape)`` laid out in the given order; also the data size."""
    tree: dict[str, object] = {}
    if metadata is not None:
        tree["__metadata__"] = dict(metadata)
    pos = 0
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        tree[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    return tree, pos


def safetensors_file(
    tensors: Sequence[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
    *,
    align: int = 8,
) -> bytes:
    """A whole safetensors file; tensor data from :func:`tensor_bytes`."""
    tree, _ = header_dict(tensors, metadata)
    header = json.dumps(tree).encode()
    header += b" " * (-len(header) % align)
    out = struct.pack("<Q", len(header)) + header
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        out += tensor_bytes(name, n)
    return out


def read_file(data: bytes) -> tuple[dict[str, object], bytes]:
    """An independent minimal reader: (header tree, data bytes) of a safetensors file."""
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + n]), data[8 + n :]

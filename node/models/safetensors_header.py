"""Strict, torch-free parser and writer of safetensors headers (DESIGN §8).

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON, then
the tensor data. The JSON is an object: an optional ``"__metadata__"`` map of strings to strings
and, for every other key, a tensor ``{"dtype", "shape", "data_offsets": [begin, end]}`` whose
offsets are relative to the start of the data. This module accepts exactly what the safetensors
library itself requires (the header starts with ``{``, known dtypes, ``end - begin`` equal to the
tensor's byte size, tensors tiling the data with no gap or overlap) and is stricter where JSON is
loose (duplicate keys, non-integer numbers, NaN, lone surrogates are refused), so one header has
one meaning everywhere, consensus included. Nothing here imports torch or numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from node.errors import DecodeError

MAX_HEADER_BYTES = (1 << 20) - 8
"""Largest header accepted: artifact format v1 puts header and length prefix in one 1 MiB leaf."""

METADATA_KEY = "__metadata__"
MAX_DIM = (1 << 64) - 1
"""Shape entries and offsets are unsigned 64-bit, as in the safetensors format."""

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
"""Bytes per element of every dtype we accept."""

SUB_BYTE_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
"""Dtypes safetensors knows whose elements are smaller than a byte: refused (rows could not be
addressed by byte ranges)."""

_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})


# --- errors ------------------------------------------------------------------------------------


class ArtifactFormatError(DecodeError):
    """An artifact (safetensors file, format v1 layout, dataset) that breaks a format rule."""

    code = 1630
    reason = "invalid artifact format"


class NotSafetensors(ArtifactFormatError):
    """Bytes that are not a safetensors header at all (not UTF-8, not a JSON object, short)."""

    code = 1631
    reason = "not a safetensors file"


class MalformedHeader(ArtifactFormatError):
    """A JSON object that is not a valid safetensors header (keys, types, duplicates)."""

    code = 1632
    reason = "malformed safetensors header"


class UnknownDtype(ArtifactFormatError):
    code = 1633
    reason = "unknown tensor dtype"


class SubByteDtype(ArtifactFormatError):
    code = 1634
    reason = "sub-byte dtypes are not supported"


class BadOffsets(ArtifactFormatError):
    """Tensor offsets that disagree with the shapes or do not tile the data exactly."""

    code = 1635
    reason = "tensor data offsets are inconsistent"


class HeaderTooLarge(ArtifactFormatError):
    code = 1636
    reason = "safetensors header too large"


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a header: data bytes ``[begin, end)`` relative to the data start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def dtype_size(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A validated header: tensors in offset order, the metadata map, the data size it implies."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None
    data_size: int

    def by_name(self, name: str) -> TensorInfo:
        """The tensor called ``name``; ``KeyError`` if there is none."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)


# --- parsing -----------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedHeader(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise MalformedHeader(f"{name} is not allowed in a safetensors header")


def _refuse_float(text: str) -> Any:
    raise MalformedHeader(f"non-integer number {text} in the header")


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_DIM


def _check_text(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a \ud800 escape
        raise MalformedHeader(f"{what} is not valid Unicode") from exc


def _element_count(shape: list[int]) -> int:
    """prod(shape), capped just above MAX_DIM so a huge shape cannot make big-int work."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > MAX_DIM:
            return MAX_DIM + 1
    return n


def _parse_tensor(name: str, spec: object) -> TensorInfo:
    if type(spec) is not dict:
        raise MalformedHeader(f"tensor {name!r} is not an object")
    if spec.keys() != _TENSOR_KEYS:
        raise MalformedHeader(
            f"tensor {name!r} must have exactly the keys dtype, shape, data_offsets"
        )
    dtype = spec["dtype"]
    if type(dtype) is not str:
        raise MalformedHeader(f"tensor {name!r}: dtype is not a string")
    if dtype in SUB_BYTE_DTYPES:
        raise SubByteDtype(f"tensor {name!r} has the sub-byte dtype {dtype}")
    if dtype not in DTYPE_SIZES:
        raise UnknownDtype(f"tensor {name!r} has the unknown dtype {dtype!r}")
    shape = spec["shape"]
    if type(shape) is not list or not all(_is_uint(d) for d in shape):
        raise MalformedHeader(f"tensor {name!r}: shape must be a list of non-negative integers")
    offsets = spec["data_offsets"]
    if type(offsets) is not list or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise BadOffsets(f"tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise BadOffsets(f"tensor {name!r}: data_offsets end before they begin")
    if end - begin != _element_count(shape) * DTYPE_SIZES[dtype]:
        raise BadOffsets(
            f"tensor {name!r}: {end - begin} bytes of data for shape {shape} of {dtype}"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def parse_header(header_json: bytes | bytearray | memoryview) -> SafetensorsHeader:
    """Validate the JSON header of a safetensors file (the bytes after its length prefix).

    Trailing spaces (and any JSON whitespace) are allowed: safetensors writers pad with them.
    """
    if not isinstance(header_json, bytes | bytearray | memoryview):
        raise TypeError("the header is bytes")
    raw = bytes(header_json)
    if len(raw) > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"a header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    if not raw.startswith(b"{"):
        raise NotSafetensors("the header must be a JSON object starting with '{'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotSafetensors(f"the header is not UTF-8 ({exc.reason})") from exc
    try:
        tree = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_refuse_float,
        )
    except ValueError as exc:  # JSONDecodeError, or Python's int digit limit
        raise NotSafetensors(f"the header is not valid JSON: {exc}") from exc
    if type(tree) is not dict:
        raise NotSafetensors("the header is not a JSON object")
    metadata: dict[str, str] | None = None
    tensors: list[TensorInfo] = []
    for key, value in tree.items():
        _check_text(key, "a header key")
        if key == METADATA_KEY:
            if type(value) is not dict or not all(type(v) is str for v in value.values()):
                raise MalformedHeader("__metadata__ must map strings to strings")
            for k, v in value.items():
                _check_text(k, "a metadata key")
                _check_text(v, "a metadata value")
            metadata = value
        else:
            tensors.append(_parse_tensor(key, value))
    tensors.sort(key=lambda t: (t.begin, t.end, t.name))
    pos = 0
    for t in tensors:
        if t.begin != pos:
            what = "a gap" if t.begin > pos else "an overlap"
            raise BadOffsets(f"tensor {t.name!r} starts at {t.begin}: {what} after byte {pos}")
        pos = t.end
    return SafetensorsHeader(tuple(tensors), metadata, pos)


# --- writing -----------------------------------------------------------------------------------


def encode_header(tensors: Iterable[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """The canonical header JSON for ``tensors`` (compact, keys sorted, raw UTF-8), validated.

    Used for every file we write (composites, conversions), so equal content gives equal bytes.
    """
    tree: dict[str, Any] = {}
    if metadata is not None:
        tree[METADATA_KEY] = dict(metadata)
    for t in tensors:
        if t.name == METADATA_KEY or t.name in tree:
            raise MalformedHeader(f"tensor name {t.name!r} is reserved or repeated")
        tree[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    try:
        out = json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        data = out.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise MalformedHeader(f"the header cannot be encoded: {exc}") from exc
    parse_header(data)  # the same rules as any header we read
    return data

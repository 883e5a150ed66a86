"""The strict safetensors header parser and the canonical header writer (DESIGN §8)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import DecodeError
from node.models import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    ArtifactFormatError,
    BadOffsets,
    HeaderTooLarge,
    MalformedHeader,
    NotSafetensors,
    SafetensorsHeader,
    SubByteDtype,
    TensorInfo,
    UnknownDtype,
    encode_header,
    parse_header,
)
from node.models import safetensors_header as sh
from tests.models.safetensors_files import header_dict


def dumps(tree: Any) -> bytes:
    return json.dumps(tree).encode()


def tensor(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD: dict[str, Any] = {
    "__metadata__": {"format": "pt"},
    "weight": tensor("F32", [2, 3], 0, 24),
    "bias": tensor("BF16", [3], 24, 30),
}


# --- accepted headers --------------------------------------------------------------------------


def test_parses_tensors_in_offset_order_with_metadata() -> None:
    # JSON order: bias written first, but weight's data comes first.
    tree = {"bias": GOOD["bias"], "__metadata__": GOOD["__metadata__"], "weight": GOOD["weight"]}
    h = parse_header(dumps(tree))
    assert h == SafetensorsHeader(
        tensors=(
            TensorInfo("weight", "F32", (2, 3), 0, 24),
            TensorInfo("bias", "BF16", (3,), 24, 30),
        ),
        metadata={"format": "pt"},
        data_size=30,
    )
    assert h.by_name("bias").begin == 24
    assert h.names == ("weight", "bias")
    assert h.by_name("weight").nbytes == 24
    assert h.by_name("weight").dtype_size == 4
    with pytest.raises(KeyError):
        h.by_name("nope")


def test_empty_header_is_an_empty_file() -> None:
    h = parse_header(b"{}")
    assert h.tensors == () and h.metadata is None and h.data_size == 0


def test_trailing_spaces_and_json_whitespace_are_allowed() -> None:
    assert (
        parse_header(b'{ "x" : {"dtype":"U8","shape":[4],"data_offsets":[0,4]} }\n   ').data_size
        == 4
    )
    assert parse_header(dumps(GOOD) + b" " * 1000).data_size == 30


def test_zero_sized_tensors_and_scalars() -> None:
    tree = {
        "z": tensor("F32", [0, 5], 0, 0),
        "s": tensor("I64", [], 0, 8),
        "e": tensor("U8", [3, 0], 8, 8),
    }
    h = parse_header(dumps(tree))
    assert [t.name for t in h.tensors] == ["z", "s", "e"]
    assert h.by_name("s").shape == () and h.data_size == 8


def test_header_of_exactly_the_cap_is_accepted() -> None:
    body = dumps(GOOD)
    assert parse_header(body + b" " * (MAX_HEADER_BYTES - len(body))).data_size == 30
    assert MAX_HEADER_BYTES == (1 << 20) - 8


def test_dtype_sizes() -> None:
    assert DTYPE_SIZES == {
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
        "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4,
        "F64": 8, "I64": 8, "U64": 8,
    }  # fmt: skip
    for dtype, size in DTYPE_SIZES.items():
        h = parse_header(dumps({"t": tensor(dtype, [3], 0, 3 * size)}))
        assert h.data_size == 3 * size


def test_unicode_names_and_metadata() -> None:
    tree = {"__metadata__": {"ключ": "значение ✓"}, "层.weight": tensor("U8", [1], 0, 1)}
    h = parse_header(json.dumps(tree, ensure_ascii=False).encode())
    assert h.metadata == {"ключ": "значение ✓"}
    assert h.tensors[0].name == "层.weight"
    assert parse_header(dumps(tree)) == h  # \u escapes mean the same


def test_accepts_bytearray_and_memoryview() -> None:
    raw = dumps(GOOD)
    assert parse_header(bytearray(raw)) == parse_header(memoryview(raw)) == parse_header(raw)
    with pytest.raises(TypeError):
        parse_header(raw.decode())  # type: ignore[arg-type]


# --- refused headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", NotSafetensors),
        (b" {}", NotSafetensors),  # safetensors requires the header to start with '{'
        (b"[]", NotSafetensors),
        (b"{", NotSafetensors),
        (b'{"a": 1} x', NotSafetensors),
        (b'{"\xff": 1}', NotSafetensors),
        (b"{}\x00", NotSafetensors),
        ('{"é": 1}'.encode("utf-16-le"), NotSafetensors),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"__metadata__":{"k":"v","k":"w"}}', MalformedHeader),
        (b'{"__metadata__":{"k":1}}', MalformedHeader),
        (b'{"__metadata__":["k"]}', MalformedHeader),
        (b'{"__metadata__":null}', MalformedHeader),
        (b'{"a":[]}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}', MalformedHeader),
        (b'{"a":{"dtype":8,"shape":[1],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":"1","data_offsets":[0,1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', MalformedHeader),
        (b'{"__metadata__":{"k":"\\udfff"}}', MalformedHeader),
        (b'{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}', UnknownDtype),
        (b'{"a":{"dtype":"u8","shape":[1],"data_offsets":[0,1]}}', UnknownDtype),
        (b'{"a":{"dtype":"F8_E8M0","shape":[1],"data_offsets":[0,1]}}', UnknownDtype),
        (b'{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', UnknownDtype),
        (b'{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', SubByteDtype),
        (b'{"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}', SubByteDtype),
        (b'{"a":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[0,3]}}', SubByteDtype),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}}', BadOffsets),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}', BadOffsets),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}', BadOffsets),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":"0,1"}}', BadOffsets),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0.0,1]}}', MalformedHeader),
        (b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[1,0]}}', BadOffsets),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', BadOffsets),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', BadOffsets),  # gap at 0
        (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', BadOffsets),
        (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}', BadOffsets),
        (b'{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}', BadOffsets),
    ],
)  # fmt: skip
def test_refuses(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        parse_header(raw)
    assert type(info.value) is error
    assert isinstance(info.value, ArtifactFormatError)
    assert isinstance(info.value, DecodeError)
    assert str(info.value)


def test_refuses_huge_dims_quickly() -> None:
    # 40k dims of 2**63 would make prod() a 2.5-Mbit integer: refused without building it.
    dims = ",".join(["9223372036854775808"] * 40_000)
    raw = f'{{"a":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}'.encode()
    with pytest.raises(BadOffsets):
        parse_header(raw)


def test_refuses_headers_over_the_cap() -> None:
    body = dumps(GOOD)
    with pytest.raises(HeaderTooLarge):
        parse_header(body + b" " * (MAX_HEADER_BYTES + 1 - len(body)))


def test_refuses_huge_integer_literals() -> None:
    with pytest.raises(NotSafetensors):  # beyond Python's int digit limit: not a JSON we read
        parse_header(b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}')


def test_error_codes_are_in_the_range() -> None:
    classes = [
        sh.ArtifactFormatError,
        NotSafetensors,
        MalformedHeader,
        UnknownDtype,
        SubByteDtype,
        BadOffsets,
        HeaderTooLarge,
    ]
    codes = [c.code for c in classes]
    assert len(set(codes)) == len(codes)
    assert all(1630 <= c <= 1649 for c in codes)


# --- the canonical writer ----------------------------------------------------------------------


def test_encode_header_is_canonical_compact_sorted() -> None:
    tensors = [TensorInfo("w", "F32", (2, 3), 0, 24), TensorInfo("b", "BF16", (3,), 24, 30)]
    raw = encode_header(tensors, {"z": "1", "a": "é"})
    assert raw == (
        b'{"__metadata__":{"a":"\xc3\xa9","z":"1"},'
        b'"b":{"data_offsets":[24,30],"dtype":"BF16","shape":[3]},'
        b'"w":{"data_offsets":[0,24],"dtype":"F32","shape":[2,3]}}'
    )
    assert encode_header(reversed(tensors), {"a": "é", "z": "1"}) == raw
    h = parse_header(raw)
    assert h.tensors == tuple(tensors) and h.metadata == {"a": "é", "z": "1"}
    assert encode_header([], None) == b"{}"


def test_encode_header_validates() -> None:
    with pytest.raises(BadOffsets):
        encode_header([TensorInfo("w", "F32", (2,), 0, 4)], None)
    with pytest.raises(BadOffsets):
        encode_header([TensorInfo("w", "U8", (2,), 1, 3)], None)
    with pytest.raises(UnknownDtype):
        encode_header([TensorInfo("w", "X", (2,), 0, 2)], None)
    with pytest.raises(MalformedHeader):
        encode_header([TensorInfo("__metadata__", "U8", (2,), 0, 2)], None)
    with pytest.raises(MalformedHeader):
        encode_header([TensorInfo("a", "U8", (2,), 0, 2), TensorInfo("a", "U8", (1,), 2, 3)], None)
    with pytest.raises(MalformedHeader):
        encode_header([TensorInfo("\ud800", "U8", (1,), 0, 1)], None)
    with pytest.raises(HeaderTooLarge):
        encode_header([TensorInfo("n" * MAX_HEADER_BYTES, "U8", (1,), 0, 1)], None)


_names = st.text(st.characters(exclude_categories=["Cs"]), min_size=0, max_size=12).filter(
    lambda s: s != "__metadata__"
)
_specs = st.lists(
    st.tuples(
        _names,
        st.sampled_from(sorted(DTYPE_SIZES)),
        st.lists(st.integers(0, 5), max_size=3),
    ),
    max_size=8,
    unique_by=lambda t: t[0],
)


@given(
    specs=_specs,
    metadata=st.none() | st.dictionaries(_names, _names, max_size=3),
)
def test_roundtrip_against_json_model(
    specs: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None
) -> None:
    tree, size = header_dict(specs, metadata)
    h = parse_header(json.dumps(tree).encode())
    assert h.data_size == size
    assert h.metadata == metadata
    assert {t.name: (t.dtype, list(t.shape), [t.begin, t.end]) for t in h.tensors} == {
        name: (v["dtype"], v["shape"], v["data_offsets"])  # type: ignore[index]
        for name, v in tree.items()
        if name != "__metadata__"
    }
    assert [t.begin for t in h.tensors] == sorted(t.begin for t in h.tensors)
    canonical = encode_header(h.tensors, h.metadata)
    assert parse_header(canonical) == h
    assert json.loads(canonical) == tree

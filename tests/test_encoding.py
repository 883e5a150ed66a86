"""Canonical encoding: the committed vectors, strict rejection, and property-based round trips."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import errors
from node.encoding import DEFAULT_MAX_BYTES, DEFAULT_MAX_ITEMS, DEFAULT_MAX_STR, Record
from node.errors import DecodeError, NonCanonicalEncoding, TooLarge
from node.types import UINT64_MAX, UINT256_MAX, Address, Amount, Hash32, Signature
from tests.vectors import gen_vectors

VECTORS = json.loads(gen_vectors.ENCODING_FILE.read_text())
RECORDS = VECTORS["records"]
INVALID = VECTORS["invalid"]


def test_vector_file_is_reproduced_exactly() -> None:
    # The committed file is exactly what the generator produces from the fixed inputs today.
    assert gen_vectors.render(gen_vectors.build_encoding_vectors()) == (
        gen_vectors.ENCODING_FILE.read_text()
    )


def test_vectors_cover_the_required_records() -> None:
    covered = {v["type"] for v in RECORDS}
    assert {"Transfer", "Transaction", "SignedTransaction", "Vote", "Header", "Account"} <= covered


@pytest.mark.parametrize("vec", RECORDS, ids=[v["name"] for v in RECORDS])
def test_record_vector(vec: dict[str, Any]) -> None:
    cls = gen_vectors.RECORD_TYPES[vec["type"]]
    record = gen_vectors.record_from_json(vec["type"], vec["value"])
    encoded = bytes.fromhex(vec["encoded"])
    assert record.encode() == encoded
    decoded = cls.decode(encoded)
    assert decoded == record
    assert decoded.encode() == encoded
    assert gen_vectors.to_json_value(cls, decoded) == vec["value"]
    if "hash" in vec:
        assert decoded.hash().hex() == vec["hash"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("vec", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector(vec: dict[str, Any]) -> None:
    cls = gen_vectors.RECORD_TYPES[vec["type"]]
    expected = getattr(errors, vec["error"])
    data = bytes.fromhex(vec["encoded"])
    kwargs = {"max_size": vec["max_size"]} if "max_size" in vec else {}
    with pytest.raises(DecodeError) as info:
        cls.decode(data, **kwargs)
    # Exactly the named class: a NonCanonicalEncoding must not pass as a generic DecodeError
    # and vice versa, so other implementations can match the reason.
    assert type(info.value) is expected, (vec["name"], info.value)


def test_non_minimal_vectors_are_accepted_by_plain_msgpack() -> None:
    # The reason for the canonical check: msgpack alone decodes these to the same value.
    import msgpack

    for vec in INVALID:
        if vec["error"] != "NonCanonicalEncoding":
            continue
        tree = msgpack.unpackb(bytes.fromhex(vec["encoded"]), use_list=False)
        assert msgpack.packb(tree, use_bin_type=True) != bytes.fromhex(vec["encoded"])


def test_decode_rejects_non_bytes() -> None:
    from node.consensus.state import Account

    with pytest.raises(DecodeError):
        Account.decode("92" + "05")  # type: ignore[arg-type]


def test_too_large_before_parsing() -> None:
    from node.consensus.state import Account

    with pytest.raises(TooLarge):
        Account.decode(b"\xc1" * 100, max_size=99)  # would be malformed if it were parsed


# --- property-based round trips ----------------------------------------------------------------

_UINT64_TYPES = gen_vectors._INT_TYPES
_SMALL = 4  # items per tuple in generated records: enough to exercise arrays, fast to run


def _strategy(tp: Any, cap: int | None) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return st.none() | _strategy(inner, cap)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        limit = DEFAULT_MAX_ITEMS if cap is None else cap
        return st.lists(_strategy(item, None), max_size=min(limit, _SMALL)).map(tuple)
    if tp is Amount:
        return st.integers(0, UINT256_MAX)
    if tp is Address:
        return st.binary(min_size=20, max_size=20)
    if tp is Hash32:
        return st.binary(min_size=32, max_size=32)
    if tp is Signature:
        return st.binary(min_size=65, max_size=65)
    if tp is bool:
        return st.booleans()
    if tp in _UINT64_TYPES:
        return st.integers(0, UINT64_MAX)
    if tp is bytes:
        limit = DEFAULT_MAX_BYTES if cap is None else cap
        return st.binary(max_size=min(limit, 300))
    if tp is str:
        limit = DEFAULT_MAX_STR if cap is None else cap
        return st.text(max_size=min(limit, 80)).filter(lambda s: len(s.encode()) <= limit)
    if isinstance(tp, type) and issubclass(tp, Record):
        return record_strategy(tp)
    raise TypeError(f"no strategy for {tp!r}")


def _field_strategy(tp: Any, cap: int | None) -> st.SearchStrategy[Any]:
    # Deferred so that records nesting other records build their strategies lazily.
    return st.deferred(lambda: _strategy(tp, cap))


def record_strategy(cls: type[Record]) -> st.SearchStrategy[Record]:
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: _field_strategy(hints[f.name], f.metadata.get("max"))
        for f in gen_vectors._fields(cls)
    }
    return st.builds(cls, **fields)


ALL_TYPES = sorted(gen_vectors.RECORD_TYPES.values(), key=lambda t: t.__name__)
any_record = st.one_of([record_strategy(t) for t in ALL_TYPES])


@given(any_record)
def test_roundtrip_decode_encode(record: Record) -> None:
    cls = type(record)
    encoded = record.encode()
    assert cls.decode(encoded) == record
    assert cls.decode(encoded).encode() == encoded


@given(st.sampled_from(ALL_TYPES), st.binary(max_size=400))
def test_random_bytes_only_raise_decode_errors(cls: type[Record], data: bytes) -> None:
    try:
        record = cls.decode(data)
    except DecodeError:
        return
    # Whatever random bytes happen to decode must be the one canonical form.
    assert record.encode() == data


@st.composite
def mutated_encoding(draw: st.DrawFn) -> tuple[type[Record], bytes]:
    """A valid encoding with a few bytes flipped, inserted or removed (structure-aware fuzz)."""
    record = draw(any_record)
    data = bytearray(record.encode())
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data.insert(pos, draw(st.integers(0, 255)))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    return type(record), bytes(data)


@given(mutated_encoding())
def test_mutated_encodings_only_raise_decode_errors(case: tuple[type[Record], bytes]) -> None:
    cls, data = case
    try:
        record = cls.decode(data)
    except DecodeError:
        return
    assert record.encode() == data


@given(st.integers(0, UINT64_MAX))
def test_every_uint_has_one_form(n: int) -> None:
    # Widening the minimal int by one size class is always refused.
    from node.consensus.state import Account

    canonical = Account(n, Amount(0)).encode()  # type: ignore[arg-type]
    assert Account.decode(canonical).nonce == n
    for prefix, width in ((b"\xcc", 1), (b"\xcd", 2), (b"\xce", 4), (b"\xcf", 8)):
        if n >= 1 << (8 * width):
            continue
        wide = b"\x92" + prefix + n.to_bytes(width, "big") + canonical[-34:]
        if wide == canonical:
            continue
        with pytest.raises(NonCanonicalEncoding):
            Account.decode(wide)

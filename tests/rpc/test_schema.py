"""Param parsing (rpc.schema) and the JSON shapes of rpc.methods.ns, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from node.types import NSD, UINT64_MAX
from rpc.errors import InvalidParams
from rpc.methods.ns import format_nsd, record_to_json
from rpc.schema import (
    EARLIEST,
    LATEST,
    PENDING,
    BlockTag,
    Params,
    parse_address,
    parse_amount,
    parse_block_tag,
    parse_bool,
    parse_hex_bytes,
    parse_quantity,
)
from tests.rpc.fakes import PARAMS


def test_params_positional_and_named() -> None:
    p = Params(["a"], ("x", "y"), required=1)
    assert p[0] == "a"
    assert p.get(1, "default") == "default"
    named = Params({"y": 2, "x": 1}, ("x", "y"))
    assert (named[0], named[1]) == (1, 2)
    assert Params(None, ("x",), required=0).get(0, 5) == 5


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2, 3], "at most 2 params (x, y), got 3"),
        ({"z": 1}, "unknown param 'z'"),
        ([], "x: missing"),
        ("x", "must be an array or an object"),
    ],
)
def test_params_errors(raw: Any, message: str) -> None:
    with pytest.raises(InvalidParams) as info:
        Params(raw, ("x", "y"), required=1)
    assert message in info.value.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), ("0x0", 0), ("0x1a", 26), ("0xFF", 255), (UINT64_MAX, UINT64_MAX)],
)
def test_quantities(value: Any, expected: int) -> None:
    assert parse_quantity(value, "n") == expected


@pytest.mark.parametrize(
    "value", ["0x", "0x01", "12", "0xg", -1, True, 1.0, None, UINT64_MAX + 1, "0x" + "f" * 17]
)
def test_bad_quantities(value: Any) -> None:
    with pytest.raises(InvalidParams) as info:
        parse_quantity(value, "n")
    assert info.value.data == {"param": "n"}


def test_amounts_bytes_bools_and_tags() -> None:
    assert parse_amount("1000000000000000000000", "a") == 1000 * NSD
    assert parse_amount("0x10", "a") == 16
    with pytest.raises(InvalidParams):
        parse_amount("9" * 79, "a")
    assert parse_hex_bytes("0xABcd", "b") == b"\xab\xcd"
    assert parse_hex_bytes("0x", "b") == b""
    for bad in ("abcd", "0xabc", "0x zz", 12):
        with pytest.raises(InvalidParams):
            parse_hex_bytes(bad, "b")
    with pytest.raises(InvalidParams, match="exceeds the maximum of 1"):
        parse_hex_bytes("0xabcd", "b", max_length=1)
    assert parse_address("0x" + "Ab" * 20, "a") == b"\xab" * 20
    assert parse_bool(False, "f") is False
    with pytest.raises(InvalidParams):
        parse_bool(0, "f")
    assert parse_block_tag("latest", "t") == BlockTag(LATEST)
    assert parse_block_tag("safe", "t") == BlockTag(LATEST)
    assert parse_block_tag("earliest", "t") == BlockTag(EARLIEST)
    assert parse_block_tag("pending", "t") == BlockTag(PENDING)
    assert parse_block_tag("0x10", "t") == BlockTag(None, 16)
    assert parse_block_tag(7, "t") == BlockTag(None, 7)


def test_shapes() -> None:
    assert format_nsd(0) == "0.000000000000000000"
    assert format_nsd(NSD * 3 // 2) == "1.500000000000000000"
    assert format_nsd(2**256 - 1).startswith(
        "115792089237316195423570985008687907853269984665640564039457"
    )
    params = record_to_json(PARAMS)
    assert params["timeoutCommitMs"] == 1000
    assert params["fees"][0] == {
        "kind": 1,
        "base": "1000",
        "perByte": "10",
        "perSignature": "100",
        "perNewAccount": "5000",
    }

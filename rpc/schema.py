"""Parsing and validation of JSON-RPC params; every failure is -32602 naming the bad param.

Wire conventions (see ``docs/rpc.md``):

* bytes, hashes and addresses are ``0x``-prefixed hex (either case accepted, lowercase returned);
* quantities are a JSON non-negative integer or an Ethereum-style ``0x`` hex quantity without
  leading zeros (``"0x0"``, ``"0x1a"``);
* a block tag is a quantity or one of ``"latest"``, ``"earliest"``, ``"pending"``, ``"safe"``,
  ``"finalized"`` (finality is immediate here, so ``"safe"`` and ``"finalized"`` mean
  ``"latest"``; ``"pending"`` means ``"latest"`` except where a method says otherwise).

``Params`` accepts both positional (array) and named (object) params for one declared signature.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from node.types import UINT64_MAX, UINT256_MAX, Address, Hash32
from rpc.errors import InvalidParams

_HEX_BODY = re.compile(r"[0-9a-fA-F]*")
_QUANTITY = re.compile(r"0x(0|[1-9a-fA-F][0-9a-fA-F]*)")

LATEST: Final = "latest"
EARLIEST: Final = "earliest"
PENDING: Final = "pending"
_TAG_ALIASES: Final = {
    "latest": LATEST,
    "safe": LATEST,
    "finalized": LATEST,
    "earliest": EARLIEST,
    "pending": PENDING,
}


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


def bad_param(name: str, problem: str) -> InvalidParams:
    return InvalidParams(f"invalid params: {name}: {problem}", {"param": name})


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Params:
    """The params of one call, positional or named, checked against declared names.

    ``names`` lists every parameter in order; the first ``required`` must be present.
    """

    __slots__ = ("_values",)

    def __init__(self, raw: Any, names: Sequence[str], required: int | None = None) -> None:
        required = len(names) if required is None else required
        values: list[Any] = [MISSING] * len(names)
        if raw is None:
            pass
        elif isinstance(raw, list):
            if len(raw) > len(names):
                raise InvalidParams(
                    f"invalid params: expected at most {len(names)} params "
                    f"({', '.join(names) or 'none'}), got {len(raw)}"
                )
            values[: len(raw)] = raw
        elif isinstance(raw, dict):
            index = {n: i for i, n in enumerate(names)}
            for key, value in raw.items():
                i = index.get(key)
                if i is None:
                    raise InvalidParams(f"invalid params: unknown param {key!r}", {"param": key})
                values[i] = value
        else:
            raise InvalidParams("invalid params: params must be an array or an object")
        for i in range(required):
            if values[i] is MISSING:
                raise bad_param(names[i], "missing")
        self._values = values

    def __getitem__(self, i: int) -> Any:
        return self._values[i]

    def get(self, i: int, default: Any) -> Any:
        v = self._values[i]
        return default if v is MISSING else v


# --- scalars -------------------------------------------------------------------------------------


def parse_quantity(value: Any, name: str, *, maximum: int = UINT64_MAX) -> int:
    """A JSON non-negative integer or a ``0x`` hex quantity, at most ``maximum``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        if _QUANTITY.fullmatch(value) is None:
            raise bad_param(
                name, f'{value[:80]!r} is not a hex quantity (e.g. "0x1a", no leading zeros)'
            )
        n = int(value, 16)
    else:
        raise bad_param(
            name, f"expected a non-negative integer or a 0x hex quantity, got {_describe(value)}"
        )
    if n < 0:
        raise bad_param(name, "must not be negative")
    if n > maximum:
        raise bad_param(name, f"exceeds the maximum {maximum}")
    return n


def parse_amount(value: Any, name: str) -> int:
    """An amount in base units: a decimal string, a 0x hex quantity or a JSON integer (uint256)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > 78:
            raise bad_param(name, "exceeds uint256")
        n = int(value)
        if n > UINT256_MAX:
            raise bad_param(name, "exceeds uint256")
        return n
    return parse_quantity(value, name, maximum=UINT256_MAX)


def parse_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad_param(name, f"expected true or false, got {_describe(value)}")
    return value


def parse_hex_bytes(
    value: Any, name: str, *, length: int | None = None, max_length: int | None = None
) -> bytes:
    """``0x``-prefixed hex of exactly ``length`` bytes, or of at most ``max_length`` bytes."""
    if not isinstance(value, str):
        raise bad_param(name, f"expected a 0x-prefixed hex string, got {_describe(value)}")
    if not value.startswith(("0x", "0X")):
        raise bad_param(name, "expected a 0x-prefixed hex string")
    body = value[2:]
    if len(body) % 2:
        raise bad_param(name, "hex string has an odd number of digits")
    n = len(body) // 2
    if length is not None and n != length:
        raise bad_param(name, f"expected {length} bytes, got {n}")
    if max_length is not None and n > max_length:
        raise bad_param(name, f"{n} bytes exceeds the maximum of {max_length}")
    if _HEX_BODY.fullmatch(body) is None:
        raise bad_param(name, "not valid hex")
    return bytes.fromhex(body)


def parse_address(value: Any, name: str) -> Address:
    return Address(parse_hex_bytes(value, name, length=20))


def parse_hash(value: Any, name: str) -> Hash32:
    return Hash32(parse_hex_bytes(value, name, length=32))


def parse_str(value: Any, name: str, *, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str):
        raise bad_param(name, f"expected a string, got {_describe(value)}")
    if choices is not None and value not in choices:
        raise bad_param(name, f"expected one of {', '.join(choices)}")
    return value


# --- block tags ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockTag:
    """A resolved block selector: ``height`` set, or one of LATEST / EARLIEST / PENDING."""

    tag: str | None
    height: int | None = None


def parse_block_tag(value: Any, name: str) -> BlockTag:
    if isinstance(value, str):
        tag = _TAG_ALIASES.get(value)
        if tag is not None:
            return BlockTag(tag)
        if not value.startswith("0x"):
            raise bad_param(
                name,
                f"{value[:80]!r} is not a block number or one of "
                "latest, earliest, pending, safe, finalized",
            )
    elif not isinstance(value, int) or isinstance(value, bool):
        raise bad_param(
            name, f'expected a block number or "latest"/"earliest", got {_describe(value)}'
        )
    return BlockTag(None, parse_quantity(value, name))


# --- results -------------------------------------------------------------------------------------


def to_hex(data: bytes) -> str:
    return "0x" + data.hex()


def to_quantity(n: int) -> str:
    return hex(n)

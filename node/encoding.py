"""Canonical msgpack encoding of records (DESIGN §3).

A record is a frozen, slotted dataclass that inherits ``Record``. It encodes as a msgpack array of
its fields in declared order (never a map), so one value has exactly one byte form:

* ``int`` and the uint64 NewTypes (``Height``, ``Nonce``, ``ChainId``, ...) → msgpack uint, minimal;
* ``Amount`` (and anything that may exceed 2**64) → 32-byte big-endian ``bin``;
* ``Address`` / ``Hash32`` / ``Signature`` → ``bin`` of exactly 20 / 32 / 65 bytes;
* ``bytes`` → ``bin`` (max length from the field's ``limit``), ``str`` → UTF-8 ``str``;
* ``bool``; ``T | None`` → ``nil`` or ``T``; ``tuple[T, ...]`` → array; nested records → arrays.

Decoding is strict: the total size is checked before msgpack allocates anything, msgpack's own
per-container limits are set, every field is type- and range-checked, and finally the input must
equal the re-encoding of what was decoded (``encode(decode(b)) == b``), which rejects every
non-minimal form msgpack would otherwise accept.
"""

from __future__ import annotations

import dataclasses
import operator
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Self, TypeVar

import msgpack

from node.errors import DecodeError, EncodeError, NonCanonicalEncoding, TooLarge
from node.types import (
    UINT64_MAX,
    UINT256_MAX,
    Address,
    Amount,
    ChainId,
    Hash32,
    Height,
    Nonce,
    Round,
    Signature,
    TimestampMs,
)

DEFAULT_MAX_BYTES = 1 << 20  # a bytes field without an explicit limit
DEFAULT_MAX_STR = 1024  # UTF-8 bytes
DEFAULT_MAX_ITEMS = 100_000
DEFAULT_MAX_RECORD = 8 << 20  # total encoded size unless the caller passes max_size

_Enc = Callable[[Any], Any]
_Dec = Callable[[Any, str], Any]

# The ``where`` a record decoder passes to its fields on the first, fast pass: no path strings are
# built for fields that decode fine. Only if that pass raises a ``DecodeError`` is the record
# decoded again with the real paths, which raises the same error with the right message (the
# decoders are pure, so the second pass fails at the same field for the same reason).
_FAST = "<fast>"


def limit(n: int) -> dict[str, int]:
    """Field metadata giving the maximum length (bytes, str) or item count (tuple)."""
    return {"max": n}


class Record:
    """Base of every encoded record; subclasses must be ``@dataclass(frozen=True, slots=True)``."""

    __slots__ = ()
    _codec: ClassVar[tuple[_Enc, _Dec] | None] = None

    def to_wire(self) -> Any:
        """The msgpack-ready tree (nested tuples/ints/bytes) of this record."""
        return _codec_of(type(self))[0](self)

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def from_wire(cls, tree: Any) -> Self:
        return typing.cast(Self, _codec_of(cls)[1](tree, cls.__name__))

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = DEFAULT_MAX_RECORD) -> Self:
        tree = unpack_canonical(data, max_size=max_size)
        return cls.from_wire(tree)


R = TypeVar("R", bound=Record)


def unpack_canonical(data: bytes, *, max_size: int = DEFAULT_MAX_RECORD) -> Any:
    """Unpack msgpack bytes with limits, and require that they are the canonical form."""
    if type(data) is not bytes and not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("expected bytes")
    n = len(data)
    if n > max_size:
        raise TooLarge(f"encoded record of {n} bytes exceeds the limit of {max_size}")
    if n == 0:
        raise DecodeError("empty input")
    try:
        tree = _unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n if n < DEFAULT_MAX_ITEMS else DEFAULT_MAX_ITEMS,
            max_map_len=0,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise DecodeError("trailing bytes after the record") from exc
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}") from exc
    try:
        packer = _local.packer
    except AttributeError:
        packer = _new_packer()
    if packer.pack(tree) != (data if type(data) is bytes else bytes(data)):
        raise NonCanonicalEncoding("bytes are not the canonical (minimal) msgpack form")
    return tree


_unpackb = msgpack.unpackb


# One reusable packer per thread: building a ``msgpack.Packer`` per call (what ``packb`` does)
# costs more than packing a small record. A packer resets its buffer after each call, also when
# packing raises.
_local = threading.local()


def _new_packer() -> Any:
    packer = msgpack.Packer(use_bin_type=True)
    _local.packer = packer
    return packer


def pack(tree: Any) -> bytes:
    """The msgpack bytes of a wire tree (``msgpack.packb(tree, use_bin_type=True)``)."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _new_packer()
    data: bytes = packer.pack(tree)
    return data


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items (what ``pack`` writes before the items)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def bin_header_size(n: int) -> int:
    """Bytes of the msgpack header ``pack`` writes before a ``bytes`` value of length ``n``."""
    return 2 if n < 1 << 8 else 3 if n < 1 << 16 else 5


# --- codec compilation -------------------------------------------------------------------------

_UINT64_TYPES: tuple[object, ...] = (int, Height, Round, Nonce, ChainId, TimestampMs)
_FIXED_BYTES: dict[object, int] = {Address: 20, Hash32: 32, Signature: 65}


def _codec_of(cls: type[Record]) -> tuple[_Enc, _Dec]:
    codec = cls.__dict__.get("_codec")
    if codec is None:
        codec = _compile_record(cls)
        cls._codec = codec
    return codec


def _compile_record(cls: type[Record]) -> tuple[_Enc, _Dec]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    encs: list[_Enc] = []
    decs: list[_Dec] = []
    for f in fields:
        enc, dec = _compile_type(hints[f.name], f.metadata.get("max"))
        encs.append(enc)
        decs.append(dec)
    count = len(fields)
    dec_items = list(zip(names, decs, strict=True))
    if count >= 2:
        get_fields: Callable[[Any], tuple[Any, ...]] = operator.attrgetter(*names)
    elif count == 1:
        get_one = operator.attrgetter(names[0])

        def get_fields(value: Any) -> tuple[Any, ...]:
            return (get_one(value),)

    else:

        def get_fields(value: Any) -> tuple[Any, ...]:
            return ()

    def enc_record(value: Any) -> tuple[Any, ...]:
        return tuple([e(v) for e, v in zip(encs, get_fields(value), strict=True)])

    def dec_record(tree: Any, where: str) -> Any:
        if type(tree) is not tuple:
            raise DecodeError(f"{where}: expected an array of {count} fields")
        if len(tree) != count:
            raise DecodeError(f"{where}: expected {count} fields, got {len(tree)}")
        if where is _FAST:
            return cls(*[d(v, _FAST) for d, v in zip(decs, tree, strict=False)])
        try:
            return cls(*[d(v, _FAST) for d, v in zip(decs, tree, strict=False)])
        except DecodeError:
            pass
        # Again with the field paths, for the error message (see _FAST).
        return cls(*[d(v, f"{where}.{n}") for (n, d), v in zip(dec_items, tree, strict=False)])

    return enc_record, dec_record


def _compile_type(tp: Any, max_len: int | None) -> tuple[_Enc, _Dec]:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"only `T | None` unions are supported, got {tp}")
        inner_enc, inner_dec = _compile_type(args[0], max_len)

        def enc_opt(v: Any) -> Any:
            return None if v is None else inner_enc(v)

        def dec_opt(v: Any, where: str) -> Any:
            return None if v is None else inner_dec(v, where)

        return enc_opt, dec_opt
    if origin is tuple:
        targs = typing.get_args(tp)
        if len(targs) != 2 or targs[1] is not Ellipsis:
            raise TypeError(f"only tuple[T, ...] is supported, got {tp}")
        item_enc, item_dec = _compile_type(targs[0], None)
        cap = max_len if max_len is not None else DEFAULT_MAX_ITEMS
        # Items that are plain ``bytes`` within a length range are already their own wire form:
        # a tuple of them (a block's transactions) is checked in bulk and passed through.
        byte_range = _BYTES_ITEM_RANGE.get(item_dec)

        def enc_tuple(v: Any) -> Any:
            if len(v) > cap:
                raise EncodeError(f"{len(v)} items exceed the limit of {cap}")
            if byte_range is not None and type(v) is tuple and _plain_bytes_in(v, byte_range):
                return v
            return tuple([item_enc(x) for x in v])

        def dec_tuple(v: Any, where: str) -> Any:
            if type(v) is not tuple:
                raise DecodeError(f"{where}: expected an array")
            if len(v) > cap:
                raise TooLarge(f"{where}: {len(v)} items exceed the limit of {cap}")
            if byte_range is not None and _plain_bytes_in(v, byte_range):
                return v
            if where is _FAST:
                return tuple([item_dec(x, _FAST) for x in v])
            return tuple([item_dec(x, f"{where}[{i}]") for i, x in enumerate(v)])

        return enc_tuple, dec_tuple
    if tp is Amount:
        return _enc_u256, _dec_u256
    if tp in _FIXED_BYTES:
        return _fixed_bytes_codec(_FIXED_BYTES[tp])
    if tp is bool:
        return _enc_bool, _dec_bool
    if tp in _UINT64_TYPES:
        return _enc_u64, _dec_u64
    if tp is bytes:
        return _var_bytes_codec(max_len if max_len is not None else DEFAULT_MAX_BYTES)
    if tp is str:
        return _str_codec(max_len if max_len is not None else DEFAULT_MAX_STR)
    if isinstance(tp, type) and issubclass(tp, Record):
        sub: type[Record] = tp
        # Resolved at the first use, not here: a record may refer to one compiled later.
        resolved: list[tuple[_Enc, _Dec]] = []

        def enc_sub(v: Any) -> Any:
            if not resolved:
                resolved.append(_codec_of(sub))
            return resolved[0][0](v)

        def dec_sub(v: Any, where: str) -> Any:
            if not resolved:
                resolved.append(_codec_of(sub))
            return resolved[0][1](v, where)

        return enc_sub, dec_sub
    raise TypeError(f"unsupported field type {tp!r}")


def _enc_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise EncodeError(f"expected a boolean, got {type(v).__name__}")
    return v


def _enc_u64(v: Any) -> int:
    if type(v) is not int:
        # IntEnum members are ints; bool is not a number here.
        if not isinstance(v, int) or isinstance(v, bool):
            raise EncodeError(f"expected an unsigned 64-bit integer, got {type(v).__name__}")
        v = int(v)
    n: int = v
    if n < 0 or n > UINT64_MAX:
        raise EncodeError(f"{n} is not an unsigned 64-bit integer")
    return n


def _dec_bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise DecodeError(f"{where}: expected a boolean")
    return v


def _dec_u64(v: Any, where: str) -> int:
    if type(v) is not int or v < 0 or v > UINT64_MAX:
        raise DecodeError(f"{where}: expected an unsigned 64-bit integer")
    return v


def _enc_u256(v: int) -> bytes:
    if type(v) is not int or v < 0 or v > UINT256_MAX:
        raise EncodeError(f"amount {v!r} is not a uint256")
    return v.to_bytes(32, "big")


def _dec_u256(v: Any, where: str) -> int:
    if type(v) is not bytes or len(v) != 32:
        raise DecodeError(f"{where}: expected a 32-byte big-endian uint256")
    return int.from_bytes(v, "big")


# Decoders of plain ``bytes`` fields -> the (min, max) length they accept (see _plain_bytes_in).
_BYTES_ITEM_RANGE: dict[_Dec, tuple[int, int]] = {}


def _plain_bytes_in(items: tuple[Any, ...], length_range: tuple[int, int]) -> bool:
    """Whether every item is exactly ``bytes`` with a length in ``length_range`` (C-speed)."""
    if not items:
        return True
    if set(map(type, items)) != {bytes}:
        return False
    lengths = set(map(len, items))
    return length_range[0] <= min(lengths) and max(lengths) <= length_range[1]


def _fixed_bytes_codec(size: int) -> tuple[_Enc, _Dec]:
    def dec(v: Any, where: str) -> bytes:
        if type(v) is not bytes or len(v) != size:
            raise DecodeError(f"{where}: expected {size} bytes")
        return v

    def enc(v: Any) -> bytes:
        if not isinstance(v, bytes | bytearray) or len(v) != size:
            raise EncodeError(f"expected {size} bytes")
        return bytes(v)

    _BYTES_ITEM_RANGE[dec] = (size, size)
    return enc, dec


def _var_bytes_codec(cap: int) -> tuple[_Enc, _Dec]:
    def dec(v: Any, where: str) -> bytes:
        if type(v) is not bytes:
            raise DecodeError(f"{where}: expected bytes")
        if len(v) > cap:
            raise TooLarge(f"{where}: {len(v)} bytes exceed the limit of {cap}")
        return v

    def enc(v: Any) -> bytes:
        if not isinstance(v, bytes | bytearray):
            raise EncodeError(f"expected bytes, got {type(v).__name__}")
        if len(v) > cap:
            raise EncodeError(f"{len(v)} bytes exceed the limit of {cap}")
        return bytes(v)

    _BYTES_ITEM_RANGE[dec] = (0, cap)
    return enc, dec


def _str_codec(cap: int) -> tuple[_Enc, _Dec]:
    def dec(v: Any, where: str) -> str:
        if type(v) is not str:
            raise DecodeError(f"{where}: expected a string")
        if len(v.encode("utf-8")) > cap:
            raise TooLarge(f"{where}: string exceeds {cap} bytes")
        return v

    def enc(v: Any) -> str:
        if type(v) is not str:
            raise EncodeError(f"expected a string, got {type(v).__name__}")
        if len(v) > cap // 4 and len(v.encode("utf-8")) > cap:
            raise EncodeError(f"string exceeds {cap} bytes")
        return v

    return enc, dec

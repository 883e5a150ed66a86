"""Length-prefixed frames over a byte stream (DESIGN §6: our own framing on raw streams).

A frame is a 4-byte big-endian header and its payload. The header's low 31 bits are the payload
length (≤ ``MAX_FRAME_BYTES``); the top bit (``MORE``) says that the message continues in the
next frame. A message is one or more frames: every frame with ``MORE`` set is exactly
``MAX_FRAME_BYTES`` long (so one message has exactly one framing, and a peer cannot spin us with
empty frames), the last frame (``MORE`` clear) holds the rest (possibly nothing, but then only for the empty
message). A message of at
most ``MAX_FRAME_BYTES`` is therefore plain "length + payload".

Reads loop on ``receive_some`` until the frame is whole — never one read per frame (py-libp2p's
``read_exactly`` gives up after 100 reads, ~6.5 MiB). Each read asks for at most what the current
frame still needs, so no byte of the next message is consumed and no buffer is kept between
calls. Sizes are checked from the header before anything is read. The pieces received are kept
as they are and joined once per message (no per-frame buffer to zero and copy); a receiver must
therefore return a new object from each ``receive_some``, as trio's and py-libp2p's streams do.

Streams are trio-style (``send_all`` / ``receive_some``; ``b""`` means end of stream);
``ReadWriteAdapter`` gives a py-libp2p ``INetStream`` (``write`` / ``read``) that shape.
"""

from __future__ import annotations

from typing import Protocol

from node.p2p.api import MAX_FRAME_BYTES, MAX_RESPONSE_BYTES, MessageTooLarge, P2PError

HEADER_BYTES = 4
MORE = 1 << 31
_LENGTH_MASK = MORE - 1


class ByteSender(Protocol):
    """trio's ``SendStream`` shape."""

    async def send_all(self, data: bytes | memoryview) -> None: ...


class ByteReceiver(Protocol):
    """trio's ``ReceiveStream`` shape: ``receive_some(n)`` returns 1..n bytes, b"" at the end."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...


class ByteStream(ByteSender, ByteReceiver, Protocol):
    """trio's ``Stream`` shape (``trio.SocketStream``, ``trio.testing.memory_stream_pair``)."""


class ReadWriteStream(Protocol):
    """py-libp2p's ``INetStream`` shape: ``read(n)`` returns at most ``n`` bytes; ``write``
    takes any bytes-like object (its Yamux slices and prefixes it, which a view supports)."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes | memoryview) -> None: ...


class ReadWriteAdapter:
    """A ``ByteStream`` over a ``read``/``write`` stream; exceptions in ``eof_errors`` from
    ``read`` mean end of stream (py-libp2p raises ``StreamEOF`` rather than returning b"")."""

    def __init__(
        self, stream: ReadWriteStream, *, eof_errors: tuple[type[BaseException], ...] = ()
    ) -> None:
        self._stream = stream
        self._eof_errors = eof_errors

    async def send_all(self, data: bytes | memoryview) -> None:
        # A view goes through as it is: py-libp2p's Yamux slices it into frames (no copy for a
        # view, where a bytes copy of each 1 MiB frame and then bytes slices cost two passes).
        await self._stream.write(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self._stream.read(max_bytes)
        except self._eof_errors:
            return b""


class FrameError(P2PError):
    code = 2130
    reason = "bad frame"


class FrameTooLarge(FrameError, MessageTooLarge):
    code = 2131
    reason = "frame or message exceeds the limit"


class TruncatedFrame(FrameError):
    """The stream ended inside a frame or inside a multi-frame message."""

    code = 2132
    reason = "stream ended inside a frame"


class MalformedFrame(FrameError):
    """A continued frame that is not exactly ``MAX_FRAME_BYTES`` long."""

    code = 2133
    reason = "malformed frame"


async def _receive_into(stream: ByteReceiver, n: int, parts: list[bytes | bytearray]) -> None:
    """Append exactly ``n`` bytes to ``parts``, as the pieces the stream gives (no copy: each
    piece is kept as received, joined once by the caller). ``TruncatedFrame`` at end of
    stream."""
    got = 0
    while got < n:
        chunk = await stream.receive_some(n - got)
        if not chunk:
            raise TruncatedFrame(f"stream ended after {got} of {n} bytes")
        if len(chunk) > n - got:  # a stream that ignores max_bytes would desynchronize us
            raise FrameError("stream returned more bytes than asked for")
        parts.append(chunk)
        got += len(chunk)


def _join(parts: list[bytes | bytearray]) -> bytes:
    """One ``bytes`` of ``parts``: the piece itself when there is one ``bytes``, else one join."""
    if len(parts) == 1 and type(parts[0]) is bytes:
        return parts[0]
    return b"".join(parts)


async def _read_header(stream: ByteReceiver, *, eof_ok: bool) -> tuple[int, bool] | None:
    """A frame header as (length, more); None if ``eof_ok`` and the stream ended before it."""
    first = await stream.receive_some(HEADER_BYTES)
    if not first:
        if eof_ok:
            return None
        raise TruncatedFrame(f"stream ended after 0 of {HEADER_BYTES} bytes")
    if len(first) > HEADER_BYTES:
        raise FrameError("stream returned more bytes than asked for")
    parts: list[bytes | bytearray] = [first]
    if len(first) < HEADER_BYTES:
        try:
            await _receive_into(stream, HEADER_BYTES - len(first), parts)
        except TruncatedFrame:
            got = sum(len(p) for p in parts)
            raise TruncatedFrame(f"stream ended after {got} of {HEADER_BYTES} bytes") from None
    word = int.from_bytes(b"".join(parts), "big")
    return word & _LENGTH_MASK, bool(word & MORE)


def frame_header(length: int, *, more: bool = False) -> bytes:
    if not 0 <= length <= MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return ((MORE if more else 0) | length).to_bytes(HEADER_BYTES, "big")


async def write_frame(
    stream: ByteSender, data: bytes | bytearray | memoryview, *, more: bool = False
) -> None:
    """Send one frame (``FrameTooLarge`` above ``MAX_FRAME_BYTES``)."""
    header = frame_header(len(data), more=more)
    # One write for small frames; large ones skip the copy.
    if len(data) <= 64 << 10:
        await stream.send_all(header + data)
    else:
        await stream.send_all(header)
        await stream.send_all(memoryview(data))  # a view: no copy on the way down (see above)


async def _read_frame_into(
    stream: ByteReceiver, parts: list[bytes | bytearray], budget: int, *, eof_ok: bool
) -> tuple[int, bool] | None:
    """One frame whose payload may use at most ``budget`` bytes (checked from the header,
    before anything is read): its payload appended to ``parts``; returns (length, more)."""
    header = await _read_header(stream, eof_ok=eof_ok)
    if header is None:
        return None
    length, more = header
    if length > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    if length > budget:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {budget} bytes allowed")
    if more and length != MAX_FRAME_BYTES:
        raise MalformedFrame(f"continued frame of {length} bytes")
    await _receive_into(stream, length, parts)
    return length, more


async def read_frame(stream: ByteReceiver, *, max_bytes: int = MAX_FRAME_BYTES) -> bytes | None:
    """One single frame (``MORE`` must be clear); None at a clean end of stream."""
    parts: list[bytes | bytearray] = []
    got = await _read_frame_into(stream, parts, max_bytes, eof_ok=True)
    if got is None:
        return None
    if got[1]:
        raise MalformedFrame("unexpected continued frame")
    return _join(parts)


async def write_message(
    stream: ByteSender,
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> None:
    """Send ``data`` as one message of as many frames as it needs (``FrameTooLarge`` above
    ``max_bytes``)."""
    n = len(data)
    if n > max_bytes:
        raise FrameTooLarge(f"message of {n} bytes exceeds {max_bytes}")
    view = memoryview(data)
    pos = 0
    while n - pos > MAX_FRAME_BYTES:
        await write_frame(stream, view[pos : pos + MAX_FRAME_BYTES], more=True)
        pos += MAX_FRAME_BYTES
    await write_frame(stream, view[pos:])


async def read_message(
    stream: ByteReceiver, *, max_bytes: int = MAX_RESPONSE_BYTES
) -> bytes | None:
    """One whole message of at most ``max_bytes``; None at a clean end of stream (between
    messages). Raises ``FrameTooLarge``, ``TruncatedFrame`` or ``MalformedFrame``.

    The pieces the stream returns are collected across all frames and joined once at the end:
    one copy of the message, where a buffer per frame cost a zero-fill and two more copies
    (page faults on every MiB)."""
    parts: list[bytes | bytearray] = []
    total = 0
    frames = 0
    while True:
        got = await _read_frame_into(stream, parts, max_bytes - total, eof_ok=not frames)
        if got is None:
            return None
        length, more = got
        if frames and not more and not length:
            raise MalformedFrame("empty last frame after a continued frame")
        frames += 1
        total += length
        if not more:
            return _join(parts)

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
calls. Sizes are checked from the header before anything is allocated.

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
    """py-libp2p's ``INetStream`` shape: ``read(n)`` returns at most ``n`` bytes."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


class ReadWriteAdapter:
    """A ``ByteStream`` over a ``read``/``write`` stream; exceptions in ``eof_errors`` from
    ``read`` mean end of stream (py-libp2p raises ``StreamEOF`` rather than returning b"")."""

    def __init__(
        self, stream: ReadWriteStream, *, eof_errors: tuple[type[BaseException], ...] = ()
    ) -> None:
        self._stream = stream
        self._eof_errors = eof_errors

    async def send_all(self, data: bytes | memoryview) -> None:
        await self._stream.write(bytes(data))

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


async def _read_exactly(stream: ByteReceiver, n: int, *, eof_ok: bool = False) -> bytes | None:
    """``n`` bytes, read in as many chunks as the stream gives. At end of stream: None if
    ``eof_ok`` and nothing was read, else ``TruncatedFrame``."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        chunk = await stream.receive_some(n - got)
        if not chunk:
            if eof_ok and got == 0:
                return None
            raise TruncatedFrame(f"stream ended after {got} of {n} bytes")
        if len(chunk) > n - got:  # a stream that ignores max_bytes would desynchronize us
            raise FrameError("stream returned more bytes than asked for")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return bytes(buf)


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
        await stream.send_all(header + bytes(data))
    else:
        await stream.send_all(header)
        await stream.send_all(data if isinstance(data, bytes) else memoryview(data))


async def _read_frame_raw(
    stream: ByteReceiver, budget: int, *, eof_ok: bool
) -> tuple[bytes, bool] | None:
    """One frame whose payload may use at most ``budget`` bytes (checked from the header)."""
    header = await _read_exactly(stream, HEADER_BYTES, eof_ok=eof_ok)
    if header is None:
        return None
    word = int.from_bytes(header, "big")
    length, more = word & _LENGTH_MASK, bool(word & MORE)
    if length > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    if length > budget:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {budget} bytes allowed")
    if more and length != MAX_FRAME_BYTES:
        raise MalformedFrame(f"continued frame of {length} bytes")
    data = await _read_exactly(stream, length)
    assert data is not None
    return data, more


async def read_frame(stream: ByteReceiver, *, max_bytes: int = MAX_FRAME_BYTES) -> bytes | None:
    """One single frame (``MORE`` must be clear); None at a clean end of stream."""
    got = await _read_frame_raw(stream, max_bytes, eof_ok=True)
    if got is None:
        return None
    data, more = got
    if more:
        raise MalformedFrame("unexpected continued frame")
    return data


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
    messages). Raises ``FrameTooLarge``, ``TruncatedFrame`` or ``MalformedFrame``."""
    parts: list[bytes] = []
    total = 0
    while True:
        got = await _read_frame_raw(stream, max_bytes - total, eof_ok=not parts)
        if got is None:
            return None
        data, more = got
        if parts and not more and not data:
            raise MalformedFrame("empty last frame after a continued frame")
        total += len(data)
        parts.append(data)
        if not more:
            return parts[0] if len(parts) == 1 else b"".join(parts)

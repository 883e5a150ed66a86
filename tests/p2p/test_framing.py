"""Framing over trio memory streams: frames of any size arrive in chunks, limits, truncation."""

from __future__ import annotations

import itertools
import random

import pytest
import trio
import trio.testing

from node.p2p.api import MAX_FRAME_BYTES, MessageTooLarge
from node.p2p.framing import (
    MORE,
    FrameError,
    FrameTooLarge,
    MalformedFrame,
    ReadWriteAdapter,
    TruncatedFrame,
    frame_header,
    read_frame,
    read_message,
    write_frame,
    write_message,
)


def chunked_pair(
    chunk: int,
) -> tuple[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
    """A one-way stream whose reader gets at most ``chunk`` bytes per ``receive_some``."""
    send = trio.testing.MemorySendStream()
    recv = trio.testing.MemoryReceiveStream()

    def pump() -> None:
        trio.testing.memory_stream_pump(send, recv, max_bytes=chunk)

    async def pump_all() -> None:
        pump()

    send.send_all_hook = pump_all
    send.close_hook = pump  # the close reaches the reader once the bytes before it did
    recv.receive_some_hook = pump_all
    return send, recv


def payload(n: int) -> bytes:
    return random.Random(n).randbytes(n)


async def test_single_frames_round_trip() -> None:
    send, recv = chunked_pair(1 << 30)
    for data in (b"", b"x", payload(1000), payload(MAX_FRAME_BYTES)):
        await write_frame(send, data)
        assert await read_frame(recv) == data
    await send.aclose()
    assert await read_frame(recv) is None


@pytest.mark.parametrize("chunk", [1, 3, 4093])
async def test_messages_arrive_in_small_chunks(chunk: int) -> None:
    send, recv = chunked_pair(chunk)
    sizes = [0, 1, 5, 300] if chunk < 10 else [0, 1, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1, 3 << 20]
    messages = [payload(n) for n in sizes]
    for m in messages:
        await write_message(send, m)
    await send.aclose()
    for m in messages:
        assert await read_message(recv) == m
    assert await read_message(recv) is None  # clean end between messages


async def test_large_message_beyond_the_libp2p_helper_ceiling() -> None:
    # 7 MiB in 64 KiB reads: 112 reads, where py-libp2p's read_exactly gives up after 100.
    send, recv = chunked_pair(64 << 10)
    data = payload(7 << 20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_message, send, data)
        assert await read_message(recv, max_bytes=8 << 20) == data


async def test_one_message_has_one_framing() -> None:
    send, recv = chunked_pair(1 << 30)
    data = payload(2 * MAX_FRAME_BYTES + 10)
    await write_message(send, data)
    raw = await recv.receive_some()
    assert raw[:4] == frame_header(MAX_FRAME_BYTES, more=True)
    second = 4 + MAX_FRAME_BYTES
    assert raw[second : second + 4] == frame_header(MAX_FRAME_BYTES, more=True)
    assert raw[2 * second : 2 * second + 4] == frame_header(10)
    assert len(raw) == 3 * 4 + len(data)


async def test_oversize_frames_and_messages() -> None:
    send, recv = chunked_pair(1 << 30)
    with pytest.raises(FrameTooLarge):
        await write_frame(send, b"x" * (MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameTooLarge):
        await write_message(send, b"x" * 101, max_bytes=100)
    assert isinstance(FrameTooLarge(), MessageTooLarge)
    # A header announcing more than a frame may hold: refused before any payload is read.
    await send.send_all((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        await read_message(recv)
    # A message over the reader's limit: refused from the header of the frame that crosses it.
    send, recv = chunked_pair(1 << 30)
    await write_message(send, payload(3000))
    with pytest.raises(FrameTooLarge):
        await read_message(recv, max_bytes=2999)
    send, recv = chunked_pair(1 << 30)
    await write_message(send, payload(2 * MAX_FRAME_BYTES))
    with pytest.raises(FrameTooLarge):
        await read_message(recv, max_bytes=MAX_FRAME_BYTES + 5)
    send, recv = chunked_pair(1 << 30)
    await write_frame(send, b"x" * 11)
    with pytest.raises(FrameTooLarge):
        await read_frame(recv, max_bytes=10)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00",  # inside the header
        b"\x00\x00\x00\x05abc",  # inside the payload
        frame_header(MAX_FRAME_BYTES, more=True) + b"x" * MAX_FRAME_BYTES,  # after a MORE frame
    ],
)
async def test_truncated(raw: bytes) -> None:
    send, recv = chunked_pair(7)
    await send.send_all(raw)
    await send.aclose()
    with pytest.raises(TruncatedFrame):
        await read_message(recv)


async def test_malformed_frames() -> None:
    cases = [
        frame_header(10, more=True) + b"x" * 10 + frame_header(0),  # short continued frame
        frame_header(MAX_FRAME_BYTES, more=True) + b"x" * MAX_FRAME_BYTES + frame_header(0),
    ]
    for raw in cases:
        send, recv = chunked_pair(1 << 30)
        await send.send_all(raw)
        with pytest.raises(MalformedFrame):
            await read_message(recv)
    send, recv = chunked_pair(1 << 30)
    await write_message(send, payload(MAX_FRAME_BYTES + 1))
    with pytest.raises(MalformedFrame):  # a single frame was expected
        await read_frame(recv)
    assert MORE == 1 << 31


async def test_a_stream_that_overreads_is_refused() -> None:
    class Greedy:
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            raise NotImplementedError

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            return b"\x00\x00\x00\x01xyz"

    with pytest.raises(FrameError):
        await read_message(Greedy())


async def test_over_a_bidirectional_memory_stream_pair() -> None:
    left, right = trio.testing.memory_stream_pair()

    async def echo() -> None:
        while (msg := await read_message(right)) is not None:
            await write_message(right, msg[::-1])
        await right.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        for n in (0, 10, MAX_FRAME_BYTES + 3):
            data = payload(n)
            await write_message(left, data)
            assert await read_message(left) == data[::-1]
        await left.send_stream.aclose()
        assert await read_message(left) is None


async def test_read_write_adapter() -> None:
    class EOF(Exception):
        pass

    class LibStream:
        """py-libp2p's shape: read(n) gives at most n bytes, and raises at the end."""

        def __init__(self) -> None:
            self.buf = bytearray()
            self.closed = False

        async def write(self, data: bytes) -> None:
            self.buf += data

        async def read(self, n: int | None = None) -> bytes:
            if not self.buf:
                raise EOF
            k = min(n or len(self.buf), 5000)
            out, self.buf = bytes(self.buf[:k]), self.buf[k:]
            return out

    stream = ReadWriteAdapter(LibStream(), eof_errors=(EOF,))
    data = payload(MAX_FRAME_BYTES + 7)
    await write_message(stream, data)
    await write_message(stream, b"second")
    assert await read_message(stream) == data
    assert await read_message(stream) == b"second"
    assert await read_message(stream) is None


class Scripted:
    """A receiver that hands out scripted pieces (each cut to what the reader asks for) and
    records every request; the rest of a cut piece comes next."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.asked: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.asked.append(max_bytes)
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        n = len(piece) if max_bytes is None else max_bytes
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece


def wire(data: bytes) -> bytes:
    """``data`` as ``write_message`` frames it."""
    out = bytearray()
    for pos in range(0, max(len(data), 1), MAX_FRAME_BYTES):
        part = data[pos : pos + MAX_FRAME_BYTES]
        more = len(data) - pos > MAX_FRAME_BYTES
        out += frame_header(len(part), more=more) + part
    return bytes(out)


async def test_pieces_are_kept_and_joined_once_per_message() -> None:
    # A one-frame message arriving in one piece is that very piece: no copy at all.
    body = payload(5000)
    stream = Scripted([frame_header(5000), body])
    got = await read_message(stream)
    assert got is body
    # Three frames arriving in uneven pieces that straddle frame boundaries.
    data = payload(2 * MAX_FRAME_BYTES + 777)
    raw = wire(data) + wire(b"next")
    cuts = [0, 3, 1000, MAX_FRAME_BYTES + 2, MAX_FRAME_BYTES + 9, 2 * MAX_FRAME_BYTES, len(raw)]
    stream = Scripted([raw[a:b] for a, b in itertools.pairwise(cuts)])
    assert await read_message(stream) == data
    # Never asked for more than the current header or frame still needed...
    assert all(n is not None and 0 < n <= MAX_FRAME_BYTES for n in stream.asked)
    # ...so the next message is intact.
    assert await read_message(stream) == b"next"
    assert await read_message(stream) is None


async def test_sizes_are_checked_before_any_payload_is_read() -> None:
    stream = Scripted([frame_header(MAX_FRAME_BYTES, more=True), b"x" * 10])
    with pytest.raises(FrameTooLarge):
        await read_message(stream, max_bytes=MAX_FRAME_BYTES - 1)
    assert stream.asked == [4]  # the header only
    stream = Scripted([frame_header(10, more=True), b"x" * 10])
    with pytest.raises(MalformedFrame):
        await read_message(stream)
    assert stream.asked == [4]
    stream = Scripted([b"\x00\x00", b"\x00"])  # the stream ends inside the header
    with pytest.raises(TruncatedFrame, match="3 of 4"):
        await read_message(stream)


async def test_adapter_hands_frames_to_the_stream_as_views() -> None:
    class Recording:
        def __init__(self) -> None:
            self.writes: list[bytes | memoryview] = []

        async def write(self, data: bytes | memoryview) -> None:
            self.writes.append(data)

        async def read(self, n: int | None = None) -> bytes:
            return b""

    lib = Recording()
    data = payload(MAX_FRAME_BYTES + 100)
    await write_message(ReadWriteAdapter(lib), data)
    # Headers, then the payload as views of the caller's bytes: nothing copied on the way.
    views = [w for w in lib.writes if isinstance(w, memoryview)]
    assert [len(v) for v in views] == [MAX_FRAME_BYTES]
    assert all(v.obj is data for v in views)
    assert b"".join(bytes(w) for w in lib.writes) == wire(data)
    small = bytearray(b"small")
    await write_frame(ReadWriteAdapter(lib), small)
    assert lib.writes[-1] == frame_header(5) + b"small"

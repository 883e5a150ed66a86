"""The consensus write-ahead log: a synced, append-only file of the current height's records.

DESIGN §5 "Crash safety of a validator" / consensus-notes "Persist before you speak". The file
(``<data dir>/wal``) holds records of the height in progress, each framed as::

    length (4 bytes, big-endian) || sha256(payload) (32 bytes) || payload
    payload = tag (1 byte) || canonical encoding of the entry

Appends are one ``write`` followed by ``fsync`` (``sync=True``); a crash can only tear the last
record, which ``open``/``replay`` detect by length or checksum and drop (the file is cut back to the
last whole record). A bad record followed by more data is corruption, not a torn tail, and raises
``CorruptDatabase``. ``start_height`` replaces the file atomically (temp file, fsync, rename, fsync
of the directory) by one that holds only the height marker and the last sign-state, so the
sign-state survives every rotation.

What the driver appends (in this order per event, see ``node/consensus/engine.py``):

* every engine event it delivers at this height (``StartHeight`` first), before calling
  ``engine.step`` — ``sync=False`` is enough, the next synced append flushes it;
* the bytes of every block it will propose or has received in a proposal (``BlockEntry``), so it
  can re-propose and commit after a restart;
* every proposal or vote it signs, with the new sign-state (``SignedVoteEntry`` /
  ``SignedProposalEntry``, ``sync=True``), before the message leaves the process.

After a restart: ``replay()``; if ``height_of(entries)`` is the next height to decide, rebuild the
engine with ``engine.replay_into(initial_state(config), events_of(entries))`` and sign with
``last_sign_state(entries)`` as the previous sign-state; otherwise call ``start_height``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from node import crypto
from node.consensus.blocks import SignedProposal, SignedVote
from node.consensus.engine import (
    BlockBuilt,
    Event,
    ProposalReceived,
    StartHeight,
    TimeoutFired,
    VoteReceived,
)
from node.consensus.signstate import SignState
from node.encoding import Record, limit
from node.errors import CorruptDatabase, DecodeError, StorageError
from node.types import Hash32, Height

MAX_WAL_RECORD = 64 << 20  # bytes of one payload; a block is the largest entry
_LENGTH_BYTES = 4
_HASH_BYTES = 32
_HEADER = _LENGTH_BYTES + _HASH_BYTES


@dataclass(frozen=True, slots=True)
class HeightMarker(Record):
    """The first record of the file: the height the records belong to."""

    height: Height


@dataclass(frozen=True, slots=True)
class SignedVoteEntry(Record):
    """A vote this node signed, with the sign-state after signing it (appended before sending)."""

    signed_vote: SignedVote
    sign_state: SignState


@dataclass(frozen=True, slots=True)
class SignedProposalEntry(Record):
    """A proposal this node signed, with the sign-state after signing it."""

    signed_proposal: SignedProposal
    sign_state: SignState


@dataclass(frozen=True, slots=True)
class BlockEntry(Record):
    """The encoded block behind a proposal (own or received), by its hash."""

    block_hash: Hash32
    block: bytes = field(metadata=limit(MAX_WAL_RECORD))


WALEntry = (
    HeightMarker
    | SignState
    | SignedVoteEntry
    | SignedProposalEntry
    | BlockEntry
    | StartHeight
    | ProposalReceived
    | VoteReceived
    | TimeoutFired
    | BlockBuilt
)

_TAGS: dict[type[Record], int] = {
    HeightMarker: 1,
    SignState: 2,
    SignedVoteEntry: 3,
    SignedProposalEntry: 4,
    BlockEntry: 5,
    StartHeight: 16,
    ProposalReceived: 17,
    VoteReceived: 18,
    TimeoutFired: 19,
    BlockBuilt: 20,
}
_TYPES: dict[int, type[Record]] = {tag: cls for cls, tag in _TAGS.items()}


def encode_entry(entry: WALEntry) -> bytes:
    """One framed record: length || sha256(payload) || payload."""
    tag = _TAGS.get(type(entry))
    if tag is None:
        raise TypeError(f"{type(entry).__name__} is not a WAL entry")
    payload = bytes([tag]) + entry.encode()
    if len(payload) > MAX_WAL_RECORD:
        raise StorageError(f"WAL record of {len(payload)} bytes exceeds {MAX_WAL_RECORD}")
    return len(payload).to_bytes(_LENGTH_BYTES, "big") + crypto.sha256(payload) + payload


def decode_entry(payload: bytes) -> WALEntry:
    cls = _TYPES.get(payload[0]) if payload else None
    if cls is None:
        raise CorruptDatabase("WAL record with an unknown tag")
    try:
        entry = cls.decode(payload[1:], max_size=MAX_WAL_RECORD)
    except DecodeError as exc:
        raise CorruptDatabase(f"WAL record does not decode: {exc.message}") from exc
    return entry  # type: ignore[return-value]  # _TYPES holds exactly the WALEntry classes


def parse_records(data: bytes) -> tuple[list[WALEntry], int]:
    """Decode the records of a WAL file; returns them and the length of the intact prefix.

    A crash can only tear the last append, so a bad record is a torn tail when it cannot be
    anything else: a header cut short, a payload cut short by the end of the file, a last record
    that fails its checksum, or a tail of zero bytes (what a file system may leave after a crash).
    A bad record with more data after it is ``CorruptDatabase``: the records after it were
    synced, and dropping them could lose a sign-state.
    """
    entries: list[WALEntry] = []
    offset = 0
    size = len(data)
    while offset < size:
        if size - offset < _HEADER or not any(data[offset:]):
            return entries, offset  # torn: a partial header, or zeros
        length = int.from_bytes(data[offset : offset + _LENGTH_BYTES], "big")
        if not 0 < length <= MAX_WAL_RECORD:
            raise CorruptDatabase(f"WAL record at offset {offset} has an invalid length {length}")
        end = offset + _HEADER + length
        if end > size:
            return entries, offset  # torn: the payload was cut short
        payload = data[offset + _HEADER : end]
        if crypto.sha256(payload) != data[offset + _LENGTH_BYTES : offset + _HEADER]:
            if end == size:
                return entries, offset  # torn: the last record was not fully written
            raise CorruptDatabase(f"WAL record at offset {offset} fails its checksum")
        entries.append(decode_entry(payload))
        offset = end
    return entries, offset


def height_of(entries: Iterable[WALEntry]) -> Height | None:
    """The height the records belong to (from the marker), or None for an empty log."""
    for entry in entries:
        if isinstance(entry, HeightMarker):
            return entry.height
    return None


def events_of(entries: Iterable[WALEntry]) -> list[Event]:
    """The engine events, in order, for ``engine.replay_into``."""
    return [
        e
        for e in entries
        if isinstance(e, StartHeight | ProposalReceived | VoteReceived | TimeoutFired | BlockBuilt)
    ]


def last_sign_state(entries: Iterable[WALEntry]) -> SignState | None:
    """The latest sign-state recorded: the ``previous`` for ``signstate.check_sign``."""
    last: SignState | None = None
    for entry in entries:
        if isinstance(entry, SignState):
            last = entry
        elif isinstance(entry, SignedVoteEntry | SignedProposalEntry):
            last = entry.sign_state
    return last


def blocks_of(entries: Iterable[WALEntry]) -> dict[Hash32, bytes]:
    """The blocks recorded at this height, by hash."""
    return {e.block_hash: e.block for e in entries if isinstance(e, BlockEntry)}


class ConsensusWAL:
    """The WAL file of one node. Not thread-safe: one owner (the consensus service) uses it.

    Its methods block on the disk (``fsync``); an async caller runs them in a worker thread.
    """

    def __init__(self, path: Path, fd: int, height: Height | None, sign: SignState | None) -> None:
        self._path = path
        self._fd: int | None = fd
        self._height = height
        self._last_sign_state = sign

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ConsensusWAL:
        """Open (creating if needed) the WAL at ``path``; a torn last record is cut off."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open the consensus WAL {p}: {exc.strerror}") from exc
        try:
            entries, intact = parse_records(_read_all(fd))
            if os.fstat(fd).st_size != intact:
                os.ftruncate(fd, intact)
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot read the consensus WAL {p}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(p, fd, height_of(entries), last_sign_state(entries))

    @property
    def path(self) -> Path:
        return self._path

    @property
    def height(self) -> Height | None:
        """The height of the records in the file (None for a new, empty log)."""
        return self._height

    @property
    def last_sign_state(self) -> SignState | None:
        return self._last_sign_state

    def append(self, entry: WALEntry, sync: bool = True) -> None:
        """Append one record; with ``sync`` it (and every earlier append) is on disk on return."""
        fd = self._require_open()
        record = encode_entry(entry)
        try:
            _write_all(fd, record)
            if sync:
                os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"cannot append to the consensus WAL: {exc.strerror}") from exc
        if isinstance(entry, SignState):
            self._last_sign_state = entry
        elif isinstance(entry, SignedVoteEntry | SignedProposalEntry):
            self._last_sign_state = entry.sign_state

    def start_height(self, height: int) -> None:
        """Replace the log by an empty one for ``height``, keeping the last sign-state."""
        fd = self._require_open()
        data = encode_entry(HeightMarker(Height(height)))
        if self._last_sign_state is not None:
            data += encode_entry(self._last_sign_state)
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            tmp_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(tmp_fd, data)
                os.fsync(tmp_fd)
            finally:
                os.close(tmp_fd)
            os.replace(tmp, self._path)
            _fsync_dir(self._path.parent)
            new_fd = os.open(self._path, os.O_RDWR | os.O_APPEND)
        except OSError as exc:
            raise StorageError(f"cannot rotate the consensus WAL: {exc.strerror}") from exc
        os.close(fd)
        self._fd = new_fd
        self._height = Height(height)

    def replay(self) -> list[WALEntry]:
        """Every intact record of the file, in order (a torn tail is left out)."""
        fd = self._require_open()
        try:
            data = _read_all(fd)
        except OSError as exc:
            raise StorageError(f"cannot read the consensus WAL: {exc.strerror}") from exc
        return parse_records(data)[0]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> int:
        if self._fd is None:
            raise StorageError("the consensus WAL is closed")
        return self._fd


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

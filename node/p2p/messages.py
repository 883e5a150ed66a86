"""Wire messages of gossip and of the request/response protocols (DESIGN §6).

Every message is a canonical record (``node.encoding``) sent as one msgpack array
``[kind, field_1, field_2, ...]``: the record's fields in declared order, prefixed by the message's
``KIND`` so a topic or protocol can carry several kinds in one strict decoding pass. Each message
type has a ``MAX_BYTES`` (checked before msgpack allocates anything, and on encoding) and a
``check()`` of what the field types cannot say (non-empty, sorted, consistent bitmaps, the header
a proposal signs). ``encode()`` / ``decode()`` on a message class use that form; nested records
(``BlockPart`` inside ``PartsResponse``) travel as plain arrays.

Decoding raises only ``node.errors.DecodeError`` subclasses: ``TooLarge`` for sizes,
``NonCanonicalEncoding``, ``UnexpectedMessage`` for a kind not allowed where it arrived, and
``InvalidMessage`` for a failed ``check()``. Nothing here verifies signatures or looks at chain
state: that is the caller's validator.

* gossip (``decode_gossip(topic, data)``): ``TxBatch`` and ``TxAnnounce`` on ``Topic.TXS``,
  ``ProposalMessage`` and ``BlockPart`` on ``Topic.PROPOSALS``, ``VoteBatch`` on ``Topic.VOTES``,
  ``EvidenceMessage`` on ``Topic.EVIDENCE``;
* requests (``decode_request(protocol, data)``) and their responses
  (``decode_response(ResponseType, data)``, which raises ``RemoteError`` for an
  ``ErrorResponse``), see ``RESPONSE_TYPES``:
  ``/neuroseed/catchup/1``: ``RoundStateMessage`` → ``RoundStateMessage``, ``HasVotes`` →
  ``HasVotes``, ``GetVotes`` → ``VotesResponse``, ``GetCommit`` → ``CommitResponse``;
  ``/neuroseed/pull/1``: ``GetParts`` → ``PartsResponse``, ``GetTxs`` → ``TxsResponse``;
  ``/neuroseed/sync/1``: ``GetStatus`` → ``StatusResponse``, ``GetHeaders`` →
  ``HeadersResponse``, ``GetBlocks`` → ``BlocksResponse``; ``/neuroseed/ping/1``: ``Ping`` →
  ``Pong``.

Responses that return "whatever fits" (``VotesResponse``, ``PartsResponse``, ``TxsResponse``,
``HeadersResponse``, ``BlocksResponse``) are built with ``take_within`` so they stay under their
``MAX_BYTES``; the requester asks again for the rest.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

from node import crypto
from node.consensus.blocks import (
    MAX_COMMIT_VOTES,
    Block,
    Commit,
    DuplicateVoteEvidence,
    Header,
    SignedProposal,
    SignedVote,
    VoteType,
)
from node.consensus.validators import MAX_VALIDATORS
from node.encoding import Record, limit, pack, unpack_canonical
from node.errors import DecodeError, EncodeError, TooLarge
from node.p2p.api import (
    MAX_FRAME_BYTES,
    MAX_GOSSIP_PAYLOAD,
    MAX_RESPONSE_BYTES,
    PROTOCOL_CATCHUP,
    PROTOCOL_PING,
    PROTOCOL_PULL,
    PROTOCOL_SYNC,
    RequestFailed,
    Topic,
)
from node.types import Hash32, Height, Round

# --- limits ----------------------------------------------------------------------------------

MAX_PART_BYTES = MAX_GOSSIP_PAYLOAD  # 256 KiB of block data per part
MAX_BLOCK_PARTS = 1024  # 256 MiB: far above any votable max_block_bytes
MAX_PART_PROOF = 32  # Merkle path length; 11 suffices for MAX_BLOCK_PARTS
MAX_TX_BATCH_BYTES = MAX_GOSSIP_PAYLOAD  # one encoded TxBatch
MAX_BATCH_TXS = 8192
MAX_ANNOUNCE_IDS = 1024
MAX_VOTE_BATCH = 1024  # ~155 B per signed vote: < 160 KiB
MAX_EVIDENCE_BATCH = 64
MAX_PULL_TXS = 1024
MAX_PARTS_PER_RESPONSE = 32  # ~8 MiB
MAX_SYNC_HEADERS = 1024
MAX_SYNC_BLOCKS = 256
MAX_ERROR_MESSAGE = 256
_BITMAP_BYTES = (MAX_VALIDATORS + 7) // 8
_SMALL = 4 << 10  # fixed-size requests and small responses


class InvalidMessage(DecodeError):
    """Decoded fine, but the fields are inconsistent (``check()`` failed)."""

    code = 1005
    reason = "invalid message"


class UnexpectedMessage(DecodeError):
    """A well-formed message of a kind that is not allowed where it arrived."""

    code = 1006
    reason = "unexpected message kind"


class RemoteError(RequestFailed):
    """The peer answered with an ``ErrorResponse``; ``remote_code`` is its code."""

    code = 2110
    reason = "peer returned an error"

    def __init__(self, remote_code: int, message: str) -> None:
        super().__init__(f"peer error {remote_code}: {message}")
        self.remote_code = remote_code


# --- base ------------------------------------------------------------------------------------


class WireMessage(Record):
    """A record sent on its own: ``[KIND, *fields]``, at most ``MAX_BYTES``."""

    __slots__ = ()
    KIND: ClassVar[int] = 0
    MAX_BYTES: ClassVar[int] = _SMALL

    def check(self) -> None:
        """Raise ``InvalidMessage`` if the fields are inconsistent (no signatures, no state)."""

    def encode(self) -> bytes:
        try:
            self.check()
        except InvalidMessage as exc:
            raise EncodeError(f"refusing to encode: {exc.message}") from exc
        data = pack((self.KIND, *self.to_wire()))
        if len(data) > self.MAX_BYTES:
            raise EncodeError(
                f"{type(self).__name__} of {len(data)} bytes exceeds {self.MAX_BYTES}"
            )
        return data

    @classmethod
    def decode(cls, data: bytes, *, max_size: int | None = None) -> Self:
        msg = decode_message(data, (cls,), max_size=max_size)
        assert isinstance(msg, cls)
        return msg


M = TypeVar("M", bound=WireMessage)
R = TypeVar("R", bound=Record)


def _invalid(cls: type[WireMessage] | type[Record], why: str) -> InvalidMessage:
    return InvalidMessage(f"{cls.__name__}: {why}")


def decode_message(
    data: bytes, allowed: Sequence[type[WireMessage]], *, max_size: int | None = None
) -> WireMessage:
    """Strictly decode one of the ``allowed`` message kinds from ``data``."""
    if not allowed:
        raise ValueError("no message kinds allowed")
    cap = max(c.MAX_BYTES for c in allowed)
    if max_size is not None:
        cap = min(cap, max_size)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("expected bytes")
    if len(data) > cap:
        raise TooLarge(f"message of {len(data)} bytes exceeds the limit of {cap}")
    tree = unpack_canonical(bytes(data), max_size=cap)
    if type(tree) is not tuple or not tree or type(tree[0]) is not int:
        raise DecodeError("expected an array starting with the message kind")
    kind = tree[0]
    cls = next((c for c in allowed if kind == c.KIND), None)
    if cls is None:
        raise UnexpectedMessage(f"message kind {kind} is not allowed here")
    if len(data) > cls.MAX_BYTES:
        raise TooLarge(f"{cls.__name__} of {len(data)} bytes exceeds {cls.MAX_BYTES}")
    msg = cls.from_wire(tree[1:])
    msg.check()
    return msg


def _require(ok: bool, cls: type[WireMessage] | type[Record], why: str) -> None:
    if not ok:
        raise _invalid(cls, why)


def _strictly_increasing(xs: Sequence[Any]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


def _check_vote_type(vote_type: int, cls: type[WireMessage]) -> None:
    _require(vote_type in (VoteType.PREVOTE, VoteType.PRECOMMIT), cls, "unknown vote type")


# --- shared records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartSetHeader(Record):
    """``total`` parts whose Merkle root (``node.merkle``, leaves = part data) is ``root``."""

    total: int
    root: Hash32

    def check(self) -> None:
        _require(1 <= self.total <= MAX_BLOCK_PARTS, PartSetHeader, "part count out of range")


@dataclass(frozen=True, slots=True)
class Bitmap(Record):
    """A set of validator indices in ``0..size-1``: bit i is ``bits[i // 8] >> (i % 8) & 1``.

    Canonical: ``len(bits) == ceil(size / 8)`` and the unused high bits of the last byte are 0.
    """

    size: int
    bits: bytes = field(metadata=limit(_BITMAP_BYTES))

    @classmethod
    def of(cls, size: int, indices: Iterable[int] = ()) -> Bitmap:
        buf = bytearray((size + 7) // 8)
        for i in indices:
            if not 0 <= i < size:
                raise ValueError(f"index {i} out of range for a bitmap of {size}")
            buf[i // 8] |= 1 << (i % 8)
        return cls(size, bytes(buf))

    def check(self) -> None:
        _require(0 <= self.size <= MAX_VALIDATORS, Bitmap, "size out of range")
        _require(len(self.bits) == (self.size + 7) // 8, Bitmap, "length does not match size")
        if self.size % 8 and self.bits:
            _require(self.bits[-1] >> (self.size % 8) == 0, Bitmap, "bits set past the end")

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.size:
            return False
        return bool(self.bits[index // 8] >> (index % 8) & 1)

    def indices(self) -> list[int]:
        return [i for i in range(self.size) if self.bits[i // 8] >> (i % 8) & 1]

    def complement(self) -> Bitmap:
        return Bitmap.of(self.size, (i for i in range(self.size) if i not in self))

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)


# --- gossip ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxBatch(WireMessage):
    """Signed transactions (raw ``SignedTransaction`` bytes), ≤ 256 KiB encoded in all."""

    KIND: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = MAX_TX_BATCH_BYTES
    txs: tuple[bytes, ...] = field(metadata=limit(MAX_BATCH_TXS))

    def check(self) -> None:
        _require(bool(self.txs), TxBatch, "empty batch")
        _require(all(self.txs), TxBatch, "empty transaction")
        _require(len(set(self.txs)) == len(self.txs), TxBatch, "duplicate transaction")


@dataclass(frozen=True, slots=True)
class TxAnnounce(WireMessage):
    """Ids of transactions too large for a batch; fetch them with ``GetTxs`` (PROTOCOL_PULL)."""

    KIND: ClassVar[int] = 2
    MAX_BYTES: ClassVar[int] = 64 << 10
    tx_ids: tuple[Hash32, ...] = field(metadata=limit(MAX_ANNOUNCE_IDS))

    def check(self) -> None:
        _require(bool(self.tx_ids), TxAnnounce, "no ids")
        _require(len(set(self.tx_ids)) == len(self.tx_ids), TxAnnounce, "duplicate id")


@dataclass(frozen=True, slots=True)
class ProposalMessage(WireMessage):
    """A signed proposal with the header it signs and the part set that carries the block.

    ``check()`` ties the header to the proposal (hash and height); the part set header is not
    signed, so a block assembled from it must still be checked against ``header`` (its hash).
    """

    KIND: ClassVar[int] = 3
    MAX_BYTES: ClassVar[int] = _SMALL
    signed_proposal: SignedProposal
    header: Header
    part_set: PartSetHeader

    def check(self) -> None:
        p = self.signed_proposal.proposal
        self.part_set.check()
        _require(self.header.height == p.height, ProposalMessage, "header height differs")
        _require(
            self.header.hash() == p.block_hash, ProposalMessage, "header is not the proposed block"
        )
        _require(p.pol_round is None or p.pol_round < p.round, ProposalMessage, "pol_round ≥ round")


@dataclass(frozen=True, slots=True)
class BlockPart(WireMessage):
    """Part ``index`` of the part set ``root`` proposed at (height, round), with its Merkle path.

    ``root`` identifies the part set, so parts of an equivocating proposer's second block are told
    apart (and ignored) rather than failing the proof of the first.
    """

    KIND: ClassVar[int] = 4
    MAX_BYTES: ClassVar[int] = MAX_PART_BYTES + (2 << 10)
    height: Height
    round: Round
    root: Hash32
    index: int
    data: bytes = field(metadata=limit(MAX_PART_BYTES))
    proof: tuple[Hash32, ...] = field(metadata=limit(MAX_PART_PROOF))

    def check(self) -> None:
        _require(self.index < MAX_BLOCK_PARTS, BlockPart, "index out of range")
        _require(bool(self.data), BlockPart, "empty part")


@dataclass(frozen=True, slots=True)
class VoteBatch(WireMessage):
    KIND: ClassVar[int] = 5
    MAX_BYTES: ClassVar[int] = MAX_GOSSIP_PAYLOAD
    votes: tuple[SignedVote, ...] = field(metadata=limit(MAX_VOTE_BATCH))

    def check(self) -> None:
        _require(bool(self.votes), VoteBatch, "empty batch")
        for v in self.votes:
            _check_vote_type(v.vote.vote_type, VoteBatch)


@dataclass(frozen=True, slots=True)
class EvidenceMessage(WireMessage):
    KIND: ClassVar[int] = 6
    MAX_BYTES: ClassVar[int] = 64 << 10
    evidence: tuple[DuplicateVoteEvidence, ...] = field(metadata=limit(MAX_EVIDENCE_BATCH))

    def check(self) -> None:
        _require(bool(self.evidence), EvidenceMessage, "no evidence")


# --- catch-up (PROTOCOL_CATCHUP) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoundStateMessage(WireMessage):
    """Where the sender is: height, round, step (``signstate.Step``: 1..3) and the votes it has
    in that round. Sent as a request; the answer is the responder's own round state."""

    KIND: ClassVar[int] = 20
    MAX_BYTES: ClassVar[int] = 2 * _BITMAP_BYTES + 256
    height: Height
    round: Round
    step: int
    prevotes: Bitmap
    precommits: Bitmap

    def check(self) -> None:
        _require(1 <= self.step <= 3, RoundStateMessage, "unknown step")
        self.prevotes.check()
        self.precommits.check()
        _require(
            self.prevotes.size == self.precommits.size, RoundStateMessage, "bitmap sizes differ"
        )


@dataclass(frozen=True, slots=True)
class HasVotes(WireMessage):
    """The votes of (height, round, type) the sender has, by validator index (CometBFT's
    VoteSetBits). As a request, the answer is the responder's ``HasVotes`` for the same triple."""

    KIND: ClassVar[int] = 21
    MAX_BYTES: ClassVar[int] = _BITMAP_BYTES + 256
    height: Height
    round: Round
    vote_type: int
    votes: Bitmap

    def check(self) -> None:
        _check_vote_type(self.vote_type, HasVotes)
        self.votes.check()


@dataclass(frozen=True, slots=True)
class GetVotes(WireMessage):
    """Ask for the votes of (height, round, type) of the validators set in ``missing``."""

    KIND: ClassVar[int] = 22
    MAX_BYTES: ClassVar[int] = _BITMAP_BYTES + 256
    height: Height
    round: Round
    vote_type: int
    missing: Bitmap

    def check(self) -> None:
        _check_vote_type(self.vote_type, GetVotes)
        self.missing.check()


@dataclass(frozen=True, slots=True)
class VotesResponse(WireMessage):
    KIND: ClassVar[int] = 23
    MAX_BYTES: ClassVar[int] = 4 << 20
    votes: tuple[SignedVote, ...] = field(metadata=limit(MAX_COMMIT_VOTES))

    def check(self) -> None:
        for v in self.votes:
            _check_vote_type(v.vote.vote_type, VotesResponse)


@dataclass(frozen=True, slots=True)
class GetCommit(WireMessage):
    KIND: ClassVar[int] = 24
    height: Height


@dataclass(frozen=True, slots=True)
class CommitResponse(WireMessage):
    """The seen commit for the requested height, or None if the responder has none."""

    KIND: ClassVar[int] = 25
    MAX_BYTES: ClassVar[int] = 4 << 20
    commit: Commit | None


# --- pull (PROTOCOL_PULL) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetParts(WireMessage):
    """Ask for parts of the part set ``root`` of (height, round); indices strictly increasing."""

    KIND: ClassVar[int] = 30
    MAX_BYTES: ClassVar[int] = 8 << 10
    height: Height
    round: Round
    root: Hash32
    indices: tuple[int, ...] = field(metadata=limit(MAX_BLOCK_PARTS))

    def check(self) -> None:
        _require(bool(self.indices), GetParts, "no indices")
        _require(_strictly_increasing(self.indices), GetParts, "indices not strictly increasing")
        _require(self.indices[-1] < MAX_BLOCK_PARTS, GetParts, "index out of range")


@dataclass(frozen=True, slots=True)
class PartsResponse(WireMessage):
    """The requested parts the responder has (any subset, at most ``MAX_PARTS_PER_RESPONSE``)."""

    KIND: ClassVar[int] = 31
    MAX_BYTES: ClassVar[int] = MAX_PARTS_PER_RESPONSE * BlockPart.MAX_BYTES + 64
    parts: tuple[BlockPart, ...] = field(metadata=limit(MAX_PARTS_PER_RESPONSE))

    def check(self) -> None:
        for p in self.parts:
            p.check()


@dataclass(frozen=True, slots=True)
class GetTxs(WireMessage):
    KIND: ClassVar[int] = 32
    MAX_BYTES: ClassVar[int] = 64 << 10
    tx_ids: tuple[Hash32, ...] = field(metadata=limit(MAX_PULL_TXS))

    def check(self) -> None:
        _require(bool(self.tx_ids), GetTxs, "no ids")
        _require(len(set(self.tx_ids)) == len(self.tx_ids), GetTxs, "duplicate id")


@dataclass(frozen=True, slots=True)
class TxsResponse(WireMessage):
    """The requested transactions the responder has (raw bytes; the requester checks ids)."""

    KIND: ClassVar[int] = 33
    MAX_BYTES: ClassVar[int] = 16 << 20
    txs: tuple[bytes, ...] = field(metadata=limit(MAX_PULL_TXS))


# --- sync (PROTOCOL_SYNC) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetStatus(WireMessage):
    KIND: ClassVar[int] = 40


@dataclass(frozen=True, slots=True)
class StatusResponse(WireMessage):
    """The responder serves blocks ``base..head``; ``head_hash`` is block ``head``'s hash."""

    KIND: ClassVar[int] = 41
    base: Height
    head: Height
    head_hash: Hash32

    def check(self) -> None:
        _require(self.base <= self.head, StatusResponse, "base above head")


@dataclass(frozen=True, slots=True)
class GetHeaders(WireMessage):
    KIND: ClassVar[int] = 42
    start: Height
    count: int

    def check(self) -> None:
        _require(1 <= self.count <= MAX_SYNC_HEADERS, GetHeaders, "count out of range")


@dataclass(frozen=True, slots=True)
class HeaderWithCommit(Record):
    header: Header
    commit: Commit


@dataclass(frozen=True, slots=True)
class HeadersResponse(WireMessage):
    """Consecutive headers from the requested height, each with its seen commit."""

    KIND: ClassVar[int] = 43
    MAX_BYTES: ClassVar[int] = MAX_RESPONSE_BYTES
    headers: tuple[HeaderWithCommit, ...] = field(metadata=limit(MAX_SYNC_HEADERS))

    def check(self) -> None:
        _check_consecutive(
            [(h.header.height, h.header, h.commit) for h in self.headers], HeadersResponse
        )


@dataclass(frozen=True, slots=True)
class GetBlocks(WireMessage):
    KIND: ClassVar[int] = 44
    start: Height
    count: int

    def check(self) -> None:
        _require(1 <= self.count <= MAX_SYNC_BLOCKS, GetBlocks, "count out of range")


@dataclass(frozen=True, slots=True)
class BlockWithCommit(Record):
    block: Block
    commit: Commit


@dataclass(frozen=True, slots=True)
class BlocksResponse(WireMessage):
    """Consecutive blocks from the requested height, each with its seen commit, ≤ 64 MiB."""

    KIND: ClassVar[int] = 45
    MAX_BYTES: ClassVar[int] = MAX_RESPONSE_BYTES
    blocks: tuple[BlockWithCommit, ...] = field(metadata=limit(MAX_SYNC_BLOCKS))

    def check(self) -> None:
        _check_consecutive(
            [(b.block.header.height, b.block.header, b.commit) for b in self.blocks],
            BlocksResponse,
        )


def _check_consecutive(items: Sequence[tuple[int, Header, Commit]], cls: type[WireMessage]) -> None:
    for i, (height, header, commit) in enumerate(items):
        if i:
            _require(height == items[i - 1][0] + 1, cls, "heights not consecutive")
        _require(commit.height == height, cls, "commit height differs from the block's")
        _require(commit.block_hash == header.hash(), cls, "commit is for another block")


# --- ping (PROTOCOL_PING) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping(WireMessage):
    KIND: ClassVar[int] = 50
    MAX_BYTES: ClassVar[int] = 64
    nonce: int


@dataclass(frozen=True, slots=True)
class Pong(WireMessage):
    KIND: ClassVar[int] = 51
    MAX_BYTES: ClassVar[int] = 64
    nonce: int


# --- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorResponse(WireMessage):
    """Any request may be answered with this: a ``NeuroSeedError`` code and a short message."""

    KIND: ClassVar[int] = 60
    MAX_BYTES: ClassVar[int] = 512
    code: int
    message: str = field(metadata=limit(MAX_ERROR_MESSAGE))


# --- dispatch --------------------------------------------------------------------------------

GOSSIP_TYPES: dict[Topic, tuple[type[WireMessage], ...]] = {
    Topic.TXS: (TxBatch, TxAnnounce),
    Topic.PROPOSALS: (ProposalMessage, BlockPart),
    Topic.VOTES: (VoteBatch,),
    Topic.EVIDENCE: (EvidenceMessage,),
}

RESPONSE_TYPES: dict[type[WireMessage], type[WireMessage]] = {
    RoundStateMessage: RoundStateMessage,
    HasVotes: HasVotes,
    GetVotes: VotesResponse,
    GetCommit: CommitResponse,
    GetParts: PartsResponse,
    GetTxs: TxsResponse,
    GetStatus: StatusResponse,
    GetHeaders: HeadersResponse,
    GetBlocks: BlocksResponse,
    Ping: Pong,
}

REQUEST_TYPES: dict[str, tuple[type[WireMessage], ...]] = {
    PROTOCOL_CATCHUP: (RoundStateMessage, HasVotes, GetVotes, GetCommit),
    PROTOCOL_PULL: (GetParts, GetTxs),
    PROTOCOL_SYNC: (GetStatus, GetHeaders, GetBlocks),
    PROTOCOL_PING: (Ping,),
}


def _check_tables() -> None:
    kinds = [c.KIND for cs in GOSSIP_TYPES.values() for c in cs]
    kinds += [c.KIND for cs in REQUEST_TYPES.values() for c in cs]
    kinds += [c.KIND for c in set(RESPONSE_TYPES.values()) - set(RESPONSE_TYPES)]
    kinds.append(ErrorResponse.KIND)
    assert len(kinds) == len(set(kinds)), "message kinds must be unique"
    for cs in REQUEST_TYPES.values():
        for c in cs:
            assert c.MAX_BYTES <= MAX_FRAME_BYTES, f"{c.__name__} must fit one request"
    for c in RESPONSE_TYPES.values():
        assert c.MAX_BYTES <= MAX_RESPONSE_BYTES


_check_tables()


def decode_gossip(topic: Topic, data: bytes) -> WireMessage:
    """Strictly decode a gossip message of ``topic`` (one of ``GOSSIP_TYPES[topic]``)."""
    return decode_message(data, GOSSIP_TYPES[topic])


def decode_request(protocol: str, data: bytes) -> WireMessage:
    """Strictly decode a request of ``protocol`` (one of ``REQUEST_TYPES[protocol]``)."""
    try:
        allowed = REQUEST_TYPES[protocol]
    except KeyError:
        raise UnexpectedMessage(f"no requests on {protocol}") from None
    return decode_message(data, allowed)


def decode_response(expected: type[M], data: bytes) -> M:
    """Strictly decode a response of type ``expected``; an ``ErrorResponse`` raises
    ``RemoteError``. Other problems raise ``DecodeError`` subclasses."""
    msg = decode_message(data, (expected, ErrorResponse))
    if isinstance(msg, ErrorResponse):
        raise RemoteError(msg.code, msg.message)
    assert isinstance(msg, expected)
    return msg


def error_response(code: int, message: str) -> bytes:
    """The encoded ``ErrorResponse`` (``message`` truncated to fit)."""
    text = message.encode("utf-8")[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore")
    return ErrorResponse(code, text).encode()


def take_within(
    items: Iterable[R], max_bytes: int, *, max_items: int | None = None
) -> tuple[R, ...]:
    """The longest prefix of ``items`` whose encodings (as nested records) fit ``max_bytes``
    with room for the response's own envelope (a conservative 16 bytes, 5 per item)."""
    out: list[R] = []
    used = 16
    for item in items:
        if max_items is not None and len(out) >= max_items:
            break
        size = len(pack(item.to_wire())) + 5
        if used + size > max_bytes:
            break
        out.append(item)
        used += size
    return tuple(out)


def _bin_size(n: int) -> int:
    return n + (2 if n < 1 << 8 else 3 if n < 1 << 16 else 5)


def pack_tx_batches(
    raw_txs: Iterable[bytes], *, max_bytes: int = MAX_TX_BATCH_BYTES
) -> tuple[list[TxBatch], list[TxAnnounce]]:
    """Pack transactions, in order, into batches of at most ``max_bytes`` encoded; those that
    cannot fit one batch alone are announced by id (``TxAnnounce``) for peers to pull."""
    batches: list[TxBatch] = []
    large: list[Hash32] = []
    current: list[bytes] = []
    seen: set[bytes] = set()
    used = 8  # [kind, [...]] headers, generously
    for tx in raw_txs:
        if not tx or tx in seen:
            continue
        seen.add(tx)
        size = _bin_size(len(tx))
        if 8 + size > max_bytes:
            large.append(crypto.sha256(tx))
            continue
        if used + size > max_bytes or len(current) >= MAX_BATCH_TXS:
            batches.append(TxBatch(tuple(current)))
            current, used = [], 8
        current.append(tx)
        used += size
    if current:
        batches.append(TxBatch(tuple(current)))
    announces = [
        TxAnnounce(tuple(large[i : i + MAX_ANNOUNCE_IDS]))
        for i in range(0, len(large), MAX_ANNOUNCE_IDS)
    ]
    return batches, announces

"""Wire messages: round trips, kinds per topic and protocol, strict decoding and size limits."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import crypto
from node.consensus.blocks import Block, VoteType
from node.encoding import pack
from node.errors import DecodeError, EncodeError, NonCanonicalEncoding, TooLarge
from node.p2p.api import MAX_FRAME_BYTES, PROTOCOL_CATCHUP, PROTOCOL_SYNC, Topic
from node.p2p.messages import (
    GOSSIP_TYPES,
    MAX_BLOCK_PARTS,
    MAX_PART_BYTES,
    MAX_SYNC_BLOCKS,
    MAX_TX_BATCH_BYTES,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    Bitmap,
    BlockPart,
    BlocksResponse,
    BlockWithCommit,
    CommitResponse,
    ErrorResponse,
    EvidenceMessage,
    GetBlocks,
    GetCommit,
    GetHeaders,
    GetParts,
    GetStatus,
    GetTxs,
    GetVotes,
    HasVotes,
    HeadersResponse,
    HeaderWithCommit,
    InvalidMessage,
    PartSetHeader,
    PartsResponse,
    Ping,
    Pong,
    RemoteError,
    RoundStateMessage,
    StatusResponse,
    TxAnnounce,
    TxBatch,
    TxsResponse,
    UnexpectedMessage,
    VoteBatch,
    VotesResponse,
    WireMessage,
    decode_gossip,
    decode_message,
    decode_request,
    decode_response,
    error_response,
    pack_tx_batches,
    take_within,
)
from node.types import Hash32, Height, Round
from tests.p2p.samples import H, block, commit_for, evidence, header, proposal_message, vote

B7 = Bitmap.of(7, [0, 3, 6])


def samples() -> list[WireMessage]:
    b5, b6 = block(5), block(6)
    return [
        TxBatch((b"a" * 10, b"b" * 300, b"c" * 70_000)),
        TxAnnounce((H, Hash32(b"\x22" * 32))),
        proposal_message(),
        proposal_message(round=3, pol_round=1),
        BlockPart(Height(5), Round(0), H, 2, b"data", (H, H)),
        VoteBatch((vote(0), vote(1, vote_type=VoteType.PRECOMMIT, block_hash=None))),
        EvidenceMessage((evidence(),)),
        RoundStateMessage(Height(5), Round(1), 2, B7, Bitmap.of(7)),
        HasVotes(Height(5), Round(1), VoteType.PRECOMMIT, B7),
        GetVotes(Height(5), Round(1), VoteType.PREVOTE, B7.complement()),
        VotesResponse((vote(2),)),
        VotesResponse(()),
        GetCommit(Height(9)),
        CommitResponse(commit_for(header(5))),
        CommitResponse(None),
        GetParts(Height(5), Round(0), H, (0, 2, 7)),
        PartsResponse((BlockPart(Height(5), Round(0), H, 0, b"x", ()),)),
        GetTxs((H,)),
        TxsResponse((b"raw-tx",)),
        GetStatus(),
        StatusResponse(Height(1), Height(10), H),
        GetHeaders(Height(5), 2),
        HeadersResponse(
            (
                HeaderWithCommit(b5.header, commit_for(b5.header)),
                HeaderWithCommit(b6.header, commit_for(b6.header)),
            )
        ),
        GetBlocks(Height(5), 2),
        BlocksResponse(
            (BlockWithCommit(b5, commit_for(b5.header)), BlockWithCommit(b6, commit_for(b6.header)))
        ),
        Ping(2**64 - 1),
        Pong(0),
        ErrorResponse(1500, "not found"),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: WireMessage) -> None:
    data = msg.encode()
    assert len(data) <= msg.MAX_BYTES
    assert data[1] == msg.KIND  # [kind, ...]: fixarray header, then the kind
    back = type(msg).decode(data)
    assert back == msg
    assert back.encode() == data


def test_every_kind_is_sampled_and_unique() -> None:
    kinds = {type(m) for m in samples()}
    every = {c for cs in GOSSIP_TYPES.values() for c in cs}
    every |= {c for cs in REQUEST_TYPES.values() for c in cs} | set(RESPONSE_TYPES.values())
    assert every | {ErrorResponse} <= kinds
    assert len({c.KIND for c in every}) == len(every)
    for cs in REQUEST_TYPES.values():
        assert all(c.MAX_BYTES <= MAX_FRAME_BYTES for c in cs)


def test_gossip_kinds_per_topic() -> None:
    batch = TxBatch((b"tx",)).encode()
    assert decode_gossip(Topic.TXS, batch) == TxBatch((b"tx",))
    for topic in (Topic.PROPOSALS, Topic.VOTES, Topic.EVIDENCE):
        with pytest.raises(UnexpectedMessage):
            decode_gossip(topic, batch)
    part = BlockPart(Height(5), Round(0), H, 0, b"x", ()).encode()
    assert isinstance(decode_gossip(Topic.PROPOSALS, part), BlockPart)
    with pytest.raises(UnexpectedMessage):
        decode_gossip(Topic.TXS, part)


def test_requests_per_protocol_and_responses() -> None:
    req = GetCommit(Height(3)).encode()
    assert decode_request(PROTOCOL_CATCHUP, req) == GetCommit(Height(3))
    with pytest.raises(UnexpectedMessage):
        decode_request(PROTOCOL_SYNC, req)
    with pytest.raises(UnexpectedMessage):
        decode_request("/unknown/1", req)
    resp = CommitResponse(None).encode()
    assert decode_response(CommitResponse, resp) == CommitResponse(None)
    with pytest.raises(UnexpectedMessage):
        decode_response(StatusResponse, resp)
    with pytest.raises(RemoteError) as info:
        decode_response(CommitResponse, error_response(1500, "no such height"))
    assert info.value.remote_code == 1500
    # Long messages are cut to fit, on a character boundary.
    err = decode_message(error_response(1, "é" * 1000), (ErrorResponse,))
    assert isinstance(err, ErrorResponse) and len(err.message.encode()) <= 256


def test_non_canonical_and_malformed_are_rejected() -> None:
    good = GetCommit(Height(3)).encode()
    with pytest.raises(NonCanonicalEncoding):  # kind as uint8 instead of a fixint
        GetCommit.decode(b"\x92\xcc" + good[1:2] + good[2:])
    with pytest.raises(DecodeError):
        GetCommit.decode(good + b"\x00")
    with pytest.raises(DecodeError):
        GetCommit.decode(b"")
    with pytest.raises(DecodeError):  # missing field
        GetCommit.decode(pack((GetCommit.KIND,)))
    with pytest.raises(DecodeError):  # extra field
        GetCommit.decode(pack((GetCommit.KIND, 3, 4)))
    with pytest.raises(DecodeError):  # not an array
        GetCommit.decode(pack(5))
    with pytest.raises(DecodeError):  # kind is not an int
        GetCommit.decode(pack(("x", 3)))
    with pytest.raises(DecodeError):  # a map
        GetCommit.decode(msgpack.packb({1: 2}))


def _raw(cls: type[WireMessage], *fields: Any) -> bytes:
    return pack((cls.KIND, *fields))


@pytest.mark.parametrize(
    ("cls", "fields"),
    [
        (TxBatch, ((),)),
        (TxBatch, ((b"a", b"a"),)),
        (TxBatch, ((b"",),)),
        (TxAnnounce, ((),)),
        (TxAnnounce, ((H, H),)),
        (BlockPart, (5, 0, H, 0, b"", ())),
        (BlockPart, (5, 0, H, MAX_BLOCK_PARTS, b"x", ())),
        (VoteBatch, ((),)),
        (EvidenceMessage, ((),)),
        (GetParts, (5, 0, H, ())),
        (GetParts, (5, 0, H, (2, 1))),
        (GetParts, (5, 0, H, (1, 1))),
        (GetParts, (5, 0, H, (MAX_BLOCK_PARTS,))),
        (GetTxs, ((H, H),)),
        (StatusResponse, (5, 4, H)),
        (GetBlocks, (1, 0)),
        (GetBlocks, (1, MAX_SYNC_BLOCKS + 1)),
        (GetHeaders, (1, 0)),
        (HasVotes, (5, 0, 3, (7, b"\x01"))),  # unknown vote type
        (HasVotes, (5, 0, 1, (7, b"\x80"))),  # a bit past the end
        (HasVotes, (5, 0, 1, (9, b"\x01"))),  # too short for 9 bits
        (HasVotes, (5, 0, 1, (8, b"\x01\x00"))),  # too long for 8 bits
        (GetVotes, (5, 0, 0, (0, b""))),
        (RoundStateMessage, (5, 0, 4, (0, b""), (0, b""))),
        (RoundStateMessage, (5, 0, 1, (8, b"\x00"), (16, b"\x00\x00"))),
    ],
)
def test_inconsistent_fields_are_invalid(cls: type[WireMessage], fields: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidMessage):
        cls.decode(_raw(cls, *fields))


def test_proposal_must_carry_the_signed_header() -> None:
    msg = proposal_message()
    wire = msg.to_wire()
    other = header(5, 1).to_wire()
    with pytest.raises(InvalidMessage):
        decode_message(pack((msg.KIND, wire[0], other, wire[2])), (type(msg),))
    with pytest.raises(InvalidMessage):  # pol_round must be below round
        bad = proposal_message(round=2, pol_round=2)
        decode_message(pack((bad.KIND, *bad.to_wire())), (type(msg),))


def test_sync_responses_must_be_consecutive_and_match_commits() -> None:
    b5, b7 = block(5), block(7)
    gap = BlocksResponse(
        (BlockWithCommit(b5, commit_for(b5.header)), BlockWithCommit(b7, commit_for(b7.header)))
    )
    with pytest.raises(InvalidMessage):
        BlocksResponse.decode(pack((BlocksResponse.KIND, *gap.to_wire())))
    wrong = HeadersResponse((HeaderWithCommit(b5.header, commit_for(b7.header)),))
    with pytest.raises(InvalidMessage):
        HeadersResponse.decode(pack((HeadersResponse.KIND, *wrong.to_wire())))
    with pytest.raises(EncodeError):  # encoding checks too: we never send what we reject
        gap.encode()


def test_size_limits() -> None:
    big = b"x" * (MAX_TX_BATCH_BYTES - 100)
    TxBatch((big,)).encode()
    with pytest.raises(EncodeError):
        TxBatch((big, b"y" * 200)).encode()
    with pytest.raises(TooLarge):
        TxBatch.decode(_raw(TxBatch, (big, b"y" * 200)))
    with pytest.raises(TooLarge):  # a part above 256 KiB
        BlockPart.decode(_raw(BlockPart, 5, 0, H, 0, b"x" * (MAX_PART_BYTES + 1), ()))
    with pytest.raises(TooLarge):  # too many proof hashes
        BlockPart.decode(_raw(BlockPart, 5, 0, H, 0, b"x", (H,) * 33))
    with pytest.raises(TooLarge):  # checked before unpacking: far above any gossip kind
        decode_gossip(Topic.VOTES, b"\x00" * (1 << 20))
    with pytest.raises(TooLarge):
        Ping.decode(_raw(Ping, 1) + b"\x00" * 64)


def test_bitmap() -> None:
    bm = Bitmap.of(10, [0, 9, 4])
    assert bm.indices() == [0, 4, 9]
    assert 9 in bm and 1 not in bm and 10 not in bm and -1 not in bm
    assert bm.count() == 3
    assert bm.complement().indices() == [1, 2, 3, 5, 6, 7, 8]
    assert Bitmap.of(0).bits == b""
    with pytest.raises(ValueError):
        Bitmap.of(3, [3])


def test_pack_tx_batches() -> None:
    txs = [i.to_bytes(2, "big") * 500 for i in range(600)] + [b"L" * (MAX_TX_BATCH_BYTES + 1)]
    batches, announces = pack_tx_batches([*txs, txs[0]])
    assert [t for b in batches for t in b.txs] == txs[:600]
    assert len(batches) == 3
    for b in batches:
        assert len(b.encode()) <= MAX_TX_BATCH_BYTES
    assert announces == [TxAnnounce((crypto.sha256(txs[-1]),))]
    assert pack_tx_batches([]) == ([], [])


def test_take_within() -> None:
    b = block(5, txs=(b"t" * 1000,))
    items = [BlockWithCommit(b, commit_for(b.header))] * 10
    one = len(pack(items[0].to_wire()))
    got = take_within(items, 3 * one + 100)
    assert len(got) == 3
    assert take_within(items, 10**9, max_items=4) == tuple(items[:4])
    assert take_within(items, 10) == ()


# --- property tests ------------------------------------------------------------------------

ALL_DECODERS = (
    [lambda d, t=t: decode_gossip(t, d) for t in Topic]
    + [lambda d, p=p: decode_request(p, d) for p in REQUEST_TYPES]
    + [lambda d, c=c: decode_response(c, d) for c in set(RESPONSE_TYPES.values())]
)

leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40)
trees = st.recursive(leaves, lambda inner: st.lists(inner, max_size=6).map(tuple), max_leaves=30)


def _only_decode_errors(data: bytes) -> None:
    for decode in ALL_DECODERS:
        try:
            msg = decode(data)
        except RemoteError:
            continue
        except DecodeError:
            continue
        assert msg.encode() == data  # whatever decodes is canonical


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_decode_errors(data: bytes) -> None:
    _only_decode_errors(data)


@given(
    st.sampled_from(sorted({type(m).KIND for m in samples()})),
    st.lists(trees, max_size=6),
)
def test_random_trees_with_a_real_kind_only_raise_decode_errors(
    kind: int, fields: list[Any]
) -> None:
    _only_decode_errors(pack((kind, *fields)))


@given(st.sampled_from(samples()), st.data())
def test_mutated_messages_only_raise_decode_errors(msg: WireMessage, data: st.DataObject) -> None:
    raw = bytearray(msg.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    _only_decode_errors(bytes(raw[:cut]))


def test_block_round_trips_inside_a_sync_response() -> None:
    b = block(5, txs=tuple(bytes([i]) * 100 for i in range(50)))
    resp = BlocksResponse((BlockWithCommit(b, commit_for(b.header)),))
    back = BlocksResponse.decode(resp.encode())
    assert back.blocks[0].block == b
    assert Block.decode(b.encode()) == b
    assert PartSetHeader(1, H) == PartSetHeader(1, H)

"""Sample wire records for the p2p tests: signed votes and proposals by dev keys, a block."""

from __future__ import annotations

from node.consensus.blocks import (
    Block,
    Commit,
    DuplicateVoteEvidence,
    Header,
    Proposal,
    SignedVote,
    Vote,
    VoteType,
    sign_proposal,
    sign_vote,
)
from node.devkeys import dev_key
from node.p2p.messages import PartSetHeader, ProposalMessage
from node.types import Address, ChainId, Hash32, Height, Round, TimestampMs

CHAIN_ID = ChainId(4242)
H = Hash32(b"\x11" * 32)


def header(height: int = 5, round: int = 0, proposer: int = 0) -> Header:
    return Header(
        chain_id=CHAIN_ID,
        height=Height(height),
        round=Round(round),
        parent_hash=H,
        time=TimestampMs(1_700_000_000_000 + height),
        proposer=dev_key(proposer).address,
        tx_root=H,
        receipts_root=H,
        state_root=H,
        validators_hash=H,
        next_validators_hash=H,
        last_commit_hash=H,
        evidence_root=H,
    )


def vote(
    key: int = 0,
    height: int = 5,
    round: int = 0,
    vote_type: int = VoteType.PREVOTE,
    block_hash: bytes | None = H,
) -> SignedVote:
    v = Vote(
        int(vote_type),
        Height(height),
        Round(round),
        None if block_hash is None else Hash32(block_hash),
        TimestampMs(1_700_000_000_000),
        dev_key(key).address,
    )
    return sign_vote(dev_key(key), CHAIN_ID, v)


def commit_for(hdr: Header, signers: range = range(3)) -> Commit:
    votes = tuple(vote(k, hdr.height, 0, VoteType.PRECOMMIT, hdr.hash()) for k in signers)
    return Commit(hdr.height, Round(0), hdr.hash(), votes)


def block(height: int = 5, txs: tuple[bytes, ...] = (b"tx-a", b"tx-b")) -> Block:
    return Block(header(height), txs, (), None)


def evidence() -> DuplicateVoteEvidence:
    return DuplicateVoteEvidence(vote(1, block_hash=H), vote(1, block_hash=None))


def proposal_message(
    height: int = 5, round: int = 0, pol_round: int | None = None
) -> ProposalMessage:
    hdr = header(height, 0)
    p = Proposal(Height(height), Round(round), hdr.hash(), pol_round, dev_key(0).address)
    return ProposalMessage(sign_proposal(dev_key(0), CHAIN_ID, p), hdr, PartSetHeader(3, H))


def address(i: int) -> Address:
    return dev_key(i).address

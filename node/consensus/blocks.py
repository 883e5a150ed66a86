"""Blocks, votes, proposals, commits and evidence (DESIGN §5).

The block id is ``sha256(encode(Header))``. The header commits to the transactions (Merkle root of
transaction ids), the receipts, the state root after the block, the validator sets of this and the
next height, the last commit and the evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from node import crypto
from node.encoding import Record, limit
from node.merkle import merkle_root
from node.types import Address, ChainId, Hash32, Height, Round, Signature, TimestampMs

MAX_BLOCK_TXS_HARD = 100_000
MAX_COMMIT_VOTES = 10_000
MAX_EVIDENCE = 1_000


class VoteType(IntEnum):
    PREVOTE = 1
    PRECOMMIT = 2


@dataclass(frozen=True, slots=True)
class Header(Record):
    chain_id: ChainId
    height: Height
    round: Round
    parent_hash: Hash32
    time: TimestampMs
    proposer: Address
    tx_root: Hash32
    receipts_root: Hash32
    state_root: Hash32
    validators_hash: Hash32
    next_validators_hash: Hash32
    last_commit_hash: Hash32
    evidence_root: Hash32

    def hash(self) -> Hash32:
        return crypto.sha256(self.encode())


@dataclass(frozen=True, slots=True)
class Vote(Record):
    """A prevote or precommit; ``block_hash`` None is a vote for nil. Signed with TAG_VOTE."""

    vote_type: int
    height: Height
    round: Round
    block_hash: Hash32 | None
    time: TimestampMs
    validator: Address


@dataclass(frozen=True, slots=True)
class SignedVote(Record):
    vote: Vote
    signature: Signature


@dataclass(frozen=True, slots=True)
class Proposal(Record):
    """The proposer's signed claim for (height, round); ``pol_round`` None is Tendermint's −1."""

    height: Height
    round: Round
    block_hash: Hash32
    pol_round: int | None
    proposer: Address


@dataclass(frozen=True, slots=True)
class SignedProposal(Record):
    proposal: Proposal
    signature: Signature


@dataclass(frozen=True, slots=True)
class Commit(Record):
    """The precommits (for ``block_hash`` in ``round``) that finalized the block at ``height``."""

    height: Height
    round: Round
    block_hash: Hash32
    precommits: tuple[SignedVote, ...] = field(metadata=limit(MAX_COMMIT_VOTES))

    def hash(self) -> Hash32:
        return crypto.sha256(self.encode())


@dataclass(frozen=True, slots=True)
class DuplicateVoteEvidence(Record):
    """Two conflicting votes of one validator for the same height, round and type."""

    vote_a: SignedVote
    vote_b: SignedVote


@dataclass(frozen=True, slots=True)
class Block(Record):
    header: Header
    txs: tuple[bytes, ...] = field(metadata=limit(MAX_BLOCK_TXS_HARD))
    evidence: tuple[DuplicateVoteEvidence, ...] = field(metadata=limit(MAX_EVIDENCE))
    last_commit: Commit | None

    def hash(self) -> Hash32:
        return self.header.hash()


def compute_tx_root(txs: tuple[bytes, ...] | list[bytes]) -> Hash32:
    return merkle_root([crypto.sha256(t) for t in txs])


def compute_evidence_root(evidence: tuple[DuplicateVoteEvidence, ...]) -> Hash32:
    return merkle_root([e.encode() for e in evidence])


def compute_last_commit_hash(commit: Commit | None) -> Hash32:
    return Hash32(b"\x00" * 32) if commit is None else commit.hash()


def sign_vote(key: crypto.PrivateKey, chain_id: int, vote: Vote) -> SignedVote:
    return SignedVote(vote, key.sign(crypto.TAG_VOTE, chain_id, vote.encode()))


def sign_proposal(key: crypto.PrivateKey, chain_id: int, proposal: Proposal) -> SignedProposal:
    return SignedProposal(proposal, key.sign(crypto.TAG_PROPOSAL, chain_id, proposal.encode()))


def vote_signer(chain_id: int, signed: SignedVote) -> Address:
    return crypto.recover_signer(crypto.TAG_VOTE, chain_id, signed.vote.encode(), signed.signature)


def proposal_signer(chain_id: int, signed: SignedProposal) -> Address:
    return crypto.recover_signer(
        crypto.TAG_PROPOSAL, chain_id, signed.proposal.encode(), signed.signature
    )

"""The sign-state: what this validator signed last, so it never signs two conflicting messages.

DESIGN §5 "Crash safety of a validator": before a vote or proposal leaves the process it is
appended to the synced consensus WAL together with the new ``SignState`` (height, round, step,
hash of the signed bytes, signature). ``check_sign`` is the pure guard every signature goes
through:

* the same (height, round, step) with the same bytes → re-send the previous signature (a restarted
  validator asked to sign the same thing again sends an identical message);
* the same (height, round, step) with different bytes, or any (height, round, step) lower than
  the last signed one → ``ConflictingSignature`` (signing it could be equivocation);
* anything higher → sign.

Steps are ordered propose < prevote < precommit (the order of one round of Tendermint's
Algorithm 1, arXiv:1807.04938).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from node import crypto
from node.consensus.blocks import (
    Proposal,
    SignedProposal,
    SignedVote,
    Vote,
    VoteType,
)
from node.encoding import Record
from node.errors import ConflictingSignature, InvalidVote
from node.types import Hash32, Height, Round, Signature


class Step(IntEnum):
    """The step of a round; also the order in which a validator signs within a round."""

    PROPOSE = 1
    PREVOTE = 2
    PRECOMMIT = 3


@dataclass(frozen=True, slots=True)
class SignState(Record):
    """The last message this validator signed."""

    height: Height
    round: Round
    step: int  # a Step
    signed_bytes_hash: Hash32
    signature: Signature


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of ``check_sign``: sign afresh, or re-send ``resend_signature`` unchanged."""

    resend_signature: Signature | None

    @property
    def is_resend(self) -> bool:
        return self.resend_signature is not None


SIGN_NEW = Decision(None)


def check_sign(
    previous: SignState | None, height: int, round: int, step: Step | int, sign_bytes: bytes
) -> Decision:
    """Decide whether ``sign_bytes`` for (height, round, step) may be signed after ``previous``.

    Raises ``ConflictingSignature`` for a different message at the same (height, round, step) or
    for any (height, round, step) below the last one signed.
    """
    step = Step(step)
    if previous is None:
        return SIGN_NEW
    last = (previous.height, previous.round, previous.step)
    here = (height, round, int(step))
    if here > last:
        return SIGN_NEW
    if here < last:
        raise ConflictingSignature(
            f"already signed height {previous.height} round {previous.round} "
            f"{Step(previous.step).name.lower()}; refusing height {height} round {round} "
            f"{step.name.lower()}"
        )
    if crypto.sha256(sign_bytes) != previous.signed_bytes_hash:
        raise ConflictingSignature(
            f"already signed a different {step.name.lower()} at height {height} round {round}"
        )
    return Decision(previous.signature)


def step_of_vote(vote: Vote) -> Step:
    if vote.vote_type == VoteType.PREVOTE:
        return Step.PREVOTE
    if vote.vote_type == VoteType.PRECOMMIT:
        return Step.PRECOMMIT
    raise InvalidVote(f"unknown vote type {vote.vote_type}")


def compute_sign_state(
    height: int, round: int, step: Step | int, sign_bytes: bytes, signature: Signature
) -> SignState:
    """The sign-state to persist after signing ``sign_bytes`` at (height, round, step)."""
    return SignState(
        Height(height), Round(round), int(Step(step)), crypto.sha256(sign_bytes), signature
    )


def sign_vote_guarded(
    key: crypto.PrivateKey, chain_id: int, previous: SignState | None, vote: Vote
) -> tuple[SignedVote, SignState]:
    """Sign ``vote`` through the sign-state guard; returns the signed vote and the new sign-state.

    The caller appends both to the WAL (synced) before the vote leaves the process.
    """
    step = step_of_vote(vote)
    encoded = vote.encode()
    decision = check_sign(previous, vote.height, vote.round, step, encoded)
    signature = decision.resend_signature or key.sign(crypto.TAG_VOTE, chain_id, encoded)
    return (
        SignedVote(vote, signature),
        compute_sign_state(vote.height, vote.round, step, encoded, signature),
    )


def sign_proposal_guarded(
    key: crypto.PrivateKey, chain_id: int, previous: SignState | None, proposal: Proposal
) -> tuple[SignedProposal, SignState]:
    """Sign ``proposal`` through the sign-state guard (step propose)."""
    encoded = proposal.encode()
    decision = check_sign(previous, proposal.height, proposal.round, Step.PROPOSE, encoded)
    signature = decision.resend_signature or key.sign(crypto.TAG_PROPOSAL, chain_id, encoded)
    return (
        SignedProposal(proposal, signature),
        compute_sign_state(proposal.height, proposal.round, Step.PROPOSE, encoded, signature),
    )

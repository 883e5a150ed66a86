"""Evidence of equivocation: the pure checks and the evidence pool (DESIGN §5 "Evidence").

Evidence is two validly signed votes of one validator for the same height, round and type with
different block hashes (``DuplicateVoteEvidence``; nil against a block counts). It travels in a
block's body, not as a transaction, and is valid in block ``h`` when

* its form is right (``check_evidence_form``): both votes prevotes or both precommits, same
  height (≥ 1), round and validator, different block hashes, ``vote_a`` before ``vote_b`` in
  encoding order (one byte form per pair: the engine sorts them so);
* it is not too old: ``vote height ≤ h`` and ``h − vote height ≤ evidence_max_age``;
* it is new: no evidence with the same key (validator, height, round, type) was processed before
  (state keeps the keys until they age out), so one offence is punished once;
* the validator is a member of the validator set of the vote's height (state keeps the sets of
  the last ``evidence_max_age`` heights);
* both signatures recover to the validator (checked last: the expensive part).

Its effect (``node.consensus.transition``): the validator is removed from the set at h+2 (even
below the floor; only a set's last member stays, since an empty set could never sign again), its
whole bond is slashed — **burned** (added to ``Supply.burned``, like fees' cost part, so
``balances + bonds + burned == issued`` holds) — and any unbonding of that bond is cancelled. The
bond is gone, so rejoining takes a new bond and a new add vote.

``EvidencePool`` holds evidence this node saw (its engine's ``RecordEvidence``, the evidence
gossip topic) until a block includes it or it ages out; the proposer passes ``pending()`` to
``build_block``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from node import crypto
from node.consensus.blocks import DuplicateVoteEvidence, VoteType, vote_signer
from node.consensus.validators import ValidatorSet
from node.encoding import pack
from node.errors import (
    DuplicateEvidence,
    EvidenceOfNonValidator,
    EvidenceSignatureError,
    ExpiredEvidence,
    InvalidEvidence,
    InvalidSignature,
    NonConflictingEvidence,
)
from node.types import Address, Hash32

# --- pure checks -------------------------------------------------------------------------------


def evidence_key(ev: DuplicateVoteEvidence) -> Hash32:
    """The offence the evidence proves: sha256 of [validator, height, round, vote type]."""
    v = ev.vote_a.vote
    return crypto.sha256(pack((v.validator, v.height, v.round, v.vote_type)))


def evidence_height(ev: DuplicateVoteEvidence) -> int:
    return int(ev.vote_a.vote.height)


def evidence_validator(ev: DuplicateVoteEvidence) -> Address:
    return ev.vote_a.vote.validator


def check_evidence_form(ev: DuplicateVoteEvidence) -> None:
    """The stateless shape of an equivocation (no signatures checked)."""
    a, b = ev.vote_a.vote, ev.vote_b.vote
    if a.vote_type not in (VoteType.PREVOTE, VoteType.PRECOMMIT):
        raise NonConflictingEvidence(f"vote type {a.vote_type} is neither prevote nor precommit")
    if a.vote_type != b.vote_type:
        raise NonConflictingEvidence("the votes are of different types")
    if a.validator != b.validator:
        raise NonConflictingEvidence("the votes are of different validators")
    if a.height != b.height or a.round != b.round:
        raise NonConflictingEvidence("the votes are for different heights or rounds")
    if a.height < 1:
        raise NonConflictingEvidence("votes of height 0 do not exist")
    if a.block_hash == b.block_hash:
        raise NonConflictingEvidence("the votes are for the same block: no equivocation")
    if not ev.vote_a.encode() < ev.vote_b.encode():
        raise NonConflictingEvidence("vote_a must come before vote_b in encoding order")


def check_evidence_signatures(chain_id: int, ev: DuplicateVoteEvidence) -> None:
    """Both votes recover to their validator under ``chain_id``."""
    for name, signed in (("vote_a", ev.vote_a), ("vote_b", ev.vote_b)):
        try:
            signer = vote_signer(chain_id, signed)
        except InvalidSignature as exc:
            raise EvidenceSignatureError(f"{name}: {exc.message}") from exc
        if signer != signed.vote.validator:
            raise EvidenceSignatureError(f"{name} is not signed by its validator")


def check_evidence_age(ev: DuplicateVoteEvidence, height: int, max_age: int) -> None:
    """Evidence may go into block ``height`` if its votes are at most ``max_age`` heights old."""
    vote_height = evidence_height(ev)
    if vote_height > height:
        raise InvalidEvidence(
            f"evidence for height {vote_height} cannot be in block {height}: it is from a later "
            "height"
        )
    if height - vote_height > max_age:
        raise ExpiredEvidence(
            f"evidence for height {vote_height} is {height - vote_height} heights old in block "
            f"{height}; evidence_max_age is {max_age}"
        )


def check_evidence(
    chain_id: int,
    ev: DuplicateVoteEvidence,
    *,
    height: int,
    max_age: int,
    validators_at: Callable[[int], ValidatorSet],
    seen: Callable[[Hash32], bool],
) -> None:
    """Everything that makes ``ev`` valid in block ``height``; raises an ``InvalidEvidence``.

    ``validators_at(h)`` gives the set of height h, ``seen(key)`` whether evidence with that key
    was processed before. Cheap checks first; signatures last.
    """
    check_evidence_form(ev)
    check_evidence_age(ev, height, max_age)
    if seen(evidence_key(ev)):
        raise DuplicateEvidence(
            f"evidence against 0x{evidence_validator(ev).hex()} for height "
            f"{evidence_height(ev)} round {ev.vote_a.vote.round} was already processed"
        )
    vote_height = evidence_height(ev)
    if not validators_at(vote_height).is_member(evidence_validator(ev)):
        raise EvidenceOfNonValidator(
            f"0x{evidence_validator(ev).hex()} is not a validator of height {vote_height}"
        )
    check_evidence_signatures(chain_id, ev)


# --- the pool ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pooled:
    evidence: DuplicateVoteEvidence
    key: Hash32
    height: int
    order: tuple[int, int, int, bytes]  # (vote height, round, type, validator): oldest first


class EvidencePool:
    """Evidence waiting for a block: de-duplicated by offence, bounded, oldest first.

    Not thread-safe (the consensus task owns it). The pool checks only form and age; the caller
    checks the rest against the committed state before adding (``ChainService.check_evidence``:
    signatures, membership, not processed), so spam cannot fill it: only real equivocations of
    real validators pass. Evidence the chain processed, or that a block build rejected, is
    remembered by key until it ages out so gossip does not bring it back.
    """

    def __init__(self, max_age: int, max_items: int = 1_000) -> None:
        if max_age < 1 or max_items < 1:
            raise ValueError("max_age and max_items must be positive")
        self.max_age = max_age
        self.max_items = max_items
        self._items: dict[Hash32, _Pooled] = {}
        self._done: dict[Hash32, int] = {}  # key -> vote height, until it ages out

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, ev: object) -> bool:
        return isinstance(ev, DuplicateVoteEvidence) and evidence_key(ev) in self._items

    def add(self, ev: DuplicateVoteEvidence, *, head_height: int) -> bool:
        """Keep ``ev`` for the blocks after ``head_height``; False if known or the pool is full.

        Raises ``NonConflictingEvidence`` / ``InvalidEvidence`` for a malformed pair and
        ``ExpiredEvidence`` if it can no longer go into block ``head_height + 1``.
        """
        check_evidence_form(ev)
        check_evidence_age(ev, max(head_height + 1, evidence_height(ev)), self.max_age)
        key = evidence_key(ev)
        if key in self._items or key in self._done:
            return False
        if len(self._items) >= self.max_items:
            return False
        v = ev.vote_a.vote
        self._items[key] = _Pooled(
            ev, key, int(v.height), (int(v.height), int(v.round), int(v.vote_type), v.validator)
        )
        return True

    def pending(self, max_count: int, *, head_height: int) -> list[DuplicateVoteEvidence]:
        """Up to ``max_count`` items for block ``head_height + 1``, oldest first (evidence of a
        later height waits)."""
        self.prune(head_height)
        due = (p for p in self._items.values() if p.height <= head_height + 1)
        items = sorted(due, key=lambda p: p.order)
        return [p.evidence for p in items[: max(0, max_count)]]

    def mark_done(self, evidence: Iterable[DuplicateVoteEvidence]) -> None:
        """Forget ``evidence`` (committed in a block, or rejected by a build) and keep its key
        until it ages out."""
        for ev in evidence:
            key = evidence_key(ev)
            self._items.pop(key, None)
            self._done[key] = evidence_height(ev)

    def update(self, committed: Sequence[DuplicateVoteEvidence], head_height: int) -> None:
        """After block ``head_height`` is committed with ``committed`` in its body."""
        self.mark_done(committed)
        self.prune(head_height)
        # The remembered keys are bounded too: the oldest go first (they age out first anyway).
        excess = len(self._done) - 10 * self.max_items
        if excess > 0:
            for key, _ in sorted(self._done.items(), key=lambda kv: kv[1])[:excess]:
                del self._done[key]

    def prune(self, head_height: int) -> None:
        """Drop what can no longer go into block ``head_height + 1``."""
        oldest = head_height + 1 - self.max_age
        for key in [k for k, p in self._items.items() if p.height < oldest]:
            del self._items[key]
        for key in [k for k, h in self._done.items() if h < oldest]:
            del self._done[key]


__all__ = [
    "DuplicateEvidence",
    "EvidenceOfNonValidator",
    "EvidencePool",
    "EvidenceSignatureError",
    "ExpiredEvidence",
    "InvalidEvidence",
    "NonConflictingEvidence",
    "check_evidence",
    "check_evidence_age",
    "check_evidence_form",
    "check_evidence_signatures",
    "evidence_height",
    "evidence_key",
    "evidence_validator",
]

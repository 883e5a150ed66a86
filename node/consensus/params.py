"""Chain parameters: fixed ones from genesis (``ChainParams``) and votable ones kept in state.

The votable parameters (``VotableParams``: timeouts, block limits, the fee table) live in state
under ``state.PARAMS_KEY`` with their genesis values and change only by a parameter vote of the
validators (PARAM_VOTE), effective two heights later (DESIGN §4, §5).

``AuthorityParams`` (minimum bond, vote expiry, unbonding period, per-block caps of the chain's own
work) are fixed at genesis like ``ChainParams``, but a record of their own, kept in the genesis
state: ``ChainParams`` and ``VotableParams`` have encodings pinned by tests/vectors, and a state
record is what the pure transition can read without a new argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from node.encoding import Record, limit
from node.types import Amount, ChainId, TimestampMs


@dataclass(frozen=True, slots=True)
class FeeSchedule(Record):
    """Cost of one transaction kind: base + per byte of the signed tx + per unit of work caused."""

    kind: int
    base: Amount
    per_byte: Amount
    per_signature: Amount
    per_new_account: Amount


@dataclass(frozen=True, slots=True)
class VotableParams(Record):
    timeout_propose_ms: int
    timeout_propose_delta_ms: int
    timeout_prevote_ms: int
    timeout_prevote_delta_ms: int
    timeout_precommit_ms: int
    timeout_precommit_delta_ms: int
    timeout_commit_ms: int  # the block interval: the pause after a decision
    max_block_bytes: int
    max_block_txs: int
    max_tx_bytes: int
    fees: tuple[FeeSchedule, ...] = field(metadata=limit(256))

    def fee_schedule(self, kind: int) -> FeeSchedule | None:
        for f in self.fees:
            if f.kind == kind:
                return f
        return None


@dataclass(frozen=True, slots=True)
class ChainParams(Record):
    """Fixed at genesis."""

    chain_id: ChainId
    genesis_time: TimestampMs  # the first block's time
    state_history_blocks: int  # proofs can be served for this many recent heights
    evidence_max_age: int  # heights
    validator_floor: int  # votes and exits cannot take the set below this size


@dataclass(frozen=True, slots=True)
class AuthorityParams(Record):
    """Validator-set rules, fixed at genesis and kept in state under ``AUTHORITY_PARAMS_KEY``.

    A separate record because ``ChainParams`` and ``VotableParams`` have pinned encodings
    (tests/vectors); it is written into the genesis state so the genesis hash commits to it and the
    pure transition reads it through the state view like the votable parameters.
    ``unbonding_heights`` must exceed ``ChainParams.evidence_max_age``: a bond leaves only after
    every vote its owner signed has aged out of the evidence window (DESIGN §5).
    """

    min_validator_bond: Amount  # a candidate's bond (BOND) must reach this
    vote_expiry_heights: int  # a validator or parameter vote counts for this many heights
    unbonding_heights: int  # an exit's bond returns this many heights after it leaves the set
    max_queue_work_per_block: int  # per height-indexed queue: entries (or heights) per block
    max_block_evidence: int  # evidence items per block


# Sanity ceilings that catch unit mistakes (seconds vs ms, bits vs bytes) in genesis files and
# parameter votes.
MAX_TIMEOUT_MS = 3_600_000
MIN_TX_BYTES = 1024
MAX_BLOCK_BYTES = 64 << 20
# A round's base timeout of 0 would make a round end before any message can arrive; the growth
# per round and the pause after a decision may be 0.
POSITIVE_TIMEOUTS = ("timeout_propose_ms", "timeout_prevote_ms", "timeout_precommit_ms")
TIMEOUT_FIELDS = (
    "timeout_propose_ms",
    "timeout_propose_delta_ms",
    "timeout_prevote_ms",
    "timeout_prevote_delta_ms",
    "timeout_precommit_ms",
    "timeout_precommit_delta_ms",
    "timeout_commit_ms",
)


def votable_params_problem(
    params: VotableParams,
    *,
    known_kinds: frozenset[int],
    max_tx_bytes_hard: int,
    max_block_txs_hard: int,
) -> str | None:
    """Why ``params`` cannot be the chain's votable parameters (None if they can).

    The same rules ``genesis.json`` is checked by: timeouts in range, a block holds at least one
    transaction of the largest size, and one fee schedule per known kind, sorted by kind.
    """
    for name in TIMEOUT_FIELDS:
        value = getattr(params, name)
        lo = 1 if name in POSITIVE_TIMEOUTS else 0
        if not lo <= value <= MAX_TIMEOUT_MS:
            return f"{name} {value} is outside [{lo}, {MAX_TIMEOUT_MS}]"
    if not MIN_TX_BYTES <= params.max_tx_bytes <= max_tx_bytes_hard:
        return f"max_tx_bytes {params.max_tx_bytes} is outside [{MIN_TX_BYTES}, {max_tx_bytes_hard}]"
    if not params.max_tx_bytes <= params.max_block_bytes <= MAX_BLOCK_BYTES:
        return (
            f"max_block_bytes {params.max_block_bytes} is outside "
            f"[max_tx_bytes {params.max_tx_bytes}, {MAX_BLOCK_BYTES}]"
        )
    if not 1 <= params.max_block_txs <= max_block_txs_hard:
        return f"max_block_txs {params.max_block_txs} is outside [1, {max_block_txs_hard}]"
    kinds = [f.kind for f in params.fees]
    if kinds != sorted(set(kinds)):
        return "fee schedules must be sorted by kind, one per kind"
    missing = sorted(known_kinds - set(kinds))
    if missing:
        return f"no fee schedule for transaction kind(s) {missing}"
    unknown = sorted(set(kinds) - known_kinds)
    if unknown:
        return f"fee schedule for unknown transaction kind(s) {unknown}"
    return None

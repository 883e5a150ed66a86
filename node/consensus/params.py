"""Chain parameters: fixed ones from genesis (``ChainParams``) and votable ones kept in state.

The votable parameters (``VotableParams``: timeouts, block limits, the fee table) live in state
under ``state.PARAMS_KEY`` with their genesis values and change only by a parameter vote of the
validators, effective two heights later (DESIGN §4, §5).
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

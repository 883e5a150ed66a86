"""The consensus-enforced fee table (DESIGN §4).

``cost(tx) = base + per_byte · size + per_signature · signatures + per_new_account · records``
from the kind's ``FeeSchedule`` in the votable parameters. ``records`` counts the state records
the transaction adds: a transfer's new account; a first bond's bond record; the unbonding record
(with its queue entry) of an exit; the vote a validator or parameter vote adds to its tally (a
parameter proposal's own bytes are in the per-byte part); for the economy's kinds, what their
handler's ``new_records`` counts (records created, composite ranges resolved, proof segments
verified). A transaction is valid only if
``fee ≥ cost(tx)``. The cost is burned; the rest of the fee (the tip) goes to the block's
proposer. Burning the whole cost — not only the per-kind base — is what makes filling one's own
blocks cost the proposer real NSD (see docs/adr/0002-fees-burn-cost.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from node.consensus.params import VotableParams
from node.consensus.state import StateView, account_key, validator_key
from node.consensus.txs import Transfer, TxKind, VerifiedTransaction
from node.economy.registry import HANDLERS as ECONOMY_HANDLERS
from node.errors import UnknownKind
from node.types import Amount


@dataclass(frozen=True, slots=True)
class FeeSplit:
    cost: Amount  # burned
    tip: Amount  # to the proposer


def compute_cost(
    params: VotableParams, kind: int, size: int, *, signatures: int = 1, new_accounts: int = 0
) -> Amount:
    schedule = params.fee_schedule(kind)
    if schedule is None:
        raise UnknownKind(f"no fee schedule for transaction kind {kind}")
    return Amount(
        schedule.base
        + schedule.per_byte * size
        + schedule.per_signature * signatures
        + schedule.per_new_account * new_accounts
    )


def count_new_accounts(view: StateView, vtx: VerifiedTransaction) -> int:
    """State records this transaction would create (the fee table's ``per_new_account`` unit),
    read from the state before it."""
    kind = vtx.tx.kind
    if kind == TxKind.TRANSFER:
        body = vtx.body
        assert isinstance(body, Transfer)  # kind dispatch guarantees it
        return 0 if view.get(account_key(body.to)) is not None else 1
    if kind == TxKind.BOND:
        return 0 if view.get(validator_key(vtx.sender)) is not None else 1
    if kind in _ONE_RECORD_KINDS:
        return 1
    handler = ECONOMY_HANDLERS.get(kind)
    if handler is not None:
        return handler.new_records(view, vtx)
    return 0


_ONE_RECORD_KINDS = frozenset({TxKind.UNBOND, TxKind.VALIDATOR_VOTE, TxKind.PARAM_VOTE})


def cost_of(params: VotableParams, view: StateView, vtx: VerifiedTransaction) -> Amount:
    return compute_cost(
        params, vtx.tx.kind, vtx.size, new_accounts=count_new_accounts(view, vtx)
    )


def split_fee(fee: int, cost: int) -> FeeSplit:
    if fee < cost:
        raise ValueError("fee below cost")
    return FeeSplit(Amount(cost), Amount(fee - cost))

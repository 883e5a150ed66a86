"""The economy's transaction kinds and end-of-block work, collected for the state transition.

``node.consensus.txs`` merges ``HANDLERS`` into its body table (decoding, stateless checks,
``make_transaction``), ``node.consensus.fees`` counts their records with ``new_records``,
and ``node.consensus.transition`` dispatches their ``apply`` and runs ``END_BLOCK`` after its own
queues. Economy modules import the consensus modules only for typing, so this import direction
(consensus → economy) has no cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.consensus.state import StateView
from node.economy import composite, datasets, deals, models, purchases, roles, tasks
from node.economy.api import EndBlockFn, KindHandler

if TYPE_CHECKING:
    from node.consensus.txs import VerifiedTransaction


def _collect(*groups: tuple[KindHandler, ...]) -> dict[int, KindHandler]:
    out: dict[int, KindHandler] = {}
    for group in groups:
        for handler in group:
            if handler.kind in out:  # pragma: no cover - a programming error caught at import
                raise RuntimeError(f"two economy handlers for kind {handler.kind}")
            out[int(handler.kind)] = handler
    return dict(sorted(out.items()))


HANDLERS: dict[int, KindHandler] = _collect(
    roles.HANDLERS,
    datasets.HANDLERS,
    composite.HANDLERS,
    purchases.HANDLERS,
    deals.HANDLERS,
    models.HANDLERS,
    tasks.HANDLERS,
)
"""Every economy kind, by kind number (sorted)."""

# Run in this order at the end of every block, after the transition's own queues.
END_BLOCK: tuple[EndBlockFn, ...] = (purchases.end_block, deals.end_block, tasks.end_block)


def max_spend(view: StateView, vtx: VerifiedTransaction) -> int | None:
    """What an economy transaction may take from the sender's balance besides its fee (a bond,
    a purchase's price, a deal's escrow, a task's escrow or bond), for the mempool's funds check; None if not economy.

    An upper bound read from ``view``: the transition takes at most this much.
    """
    body = vtx.body
    if isinstance(body, roles.RoleRegister):
        return roles.register_spend(view, body)
    if isinstance(body, purchases.Purchase):
        return body.max_price
    if isinstance(body, tasks.TaskSubmit):
        return tasks.submit_spend(view, body)  # the escrow
    if isinstance(body, tasks.TaskClaim):
        return tasks.claim_spend(view, body)  # the task bond
    if isinstance(body, deals.DealCreate):
        return body.terms.epochs * body.terms.price_per_epoch  # the owner's escrow
    if vtx.tx.kind in HANDLERS:
        return 0
    return None


__all__ = ["END_BLOCK", "HANDLERS", "max_spend"]

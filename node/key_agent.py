"""The owner key agent: posts the content key of this node's priced datasets to their buyers
(DESIGN §8 "Key delivery is a fair exchange").

A buyer's ``Purchase`` puts the price in escrow and a one-off public key on chain; the escrow is
paid to a source's owner only once the owner posts the content key wrapped to that key
(``KeyPost``) before the deadline. This agent does it for the node's **operator account**: after
each committed block it looks at the block's ``Purchase`` transactions (a cheap kind check on each
transaction, then the receipt's ``purchase`` event for the id — bounded work per block), and for
every share whose source's owner is the operator, still awaiting its key, and whose content key
this node holds (``<datadir>/artifact-keys/``, written at upload), it wraps the key to the buyer's
one-off key with ``context = purchase id ‖ source id`` and submits a ``KeyPost`` signed by the
operator account. At start it looks back over ``key_post_heights`` blocks, so purchases made
while the node was down are served if their deadline has not passed. A post that has not reached
the chain a few blocks later is sent again. Keys are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from node import crypto
from node.api import ViewState
from node.artifact_service import ContentKeyStore
from node.consensus.txs import decode_transaction
from node.economy.api import EconomyKind, economy_params
from node.economy.datasets import get_dataset
from node.economy.purchases import (
    KeyPost,
    ShareState,
    get_purchase,
    key_wrap_context,
)
from node.encoding import Record
from node.errors import NeuroSeedError
from node.storage.encryption import wrap_key
from node.types import Address, Hash32

log = logging.getLogger(__name__)

SendTransaction = Callable[[Record], Awaitable[Hash32]]


@dataclass(frozen=True, slots=True)
class KeyAgentSettings:
    poll_interval_s: float = 0.5  # how often the head is checked
    blocks_per_round: int = 64  # blocks looked at per wake-up (bounded work, DESIGN §4)
    purchases_per_block: int = 256  # purchase transactions handled per block
    resubmit_after_blocks: int = 3  # a post not on chain after this many blocks is sent again
    max_lookback: int = 10_000  # blocks scanned at start at most


class KeyAgent:
    """See the module docstring. ``run`` in the node's nursery; ``send`` signs a body with the
    operator key and submits it (the storage agent's ``send_transaction``, so one lock orders the
    operator's nonces)."""

    def __init__(
        self,
        chain: Any,
        send: SendTransaction,
        operator: Address,
        keys: ContentKeyStore,
        settings: KeyAgentSettings | None = None,
    ) -> None:
        self._chain = chain
        self._send = send
        self.operator = operator
        self._keys = keys
        self.settings = settings or KeyAgentSettings()
        self.scanned_height = -1
        # (purchase id, source id) -> height at which the post was sent
        self._sent: dict[tuple[bytes, bytes], int] = {}
        self.posted = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        view = self._chain.read_view()
        head = _head(view)
        lookback = min(economy_params(ViewState(view)).key_post_heights, self.settings.max_lookback)
        self.scanned_height = max(0, head - lookback)
        task_status.started()
        while True:
            await self.step()
            await trio.sleep(self.settings.poll_interval_s)

    async def step(self) -> None:
        """Look at the blocks committed since the last step (at most ``blocks_per_round``) and
        resend posts that did not make it."""
        view = self._chain.read_view()
        head = _head(view)
        stop = min(head, self.scanned_height + self.settings.blocks_per_round)
        for height in range(self.scanned_height + 1, stop + 1):
            await self._scan_block(view, height)
            self.scanned_height = height
        await self._resend(view, head)

    async def _scan_block(self, view: Any, height: int) -> None:
        block = view.get_block(height)
        if block is None:
            return
        seen = 0
        for raw in block.txs:
            if seen >= self.settings.purchases_per_block:
                log.warning("block %d: more purchases than one step handles; rest skipped", height)
                return
            try:
                tx = decode_transaction(raw).tx
            except NeuroSeedError:
                continue
            if tx.kind != EconomyKind.PURCHASE:
                continue
            seen += 1
            location = view.get_transaction(crypto.sha256(raw))
            if location is None:
                continue
            for event in location.receipt.events:
                if event.name == "purchase":
                    pid = _attribute(event, "id")
                    if pid is not None:
                        await self.serve_purchase(view, pid, height)

    async def serve_purchase(self, view: Any, purchase: bytes, height: int) -> int:
        """Post the keys of every share of ``purchase`` this node owes; returns how many."""
        state = ViewState(view)
        record = get_purchase(state, purchase)
        if record is None:
            return 0
        posted = 0
        for share in record.shares:
            if share.owner != self.operator or share.state != ShareState.AWAITING_KEY:
                continue
            if share.deadline < _head(view) + 1:
                continue
            key_id = (bytes(purchase), bytes(share.source))
            if key_id in self._sent:
                continue
            source = get_dataset(state, share.source)
            if source is None or not source.root:
                continue
            content = self._keys.get(source.root)
            if content is None:
                log.warning(
                    "purchase 0x%s of dataset 0x%s: this node has no content key for it",
                    purchase.hex()[:16],
                    bytes(share.source).hex()[:16],
                )
                continue
            wrapped = wrap_key(
                content.key, record.buyer_pubkey, key_wrap_context(purchase, share.source)
            )
            try:
                tx_id = await self._send(KeyPost(Hash32(purchase), share.source, wrapped))
            except NeuroSeedError as exc:
                log.warning(
                    "key post for purchase 0x%s failed: %s", purchase.hex()[:16], exc.message
                )
                continue
            self._sent[key_id] = height
            self.posted += 1
            posted += 1
            log.info(
                "posted the key of dataset 0x%s for purchase 0x%s (tx 0x%s)",
                bytes(share.source).hex()[:16],
                purchase.hex()[:16],
                tx_id.hex()[:16],
            )
        return posted

    async def _resend(self, view: Any, head: int) -> None:
        state = ViewState(view)
        for key_id, sent_at in list(self._sent.items()):
            purchase, source = key_id
            record = get_purchase(state, purchase)
            share = (
                None
                if record is None
                else next((s for s in record.shares if bytes(s.source) == source), None)
            )
            if share is None or share.state != ShareState.AWAITING_KEY or share.deadline <= head:
                del self._sent[key_id]  # posted (or too late): done with it
                continue
            if head - sent_at >= self.settings.resubmit_after_blocks:
                del self._sent[key_id]
                await self.serve_purchase(view, purchase, head)


def _head(view: Any) -> int:
    return 0 if view.head is None else int(view.head.height)


def _attribute(event: Any, key: str) -> bytes | None:
    for attr in event.attributes:
        if attr.key == key:
            return bytes(attr.value)
    return None

"""The economy inside blocks (node/consensus/transition.py wiring): economy kinds go through
``build_block`` / ``apply_block`` with their fee split and receipts, an invalid one makes a
block invalid with its code, the economy's end-of-block work runs with the block's parent hash,
and a whole market round trip keeps the supply."""

from __future__ import annotations

from dataclasses import replace

import pytest

from node.consensus import transition
from node.consensus.blocks import Block, compute_tx_root
from node.consensus.fees import cost_of
from node.consensus.receipts import ReceiptStatus
from node.consensus.transition import BlockContext
from node.consensus.txs import verify_transaction
from node.economy import registry
from node.economy.api import Role
from node.economy.purchases import KeyPost, Purchase, ShareState, get_purchase, purchase_id
from node.economy.roles import MissingRole, RoleRegister
from node.errors import InvalidBlock
from node.storage import encryption
from node.types import ZERO_HASH, Amount, Hash32
from tests.economy.econ import (
    BUYER,
    DISPUTE_WINDOW,
    SUPPLIER,
    EconomyChain,
    addr,
    priced_dataset,
    register_body,
)


def test_end_block_gets_the_parent_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, bytes]] = []

    def record(view: object, ctx: BlockContext) -> None:
        seen.append((ctx.height, bytes(ctx.parent_hash)))

    monkeypatch.setattr(transition, "ECONOMY_END_BLOCK", (*registry.END_BLOCK, record))
    c = EconomyChain()
    for _ in range(3):
        c.step()
    # each block is built, then applied: both see the same parent hash
    assert seen == [
        (1, ZERO_HASH),
        (1, ZERO_HASH),
        (2, c.headers[1].hash()),
        (2, c.headers[1].hash()),
        (3, c.headers[2].hash()),
        (3, c.headers[2].hash()),
    ]
    assert c.headers[2].parent_hash == c.headers[1].hash()


def test_an_invalid_economy_transaction_makes_the_block_invalid() -> None:
    c = EconomyChain()
    good = c.tx(SUPPLIER, RoleRegister(int(Role.CUSTOMER)))
    built = c.build([verify_transaction(good)])
    bad = c.tx(BUYER, Purchase(Hash32(b"\x01" * 32), b"\x02" * 33, Amount(1)))
    txs = (good, bad)
    block = Block(
        replace(built.block.header, tx_root=compute_tx_root(txs)),
        txs,
        built.block.evidence,
        built.block.last_commit,
    )
    with pytest.raises(InvalidBlock) as info:
        c.apply(block)
    assert info.value.data == {"index": 1, "code": MissingRole.code}


def test_a_market_round_trip_through_blocks() -> None:
    c = EconomyChain()
    c.register_roles((SUPPLIER, Role.DATA_SUPPLIER), (BUYER, Role.CUSTOMER))
    p = priced_dataset(16, seed=9)
    raw = c.tx(SUPPLIER, register_body(p, price=777))
    cost = cost_of(c.params, c.view(), verify_transaction(raw))
    built = c.run(raw)
    receipt = built.result.receipts[0]
    assert receipt.status == ReceiptStatus.SUCCESS and receipt.burned == cost
    priv, pub = encryption.generate_wrap_keypair(lambda n: b"\x05" * n)
    pid = purchase_id(addr(BUYER), c.nonce(BUYER))
    c.run(c.tx(BUYER, Purchase(p.id, pub, Amount(777))))
    assert p.key is not None
    wrapped = encryption.wrap_key(p.key, pub, pid + p.id, rng=lambda n: b"\x06" * n)
    c.run(c.tx(SUPPLIER, KeyPost(pid, p.id, wrapped)))
    c.advance_to(c.height + DISPUTE_WINDOW)
    record = get_purchase(c.view(), pid)
    assert record is not None and record.shares[0].state == ShareState.PAID
    assert encryption.unwrap_key(record.shares[0].wrapped_key, priv, pid + p.id) == p.key
    c.check_economy_supply()

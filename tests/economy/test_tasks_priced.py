"""Priced task inputs (node/economy/tasks.py, docs/compute-market.md "Priced inputs", issue 7):
a task naming a priced dataset escrows an input allowance (the dataset's price per party: the
provider, each verifier, one referee); every party that reads the data buys it with its own
``Purchase`` made at or after the submission, and a result, a failure with checkpoints or a
verifier's / referee's commitment without one is refused (``InputNotPurchased``); one purchase
serves one read; at the end each buyer gets back what its delivered (not refunded) purchase
cost, at most the allowance, and the rest goes back to the requester. The chain is the same
``TaskChain`` as tests/economy/test_tasks.py, whose supply check (task escrow and bonds,
purchase escrow) runs after every block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from node.economy import registry
from node.economy.api import Role
from node.economy.purchases import (
    KeyPost,
    Purchase,
    ShareState,
    get_purchase,
    key_wrap_context,
    open_purchases,
    purchase_id,
)
from node.economy.tasks import (
    InputKind,
    InputNotPurchased,
    Outcome,
    Task,
    TaskCancel,
    TaskFail,
    TaskInput,
    TaskState,
    VerifyCommit,
    VerifyReveal,
    escrow_for,
    input_reimbursements,
    verify_commitment,
)
from node.storage import encryption
from node.types import Amount, Hash32
from tests.economy.econ import (
    BUYER_PUB,
    KEY_POST_HEIGHTS,
    Artifact,
    fixed_rng,
    priced_dataset,
    register_body,
    tx,
    verified,
)
from tests.economy.test_tasks import (
    FEE_V,
    PRICE,
    PROVIDERS,
    REQ,
    SUPPLIER,
    TASK_ECONOMY,
    Market,
    P,
    Q,
    R,
    S,
    T,
    bisect,
    entries,
    honest,
    honest_answer,
    link,
    result_body,
    salt_of,
    submit_body,
    train_params,
)
from tests.helpers import addr

DPRICE = 7_000  # the priced dataset's price
ROYALTY = PRICE * TASK_ECONOMY.royalty_percent // 100
# A verifier buys after the draw names it: the purchase and the key post take two blocks, so the
# commit window must be longer than test_tasks' two heights.
ECONOMY = replace(TASK_ECONOMY, verify_commit_heights=6)


class PricedMarket(Market):
    """test_tasks' market, plus a priced dataset of SUPPLIER's and the CUSTOMER role (which a
    ``Purchase`` needs) for every compute provider."""

    def __init__(self) -> None:
        super().__init__(ECONOMY)
        self.c.register_roles(*((p, Role.CUSTOMER) for p in PROVIDERS))
        self.data: Artifact = priced_dataset(10, seed=5)
        self.priced = self.data.id
        self.c.run(self.c.tx(SUPPLIER, register_body(self.data, price=DPRICE, name="priced")))

    def priced_task(
        self, *, verifiers: int = 2, steps: int = 16, every: int = 4, deadline: int = 0
    ) -> Task:
        body = submit_body(
            train_params(self.priced, steps=steps, every=every),
            [TaskInput(InputKind.DATASET, self.priced)],
            deadline=deadline or self.c.height + 60,
            verifiers=verifiers,
        )
        return self.submit(body)

    def buy(self, who: int, *, key: bool = True) -> Hash32:
        """``who`` buys the priced dataset; its owner posts the key in the next block."""
        pid = purchase_id(addr(who), self.c.nonce(who))
        self.c.run(self.c.tx(who, Purchase(self.priced, BUYER_PUB, Amount(DPRICE))))
        if key:
            assert self.data.key is not None
            wrapped = encryption.wrap_key(
                self.data.key, BUYER_PUB, key_wrap_context(pid, self.priced), rng=fixed_rng(9)
            )
            self.c.run(self.c.tx(SUPPLIER, KeyPost(pid, self.priced, wrapped)))
        return pid

    def commit_as(self, t: Task, who: int, state: Hash32) -> bytes:
        commitment = verify_commitment(t.id, addr(who), state, salt_of(who))
        return self.c.tx(who, VerifyCommit(t.id, commitment))

    def reveal_as(self, t: Task, who: int, state: Hash32) -> bytes:
        return self.c.tx(who, VerifyReveal(t.id, state, salt_of(who)))

    def settle_purchases(self) -> None:
        """Run past every key and dispute window, so that the owner is paid its shares."""
        self.c.advance_to(self.c.height + KEY_POST_HEIGHTS + ECONOMY.dispute_window_heights + 2)


@pytest.fixture
def pm() -> PricedMarket:
    return PricedMarket()


def _verify_with_purchases(
    pm: PricedMarket, t: Task, answer: Callable[[int, Task], Hash32]
) -> Task:
    """Every drawn verifier buys, commits and reveals ``answer``; the reveal window closes."""
    who = pm.verifiers(t)
    for v in who:
        pm.buy(v)
    c = pm.c
    c.run(*(pm.commit_as(t, v, answer(v, t)) for v in who))
    t = pm.task(t.id)
    c.advance_to(t.commit_end + 1)
    c.run(*(pm.reveal_as(t, v, answer(v, t)) for v in who))
    c.advance_to(t.reveal_end + 1)
    return pm.task(t.id)


def test_the_escrow_holds_an_input_allowance_per_party(pm: PricedMarket) -> None:
    before = pm.c.net(REQ)
    t = pm.priced_task(verifiers=2)
    parties = 2 + 2  # provider, two verifiers, one referee
    assert t.input_allowance == DPRICE
    assert t.escrow == PRICE + ROYALTY + 2 * FEE_V + parties * DPRICE
    assert pm.c.net(REQ) == before - t.escrow
    body = submit_body(
        train_params(pm.priced), [TaskInput(InputKind.DATASET, pm.priced)], deadline=99, verifiers=3
    )
    assert escrow_for(TASK_ECONOMY, body, DPRICE) == PRICE + ROYALTY + 3 * FEE_V + 5 * DPRICE
    vtx = verified(tx(REQ, body, nonce=0))
    assert registry.max_spend(pm.c.view(), vtx) == PRICE + ROYALTY + 3 * FEE_V + 5 * DPRICE
    # A free dataset adds nothing.
    free = pm.train()
    assert free.input_allowance == 0 and free.escrow == PRICE + ROYALTY + 2 * FEE_V


def test_a_result_needs_a_purchase_made_after_the_submission(pm: PricedMarket) -> None:
    early = pm.buy(P)  # before the task exists: it cannot pay for this task's read
    t = pm.claim(pm.priced_task())
    err = pm.reject(P, result_body(t), InputNotPurchased)
    assert err.data == {"dataset": "0x" + pm.priced.hex()}
    # Failing with checkpoints is refused the same way.
    cps = entries(t, honest, 2)
    fail = TaskFail(t.id, 1, cps, link(t.id, cps), 5)
    pm.reject(P, fail, InputNotPurchased)
    # A purchase without a key yet grants the data, so it counts.
    pid = pm.buy(P, key=False)
    assert open_purchases(pm.c.view(), addr(P), pm.priced) == (early, pid)
    t = pm.post(result_body(t))
    assert t.state == TaskState.DRAWING
    # The purchase is used: off the open list, on the task.
    assert open_purchases(pm.c.view(), addr(P), pm.priced) == (early,)
    assert [(b.address, b.purchases) for b in t.input_buys] == [(addr(P), (pid,))]


def test_one_purchase_pays_for_one_task(pm: PricedMarket) -> None:
    t1 = pm.claim(pm.priced_task())
    t2 = pm.claim(pm.priced_task())  # P runs two tasks at once (max_concurrent = 2)
    pm.buy(P)
    pm.post(result_body(t1))
    pm.reject(P, result_body(t2), InputNotPurchased)
    pm.buy(P)
    assert pm.post(result_body(t2)).state == TaskState.DRAWING


def test_verifiers_must_buy_before_they_commit(pm: PricedMarket) -> None:
    t = pm.claim(pm.priced_task())
    pm.buy(P)
    # Every other provider buys too, but no key comes: refunded purchases are no purchases.
    for x in (Q, R, S, T):
        pm.buy(x, key=False)
    pm.c.advance_to(pm.c.height + KEY_POST_HEIGHTS + 1)
    t = pm.drawn(pm.post(result_body(t)))
    v, w = pm.verifiers(t)
    for x in (v, w):
        pm.c.reject(pm.commit_as(t, x, honest_answer(x, t)), InputNotPurchased)
    pm.buy(v)
    pm.c.run(pm.commit_as(t, v, honest_answer(v, t)))
    t = pm.task(t.id)
    assert [s.commitment is not None for s in t.verifier_slots] == [True, False]
    assert [b.address for b in t.input_buys] == [addr(P), addr(v)]
    pm.c.reject(pm.commit_as(t, w, honest_answer(w, t)), InputNotPurchased)


def test_settlement_reimburses_every_buyer_and_returns_the_rest(pm: PricedMarket) -> None:
    before = {k: pm.c.net(k) for k in range(12)}
    t = pm.claim(pm.priced_task(verifiers=2))
    pm.buy(P)
    t = pm.drawn(pm.post(result_body(t)))
    v, w = pm.verifiers(t)
    t = _verify_with_purchases(pm, t, honest_answer)
    assert t.state == TaskState.CHALLENGE
    pm.c.advance_to(t.window_end + 1)
    t = pm.task(t.id)
    assert t.outcome == Outcome.PAID
    assert input_reimbursements(pm.c.view(), t) == [(addr(x), DPRICE) for x in (P, v, w)]
    pm.settle_purchases()
    # Each buyer paid the price and got it back; the owner sold three reads; the requester
    # paid them and got the unused referee's allowance back.
    assert pm.c.net(P) - before[P] == PRICE
    assert pm.c.net(v) - before[v] == FEE_V and pm.c.net(w) - before[w] == FEE_V
    assert pm.c.net(SUPPLIER) - before[SUPPLIER] == ROYALTY + 3 * DPRICE
    assert pm.c.net(REQ) - before[REQ] == -(PRICE + ROYALTY + 2 * FEE_V + 3 * DPRICE)


def test_a_purchase_whose_key_never_came_is_not_reimbursed(pm: PricedMarket) -> None:
    before = {k: pm.c.net(k) for k in range(12)}
    t = pm.claim(pm.priced_task(verifiers=1))
    pid = pm.buy(P, key=False)
    t = pm.drawn(pm.post(result_body(t)))
    (v,) = pm.verifiers(t)
    t = _verify_with_purchases(pm, t, honest_answer)
    pm.c.advance_to(t.window_end + 1)
    pm.settle_purchases()
    record = get_purchase(pm.c.view(), pid)
    assert record is not None and record.shares[0].state == ShareState.REFUNDED
    t = pm.task(t.id)
    assert t.outcome == Outcome.PAID
    assert pm.c.net(P) - before[P] == PRICE  # refunded by the purchase, nothing from the task
    assert pm.c.net(v) - before[v] == FEE_V
    assert pm.c.net(SUPPLIER) - before[SUPPLIER] == ROYALTY + DPRICE
    assert pm.c.net(REQ) - before[REQ] == -(PRICE + ROYALTY + FEE_V + DPRICE)


def test_refunds_when_nothing_is_settled(pm: PricedMarket) -> None:
    before = pm.c.net(REQ)
    # Unclaimed until the deadline: the whole escrow, the allowance included, comes back.
    t = pm.priced_task(deadline=pm.c.height + 3)
    pm.c.advance_to(t.deadline + 1)
    assert pm.task(t.id).outcome == Outcome.EXPIRED and pm.c.net(REQ) == before
    # Cancelled while unclaimed: the same.
    t = pm.priced_task()
    pm.c.run(pm.c.tx(REQ, TaskCancel(t.id)))
    assert pm.task(t.id).outcome == Outcome.CANCELLED and pm.c.net(REQ) == before
    # The provider's own fault after buying: it gets its purchase back, the requester the rest.
    p_before = pm.c.net(P)
    t = pm.claim(pm.priced_task())
    pm.buy(P)
    pm.post(TaskFail(t.id, 4, (), Hash32(bytes(32)), 0))
    assert pm.task(t.id).outcome == Outcome.PROVIDER_FAULT
    pm.settle_purchases()
    assert pm.c.net(P) == p_before and pm.c.net(REQ) == before - DPRICE


def test_a_referee_buys_too_and_every_buyer_is_reimbursed_when_the_provider_loses(
    pm: PricedMarket,
) -> None:
    before = {k: pm.c.net(k) for k in range(12)}
    t = pm.claim(pm.priced_task(verifiers=1, steps=32, every=16))
    bond = t.bond

    def provider_run(s: int) -> Hash32:  # skips step 5 of each segment
        return honest(s) if s - (0 if s <= 16 else 16) < 5 else honest(s, b"cheat")

    pm.buy(P)
    t = pm.drawn(pm.post(result_body(t, provider_run)))
    (v,) = pm.verifiers(t)
    t = _verify_with_purchases(pm, t, honest_answer)
    assert t.state == TaskState.DISPUTE
    t, _ = bisect(pm, t, provider_run, honest)
    if t.state == TaskState.REFEREE_DRAW:
        pm.c.run()
        t = pm.task(t.id)
    assert t.state == TaskState.REFEREE and t.dispute is not None and t.dispute.referee is not None
    ref = pm.index(t.dispute.referee.address)
    answer = honest(t.dispute.high)
    pm.c.reject(pm.commit_as(t, ref, answer), InputNotPurchased)
    pm.buy(ref)
    pm.c.run(pm.commit_as(t, ref, answer))
    t = pm.task(t.id)
    pm.c.advance_to(t.commit_end + 1)
    pm.c.run(pm.reveal_as(t, ref, answer))
    pm.c.advance_to(t.reveal_end + 1)
    t = pm.task(t.id)
    assert t.outcome == Outcome.PROVIDER_SLASHED
    pm.settle_purchases()
    assert pm.c.net(P) - before[P] == -bond  # its purchase came back; its bond did not
    assert pm.c.net(v) - before[v] == FEE_V + bond // 2
    assert pm.c.net(ref) - before[ref] == FEE_V
    assert pm.c.net(SUPPLIER) - before[SUPPLIER] == 3 * DPRICE
    assert pm.c.net(REQ) - before[REQ] == -(FEE_V + 3 * DPRICE)

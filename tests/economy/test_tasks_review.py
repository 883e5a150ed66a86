"""Attacks on the compute market's disputes and listings, and the rules that stop them
(docs/compute-market.md, "Disputes", "Providers" and the payer table; issue 7).

- A challenger that loses (or is left without a referee's verdict) does not settle the task: the
  next mismatching verifier disputes, then the challenge window comes back; so a provider's
  sybil that disputes first and stays silent cannot have a fake result paid.
- A requester cannot challenge its own task, and a silent referee leaves the result standing
  (no free work from an "undecided" end).
- A full class list gives up an entry that no longer holds the role with a full bond.
- A challenger cannot open more disputes than its bond covers.

The chain is ``tests/economy/test_tasks.py``'s Market: the supply is checked after every block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from node.economy.api import Role
from node.economy.roles import RoleRegister, RoleResign, get_role
from node.economy.tasks import (
    BisectStep,
    ChallengerAtCapacity,
    InputKind,
    Outcome,
    ProviderClassFull,
    RequesterCannotChallenge,
    Task,
    TaskChallenge,
    TaskInput,
    TaskState,
    bisect_midpoint,
    class_providers,
    get_provider,
)
from node.types import Amount, Hash32
from tests.economy.test_tasks import (
    BARE,
    CHALLENGE_SLASH,
    CLASS,
    CUDA,
    FEE_V,
    OTHER,
    PRICE,
    PROVIDER_BOND,
    REQ,
    TASK_ECONOMY,
    Market,
    P,
    Q,
    R,
    S,
    T,
    bisect,
    honest,
    honest_answer,
    hw,
    referee_answers,
    result_body,
    submit_body,
    train_params,
)
from tests.helpers import addr


@pytest.fixture
def m() -> Market:
    return Market()


def fake(step: int) -> Hash32:
    return honest(step, b"random weights")


def garbage(step: int) -> Hash32:
    return honest(step, b"garbage")


def role_bond(m: Market, who: int) -> int:
    entry = get_role(m.c.view(), addr(who), Role.COMPUTE_PROVIDER)
    assert entry is not None
    return entry.bond


def obligations(m: Market, who: int) -> int:
    entry = get_role(m.c.view(), addr(who), Role.COMPUTE_PROVIDER)
    assert entry is not None
    return entry.obligations


def silent_challenger_round(m: Market, t: Task, provider_run: Callable[[int], Hash32]) -> Task:
    """The provider posts its hash at the open round's midpoint; the challenger stays silent
    until the round's window ends."""
    d = t.dispute
    assert t.state == TaskState.DISPUTE and d is not None
    m.c.run(m.c.tx(P, BisectStep(t.id, d.round, provider_run(bisect_midpoint(d)))))
    m.c.advance_to(m.task(t.id).window_end + 1)
    return m.task(t.id)


# --- a losing challenger hands over to the next ---------------------------------------------


def test_a_sybil_verifier_that_defaults_does_not_get_a_fake_paid(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train(verifiers=2, steps=32, every=16), P, price=PRICE)
    bond = t.bond
    t = m.drawn(m.post(result_body(t, fake)))
    sybil, hon = m.verifiers(t)

    def answer(v: int, task: Task) -> Hash32:
        return garbage(99) if v == sybil else honest(task.checkpoint_steps[task.segment])

    t = m.verify_all(t, answer)
    assert t.dispute is not None and m.index(t.dispute.challenger) == sybil
    first_round = t.dispute.round
    t = silent_challenger_round(m, t, fake)
    # The sybil lost its stake; the honest verifier's dispute opens at once.
    assert t.state == TaskState.DISPUTE and t.dispute is not None
    assert m.index(t.dispute.challenger) == hon and t.dispute.by_verifier
    assert t.dispute.round > first_round  # round numbers follow on within the task
    assert role_bond(m, sybil) == PROVIDER_BOND - CHALLENGE_SLASH and obligations(m, sybil) == 0
    assert obligations(m, hon) == 1
    t, _ = bisect(m, t, fake, honest)
    t = referee_answers(m, t, honest(t.dispute.high))  # type: ignore[union-attr]
    assert (t.state, t.outcome) == (TaskState.ENDED, Outcome.PROVIDER_SLASHED)
    referee = m.index(t.dispute.referee.address)  # type: ignore[union-attr]
    # The provider got half the sybil's stake, then lost its bond; the honest verifier, proven
    # right, is paid its fee and half the bond; the sybil, proven wrong, nothing.
    assert m.c.net(P) == before[P] + CHALLENGE_SLASH // 2 - bond
    assert m.c.net(hon) == before[hon] + FEE_V + bond // 2
    assert m.c.net(sybil) == before[sybil]
    assert m.c.net(referee) == before[referee] + FEE_V
    assert m.c.net(REQ) == before[REQ] - FEE_V
    record = get_provider(m.c.view(), addr(P))
    assert record is not None and (record.settled_ok, record.slashed) == (0, 1)
    assert obligations(m, hon) == 0 and obligations(m, P) == 0


def test_a_sybil_challenge_that_defaults_reopens_the_challenge_window(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train(verifiers=1, steps=32, every=16), P, price=PRICE)
    bond = t.bond
    t = m.drawn(m.post(result_body(t, fake)))
    (colluder,) = m.verifiers(t)
    t = m.verify_all(t, lambda v, task: fake(task.checkpoint_steps[task.segment]))
    assert t.state == TaskState.CHALLENGE
    sybil, hon = [p for p in (Q, R, S, T) if p != colluder][:2]
    end = t.window_end
    m.c.run(m.c.tx(sybil, TaskChallenge(t.id, t.segment, garbage(1))))
    left = end - (m.c.height - 1)  # heights of the window after the challenge's block
    assert left > 0
    t = silent_challenger_round(m, m.task(t.id), fake)
    # Not settled: the window is back for the heights it had left.
    assert t.state == TaskState.CHALLENGE and t.window_end == m.c.height - 1 + left
    seg_end = t.checkpoint_steps[t.segment]
    m.c.run(m.c.tx(hon, TaskChallenge(t.id, t.segment, honest(seg_end))))
    t, _ = bisect(m, t, fake, honest)
    t = referee_answers(m, t, honest(t.dispute.high))  # type: ignore[union-attr]
    assert (t.state, t.outcome) == (TaskState.ENDED, Outcome.PROVIDER_SLASHED)
    assert m.c.net(hon) == before[hon] + bond // 2
    assert m.c.net(P) == before[P] + CHALLENGE_SLASH // 2 - bond
    assert m.c.net(colluder) == before[colluder]  # it agreed with the fake: no fee
    assert role_bond(m, sybil) == PROVIDER_BOND - CHALLENGE_SLASH


def test_a_challenge_in_the_windows_last_height_settles_when_lost(m: Market) -> None:
    t = m.claim(m.train(verifiers=1, steps=32, every=16), P, price=PRICE)
    t = m.verify_all(m.drawn(m.post(result_body(t))), honest_answer)
    challenger = next(p for p in (Q, R, S, T) if p not in m.verifiers(t))
    m.c.advance_to(t.window_end)
    m.c.run(m.c.tx(challenger, TaskChallenge(t.id, t.segment, garbage(1))))
    t = silent_challenger_round(m, m.task(t.id), honest)
    assert (t.state, t.outcome) == (TaskState.ENDED, Outcome.PAID)


# --- the requester and a silent referee --------------------------------------------------------


def test_a_requester_cannot_challenge_its_own_task(m: Market) -> None:
    body = submit_body(
        train_params(m.dataset),
        [TaskInput(InputKind.DATASET, m.dataset)],
        deadline=m.c.height + 50,
        verifiers=1,
    )
    t = m.submit(body, who=Q)
    t = m.claim(t, P)
    t = m.verify_all(m.drawn(m.post(result_body(t))), honest_answer)
    assert t.state == TaskState.CHALLENGE
    m.reject(Q, TaskChallenge(t.id, 0, garbage(1)), RequesterCannotChallenge)


def test_a_silent_referee_leaves_the_result_standing(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train(verifiers=1, steps=32, every=16), P, price=PRICE)
    t = m.verify_all(m.drawn(m.post(result_body(t))), honest_answer)
    assert t.state == TaskState.CHALLENGE
    (v,) = m.verifiers(t)
    col = next(p for p in (Q, R, S, T) if p != v)
    m.c.run(m.c.tx(col, TaskChallenge(t.id, 0, garbage(99))))
    t, _ = bisect(m, t, honest, garbage)
    m.c.run()  # the referee is drawn
    t = m.task(t.id)
    assert t.state == TaskState.REFEREE
    m.c.advance_to(t.reveal_end + 1)  # it never answers
    t = m.task(t.id)
    assert t.state == TaskState.CHALLENGE  # back to the window's last heights, then settled
    m.c.advance_to(t.window_end + 1)
    t = m.task(t.id)
    assert t.outcome == Outcome.PAID
    assert m.c.net(P) == before[P] + PRICE
    assert m.c.net(REQ) == before[REQ] - PRICE - PRICE // 10 - FEE_V
    # Nobody proved the challenger wrong either: no slash, its obligation freed.
    assert role_bond(m, col) == PROVIDER_BOND and obligations(m, col) == 0


def test_no_referee_to_draw_leaves_the_result_standing(m: Market) -> None:
    t = m.claim(m.train(verifiers=1, steps=32, every=16), P, price=PRICE)
    t = m.verify_all(m.drawn(m.post(result_body(t))), honest_answer)
    col = next(p for p in (Q, R, S, T) if p not in m.verifiers(t))
    m.c.run(m.c.tx(col, TaskChallenge(t.id, 0, garbage(99))))
    # Everyone else of the class leaves: nobody can referee.
    m.c.run(*(m.c.tx(p, RoleResign(int(Role.COMPUTE_PROVIDER))) for p in (Q, R, S, T) if p != col))
    t, _ = bisect(m, t, honest, garbage)
    m.c.run()  # the referee draw finds nobody
    t = m.task(t.id)
    assert t.state == TaskState.CHALLENGE
    m.c.advance_to(t.window_end + 1)
    assert m.task(t.id).outcome == Outcome.PAID
    assert role_bond(m, col) == PROVIDER_BOND and obligations(m, col) == 0


# --- class lists -----------------------------------------------------------------------------------


def test_a_full_class_list_gives_up_a_resigned_entry() -> None:
    m = Market(replace(TASK_ECONOMY, max_providers_per_class=6))
    c = m.c
    c.run(c.tx(BARE, hw()))  # the sixth: the list is full
    assert len(class_providers(c.view(), CLASS)) == 6
    c.run(c.tx(BARE, RoleResign(int(Role.COMPUTE_PROVIDER))))
    assert addr(BARE) in class_providers(c.view(), CLASS)
    # OTHER moves in: BARE's entry (no role any more) makes room.
    c.run(c.tx(OTHER, hw()))
    listed = class_providers(c.view(), CLASS)
    assert addr(OTHER) in listed and addr(BARE) not in listed and len(listed) == 6
    assert class_providers(c.view(), CUDA) == ()
    # BARE comes back: the list is full of bonded providers.
    c.run(c.tx(BARE, RoleRegister(int(Role.COMPUTE_PROVIDER), b"")))
    m.reject(BARE, hw(), ProviderClassFull)
    assert len(class_providers(c.view(), CLASS)) == 6


# --- concurrent disputes --------------------------------------------------------------------------


def test_a_challenger_opens_no_more_disputes_than_its_bond_covers() -> None:
    # One stake per bond; rounds long enough that the first dispute stays open.
    economy = replace(TASK_ECONOMY, challenge_slash=Amount(PROVIDER_BOND), bisect_step_heights=60)
    m = Market(economy)
    first = m.claim(m.train(verifiers=1), P)
    second = m.claim(m.train(verifiers=1), P)
    first = m.verify_all(m.drawn(m.post(result_body(first))), honest_answer)
    challenger = next(p for p in (Q, R, S, T) if p not in m.verifiers(first))
    m.c.run(m.c.tx(challenger, TaskChallenge(first.id, 0, garbage(1))))
    assert m.task(first.id).state == TaskState.DISPUTE
    second = m.verify_all(m.drawn(m.post(result_body(second))), honest_answer)
    assert second.state == TaskState.CHALLENGE
    m.reject(challenger, TaskChallenge(second.id, 0, garbage(1)), ChallengerAtCapacity)


def test_a_verifier_out_of_dispute_slots_is_not_made_challenger() -> None:
    economy = replace(TASK_ECONOMY, challenge_slash=Amount(PROVIDER_BOND), bisect_step_heights=60)
    m = Market(economy)
    first = m.claim(m.train(verifiers=1), P)
    second = m.claim(m.train(verifiers=4), P)  # draws all of Q, R, S, T
    first = m.verify_all(m.drawn(m.post(result_body(first))), honest_answer)
    busy = next(p for p in (Q, R, S, T) if p not in m.verifiers(first))
    m.c.run(m.c.tx(busy, TaskChallenge(first.id, 0, garbage(1))))
    t = m.drawn(m.post(result_body(second)))
    assert sorted(m.verifiers(t)) == [Q, R, S, T]

    def answer(v: int, task: Task) -> Hash32:
        return garbage(5) if v == busy else honest_answer(v, task)

    t = m.verify_all(t, answer)
    # Its stake is at work in the other dispute: its mismatch opens none.
    assert t.state == TaskState.CHALLENGE


def test_supply_holds_after_a_chain_of_disputes(m: Market) -> None:
    """Three verifiers: the first two default in turn, the third wins; every block's supply
    check passes and only the winner of the last dispute is paid."""
    before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train(verifiers=3, steps=32, every=16), P, price=PRICE)
    bond = t.bond
    t = m.drawn(m.post(result_body(t, fake)))
    a, b, c = m.verifiers(t)

    def answer(v: int, task: Task) -> Hash32:
        return garbage(v) if v in (a, b) else honest(task.checkpoint_steps[task.segment])

    t = m.verify_all(t, answer)
    for expected in (a, b):
        assert t.dispute is not None and m.index(t.dispute.challenger) == expected
        t = silent_challenger_round(m, t, fake)
    assert t.dispute is not None and m.index(t.dispute.challenger) == c
    t, _ = bisect(m, t, fake, honest)
    t = referee_answers(m, t, honest(t.dispute.high))  # type: ignore[union-attr]
    assert t.outcome == Outcome.PROVIDER_SLASHED
    assert m.c.net(c) == before[c] + FEE_V + bond // 2
    assert m.c.net(a) == before[a] and m.c.net(b) == before[b]
    assert m.c.net(P) == before[P] + 2 * (CHALLENGE_SLASH // 2) - bond

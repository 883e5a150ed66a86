"""Verification windows close early once every party has acted (docs/compute-market.md,
"Result and verification" and "Disputes"; issue 7).

The commit window ends at the block holding the last drawn slot's commitment (reveals are taken
from the next height), and the reveal window ends at the height after the last committed slot's
reveal, whose end of block opens the challenge window or the dispute. A slot that stays silent
keeps the window it did not act in at its normal length. Windows here are 5 + 5 heights so that
an early close is visibly shorter; the supply is checked after every block.
"""

from __future__ import annotations

from dataclasses import replace

from node.consensus.state import HeightQueue
from node.economy.api import QUEUE_TASK
from node.economy.tasks import (
    AlreadyRevealed,
    CommitWindowClosed,
    NoCommitment,
    Outcome,
    RevealOutsideWindow,
    Task,
    TaskState,
    VerifyCommit,
    VerifyReveal,
    verify_commitment,
)
from node.types import Hash32
from tests.economy.econ import tx
from tests.economy.test_tasks import (
    FEE_V,
    PRICE,
    REQ,
    SUPPLIER,
    TASK_ECONOMY,
    Market,
    honest,
    honest_answer,
    result_body,
    run_dispute,
    salt_of,
)
from tests.helpers import addr

WINDOWS = replace(
    TASK_ECONOMY, verify_commit_heights=5, verify_reveal_heights=5, task_challenge_heights=3
)


def advance(m: Market, height: int) -> None:
    """Commit empty blocks until the next block is ``height``, checking the supply after each."""
    while m.c.height < height:
        m.c.run()


def drawn_task(m: Market, verifiers: int) -> Task:
    t = m.drawn(m.post(result_body(m.claim(m.train(verifiers=verifiers)))))
    assert t.state == TaskState.VERIFYING
    d = m.c.height - 1  # the block whose end drew the verifiers
    assert (t.commit_end, t.reveal_end) == (d + 5, d + 10)
    return t


def commit_tx(m: Market, t: Task, who: int, state: Hash32) -> bytes:
    return m.c.tx(who, VerifyCommit(t.id, verify_commitment(t.id, addr(who), state, salt_of(who))))


def test_all_commit_early_reveals_from_the_next_height() -> None:
    m = Market(WINDOWS)
    t = drawn_task(m, 2)
    v1, v2 = m.verifiers(t)
    answer = honest_answer(v1, t)
    m.c.run(commit_tx(m, t, v1, answer))
    assert m.task(t.id).commit_end == t.commit_end  # one slot still to commit: no change
    # The last commitment and a reveal in the same block: the reveal is refused, as before.
    h = m.c.height
    reveal = tx(v1, VerifyReveal(t.id, answer, salt_of(v1)), nonce=m.c.nonce(v1))
    built = m.c.step([commit_tx(m, t, v2, answer), reveal], strict=False)
    assert [type(e) for _, e in built.rejected] == [RevealOutsideWindow]
    m.c.check_economy_supply()
    e = m.task(t.id)
    assert (e.commit_end, e.reveal_end) == (h, h + 5)
    assert e.reveal_end < t.reveal_end
    m.reject_at(v1, VerifyReveal(t.id, answer, salt_of(v1)), h, RevealOutsideWindow)
    m.reject_at(v1, VerifyCommit(t.id, Hash32(bytes(32))), h + 1, CommitWindowClosed)
    m.reveal(t, v1, answer)  # at h + 1
    assert m.task(t.id).reveal_end == h + 5  # v2 has still to reveal


def test_all_reveal_early_opens_the_challenge_window_at_once() -> None:
    m = Market(WINDOWS)
    before = {k: m.c.net(k) for k in range(12)}
    t = drawn_task(m, 2)
    who = m.verifiers(t)
    answer = honest_answer(who[0], t)
    m.c.run(*(commit_tx(m, t, v, answer) for v in who))
    h = m.c.height - 1
    assert m.task(t.id).commit_end == h
    m.c.run(*(m.c.tx(v, VerifyReveal(t.id, answer, salt_of(v))) for v in who))  # at h + 1
    e = m.task(t.id)
    assert (e.state, e.reveal_end) == (TaskState.VERIFYING, h + 2)
    m.reject(who[0], VerifyReveal(t.id, answer, salt_of(who[0])), AlreadyRevealed)
    m.c.run()  # h + 2: its end takes the reveals
    e = m.task(t.id)
    assert (e.state, e.window_end) == (TaskState.CHALLENGE, h + 2 + WINDOWS.task_challenge_heights)
    advance(m, e.window_end)
    assert m.task(t.id).state == TaskState.CHALLENGE
    m.c.run()  # the challenge window's last height settles
    e = m.task(t.id)
    assert (e.state, e.outcome, e.end_height) == (TaskState.ENDED, Outcome.PAID, e.window_end)
    assert e.end_height < t.reveal_end  # before the full reveal window would even have ended
    paid = {k: m.c.net(k) for k in range(12)}
    # The stale timers (the draw's reveal end, the early commit close's) do nothing.
    advance(m, t.reveal_end + 2)
    assert {k: m.c.net(k) for k in range(12)} == paid and m.task(t.id) == e
    assert HeightQueue(QUEUE_TASK).pending(m.c.view()) == 1  # the task's deadline entry only
    for v in who:
        assert paid[v] == before[v] + FEE_V
    assert paid[SUPPLIER] == before[SUPPLIER] + PRICE // 10
    assert paid[REQ] == before[REQ] - PRICE - PRICE // 10 - 2 * FEE_V


def test_a_verifier_that_never_commits_keeps_the_commit_window() -> None:
    m = Market(WINDOWS)
    t = drawn_task(m, 2)
    v1, silent = m.verifiers(t)
    answer = honest_answer(v1, t)
    m.commit(t, v1, answer)
    advance(m, t.commit_end)
    e = m.task(t.id)
    assert (e.commit_end, e.reveal_end) == (t.commit_end, t.reveal_end)
    m.reject(v1, VerifyReveal(t.id, answer, salt_of(v1)), RevealOutsideWindow)  # at commit_end
    m.c.run()
    m.reject(silent, VerifyReveal(t.id, answer, salt_of(silent)), NoCommitment)
    m.reveal(t, v1, answer)  # commit_end + 1: every slot that committed has revealed
    assert m.task(t.id).reveal_end == t.commit_end + 2
    m.c.run()
    e = m.task(t.id)
    assert (e.state, e.window_end) == (TaskState.CHALLENGE, t.commit_end + 2 + 3)


def test_a_verifier_that_never_reveals_keeps_the_reveal_window() -> None:
    m = Market(WINDOWS)
    before = {k: m.c.net(k) for k in range(12)}
    t = drawn_task(m, 2)
    v1, silent = m.verifiers(t)
    answer = honest_answer(v1, t)
    m.c.run(*(commit_tx(m, t, v, answer) for v in (v1, silent)))
    h = m.c.height - 1
    m.reveal(t, v1, answer)
    e = m.task(t.id)
    assert (e.commit_end, e.reveal_end) == (h, h + 5)  # closed early for commits only
    advance(m, e.reveal_end)
    assert m.task(t.id).state == TaskState.VERIFYING
    m.c.run()  # the reveal window's normal last height
    e = m.task(t.id)
    assert (e.state, e.window_end) == (TaskState.CHALLENGE, h + 5 + 3)
    advance(m, e.window_end + 1)
    assert m.task(t.id).outcome == Outcome.PAID
    assert m.c.net(v1) == before[v1] + FEE_V
    assert m.c.net(silent) == before[silent]
    assert m.c.net(REQ) == before[REQ] - PRICE - PRICE // 10 - FEE_V  # the silent one's fee back


def test_the_referee_closes_its_windows_early() -> None:
    m = Market(WINDOWS)
    r = run_dispute(m, 5, provider_lies=True)
    t = m.task(r["task"].id)
    if t.state == TaskState.REFEREE_DRAW:
        m.c.run()
        t = m.task(t.id)
    assert t.state == TaskState.REFEREE and t.dispute is not None and t.dispute.referee is not None
    ref = m.index(t.dispute.referee.address)
    answer = honest(r["high"])
    m.commit(t, ref, answer)
    h = m.c.height - 1
    e = m.task(t.id)
    assert (e.commit_end, e.reveal_end) == (h, h + 5) and e.reveal_end < t.reveal_end
    m.reveal(t, ref, answer)  # at h + 1
    assert m.task(t.id).reveal_end == h + 2
    m.c.run()  # h + 2 decides
    e = m.task(t.id)
    assert (e.state, e.outcome, e.end_height) == (
        TaskState.ENDED,
        Outcome.PROVIDER_SLASHED,
        h + 2,
    )
    before, v = r["before"], r["verifier"]
    assert m.c.net(v) == before[v] + FEE_V + r["bond"] // 2
    assert m.c.net(ref) == before[ref] + FEE_V

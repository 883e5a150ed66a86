"""The compute agent (``node.compute_agent``) over a real ``ChainService`` whose blocks the test
commits from what the agents submit, with real worker child processes (torch) running a tiny
MLP on digits: an honest train task ends paid with exact amounts (provider, both verifiers, the
dataset owner; the requester's escrow rest back); a provider returning random weights is caught
by the verifier's re-run, loses the dispute and its bond; a recipe outside the allow-list and
parameters outside the schema are refused at submission; two providers racing for the same
claim, each with its own mempool (the real ``Mempool``), still verify: the loser drops its lost
claim so that its commitment is not stuck behind it. The agents share one blob store (the
network transfer of inputs and checkpoints is the artifact service's, tested on its own). The
world itself is ``tests/compute_world.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from node.compute import recipes
from node.consensus.txs import verify_transaction
from node.economy import tasks as tk
from node.economy.api import EconomyKind
from node.storage import MemoryKV
from node.types import Hash32
from tests.compute_world import (
    ECONOMY,
    PRICE_PER_DEVICE_SECOND,
    PROVIDERS,
    REQ,
    SUPPLIER,
    V1,
    V2,
    VERIFIER_FEE,
    WALL,
    NodePools,
    P,
    Pool,
    World,
    _genesis,
    _State,
    _world,
    random_weights,
)
from tests.helpers import key, open_chain


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


@pytest.mark.slow
async def test_honest_train_task_ends_paid_with_exact_amounts(
    tmp_path: Path, nursery: trio.Nursery, threads: Any
) -> None:
    w = await _world(tmp_path, nursery)
    before = {i: w.net(i) for i in (SUPPLIER, REQ, *PROVIDERS)}
    tid = await w.submit(w.submit_body(w.params()))
    await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.ENDED)
    t = w.task(tid)
    assert t.outcome == tk.Outcome.PAID, t
    assert t.provider == key(P).address
    assert t.result is not None and len(t.result.checkpoints) == 2
    assert t.result.checkpoints[-1].state_hash != bytes(32)
    price = PRICE_PER_DEVICE_SECOND * 1 * WALL
    assert t.result.price == price
    royalty = price * ECONOMY.royalty_percent // 100
    assert w.net(P) - before[P] == price
    for v in (V1, V2):
        assert w.net(v) - before[v] == VERIFIER_FEE
    assert w.net(SUPPLIER) - before[SUPPLIER] == royalty
    assert w.net(REQ) - before[REQ] == -(price + royalty + 2 * VERIFIER_FEE)
    assert tk.get_provider(_State(w.chain.read_view()), key(P).address).settled_ok == 1  # type: ignore[union-attr]
    # the result and checkpoints are in the blob store, under the CIDs posted
    blobs = w.agents[P]._blobs
    assert all(blobs.has(c.cid) for c in t.result.checkpoints) and blobs.has(t.result.output)
    assert w.agents[P].task_progress(tid)["stage"] == "posted"  # type: ignore[index]


@pytest.mark.slow
async def test_a_provider_returning_random_weights_is_caught_and_slashed(
    tmp_path: Path, nursery: trio.Nursery, threads: Any
) -> None:
    w = await _world(tmp_path, nursery, hooks={P: random_weights})
    before = {i: w.net(i) for i in (REQ, *PROVIDERS)}
    tid = await w.submit(w.submit_body(w.params(steps=4, checkpoint_every=4), verifiers=1))
    await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.ENDED, limit=120)
    t = w.task(tid)
    assert t.outcome == tk.Outcome.PROVIDER_SLASHED, t
    provider = tk.get_provider(_State(w.chain.read_view()), key(P).address)
    assert provider is not None and provider.slashed == 1 and provider.settled_ok == 0
    bond = tk.bond_for(ECONOMY, PRICE_PER_DEVICE_SECOND * WALL)
    assert w.net(P) - before[P] == -bond  # the cheat's bond is gone, it was paid nothing
    # The referee may earn a fee too: the catcher is the one that gained the most.
    catcher = max((V1, V2), key=lambda i: w.net(i) - before[i])
    # the verifier who caught it: its fee, plus its share of the bond as the dispute's winner
    reward = bond * ECONOMY.dispute_reward_percent // 100
    assert w.net(catcher) - before[catcher] == VERIFIER_FEE + reward
    referee = next(i for i in (V1, V2) if i != catcher)
    assert w.net(referee) - before[referee] in (0, min(VERIFIER_FEE, bond - reward))
    assert w.net(REQ) - before[REQ] == -VERIFIER_FEE  # refunded but the catcher's fee


@pytest.mark.slow
async def test_the_provider_that_lost_the_claim_race_still_verifies(
    tmp_path: Path, nursery: trio.Nursery, threads: Any
) -> None:
    """Both providers claim in the same block; the loser's claim fails in the block, so only the
    validator drops it: the loser's own pool keeps it at its next nonce. The loser, drawn as the
    one verifier, must still get its commitment and reveal into blocks (and its fee paid)."""
    w = await _world(tmp_path, nursery, providers=(P, V1), all_provide=True, node_pools=True)
    assert isinstance(w.pool, NodePools)
    before = {i: w.net(i) for i in (P, V1)}
    tid = await w.submit(w.submit_body(w.params(), verifiers=1))
    await w.block()  # both claims were sent on the submission's block: one wins here
    claims = [
        e for raw, e in w.rejected if verify_transaction(raw).tx.kind == EconomyKind.TASK_CLAIM
    ]
    assert len(claims) == 1, w.rejected  # the race happened: the loser's claim failed
    t = w.task(tid)
    assert t.provider is not None
    winner = P if t.provider == key(P).address else V1
    loser = V1 if winner == P else P
    await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.ENDED)
    t = w.task(tid)
    assert t.outcome == tk.Outcome.PAID, t
    assert [s.address for s in t.verifier_slots] == [key(loser).address]
    assert t.verifier_slots[0].state_hash == t.result.checkpoints[t.segment].state_hash  # type: ignore[union-attr]
    price = PRICE_PER_DEVICE_SECOND * WALL
    assert w.net(winner) - before[winner] == price
    assert w.net(loser) - before[loser] == VERIFIER_FEE
    assert not w.pool.local[loser]  # nothing of the loser's left waiting


async def test_recipes_outside_the_allow_list_and_bad_params_are_refused_at_submit(
    tmp_path: Path,
) -> None:
    chain = open_chain(MemoryKV(), _genesis())
    w = World(chain, Pool(chain), {}, Hash32(b"\x01" * 32), "cpu-x")
    bad_recipe = replace(w.submit_body(w.params()), recipe="python")
    bad_params = w.submit_body(w.params(steps=-3))
    for body, error in ((bad_recipe, tk.RecipeNotAllowed), (bad_params, tk.TaskParamsInvalid)):
        await w.tx(REQ, body)
        await w.block()
        assert w.rejected, "the submission was accepted"
        _raw, exc = w.rejected.pop()
        assert isinstance(exc, error), exc
    with pytest.raises(recipes.InvalidTaskParams) as info:
        recipes.validate_task_params("train", w.params(steps=-3))
    assert info.value.field == "steps"

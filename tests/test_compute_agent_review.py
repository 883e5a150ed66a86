"""The compute agent's answers, windows and files (``node.compute_agent``,
``node.input_purchases``) in the world of ``tests/compute_world.py``, with the worker runs
replaced by scripted ones (no torch child): a verifier whose re-run fails for a local reason
(its memory below the task's, a timeout) abstains and the honest provider is paid, while a
start checkpoint of the provider's that does not load still answers as a mismatch, and a
commitment that could not land by the commit window's end is not sent; the agent watches only
the tasks of its platform class, and a task where it is a dispute party is looked at in every
block however many open tasks it watches; a priced input is decrypted 0600 in a 0700 work
directory, the work directories go once the task has ended (the blob store serves what was
posted), the one-off keys once their purchases can no longer be disputed, and a purchase that
never landed is sent again with the same key; a task too close to its deadline is not claimed.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from node.compute.worker import InvalidCheckpoint, JobTimeout
from node.compute_agent import _ABSTAIN, ComputeAgent, _Local, rerun_failed_hash
from node.economy import tasks as tk
from node.types import Amount, Hash32
from tests.compute_world import V1, V2, P, _world
from tests.helpers import key


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


def _hash(who: bytes, step: int) -> bytes:
    return hashlib.sha256(who + step.to_bytes(8, "big")).digest()


class Script:
    """A worker run: the provider's writes its checkpoints and output (state hashes
    ``_hash(who, step)``); a segment re-run answers ``_hash(who, to_step)``, or raises
    ``error`` (only when it starts from a checkpoint, with ``only_with_start``)."""

    def __init__(self, who: bytes, every: int = 10) -> None:
        self.who, self.every = who, every
        self.calls: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.only_with_start = False

    async def __call__(
        self, job: dict[str, Any], *, time_limit_s: float, on_progress: Any = None
    ) -> dict[str, Any]:
        self.calls.append(dict(job))
        await trio.sleep(0)
        if self.error is not None and (job.get("start") or not self.only_with_start):
            raise self.error
        if job["kind"] == "task_segment":
            return {"state_hash": _hash(self.who, int(job["to_step"])).hex()}
        out = Path(job["output"])
        out.write_bytes(self.who * 100)
        ckpts = []
        ckdir = Path(job["checkpoint_dir"])
        ckdir.mkdir(parents=True, exist_ok=True)
        steps = int(json.loads(job["params"])["steps"])
        for step in range(self.every, steps + 1, self.every):
            path = ckdir / f"ckpt-{step:09d}.safetensors"
            path.write_bytes(self.who + step.to_bytes(8, "big"))
            ckpts.append({"path": str(path), "sha256": _hash(self.who, step).hex()})
        return {"output": str(out), "checkpoints": ckpts, "metrics": {}, "device_seconds": 1}


def _spy(agent: ComputeAgent) -> dict[bytes, list[int]]:
    """The heights at which ``agent`` looked at each task."""
    visits: dict[bytes, list[int]] = defaultdict(list)
    step = agent._step

    async def spy(view: Any, state: Any, head: int, task: tk.Task) -> None:
        visits[bytes(task.id)].append(head)
        await step(view, state, head, task)

    agent._step = spy  # type: ignore[method-assign]
    return visits


async def test_a_verifier_whose_rerun_fails_locally_abstains_and_the_provider_is_paid(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    scripts = {P: Script(b"honest"), V1: Script(b"honest"), V2: Script(b"honest")}
    scripts[V2].error = JobTimeout("the re-run hit this node's wall time")
    w = await _world(
        tmp_path,
        nursery,
        run_jobs=dict(scripts),
        settings_over={V1: {"memory_bytes": 512 << 20}},  # the task asks for 1 GiB
        pause=0.02,
    )
    tid = await w.submit(w.submit_body(w.params()))
    await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.ENDED)
    task = w.task(tid)
    assert task.outcome == tk.Outcome.PAID
    assert w.bodies(tk.VerifyCommit) == [] and w.bodies(tk.BisectStep) == []
    assert {bytes(s.address) for s in task.verifier_slots} == {
        bytes(w.agents[V1].address),
        bytes(w.agents[V2].address),
    }
    assert scripts[V1].calls == []  # below the task's memory: abstained without running
    assert [c["kind"] for c in scripts[V2].calls] == ["task_segment"]
    for v in (V1, V2):
        assert w.agents[v].task_progress(tid)["stage"] == "abstained"  # type: ignore[index]


async def test_only_the_providers_own_start_checkpoint_failing_counts_as_a_mismatch(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    scripts = {P: Script(b"honest"), V1: Script(b"honest"), V2: Script(b"honest")}
    w = await _world(tmp_path, nursery, run_jobs=dict(scripts), pause=0.02)
    tid = await w.submit(w.submit_body(w.params(), verifiers=1))
    await w.blocks_until(lambda: w.task(tid).result is not None)
    task, agent, script = w.task(tid), w.agents[V2], scripts[V2]
    end1 = tk.segment_bounds(task, 1).end
    script.error, script.only_with_start = InvalidCheckpoint("not a checkpoint"), True
    # Segment 1 starts from the provider's checkpoint: it does not load, a mismatch.
    assert await agent._state_hash_at(task, 1, end1, "x") == rerun_failed_hash(task.id)
    # Segment 0 loads nothing of the provider's: the same error is this node's, no answer.
    script.only_with_start = False
    with pytest.raises(InvalidCheckpoint):
        await agent._state_hash_at(task, 0, tk.segment_bounds(task, 0).end, "y")
    local = _Local()
    agent._compute(task, local, "z", 0, 10)
    await w.block()
    assert "z" not in local.answer and _ABSTAIN + "z" in local.sent
    # A commitment sent at commit_end would land after it: not sent; one height earlier it is.
    await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.VERIFYING)
    task = w.task(tid)
    end = tk.segment_bounds(task, task.segment).end
    slot = tk.VerifierSlot(agent.address, None, None)
    view = w.chain.read_view()
    for head, sent in ((task.commit_end, False), (task.commit_end - 1, True)):
        late = _Local(answer={f"verify-{task.segment}-{end}": Hash32(bytes(32))})
        await agent._verify(view, head, task, late, slot, "verify", None)
        assert any(k.startswith("c") for k in late.sent) is sent


async def test_only_tasks_of_the_own_class_are_watched_and_a_dispute_is_seen_every_block(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    scripts = {P: Script(b"provider"), V1: Script(b"verifier"), V2: Script(b"verifier")}
    w = await _world(
        tmp_path,
        nursery,
        run_jobs=dict(scripts),
        settings_over={i: {"tasks_per_block": 3} for i in (P, V1, V2)},
        pause=0.02,
    )
    tid = await w.submit(w.submit_body(w.params(), verifiers=1))
    await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.CLAIMED)
    other = replace(w.submit_body(w.params()), platform_class="other-class")
    cheap = replace(w.submit_body(w.params()), max_price=Amount(1))  # below every ask
    foreign = await w.submit_all([other] * 30)
    spam = await w.submit_all([cheap] * 30)
    for agent in w.agents.values():
        assert not set(foreign) & set(agent._watched)
        assert set(spam) <= set(agent._watched)
    visits = {i: _spy(w.agents[i]) for i in (P, V1, V2)}
    disputed: list[int] = []

    def ended() -> bool:
        t = w.task(tid)
        if t.state == tk.TaskState.DISPUTE:
            disputed.append(w.chain.head_height)
        return t.state == tk.TaskState.ENDED

    await w.blocks_until(ended)
    task = w.task(tid)
    assert disputed and task.dispute is not None
    challenger = next(i for i in (V1, V2) if w.agents[i].address == task.dispute.challenger)
    for who in (P, challenger):
        seen = set(visits[who][bytes(tid)])
        # every block of the dispute (the agent looks at height h once block h is in)
        assert set(disputed) <= seen, (who, disputed, sorted(seen))
    steps = w.bodies(tk.BisectStep)
    rounds = {s.round for s in steps}
    assert rounds and all(
        sum(1 for s in steps if s.round == r) == 2 for r in rounds
    )  # both parties answered every round
    # The provider kept to its answers, the referee sided with the challenger in time.
    referee = task.dispute.referee
    assert referee is not None and referee.state_hash is not None
    assert task.outcome == tk.Outcome.PROVIDER_SLASHED


class _Later:
    """A view of the chain as if its head were at ``height``."""

    def __init__(self, view: Any, height: int) -> None:
        self._view, self.head = view, SimpleNamespace(height=height)

    def get_state(self, k: bytes) -> bytes | None:
        value: bytes | None = self._view.get_state(k)
        return value


@pytest.mark.slow
async def test_priced_inputs_private_files_removed_and_a_lost_purchase_sent_again(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node import input_purchases
    from node.economy.purchases import Purchase
    from node.storage.importer import missing_blocks
    from tests.test_compute_agent_priced import ECONOMY, _priced_world

    monkeypatch.setattr(input_purchases, "RESEND_AFTER_HEIGHTS", 3)
    w, _grants, _owner = await _priced_world(tmp_path, nursery)
    scripts = {i: Script(b"honest") for i in (P, V1, V2)}
    modes: list[tuple[int, int]] = []
    run = scripts[P].__call__

    async def provider_run(job: dict[str, Any], **kw: Any) -> dict[str, Any]:
        data = Path(job["data"])
        modes.append((data.stat().st_mode & 0o777, data.parent.stat().st_mode & 0o777))
        return await run(job, **kw)

    for i, agent in w.agents.items():
        agent._run_job = provider_run if i == P else scripts[i]
    tid = await w.submit(w.submit_body(w.params(), verifiers=1))
    provider = bytes(key(P).address)
    dropped: list[Any] = []
    for _ in range(80):  # the provider's first Purchase leaves the pool unmined
        for v in list(w.pool.txs):
            if isinstance(v.body, Purchase) and bytes(v.sender) == provider and not dropped:
                w.pool.txs.remove(v)
                dropped.append(v.body)
        if w.task(tid).state == tk.TaskState.ENDED:
            break
        await w.block()
    task = w.task(tid)
    assert task.outcome == tk.Outcome.PAID, task
    sent = [b for b in w.bodies(Purchase) if b.buyer_pubkey == dropped[0].buyer_pubkey]
    assert len(sent) == 1  # sent again with the same one-off key, and used
    assert modes == [(0o600, 0o700)]  # the decrypted input and its work directory
    await w.block()  # the agents look at the ended task: its work directories go
    for i in (P, V1, V2):
        compute = tmp_path / f"node{i}" / "compute"
        assert compute.stat().st_mode & 0o777 == 0o700
        assert not (compute / tid.hex()).exists()
    assert task.result is not None  # served from the blob store, not the work directory
    blobs = w.agents[P]._blobs
    for root in (task.result.output, *(c.cid for c in task.result.checkpoints)):
        assert blobs.has(root) and not missing_blocks(blobs, root)
    # The one-off keys stay until the purchases can no longer be disputed, then go.
    keep = ECONOMY.key_post_heights + ECONOMY.dispute_window_heights + ECONOMY.leaf_dispute_heights
    view = w.chain.read_view()
    buyers = [b.address for b in task.input_buys]  # the verifier V2 cannot buy: it abstains
    assert buyers[0] == key(P).address and len(buyers) in (1, 2)
    for i in (P, V1, V2):
        if key(i).address not in buyers:
            continue
        buyer = w.agents[i].input_buyer()
        assert len(list(buyer.directory.glob("*.json"))) == 1
        assert buyer.forget_ended(_Later(view, task.end_height + keep)) == []
        assert len(buyer.forget_ended(_Later(view, task.end_height + keep + 1))) == 1
        assert list(buyer.directory.glob("*.json")) == []


async def test_a_task_too_close_to_its_deadline_is_not_claimed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from node.input_purchases import PROVIDER_GIVE_UP_HEIGHTS, read_until

    scripts = {i: Script(b"honest") for i in (P, V1, V2)}
    w = await _world(tmp_path, nursery, run_jobs=dict(scripts), pause=0.02)
    margin = w.agents[P].settings.claim_margin_heights
    body = w.submit_body(w.params())
    near = replace(body, deadline=w.chain.head_height + margin)  # margin - 1 left once in
    far = replace(body, deadline=w.chain.head_height + margin + 1)
    tid_near, tid_far = await w.submit_all([near, far])
    for _ in range(3):
        await w.block()
    assert w.task(tid_near).provider is None
    assert w.task(tid_far).provider == w.agents[P].address
    # Waiting for a priced input's key, the provider gives up before the deadline.
    task = w.task(tid_far)
    assert read_until(task, "provider") == task.deadline - PROVIDER_GIVE_UP_HEIGHTS

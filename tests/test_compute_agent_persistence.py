"""The compute agent's state kept across restarts (``data_dir/compute/state``): the file round
trip (claims, verification answers and salts, sent markers, the built result, progress), its
mode 0600, a corrupt or foreign file refused with ``ComputeStateCorrupt`` and set aside by the
agent (which starts clean with a warning, never crashes); and, over the real chain harness of
``tests/compute_world.py``, a verifier stopped after its commitment is in a block whose
replacement (a new ``ComputeAgent`` on the same data directory) reveals with the same salt and
is paid, without sending anything twice.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from node.compute_agent import (
    MAX_STATE_BYTES,
    STATE_FILE,
    ComputeAgent,
    ComputeStateCorrupt,
    TaskProgress,
    _Local,
    decode_state,
    encode_state,
    read_state_file,
    write_state_file,
)
from node.economy import tasks as tk
from node.storage import MemoryKV
from node.types import NSD, Hash32
from tests.helpers import key, make_genesis, open_chain

T1, T2 = Hash32(b"\x01" * 32), Hash32(b"\x02" * 32)


def _entries() -> tuple[dict[Hash32, _Local], dict[Hash32, TaskProgress]]:
    verifying = _Local(
        claimed_at=7,
        answer={"verify-0-20": Hash32(b"\xaa" * 32)},
        salt={"verify-0-20": Hash32(b"\x5a" * 32)},
        sent={"cverify-0-20"},
    )
    providing = _Local(
        claimed_at=3,
        claim_tx=Hash32(b"\x33" * 32),
        running=True,
        posted=True,
        result=b"\x93\x01\x02\x03",
    )
    progress = {
        T1: TaskProgress("verifier", "committed", 0, 20, "", 9),
        T2: TaskProgress("provider", "posted", 20, 20, "", 8),
    }
    return {T1: verifying, T2: providing}, progress


def test_the_state_file_round_trips_with_mode_0600(tmp_path: Path) -> None:
    local, progress = _entries()
    path = tmp_path / STATE_FILE
    write_state_file(path, encode_state(local, progress))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.with_name(STATE_FILE + ".tmp").exists()
    back_local, back_progress = read_state_file(path)
    assert back_local == local and back_progress == progress
    # replaced atomically, still 0600 even when the old file was wider
    path.chmod(0o644)
    del local[T2]
    write_state_file(path, encode_state(local, progress))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(read_state_file(path)[0]) == {T1}
    assert read_state_file(tmp_path / "none") == ({}, {})


def _packed(tree: Any) -> bytes:
    return bytes(msgpack.packb(tree, use_bin_type=True))


def test_corrupt_or_foreign_state_is_refused_with_a_typed_error(tmp_path: Path) -> None:
    local, progress = _entries()
    good = msgpack.unpackb(encode_state(local, progress), raw=False, strict_map_key=False)
    entry = good["tasks"][bytes(T1)]
    bad: list[bytes] = [
        b"",
        b"\xc1not msgpack",
        encode_state(local, progress)[:-3],  # cut short
        _packed([1, 2, 3]),
        _packed({**good, "v": 2}),
        _packed({**good, "extra": 1}),
        _packed({**good, "tasks": {b"short": entry}}),
        _packed({**good, "tasks": {bytes(T1): {**entry, "salt": {"verify-0-20": b"x"}}}}),
        _packed({**good, "tasks": {bytes(T1): {**entry, "claimed_at": "7"}}}),
        _packed({**good, "tasks": {bytes(T1): {**entry, "more": True}}}),
        _packed({**good, "progress": {bytes(T1): {"role": "verifier"}}}),
    ]
    for raw in bad:
        with pytest.raises(ComputeStateCorrupt):
            decode_state(raw)
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(MAX_STATE_BYTES + 1)
    with pytest.raises(ComputeStateCorrupt) as info:
        read_state_file(huge)
    assert info.value.code == 3199


def _agent(data_dir: Path) -> ComputeAgent:
    chain = open_chain(MemoryKV(), make_genesis(funded=2, validators=(0,), balance=NSD))

    async def submit(raw: bytes) -> Hash32:
        raise AssertionError("nothing is sent")

    return ComputeAgent(chain, submit, key(1), data_dir)


async def test_an_agent_starts_clean_on_a_corrupt_file_and_drops_ended_tasks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "compute" / STATE_FILE
    state.parent.mkdir()
    state.write_bytes(b"\x00garbage")
    agent = _agent(tmp_path)
    with caplog.at_level(logging.WARNING, logger="node.compute_agent"):
        agent._load()
    assert "starting without the saved state" in caplog.text
    assert agent._local == {} and agent.progress == {}
    assert state.with_name(STATE_FILE + ".corrupt").read_bytes() == b"\x00garbage"
    # A good file: read back (a run cut by the stop is no longer marked running); the tasks
    # are not on this chain, so resuming forgets them and saves that.
    local, progress = _entries()
    write_state_file(state, encode_state(local, progress))
    agent = _agent(tmp_path)
    agent._load()
    assert agent._local[T1] == local[T1]
    assert agent._local[T2] == replace(local[T2], running=False)
    await agent._resume(agent._chain.read_view())
    assert agent._local == {}
    assert read_state_file(state) == ({}, progress)


@pytest.mark.slow
async def test_a_verifier_restarted_after_its_commitment_reveals_with_its_salt(
    tmp_path: Path, threads: Any
) -> None:
    from tests import compute_world as h

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as first:
            w = await h._world(tmp_path, first, providers=(h.P, h.V1))
            before = {i: w.net(i) for i in (h.P, h.V1)}
            tid = await w.submit(w.submit_body(w.params(steps=4, checkpoint_every=4), verifiers=1))

            def committed() -> bool:
                slots = w.task(tid).verifier_slots
                return bool(slots) and slots[0].commitment is not None

            await w.blocks_until(committed)
            salts = dict(w.agents[h.V1]._local[tid].salt)
            assert len(salts) == 1
            first.cancel_scope.cancel()  # both nodes stop
        saved = tmp_path / f"node{h.V1}" / "compute" / STATE_FILE
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        old = w.agents
        w.agents = {
            i: ComputeAgent(
                w.chain,
                w.pool.submit_for(i),
                key(i),
                tmp_path / f"node{i}",
                a.settings,
                blobs=a._blobs,
                pending_nonce=w.pool.pending_nonce_for(i),
                drop=w.pool.drop_for(i),
                run_job=h._sync_run_job,
            )
            for i, a in old.items()
        }
        for agent in w.agents.values():
            await outer.start(agent.run)
        assert w.agents[h.V1]._local[tid].salt == salts  # read back before any block
        await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.ENDED)
        t = w.task(tid)
        assert t.outcome == tk.Outcome.PAID, t
        assert t.result is not None
        assert t.verifier_slots[0].state_hash == t.result.checkpoints[t.segment].state_hash
        assert not w.rejected, w.rejected  # nothing sent twice, nothing refused
        assert w.net(h.V1) - before[h.V1] == h.VERIFIER_FEE
        assert w.net(h.P) - before[h.P] == h.PRICE_PER_DEVICE_SECOND * h.WALL
        assert tid not in w.agents[h.V1]._local  # an ended task leaves the state file
        outer.cancel_scope.cancel()
    assert tid not in read_state_file(saved)[0]


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["run", "post"])
async def test_a_provider_restarted_mid_task_finishes_it(
    tmp_path: Path, threads: Any, cut: str
) -> None:
    """The provider's node stops while the task runs (``run``: the child never answers) or
    after the result was built but before it reached the pool (``post``). The new agent on the
    same data directory runs the task again, or posts the kept result without running anything,
    and the task ends paid with nothing sent twice."""
    from node.consensus.txs import decode_transaction
    from node.economy.api import EconomyKind
    from tests import compute_world as h

    async def hang(job: Any, *, time_limit_s: float, on_progress: Any = None) -> Any:
        await trio.sleep_forever()

    async def never(job: Any, *, time_limit_s: float, on_progress: Any = None) -> Any:
        raise AssertionError("the kept result must be posted, not computed again")

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as first:
            w = await h._world(tmp_path, first, providers=(h.P, h.V1))
            provider = w.agents[h.P]
            if cut == "run":
                provider._run_job = hang
            else:
                real_submit = provider._submit

                async def stall_results(raw: bytes) -> Hash32:
                    if decode_transaction(raw).tx.kind == EconomyKind.TASK_RESULT:
                        await trio.sleep_forever()
                    return await real_submit(raw)

                provider._submit = stall_results
            before = {i: w.net(i) for i in (h.P, h.V1)}
            tid = await w.submit(w.submit_body(w.params(steps=4, checkpoint_every=4), verifiers=1))

            def cut_here() -> bool:
                local = provider._local.get(tid)
                if local is None:
                    return False
                return local.running if cut == "run" else local.result is not None

            await w.blocks_until(cut_here)
            first.cancel_scope.cancel()  # both nodes stop
        assert w.task(tid).state == tk.TaskState.CLAIMED
        old = w.agents
        w.agents = {
            i: ComputeAgent(
                w.chain,
                w.pool.submit_for(i),
                key(i),
                tmp_path / f"node{i}",
                a.settings,
                blobs=a._blobs,
                pending_nonce=w.pool.pending_nonce_for(i),
                drop=w.pool.drop_for(i),
                run_job=never if (cut == "post" and i == h.P) else h._sync_run_job,
            )
            for i, a in old.items()
        }
        for agent in w.agents.values():
            await outer.start(agent.run)
        await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.ENDED)
        t = w.task(tid)
        assert t.outcome == tk.Outcome.PAID, t
        assert not w.rejected, w.rejected
        results = [
            v
            for v in w.committed
            if v.tx.kind == EconomyKind.TASK_RESULT and v.sender == key(h.P).address
        ]
        assert len(results) == 1
        assert w.net(h.P) - before[h.P] == h.PRICE_PER_DEVICE_SECOND * h.WALL
        assert w.net(h.V1) - before[h.V1] == h.VERIFIER_FEE
        outer.cancel_scope.cancel()


def test_a_failed_save_is_reported_so_no_commitment_goes_out_unsaved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``_save`` says whether the tasks' state is on disk: ``_verify`` sends a commitment only
    after its salt was saved (a restart could not reveal an unsaved one)."""
    import node.compute_agent as ca

    agent = _agent(tmp_path)
    agent._local[T1] = _Local(salt={"verify-0-20": Hash32(b"\x5a" * 32)})

    def broken(path: Path, raw: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ca, "write_state_file", broken)
    with caplog.at_level(logging.ERROR):
        assert agent._save() is False
    assert "cannot save" in caplog.text
    monkeypatch.undo()
    assert agent._save() is True
    assert read_state_file(tmp_path / "compute" / STATE_FILE)[0][T1].salt == agent._local[T1].salt
    assert agent._save() is True  # nothing changed: still on disk

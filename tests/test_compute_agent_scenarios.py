"""The compute market end to end through the agents (issue 7 "How it is checked";
``tests/compute_world.py``: a real chain, agents with real worker children, a tiny MLP on digits,
models registered on chain by ``DEV``):

- honest **finetune**, **merge** (linear, two registered parents) and **evaluate** tasks end
  PAID with exact amounts: the provider its price, each verifier its fee, and the royalty split
  among the dataset's and the models' owners as docs/compute-market.md says;
- cheats are caught and slashed: a provider that **skips steps** (its last checkpoint is the
  state of an earlier step) and one that **returns the parent unchanged** (a finetune whose
  checkpoint is the parent's state at step 0 and whose output is the parent's file) lose the
  dispute and their bond, the catching verifier is paid;
- a task that **hangs** past its wall limit is killed there and ends as ``TaskFail
  WALL_TIMEOUT`` paid pro rata for its proven checkpoints; a task that runs **out of memory**
  inside its memory limit ends as ``TaskFail OUT_OF_MEMORY`` (the requester refunded) and the
  same agent then claims and completes another task;
- a **pickle** handed to a task job as a dataset, a model or a merge parent is refused by the
  worker with its typed error and never unpickled (a pickle registered as a model is refused at
  the chain: ``tests/economy/test_models.py``, ``tests/test_cli_models.py``).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from node.compute import recipes
from node.compute.worker import run_job
from node.economy import tasks as tk
from node.errors import NeuroSeedError
from node.types import Address
from tests.compute_world import (
    DEV,
    ECONOMY,
    PRICE_PER_DEVICE_SECOND,
    PROVIDERS,
    REQ,
    SPEC,
    SUPPLIER,
    V1,
    V2,
    VERIFIER_FEE,
    WALL,
    P,
    World,
    _digits_v1,
    _State,
    _world,
)
from tests.helpers import key

PRICE = PRICE_PER_DEVICE_SECOND * WALL  # what P asks for a task with the default limits
TRAINING = {"lr": 0.01, "batch_size": 32, "optimizer": "adam", "seed": 1}


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


def _dataset(w: World) -> tk.TaskInput:
    return tk.TaskInput(tk.InputKind.DATASET, w.dataset)


def _model(m: bytes) -> tk.TaskInput:
    return tk.TaskInput(tk.InputKind.MODEL, m)


def _params(**p: Any) -> bytes:
    return recipes.canonical_params(p)


def _add(total: dict[int, int], who: int, amount: int) -> None:
    total[who] = total.get(who, 0) + amount


def _index(address: Address | None) -> int:
    return next(i for i in (SUPPLIER, REQ, P, V1, V2, DEV) if key(i).address == address)


# --- honest finetune, merge, evaluate ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_honest_finetune_merge_and_evaluate_tasks_end_paid(
    tmp_path: Path, nursery: trio.Nursery, threads: Any
) -> None:
    w = await _world(tmp_path, nursery, max_concurrent=3, developer=True)
    m1 = await w.register_model(tmp_path / "m1.safetensors", seed=1)
    m2 = await w.register_model(tmp_path / "m2.safetensors", seed=2)
    ds = w.dataset.hex()
    finetune = _params(
        model=m1.hex(), dataset=ds, steps=20, checkpoint_every=10, train_head_only=False, **TRAINING
    )
    merge = _params(method="linear", parents=[m1.hex(), m2.hex()], coefficients=[0.5, 0.5])
    evaluate = _params(model=m2.hex(), dataset=ds, split="holdout")
    before = {i: w.net(i) for i in (SUPPLIER, REQ, DEV, *PROVIDERS)}
    tids = await w.submit_all(
        [
            w.submit_body(finetune, recipe="finetune", inputs=[_dataset(w), _model(m1)]),
            w.submit_body(merge, recipe="merge", inputs=[_model(m1), _model(m2)], verifiers=1),
            w.submit_body(
                evaluate, recipe="evaluate", inputs=[_dataset(w), _model(m2)], verifiers=1
            ),
        ]
    )
    await w.blocks_until(lambda: all(w.task(t).state == tk.TaskState.ENDED for t in tids))
    # Each task's royalty (5 % of the price) is split evenly among its inputs in order, the
    # remainder to the first: the finetune's and the evaluation's between the dataset's owner
    # and the model's, the merge's two shares both to the parents' owner.
    royalty = PRICE * ECONOMY.royalty_percent // 100
    first, second = royalty - royalty // 2, royalty // 2
    royalties = [{SUPPLIER: first, DEV: second}, {DEV: royalty}, {SUPPLIER: first, DEV: second}]
    expected: dict[int, int] = {}
    for tid, shares in zip(tids, royalties, strict=True):
        t = w.task(tid)
        assert t.outcome == tk.Outcome.PAID, (t.recipe, t)
        assert t.provider == key(P).address and t.result is not None
        assert t.result.price == PRICE
        # the verifiers re-ran the drawn segment (merge and evaluate: the whole job) and agreed
        claimed = t.result.checkpoints[t.segment].state_hash
        assert [s.state_hash for s in t.verifier_slots] == [claimed] * t.verifiers
        assert w.blobs.has(t.result.output)
        _add(expected, P, PRICE)
        for slot in t.verifier_slots:
            _add(expected, _index(slot.address), VERIFIER_FEE)
        for owner, amount in shares.items():
            _add(expected, owner, amount)
        _add(expected, REQ, -(PRICE + royalty + t.verifiers * VERIFIER_FEE))
    for i in (SUPPLIER, REQ, DEV, *PROVIDERS):
        assert w.net(i) - before[i] == expected.get(i, 0), i
    ft, mg, ev = (w.task(t) for t in tids)
    assert ft.result is not None and len(ft.result.checkpoints) == 2
    from node.economy.models import get_model

    parent = get_model(_State(w.chain.read_view()), m1)
    assert parent is not None and ft.result.output != parent.root  # trained: a new file
    assert mg.result is not None and len(mg.result.checkpoints) == 1
    assert ev.result is not None and {m.name for m in ev.result.metrics} >= {"accuracy", "loss"}
    # the merge's one "checkpoint" is the output itself
    assert mg.result.checkpoints[0].cid == mg.result.output
    provider = tk.get_provider(_State(w.chain.read_view()), key(P).address)
    assert provider is not None and provider.settled_ok == 3


# --- cheats --------------------------------------------------------------------------------------


class Cheat:
    """P's cheats (its ``result_hook``: what it returns is what the agent uploads and posts).

    A train task: it **skips steps** — its final checkpoint is the task's true state after half
    the steps. A finetune task: it **returns the parent unchanged** — its output is the parent
    model's file and its checkpoint the parent's state at step 0 (what training from the parent
    holds before any step). The earlier states come from a worker segment run from the initial
    state on the task's inputs, exported from the world's blob store."""

    def __init__(self) -> None:
        self.world: World | None = None

    def _export(self, root: bytes, dest: Path) -> str:
        from node.storage.importer import export_file

        assert self.world is not None
        with open(dest, "wb") as f:
            export_file(self.world.blobs, root, f)
        return str(dest)

    def __call__(self, task: tk.Task, result: dict[str, Any]) -> dict[str, Any]:
        from node.economy.datasets import get_dataset
        from node.economy.models import get_model

        assert self.world is not None
        state = _State(self.world.chain.read_view())
        work = Path(result["output"]).parent
        (data,) = [i.ref for i in task.inputs if i.kind == tk.InputKind.DATASET]
        dataset = get_dataset(state, data)
        assert dataset is not None
        last = result["checkpoints"][-1]
        job: dict[str, Any] = {
            "kind": "task_segment",
            "recipe": task.recipe,
            "params": task.params.decode(),
            "task_id": task.id.hex(),
            "threads": 1,
            "device": "cpu",
            "data": self._export(dataset.root, work / "cheat-data"),
            "start": None,
            "from_step": 0,
            "to_step": task.steps // 2,
            "output": last["path"],
        }
        if task.recipe == "finetune":
            (ref,) = [i.ref for i in task.inputs if i.kind == tk.InputKind.MODEL]
            model = get_model(state, ref)
            assert model is not None
            parent = self._export(model.root, work / "cheat-parent")
            shutil.copyfile(parent, result["output"])
            job.update(init=parent, spec=SPEC, to_step=0)
        seg = run_job(job, time_limit_s=WALL)
        assert seg["step"] == job["to_step"] < task.steps
        last["sha256"] = seg["state_hash"]
        return result


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_skipped_steps_and_an_unchanged_parent_are_caught_and_slashed(
    tmp_path: Path, nursery: trio.Nursery, threads: Any
) -> None:
    cheat = Cheat()
    w = await _world(tmp_path, nursery, {P: cheat}, max_concurrent=2, developer=True)
    cheat.world = w
    parent = await w.register_model(tmp_path / "parent.safetensors", seed=3)
    ds = w.dataset.hex()
    train = w.params(steps=2, checkpoint_every=2)
    finetune = _params(model=parent.hex(), dataset=ds, steps=2, checkpoint_every=2, **TRAINING)
    before = {i: w.net(i) for i in (SUPPLIER, REQ, DEV, *PROVIDERS)}
    tids = await w.submit_all(
        [
            w.submit_body(train, verifiers=1),
            w.submit_body(
                finetune, recipe="finetune", verifiers=1, inputs=[_dataset(w), _model(parent)]
            ),
        ]
    )
    await w.blocks_until(
        lambda: all(w.task(t).state == tk.TaskState.ENDED for t in tids), limit=120
    )
    bond = tk.bond_for(ECONOMY, PRICE)
    reward = bond * ECONOMY.dispute_reward_percent // 100
    expected: dict[int, int] = {}
    for tid in tids:
        t = w.task(tid)
        assert t.outcome == tk.Outcome.PROVIDER_SLASHED, (t.recipe, t)
        assert t.result is not None and t.dispute is not None
        # the verifier's re-run disagreed and it was the challenger; the bisection agreed up to
        # the last step, which the referee re-ran and found as the challenger did
        (slot,) = t.verifier_slots
        assert t.dispute.challenger == slot.address
        assert slot.state_hash != t.result.checkpoints[0].state_hash
        assert t.dispute.high == t.steps and t.dispute.low == t.steps - 1
        referee = t.dispute.referee
        assert referee is not None and referee.state_hash == t.dispute.challenger_hash
        _add(expected, P, -bond)
        _add(expected, _index(slot.address), VERIFIER_FEE + reward)
        _add(expected, _index(referee.address), min(VERIFIER_FEE, bond - reward))
        _add(expected, REQ, -VERIFIER_FEE)  # refunded but the catcher's fee
    for i in (SUPPLIER, REQ, DEV, *PROVIDERS):
        assert w.net(i) - before[i] == expected.get(i, 0), i
    finetune_task = w.task(tids[1])
    # the unchanged parent: the output posted is the parent's own file
    from node.economy.models import get_model

    record = get_model(_State(w.chain.read_view()), parent)
    assert record is not None and finetune_task.result is not None
    assert finetune_task.result.output == record.root
    provider = tk.get_provider(_State(w.chain.read_view()), key(P).address)
    assert provider is not None and provider.slashed == 2 and provider.settled_ok == 0


# --- hang, out of memory, and the next task -------------------------------------------------------

HANG_WALL = 8  # seconds: far below what the hanging task's steps need
HANG_STEPS, HANG_EVERY = 126_000, 2_000  # 63 checkpoints; one segment re-runs in about a second


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_hanging_task_and_an_out_of_memory_task_fail_as_defined_and_the_agent_goes_on(
    tmp_path: Path, nursery: trio.Nursery, threads: Any
) -> None:
    w = await _world(tmp_path, nursery, max_concurrent=2)
    before = {i: w.net(i) for i in (SUPPLIER, REQ, *PROVIDERS)}
    hang = w.submit_body(
        w.params(steps=HANG_STEPS, checkpoint_every=HANG_EVERY),
        limits=tk.TaskLimits(1 << 30, HANG_WALL, HANG_STEPS),
    )
    # 64 MiB of data for the child: torch alone holds more, the first tensor fails
    oom = w.submit_body(w.params(), limits=tk.TaskLimits(64 << 20, WALL, 1000))
    hang_id, oom_id = await w.submit_all([hang, oom])
    await w.blocks_until(lambda: w.task(oom_id).state == tk.TaskState.ENDED)
    t = w.task(oom_id)
    (fail,) = [b for b in w.bodies(tk.TaskFail) if b.task_id == oom_id]
    assert fail.reason == tk.FailReason.OUT_OF_MEMORY and fail.checkpoints == ()
    assert t.outcome == tk.Outcome.PARTIAL and t.result is None  # nothing proven: full refund
    progress = w.agents[P].task_progress(oom_id)
    assert progress is not None and "out of memory" in progress["error"]
    # the same agent claims and completes the next task
    next_id = await w.submit(w.submit_body(w.params()))
    await w.blocks_until(
        lambda: all(w.task(x).state == tk.TaskState.ENDED for x in (hang_id, next_id))
    )
    nxt = w.task(next_id)
    assert nxt.outcome == tk.Outcome.PAID and nxt.provider == key(P).address
    h = w.task(hang_id)
    (fail,) = [b for b in w.bodies(tk.TaskFail) if b.task_id == hang_id]
    assert fail.reason == tk.FailReason.WALL_TIMEOUT
    hang_price = PRICE_PER_DEVICE_SECOND * HANG_WALL
    royalty = PRICE * ECONOMY.royalty_percent // 100
    expected = {P: PRICE, V1: VERIFIER_FEE, V2: VERIFIER_FEE, SUPPLIER: royalty}
    expected[REQ] = -(PRICE + royalty + 2 * VERIFIER_FEE)
    k = len(fail.checkpoints)
    assert k < len(h.checkpoint_steps)  # killed long before the end
    if k:  # the proven checkpoints were verified like a result's and are paid pro rata
        assert h.outcome == tk.Outcome.PARTIAL and h.result is not None
        assert h.result.fail_reason == tk.FailReason.WALL_TIMEOUT
        claimed = h.result.checkpoints[h.segment].state_hash
        assert [s.state_hash for s in h.verifier_slots] == [claimed, claimed]
        pay = hang_price * h.checkpoint_steps[k - 1] // HANG_STEPS
        assert pay == hang_price * HANG_EVERY * k // HANG_STEPS
        royalty = pay * ECONOMY.royalty_percent // 100
        for who, amount in ((P, pay), (V1, VERIFIER_FEE), (V2, VERIFIER_FEE), (SUPPLIER, royalty)):
            _add(expected, who, amount)
        _add(expected, REQ, -(pay + royalty + 2 * VERIFIER_FEE))
    else:  # killed before its first checkpoint: a full refund
        assert h.outcome == tk.Outcome.PARTIAL and h.result is None
    for i in (SUPPLIER, REQ, *PROVIDERS):
        assert w.net(i) - before[i] == expected.get(i, 0), i
    provider = tk.get_provider(_State(w.chain.read_view()), key(P).address)
    assert provider is not None and provider.settled_ok == 1 and provider.slashed == 0
    assert provider.active_tasks == 0


# --- pickles -------------------------------------------------------------------------------------


class _Bomb:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): proof of any unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_pickle_handed_to_a_task_job_is_refused_typed_and_never_unpickled(
    tmp_path: Path,
) -> None:
    from node.compute.architectures import build_model, state_for_spec
    from node.merge.recipe import InvalidModelFile
    from node.merge.safetensors_writer import write_state_dict
    from node.models.specs import parse_spec

    marker = tmp_path / "unpickled"
    bomb = tmp_path / "model.pt"
    bomb.write_bytes(pickle.dumps({"weights": _Bomb(marker)}))
    data = tmp_path / "digits"
    data.write_bytes(_digits_v1())
    model = tmp_path / "model.safetensors"
    spec = parse_spec(SPEC)
    write_state_dict(model, state_for_spec(build_model(spec, seed=1), spec))
    ds, mid = "11" * 32, "22" * 32
    base = {"task_id": "33" * 32, "threads": 1, "device": "cpu", "output": str(tmp_path / "out")}
    train = {**TRAINING, "steps": 2, "checkpoint_every": 2}
    jobs: dict[str, dict[str, Any]] = {
        "train data": {
            "kind": "task",
            "recipe": "train",
            "params": _params(spec=SPEC, dataset=ds, **train).decode(),
            "data": str(bomb),
        },
        "finetune model": {
            "kind": "task",
            "recipe": "finetune",
            "params": _params(model=mid, dataset=ds, **train).decode(),
            "data": str(data),
            "init": str(bomb),
            "spec": SPEC,
        },
        "merge parent": {
            "kind": "task",
            "recipe": "merge",
            "params": _params(
                method="linear", parents=[mid, "44" * 32], coefficients=[0.5, 0.5]
            ).decode(),
            "parents": [str(bomb), str(model)],
            "specs": [SPEC, SPEC],
        },
    }
    for what, job in jobs.items():
        with pytest.raises(NeuroSeedError) as info:
            run_job({**base, **job}, time_limit_s=WALL)
        # the file's typed refusal (the strict header parser), before any loader
        assert isinstance(info.value, InvalidModelFile), (what, info.value)
        assert "pickle" in info.value.message, what
        assert not marker.exists(), what
    pickle.loads(bomb.read_bytes())["weights"].close()  # what unpickling would have done
    assert marker.exists()

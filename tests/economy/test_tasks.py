"""The compute market on chain (node/economy/tasks.py, docs/compute-market.md, issue 7).

Blocks are built, re-applied and committed by an ``EconomyChain`` (the wired transition, fees,
the real parent hash as the draw seed), whose supply check here also counts task escrow and
bonds. Every path ends with exact amounts: ``net(who)`` is a balance plus the fees its committed
transactions paid, so each party's gain or loss is compared with the rules' numbers. Checkpoint
"state hashes" are stand-ins (sha256 of a label and a step) with the same roles as the worker's:
an honest run's, and a cheat's that diverges from one step on.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from node.compute import recipes
from node.consensus.state import Overlay
from node.consensus.transition import apply_transaction
from node.consensus.txs import Transfer
from node.consensus.txs import verify_transaction as verify
from node.economy import registry
from node.economy.api import NS_TASK, EconomyParams, Role
from node.economy.models import Metric, model_id
from node.economy.roles import (
    MissingRole,
    RoleBondDepleted,
    RoleHasObligations,
    RoleResign,
    get_role,
)
from node.economy.tasks import (
    AlreadyCommitted,
    AlreadyPosted,
    AlreadyRevealed,
    BadSegment,
    BisectStep,
    BisectWindowClosed,
    ChallengeAgrees,
    CheckpointChainMismatch,
    CheckpointCountMismatch,
    CheckpointEntry,
    CommitWindowClosed,
    FailReason,
    InputKind,
    InsufficientHardware,
    InvalidFailure,
    InvalidProviderRegistration,
    InvalidTaskBody,
    LateResult,
    NoCommitment,
    NotAVerifier,
    NotDisputeParty,
    NotInChallengeWindow,
    NotTaskProvider,
    NotTaskRequester,
    NotVerifying,
    Outcome,
    PlatformClassMismatch,
    PriceAboveClaim,
    PriceAboveMax,
    ProviderAtCapacity,
    ProviderCannotBond,
    ProviderClassFull,
    ProviderNotRegistered,
    ProviderRegister,
    RecipeNotAllowed,
    ReputationTooLow,
    RequesterCannotPay,
    RevealMismatch,
    RevealOutsideWindow,
    SelfClaim,
    Task,
    TaskCancel,
    TaskChallenge,
    TaskClaim,
    TaskDeadlineInvalid,
    TaskFail,
    TaskInput,
    TaskInputMissing,
    TaskLimits,
    TaskLimitsExceeded,
    TaskNotClaimed,
    TaskNotOpen,
    TaskParamsInvalid,
    TaskResult,
    TaskState,
    TaskSubmit,
    UnknownTaskInput,
    VerifyCommit,
    VerifyReveal,
    WrongBisectRound,
    bisect_midpoint,
    class_providers,
    get_provider,
    get_task,
    provider_pay,
    royalty_split,
    task_id,
    verify_commitment,
)
from node.encoding import Record
from node.errors import InvalidTransaction
from node.genesis import Genesis
from node.storage.unixfs import raw_cid
from node.types import Address, Amount, Hash32
from tests.consensus.authority_chain import EVERY_KIND_FEES
from tests.economy.econ import ECONOMY, FEE, EconomyChain, register_body, rows_dataset, tx
from tests.economy.test_models import model_artifact, model_body
from tests.helpers import addr, make_authority, make_genesis

SUPPLIER, DEV, REQ = 1, 2, 3
P, Q, R, S, T = 4, 5, 6, 7, 8  # compute providers of CLASS
OTHER = 9  # a compute provider of another class
BARE = 10  # holds the role, never registered its hardware
NOBODY = 11
POOR = 12  # funded with little
PROVIDERS = (P, Q, R, S, T)
CLASS = "cpu-x86_64-avx2-torch2.13.0-t1"
CUDA = "cuda-sm90-torch2.13.0"
BALANCE = 10**15
PROVIDER_BOND = 2_000_000
CHALLENGE_SLASH = 500_000
MIN_BOND = 1_000
PRICE = 10_000
FEE_V = 100  # per verifier

TASK_ECONOMY = replace(
    ECONOMY,
    provider_bond=Amount(PROVIDER_BOND),
    task_bond_percent=20,
    task_min_bond=Amount(MIN_BOND),
    task_miss_slash_percent=50,
    task_reopen_heights=10,
    max_task_deadline_heights=1_000,
    verify_commit_heights=2,
    verify_reveal_heights=2,
    task_challenge_heights=3,
    bisect_step_heights=2,
    challenge_slash=Amount(CHALLENGE_SLASH),
    dispute_reward_percent=50,
    royalty_percent=10,
    max_providers_per_class=8,
    max_task_work_per_block=64,
)


def task_genesis(economy: EconomyParams = TASK_ECONOMY) -> Genesis:
    genesis = make_genesis(
        funded=11,
        balance=BALANCE,
        balances={POOR: FEE + 100},  # a fee, not an escrow
        validators=(0,),
        fees=EVERY_KIND_FEES,
        max_tx_bytes=1 << 20,
        max_block_bytes=8 << 20,
        authority=make_authority(max_queue_work_per_block=64),
    )
    return replace(genesis, economy_params=economy)


class TaskChain(EconomyChain):
    """Counts task escrow and bonds as locked, and the fees each sender's committed
    transactions paid (``net``)."""

    def __init__(self, genesis: Genesis | None = None) -> None:
        self.paid: dict[bytes, int] = defaultdict(int)
        super().__init__(genesis or task_genesis())

    def locked(self) -> int:
        total = super().locked()
        for k, v in self.state.items():
            if k.startswith(NS_TASK):
                t = Task.decode(v)
                total += t.escrow + t.bond
        return total

    def run(self, *txs: bytes) -> Any:
        built = super().run(*txs)
        for raw in txs:
            vtx = verify(raw)
            self.paid[bytes(vtx.sender)] += vtx.tx.fee
        return built

    def net(self, who: int) -> int:
        return self.balance(who) + self.paid[bytes(addr(who))]


# --- builders --------------------------------------------------------------------------------------


def hw(cls: str = CLASS, **kw: Any) -> ProviderRegister:
    fields: dict[str, Any] = {
        "device_kind": "cpu",
        "device_name": "test cpu",
        "devices": 2,
        "memory_bytes": 8 << 30,
        "compute_capability": "",
        "cpu_cores": 8,
        "platform_class": cls,
        "price_per_device_second": Amount(3),
        "max_concurrent": 2,
    }
    fields.update(kw)
    return ProviderRegister(**fields)


def hx(b: bytes) -> str:
    return bytes(b).hex()


SPEC = {"family": "mlp", "input_dim": 4, "hidden": [3], "num_classes": 2}


def train_params(dataset: bytes, steps: int = 16, every: int = 4, **kw: Any) -> bytes:
    p: dict[str, Any] = {
        "spec": SPEC,
        "dataset": hx(dataset),
        "steps": steps,
        "lr": 0.1,
        "batch_size": 8,
        "optimizer": "sgd",
        "seed": 1,
        "checkpoint_every": every,
    }
    p.update(kw)
    return recipes.canonical_params(p)


def submit_body(
    params: bytes,
    inputs: Sequence[TaskInput],
    *,
    recipe: str = "train",
    deadline: int,
    max_price: int = PRICE,
    verifiers: int = 2,
    steps: int = 1_000,
    memory: int = 1 << 30,
    min_reputation: int = 0,
    cls: str = CLASS,
    fee: int = FEE_V,
) -> TaskSubmit:
    return TaskSubmit(
        recipe=recipe,
        params=params,
        inputs=tuple(inputs),
        limits=TaskLimits(memory, 600, steps),
        deadline=deadline,
        max_price=Amount(max_price),
        verifier_fee=Amount(fee),
        verifiers=verifiers,
        min_reputation=min_reputation,
        platform_class=cls,
    )


def honest(step: int, label: bytes = b"honest") -> Hash32:
    """The state hash an honest run has after ``step`` steps."""
    return Hash32(hashlib.sha256(label + step.to_bytes(8, "big")).digest())


def cheat_from(bad_step: int) -> Callable[[int], Hash32]:
    """A run that skipped step ``bad_step``: equal to the honest run before it, different after."""
    return lambda s: honest(s) if s < bad_step else honest(s, b"cheat")


def ckpt(step: int, state: Hash32) -> CheckpointEntry:
    return CheckpointEntry(bytes(raw_cid(b"ckpt" + step.to_bytes(8, "big") + state)), state)


def entries(
    task: Task, run: Callable[[int], Hash32], count: int | None = None
) -> tuple[CheckpointEntry, ...]:
    steps = task.checkpoint_steps if count is None else task.checkpoint_steps[:count]
    return tuple(ckpt(s, run(s)) for s in steps)


def link(tid: bytes, cps: Sequence[CheckpointEntry]) -> Hash32:
    return Hash32(recipes.chain_links(tid, [c.cid for c in cps])[-1])


OUTPUT = bytes(raw_cid(b"the trained model"))


def result_body(
    task: Task, run: Callable[[int], Hash32] = honest, price: int = PRICE
) -> TaskResult:
    cps = entries(task, run)
    return TaskResult(
        task_id=task.id,
        output=OUTPUT,
        metrics=(Metric.of("accuracy", 912_500),),
        checkpoints=cps,
        final_link=link(task.id, cps),
        device_seconds=42,
        price=Amount(price),
    )


def salt_of(who: int) -> Hash32:
    return Hash32(bytes([who]) * 32)


class Market:
    """A data supplier with a dataset, a model developer with two models, a requester, five
    compute providers of CLASS and one of another class."""

    def __init__(self, economy: EconomyParams = TASK_ECONOMY) -> None:
        self.c = c = TaskChain(task_genesis(economy))
        c.register_roles(
            (SUPPLIER, Role.DATA_SUPPLIER),
            (DEV, Role.MODEL_DEVELOPER),
            *((p, Role.COMPUTE_PROVIDER) for p in (*PROVIDERS, OTHER, BARE)),
        )
        c.run(*(c.tx(p, hw()) for p in PROVIDERS), c.tx(OTHER, hw(CUDA)))
        data = rows_dataset(10, seed=1)
        self.dataset = data.id
        m1, m2 = model_artifact(seed=1), model_artifact(seed=2)
        self.m1, self.m2 = model_id(m1.root), model_id(m2.root)
        c.run(
            c.tx(SUPPLIER, register_body(data, name="D")),
            c.tx(DEV, model_body(m1)),
            c.tx(DEV, model_body(m2, name="other")),
        )

    # transactions
    def submit(self, body: TaskSubmit, who: int = REQ) -> Task:
        tid = task_id(addr(who), self.c.nonce(who))
        self.c.run(self.c.tx(who, body))
        return self.task(tid)

    def train(self, **kw: Any) -> Task:
        params = train_params(self.dataset, **{k: kw.pop(k) for k in ("steps", "every") if k in kw})
        kw.setdefault("deadline", self.c.height + 50)
        return self.submit(submit_body(params, [TaskInput(InputKind.DATASET, self.dataset)], **kw))

    def task(self, tid: bytes) -> Task:
        t = get_task(self.c.view(), tid)
        assert t is not None
        return t

    def claim(self, t: Task, who: int = P, price: int = PRICE) -> Task:
        self.c.run(self.c.tx(who, TaskClaim(t.id, Amount(price))))
        return self.task(t.id)

    def post(self, body: Record, who: int = P) -> Task:
        self.c.run(self.c.tx(who, body))
        tid = body.task_id
        return self.task(tid)

    def drawn(self, t: Task) -> Task:
        """Run the block whose end draws the verifiers of a posted result."""
        assert t.state == TaskState.DRAWING
        self.c.run()
        return self.task(t.id)

    def verifiers(self, t: Task) -> list[int]:
        return [self.index(s.address) for s in t.verifier_slots]

    @staticmethod
    def index(a: Address) -> int:
        return next(i for i in range(16) if addr(i) == a)

    def commit(self, t: Task, who: int, state: Hash32) -> None:
        commitment = verify_commitment(t.id, addr(who), state, salt_of(who))
        self.c.run(self.c.tx(who, VerifyCommit(t.id, commitment)))

    def reveal(self, t: Task, who: int, state: Hash32) -> None:
        self.c.run(self.c.tx(who, VerifyReveal(t.id, state, salt_of(who))))

    def verify_all(self, t: Task, answer: Callable[[int, Task], Hash32]) -> Task:
        """Every drawn verifier commits and reveals ``answer(verifier, task)`` as soon as it
        may (the windows close early); the reveal window is then closed."""
        who = self.verifiers(t)
        c = self.c
        c.run(
            *(
                c.tx(
                    v,
                    VerifyCommit(t.id, verify_commitment(t.id, addr(v), answer(v, t), salt_of(v))),
                )
                for v in who
            )
        )
        c.advance_to(self.task(t.id).commit_end + 1)
        c.run(*(c.tx(v, VerifyReveal(t.id, answer(v, t), salt_of(v))) for v in who))
        self.c.advance_to(self.task(t.id).reveal_end + 1)
        return self.task(t.id)

    def segment_end(self, t: Task, run: Callable[[int], Hash32] = honest) -> Hash32:
        return run(t.checkpoint_steps[t.segment])

    def reject(self, who: int, body: Record, error: type[InvalidTransaction]) -> InvalidTransaction:
        return self.c.reject(self.c.tx(who, body), error)

    def reject_at(
        self, who: int, body: Record, height: int, error: type[InvalidTransaction]
    ) -> None:
        """``body`` fails with ``error`` in a block at ``height`` on the current state."""
        raw = tx(who, body, nonce=self.c.nonce(who))
        with pytest.raises(error):
            apply_transaction(
                Overlay(self.c.view()), verify(raw), replace(self.c.ctx(), height=height)
            )


@pytest.fixture
def m() -> Market:
    return Market()


def honest_answer(v: int, t: Task) -> Hash32:
    return honest(t.checkpoint_steps[t.segment])


# --- providers ---------------------------------------------------------------------------------------


def test_provider_registration_lists_the_class(m: Market) -> None:
    view = m.c.view()
    assert class_providers(view, CLASS) == tuple(addr(p) for p in PROVIDERS)
    assert class_providers(view, CUDA) == (addr(OTHER),)
    record = get_provider(view, addr(P))
    assert record is not None and record.platform_class == CLASS and record.cpu_cores == 8
    # Moving to another class moves the listing; the reputation counters stay.
    m.c.run(m.c.tx(T, hw(CUDA, device_kind="cuda", compute_capability="9.0")))
    assert class_providers(m.c.view(), CLASS) == tuple(addr(p) for p in (P, Q, R, S))
    assert class_providers(m.c.view(), CUDA) == (addr(OTHER), addr(T))
    m.reject(NOBODY, hw(), MissingRole)
    with pytest.raises(InvalidProviderRegistration, match="device_kind"):
        verify(tx(P, hw(device_kind="tpu"), nonce=0))
    with pytest.raises(InvalidProviderRegistration, match="compute_capability"):
        verify(tx(P, hw(device_kind="cuda"), nonce=0))
    with pytest.raises(InvalidProviderRegistration, match="platform_class"):
        verify(tx(P, hw("has space"), nonce=0))


def test_a_class_list_is_capped() -> None:
    m = Market(replace(TASK_ECONOMY, max_providers_per_class=5))
    m.reject(BARE, hw(), ProviderClassFull)
    m.c.run(m.c.tx(P, hw()))  # re-registering a listed provider is no new entry


# --- honest tasks, paid ------------------------------------------------------------------------------


def test_honest_train_task_pays_provider_verifiers_and_royalties(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    t = m.train(verifiers=2)
    escrow = PRICE + PRICE // 10 + 2 * FEE_V
    assert t.escrow == escrow and t.steps == 16 and t.checkpoint_steps == (4, 8, 12, 16)
    assert m.c.net(REQ) == before[REQ] - escrow
    t = m.claim(t, P, price=9_000)
    bond = max(MIN_BOND, 9_000 * 20 // 100)
    assert t.bond == bond and m.c.net(P) == before[P] - bond
    assert get_role(m.c.view(), addr(P), Role.COMPUTE_PROVIDER).obligations == 1  # type: ignore[union-attr]
    t = m.post(result_body(t, price=8_000))
    t = m.drawn(t)
    assert t.state == TaskState.VERIFYING and len(t.verifier_slots) == 2
    who = m.verifiers(t)
    assert P not in who and REQ not in who and OTHER not in who
    t = m.verify_all(t, honest_answer)
    assert t.state == TaskState.CHALLENGE
    m.c.advance_to(t.window_end + 1)
    t = m.task(t.id)
    assert (t.state, t.outcome) == (TaskState.ENDED, Outcome.PAID)
    royalty = 8_000 // 10
    assert m.c.net(P) == before[P] + 8_000
    for v in who:
        assert m.c.net(v) == before[v] + FEE_V
    assert m.c.net(SUPPLIER) == before[SUPPLIER] + royalty
    assert m.c.net(REQ) == before[REQ] - 8_000 - royalty - 2 * FEE_V
    assert t.escrow == 0 and t.bond == 0
    record = get_provider(m.c.view(), addr(P))
    assert record is not None and (record.settled_ok, record.slashed, record.active_tasks) == (
        1,
        0,
        0,
    )
    assert get_role(m.c.view(), addr(P), Role.COMPUTE_PROVIDER).obligations == 0  # type: ignore[union-attr]


def test_finetune_pays_dataset_and_model_owners_pro_rata(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    params = recipes.canonical_params(
        {
            "model": hx(m.m1),
            "dataset": hx(m.dataset),
            "steps": 8,
            "lr": 0.01,
            "batch_size": 4,
            "optimizer": "adam",
            "seed": 3,
            "checkpoint_every": 8,
        }
    )
    inputs = [TaskInput(InputKind.MODEL, m.m1), TaskInput(InputKind.DATASET, m.dataset)]
    t = m.submit(
        submit_body(params, inputs, recipe="finetune", deadline=m.c.height + 40, verifiers=1)
    )
    t = m.claim(t, Q, price=PRICE)
    t = m.post(result_body(t, price=7_010), Q)
    t = m.verify_all(m.drawn(t), honest_answer)
    m.c.advance_to(t.window_end + 1)
    assert m.task(t.id).outcome == Outcome.PAID
    # 10 % of 7010 = 701: 351 to the first input's owner (the model's), 350 to the dataset's.
    assert royalty_split(701, [addr(DEV), addr(SUPPLIER)]) == [
        (addr(DEV), 351),
        (addr(SUPPLIER), 350),
    ]
    assert m.c.net(DEV) == before[DEV] + 351
    assert m.c.net(SUPPLIER) == before[SUPPLIER] + 350
    assert m.c.net(Q) == before[Q] + 7_010
    assert m.c.net(REQ) == before[REQ] - 7_010 - 701 - FEE_V


@pytest.mark.parametrize("recipe", ["merge", "evaluate"])
def test_merge_and_evaluate_are_verified_whole(m: Market, recipe: str) -> None:
    if recipe == "merge":
        params = recipes.canonical_params(
            {"method": "linear", "parents": [hx(m.m1), hx(m.m2)], "coefficients": [0.5, 0.5]}
        )
        inputs = [TaskInput(InputKind.MODEL, m.m1), TaskInput(InputKind.MODEL, m.m2)]
    else:
        params = recipes.canonical_params(
            {"model": hx(m.m1), "dataset": hx(m.dataset), "split": "all"}
        )
        inputs = [TaskInput(InputKind.MODEL, m.m1), TaskInput(InputKind.DATASET, m.dataset)]
    before = {k: m.c.net(k) for k in range(12)}
    t = m.submit(submit_body(params, inputs, recipe=recipe, deadline=m.c.height + 40, verifiers=3))
    assert (t.steps, t.checkpoint_steps) == (0, (0,))
    t = m.post(result_body(m.claim(t), price=6_000))
    t = m.drawn(t)
    assert t.segment == 0 and len(t.verifier_slots) == 3
    t = m.verify_all(t, lambda v, task: honest(0))  # everyone re-ran the whole job
    m.c.advance_to(t.window_end + 1)
    assert m.task(t.id).outcome == Outcome.PAID
    royalty = 600
    owners = {DEV: royalty} if recipe == "merge" else {DEV: 300, SUPPLIER: 300}
    for who, amount in owners.items():
        assert m.c.net(who) == before[who] + amount
    assert m.c.net(REQ) == before[REQ] - 6_000 - royalty - 3 * FEE_V


# --- rejections of a submission and a claim ------------------------------------------------------


def test_submission_rejections(m: Market) -> None:
    good = train_params(m.dataset)
    d_in = [TaskInput(InputKind.DATASET, m.dataset)]
    dl = m.c.height + 20
    m.reject(REQ, submit_body(good, d_in, recipe="shell", deadline=dl), RecipeNotAllowed)
    bad = recipes.canonical_params({**recipes.parse_params(good), "code": "import os"})
    err = m.reject(REQ, submit_body(bad, d_in, deadline=dl), TaskParamsInvalid)
    assert err.data == {"field": "code"}
    err = m.reject(
        REQ,
        submit_body(good.replace(b'"lr":0.1', b'"lr":-1'), d_in, deadline=dl),
        TaskParamsInvalid,
    )
    assert err.data == {"field": "lr"}
    ghost = Hash32(b"\x07" * 32)
    m.reject(
        REQ,
        submit_body(good, [*d_in, TaskInput(InputKind.DATASET, ghost)], deadline=dl),
        UnknownTaskInput,
    )
    m.reject(
        REQ, submit_body(good, [TaskInput(InputKind.MODEL, ghost)], deadline=dl), UnknownTaskInput
    )
    m.reject(REQ, submit_body(good, [], deadline=dl), TaskInputMissing)
    m.reject(REQ, submit_body(good, d_in, deadline=dl, steps=15), TaskLimitsExceeded)
    m.reject(REQ, submit_body(good, d_in, deadline=m.c.height), TaskDeadlineInvalid)
    m.reject(REQ, submit_body(good, d_in, deadline=m.c.height + 1_001), TaskDeadlineInvalid)
    m.reject(POOR, submit_body(good, d_in, deadline=dl), RequesterCannotPay)
    for body in (
        submit_body(good, d_in, deadline=dl, verifiers=0),
        submit_body(good, d_in, deadline=dl, verifiers=6),
        submit_body(good, d_in, deadline=dl, max_price=0),
        submit_body(good, [TaskInput(InputKind.CID, b"\x80pickle")], deadline=dl),
        submit_body(good, [*d_in, *d_in], deadline=dl),
    ):
        with pytest.raises(InvalidTaskBody):
            verify(tx(REQ, body, nonce=0))
    assert not any(k.startswith(NS_TASK) for k in m.c.state)


def test_claim_rejections(m: Market) -> None:
    t = m.train(min_reputation=1, memory=4 << 30)
    m.reject(NOBODY, TaskClaim(t.id, Amount(PRICE)), MissingRole)
    m.reject(BARE, TaskClaim(t.id, Amount(PRICE)), ProviderNotRegistered)
    m.reject(OTHER, TaskClaim(t.id, Amount(PRICE)), PlatformClassMismatch)
    m.reject(P, TaskClaim(t.id, Amount(PRICE)), ReputationTooLow)
    t = m.train(memory=16 << 30)
    m.reject(P, TaskClaim(t.id, Amount(PRICE)), InsufficientHardware)
    t = m.train()
    m.reject(P, TaskClaim(t.id, Amount(PRICE + 1)), PriceAboveMax)
    own = m.train()
    m.c.run(m.c.tx(P, hw(max_concurrent=1)))
    m.claim(t, P)
    m.reject(Q, TaskClaim(t.id, Amount(PRICE)), TaskNotOpen)  # the first valid claim won
    m.reject(P, TaskClaim(own.id, Amount(PRICE)), ProviderAtCapacity)
    mine = m.submit(
        submit_body(
            train_params(m.dataset),
            [TaskInput(InputKind.DATASET, m.dataset)],
            deadline=m.c.height + 9,
        ),
        who=Q,
    )
    m.reject(Q, TaskClaim(mine.id, Amount(PRICE)), SelfClaim)
    # A provider that can pay the fee but not the bond (2_000) on top of it.
    m.c.run(m.c.tx(R, Transfer(addr(NOBODY), Amount(m.c.balance(R) - 2 * FEE - 1_000))))
    m.reject(R, TaskClaim(own.id, Amount(PRICE)), ProviderCannotBond)


# --- results, deadlines, cancellation ------------------------------------------------------------


def test_result_rejections(m: Market) -> None:
    t = m.claim(m.train())
    good = result_body(t)
    m.reject(Q, good, NotTaskProvider)
    m.reject(
        P,
        replace(
            good, checkpoints=good.checkpoints[:3], final_link=link(t.id, good.checkpoints[:3])
        ),
        CheckpointCountMismatch,
    )
    m.reject(P, replace(good, final_link=link(t.id, good.checkpoints[:2])), CheckpointChainMismatch)
    swapped = (good.checkpoints[1], good.checkpoints[0], *good.checkpoints[2:])
    m.reject(P, replace(good, checkpoints=swapped), CheckpointChainMismatch)
    m.reject(P, replace(good, price=Amount(PRICE + 1)), PriceAboveClaim)
    m.reject_at(P, good, t.deadline + 1, LateResult)
    with pytest.raises(InvalidTaskBody):
        verify(tx(P, replace(good, output=b"not a cid"), nonce=0))
    m.reject(P, VerifyCommit(t.id, Hash32(bytes(32))), NotVerifying)


def test_missed_deadline_slashes_part_of_the_bond_and_reopens_once(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train(deadline=m.c.height + 5), P)
    bond = t.bond
    m.c.advance_to(t.deadline + 1)
    t2 = m.task(t.id)
    assert t2.state == TaskState.OPEN and t2.reopened and t2.provider is None
    assert t2.deadline == t.deadline + 10
    assert m.c.net(P) == before[P] - bond // 2  # half the bond burned, half returned
    record = get_provider(m.c.view(), addr(P))
    assert record is not None and (record.slashed, record.active_tasks) == (1, 0)
    m.reject(P, result_body(t2), TaskNotClaimed)  # the late result has no task to go to
    m.claim(t2, Q)
    m.c.advance_to(t2.deadline + 1)
    t3 = m.task(t.id)
    assert (t3.state, t3.outcome) == (TaskState.ENDED, Outcome.EXPIRED)
    assert m.c.net(Q) == before[Q] - bond // 2
    assert m.c.net(REQ) == before[REQ]  # fully refunded


def test_unclaimed_task_is_refunded_at_its_deadline(m: Market) -> None:
    before = m.c.net(REQ)
    t = m.train(deadline=m.c.height + 3)
    assert m.c.net(REQ) == before - t.escrow
    m.c.advance_to(t.deadline + 1)
    assert m.task(t.id).outcome == Outcome.EXPIRED
    assert m.c.net(REQ) == before
    m.reject(P, TaskClaim(t.id, Amount(PRICE)), TaskNotOpen)


def test_cancel_while_unclaimed(m: Market) -> None:
    before = m.c.net(REQ)
    t = m.train()
    m.reject(P, TaskCancel(t.id), NotTaskRequester)
    m.c.run(m.c.tx(REQ, TaskCancel(t.id)))
    assert m.task(t.id).outcome == Outcome.CANCELLED and m.c.net(REQ) == before
    m.c.advance_to(t.deadline + 1)  # the stale deadline entry does nothing
    assert m.c.net(REQ) == before
    t = m.claim(m.train())
    m.reject(REQ, TaskCancel(t.id), TaskNotOpen)


# --- failures ------------------------------------------------------------------------------------


def test_oom_inside_the_limits_pays_the_proven_checkpoints_pro_rata(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train(verifiers=1), P, price=9_000)
    cps = entries(t, honest, 2)  # steps 4 and 8 of 16
    body = TaskFail(t.id, int(FailReason.OUT_OF_MEMORY), cps, link(t.id, cps), 30)
    t = m.drawn(m.post(body))
    assert t.segment in (0, 1)
    t = m.verify_all(t, honest_answer)
    m.c.advance_to(t.window_end + 1)
    t = m.task(t.id)
    assert t.outcome == Outcome.PARTIAL and provider_pay(t) == 9_000 * 8 // 16
    pay = 4_500
    (v,) = m.verifiers(t)
    assert m.c.net(P) == before[P] + pay
    assert m.c.net(v) == before[v] + FEE_V
    assert m.c.net(SUPPLIER) == before[SUPPLIER] + pay // 10
    assert m.c.net(REQ) == before[REQ] - pay - pay // 10 - FEE_V


def test_provider_fault_refunds_and_a_full_failure_is_refused(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train())
    cps = entries(t, honest)
    m.reject(P, TaskFail(t.id, int(FailReason.CRASH), cps, link(t.id, cps), 1), InvalidFailure)
    with pytest.raises(InvalidTaskBody):
        verify(tx(P, TaskFail(t.id, 9, (), Hash32(bytes(32)), 1), nonce=0))
    m.post(TaskFail(t.id, int(FailReason.PROVIDER_FAULT), cps[:1], link(t.id, cps[:1]), 1))
    t = m.task(t.id)
    assert t.outcome == Outcome.PROVIDER_FAULT
    assert m.c.net(P) == before[P] and m.c.net(REQ) == before[REQ]


# --- verification ------------------------------------------------------------------------------------


def test_commit_reveal_rules(m: Market) -> None:
    t = m.drawn(m.post(result_body(m.claim(m.train(verifiers=2)))))
    v1, v2 = m.verifiers(t)
    outsider = next(p for p in (Q, R, S, T) if p not in (v1, v2))
    answer = honest_answer(v1, t)
    m.reject(
        outsider,
        VerifyCommit(t.id, verify_commitment(t.id, addr(outsider), answer, salt_of(outsider))),
        NotAVerifier,
    )
    m.commit(t, v1, answer)
    m.reject(v1, VerifyCommit(t.id, Hash32(bytes(32))), AlreadyCommitted)
    m.reject(v1, VerifyReveal(t.id, answer, salt_of(v1)), RevealOutsideWindow)  # still committing
    m.reject_at(v2, VerifyCommit(t.id, Hash32(bytes(32))), t.commit_end + 1, CommitWindowClosed)
    m.c.advance_to(t.commit_end + 1)
    m.reject(v1, VerifyReveal(t.id, answer, salt_of(v2)), RevealMismatch)
    m.reject(v2, VerifyReveal(t.id, answer, salt_of(v2)), NoCommitment)
    m.reveal(t, v1, answer)
    m.reject(v1, VerifyReveal(t.id, answer, salt_of(v1)), AlreadyRevealed)
    m.reject_at(v1, VerifyReveal(t.id, answer, salt_of(v1)), t.reveal_end + 1, RevealOutsideWindow)


def test_a_copying_verifier_gains_nothing(m: Market) -> None:
    before = {k: m.c.net(k) for k in range(12)}
    t = m.drawn(m.post(result_body(m.claim(m.train(verifiers=2)))))
    honest_v, copier = m.verifiers(t)
    answer = honest_answer(honest_v, t)
    m.commit(t, honest_v, answer)
    # The copier posts the honest verifier's commitment as its own.
    mine = m.task(t.id).verifier_slots[0].commitment
    assert mine is not None
    m.c.run(m.c.tx(copier, VerifyCommit(t.id, mine)))
    m.c.advance_to(t.commit_end + 1)
    m.reveal(t, honest_v, answer)
    # Having seen the reveal, the copier cannot open the copied commitment with it.
    m.reject(copier, VerifyReveal(t.id, answer, salt_of(honest_v)), RevealMismatch)
    m.reject(copier, VerifyReveal(t.id, answer, salt_of(copier)), RevealMismatch)
    m.c.advance_to(t.reveal_end + 1)
    m.c.advance_to(m.task(t.id).window_end + 1)
    assert m.task(t.id).outcome == Outcome.PAID
    assert m.c.net(honest_v) == before[honest_v] + FEE_V
    assert m.c.net(copier) == before[copier]  # its fees paid for nothing: net of fees unchanged
    assert m.c.balance(copier) < m.c.net(copier)
    assert m.c.net(REQ) == before[REQ] - PRICE - PRICE // 10 - FEE_V  # the copier's fee refunded


def test_challenge_rules(m: Market) -> None:
    t = m.verify_all(m.drawn(m.post(result_body(m.claim(m.train(verifiers=1))))), honest_answer)
    assert t.state == TaskState.CHALLENGE
    challenger = next(p for p in (Q, R, S, T) if p not in m.verifiers(t))
    claimed = t.result.checkpoints[0].state_hash  # type: ignore[union-attr]
    m.reject(challenger, TaskChallenge(t.id, 0, claimed), ChallengeAgrees)
    m.reject(challenger, TaskChallenge(t.id, 4, honest(99)), BadSegment)
    m.reject(OTHER, TaskChallenge(t.id, 0, honest(99)), PlatformClassMismatch)
    m.reject(NOBODY, TaskChallenge(t.id, 0, honest(99)), MissingRole)
    m.reject(P, TaskChallenge(t.id, 0, honest(99)), NotDisputeParty)
    m.reject_at(
        challenger, TaskChallenge(t.id, 0, honest(99)), t.window_end + 1, NotInChallengeWindow
    )


# --- disputes ------------------------------------------------------------------------------------------


def bisect(
    m: Market,
    t: Task,
    provider_run: Callable[[int], Hash32],
    challenger_run: Callable[[int], Hash32],
) -> tuple[Task, int]:
    """Both parties answer every round; returns the task once one step is left, and the rounds."""
    rounds = 0
    t = m.task(t.id)
    while t.state == TaskState.DISPUTE:
        d = t.dispute
        assert d is not None
        mid = bisect_midpoint(d)
        m.c.run(
            m.c.tx(P, BisectStep(t.id, d.round, provider_run(mid))),
            m.c.tx(m.index(d.challenger), BisectStep(t.id, d.round, challenger_run(mid))),
        )
        rounds += 1
        t = m.task(t.id)
    return t, rounds


def referee_answers(m: Market, t: Task, answer: Hash32) -> Task:
    t = m.task(t.id)
    if t.state == TaskState.REFEREE_DRAW:
        m.c.run()
        t = m.task(t.id)
    assert t.state == TaskState.REFEREE and t.dispute is not None and t.dispute.referee is not None
    ref = m.index(t.dispute.referee.address)
    assert ref not in (P, m.index(t.dispute.challenger))
    m.commit(t, ref, answer)
    m.c.advance_to(t.commit_end + 1)
    m.reveal(t, ref, answer)
    m.c.advance_to(t.reveal_end + 1)
    return m.task(t.id)


def run_dispute(m: Market, bad_step_in_segment: int, provider_lies: bool) -> dict[str, Any]:
    """A 32-step task in two 16-step segments. The liar's run diverges at ``segment start +
    bad_step_in_segment``; the drawn verifier (or, when the provider is honest, a challenger in
    the challenge window) disputes; returns what happened."""
    before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train(verifiers=1, steps=32, every=16), P, price=PRICE)
    bond = t.bond

    # A lying provider's run skips a step in every segment (so whichever segment is drawn
    # shows it); an honest one's is the honest run.
    def provider_run(s: int) -> Hash32:
        seg_start = 0 if s <= 16 else 16
        if not provider_lies or s - seg_start < bad_step_in_segment:
            return honest(s)
        return honest(s, b"cheat")

    t = m.drawn(m.post(result_body(t, provider_run)))
    (v,) = m.verifiers(t)
    t = m.verify_all(t, lambda who, task: honest(task.checkpoint_steps[task.segment]))
    seg_start = (0, 16)[t.segment]
    out: dict[str, Any] = {"before": before, "bond": bond, "verifier": v}
    if provider_lies:
        assert t.state == TaskState.DISPUTE and t.dispute is not None
        assert m.index(t.dispute.challenger) == v and t.dispute.by_verifier
        challenger_run: Callable[[int], Hash32] = honest
    else:
        assert t.state == TaskState.CHALLENGE
        challenger = next(p for p in (Q, R, S, T) if p != v)
        liar_from = seg_start + bad_step_in_segment

        def challenger_run(s: int) -> Hash32:
            return honest(s) if s < liar_from else honest(s, b"liar")

        m.c.run(m.c.tx(challenger, TaskChallenge(t.id, t.segment, challenger_run(seg_start + 16))))
        t = m.task(t.id)
    d = t.dispute
    assert d is not None and (d.low, d.high) == (seg_start, seg_start + 16)
    challenger_index = m.index(d.challenger)
    # The challenger's stake is its role bond: no resigning while the dispute is open.
    m.reject(challenger_index, RoleResign(int(Role.COMPUTE_PROVIDER)), RoleHasObligations)
    t, rounds = bisect(m, t, provider_run, challenger_run)
    assert rounds == 4  # log2(16)
    d = t.dispute
    assert d is not None and (d.low, d.high) == (
        seg_start + bad_step_in_segment - 1,
        seg_start + bad_step_in_segment,
    )
    out.update(task=t, challenger=m.index(d.challenger), rounds=rounds, high=d.high)
    return out


@pytest.mark.parametrize("bad", [1, 5, 16])
def test_dispute_provider_cheated_referee_sides_with_the_verifier(m: Market, bad: int) -> None:
    r = run_dispute(m, bad, provider_lies=True)
    t = r["task"]
    # The referee re-runs the single step from the agreed state and gets the honest hash.
    t = referee_answers(m, t, honest(r["high"]))
    assert (t.state, t.outcome) == (TaskState.ENDED, Outcome.PROVIDER_SLASHED)
    referee = m.index(t.dispute.referee.address)
    before, bond, v = r["before"], r["bond"], r["verifier"]
    reward = bond // 2
    # The verifier who caught it: its fee and half the bond; the referee its fee; rest burned.
    assert m.c.net(v) == before[v] + FEE_V + reward
    assert m.c.net(referee) == before[referee] + FEE_V
    assert m.c.net(P) == before[P] - bond
    assert m.c.net(REQ) == before[REQ] - FEE_V  # refunded all but the honest verifier's fee
    assert m.c.net(SUPPLIER) == before[SUPPLIER]
    record = get_provider(m.c.view(), addr(P))
    assert record is not None and (record.settled_ok, record.slashed) == (0, 1)


def test_dispute_lying_challenger_loses_its_stake(m: Market) -> None:
    r = run_dispute(m, 7, provider_lies=False)
    t = referee_answers(m, r["task"], honest(r["high"]))
    # The challenge window comes back for the heights it had left, then the task settles.
    assert t.state == TaskState.CHALLENGE
    m.c.advance_to(t.window_end + 1)
    t = m.task(t.id)
    assert (t.state, t.outcome) == (TaskState.ENDED, Outcome.PAID)
    before, c, v = r["before"], r["challenger"], r["verifier"]
    referee = m.index(t.dispute.referee.address)
    reward = CHALLENGE_SLASH // 2
    assert m.c.net(P) == before[P] + PRICE + reward
    assert m.c.net(c) == before[c]  # the stake came from its provider bond:
    assert m.c.net(referee) == before[referee] + FEE_V
    assert m.c.net(v) == before[v] + FEE_V
    assert m.c.net(REQ) == before[REQ] - PRICE - PRICE // 10 - FEE_V
    entry = get_role(m.c.view(), addr(c), Role.COMPUTE_PROVIDER)
    assert entry is not None and entry.bond == PROVIDER_BOND - CHALLENGE_SLASH
    t2 = m.train()
    m.reject(c, TaskClaim(t2.id, Amount(PRICE)), RoleBondDepleted)


def test_a_referee_matching_neither_party_settles_undecided(m: Market) -> None:
    r = run_dispute(m, 3, provider_lies=True)
    t = referee_answers(m, r["task"], honest(0, b"someone else"))
    assert t.outcome == Outcome.UNDECIDED
    before = r["before"]
    assert m.c.net(P) == before[P] and m.c.net(REQ) == before[REQ]
    for who in (P, r["challenger"]):
        entry = get_role(m.c.view(), addr(who), Role.COMPUTE_PROVIDER)
        assert entry is not None and entry.obligations == 0


def test_bisection_rules_and_a_silent_provider_loses(m: Market) -> None:
    r_before = {k: m.c.net(k) for k in range(12)}
    t = m.claim(m.train(verifiers=1, steps=32, every=16), P, price=PRICE)
    bond = t.bond
    t = m.drawn(m.post(result_body(t, lambda s: honest(s, b"random weights"))))
    (v,) = m.verifiers(t)
    t = m.verify_all(t, honest_answer)
    assert t.state == TaskState.DISPUTE and t.dispute is not None
    outsider = next(p for p in (Q, R, S, T) if p != v)
    mid = bisect_midpoint(t.dispute)
    m.reject(outsider, BisectStep(t.id, 0, honest(mid)), NotDisputeParty)
    m.reject(v, BisectStep(t.id, 1, honest(mid)), WrongBisectRound)
    m.c.run(m.c.tx(v, BisectStep(t.id, 0, honest(mid))))
    m.reject(v, BisectStep(t.id, 0, honest(mid)), AlreadyPosted)
    m.reject_at(P, BisectStep(t.id, 0, honest(mid)), t.window_end + 1, BisectWindowClosed)
    m.c.advance_to(t.window_end + 1)  # the provider never answers
    t = m.task(t.id)
    assert t.outcome == Outcome.PROVIDER_SLASHED
    assert m.c.net(v) == r_before[v] + FEE_V + bond // 2
    assert m.c.net(P) == r_before[P] - bond
    assert m.c.net(REQ) == r_before[REQ] - FEE_V


# --- plumbing --------------------------------------------------------------------------------------


def test_mempool_spend_bounds(m: Market) -> None:
    body = submit_body(
        train_params(m.dataset), [TaskInput(InputKind.DATASET, m.dataset)], deadline=99
    )
    vtx = verify(tx(REQ, body, nonce=0))
    assert registry.max_spend(m.c.view(), vtx) == PRICE + PRICE // 10 + 2 * FEE_V
    vtx = verify(tx(P, TaskClaim(Hash32(bytes(32)), Amount(50_000)), nonce=0))
    assert registry.max_spend(m.c.view(), vtx) == 10_000
    vtx = verify(tx(P, TaskCancel(Hash32(bytes(32))), nonce=0))
    assert registry.max_spend(m.c.view(), vtx) == 0

"""The compute market on chain (DESIGN §10, issue 7; the rules in docs/compute-market.md).

Kinds 60–69 (``EconomyKind``): compute providers register their hardware and platform class
(``ProviderRegister``); a requester submits a task whose recipe comes from the allow-list of
``node.compute.recipes`` with parameters checked against its schema, its price, verifier fees and
input royalties held in escrow (``TaskSubmit``); the first eligible provider claims it and locks a
bond (``TaskClaim``); it posts the result with the hash chain of its checkpoint CIDs and their
state hashes (``TaskResult``) or a failure with the checkpoints it can prove (``TaskFail``).

Verification. At the first block after the result, ``end_block`` draws the verifiers among the
platform class's providers and the segment to re-run (checkpoint k−1 → k) from that block's
parent hash — the hash of the block holding the result, unknown when the result was signed.
Verifiers commit ``sha256(TAG_VERIFY ‖ task ‖ verifier ‖ state_hash ‖ salt)`` (``VerifyCommit``)
and reveal after the commit window (``VerifyReveal``): a copy of another's commitment cannot be
opened by anyone else (the verifier's address is bound), and reveals only start once every
commitment is in. Both windows close early once every party has acted: the last drawn slot's
commitment ends the commit window (reveals from the next height), and the last committed slot's
reveal has the reveals taken at the end of the next block. Reveals that all equal the provider's
state hash for the segment's end open a challenge window (``TaskChallenge`` by any bonded
provider of the class posting its own hash); a mismatching reveal or a challenge opens a dispute
bisected Verde-style (``BisectStep``: both post the state hash at the midpoint; equal → the
lower bound moves up, else the upper moves down) until one step remains, which a third verifier
(the referee, drawn the same way) re-runs from the agreed state and commit-reveals. The loser's
stake is slashed: part to the winner, the referee's fee from it, the rest burned.

Every payer is defined: settlement pays the provider its price, each verifier who revealed the
right hash its fee and the input owners their royalties from escrow, the rest back to the
requester; an unclaimed task is refunded at its deadline; a claimed task that misses it burns
part of the provider's bond and reopens once; a failure inside the requester's limits pays the
proven checkpoints pro rata (after the same verification); a provider fault or a lost dispute
refunds the requester. A challenger that loses (or is left without a referee's verdict) hands
over to the next challenge: the task settles only when none is left. ``TaskCancel`` refunds an
unclaimed task.

Priced inputs: a task naming priced (encrypted) datasets escrows an input allowance, their prices
once per party that reads them (the provider, each verifier, one referee). A result, a failure
with checkpoints and a verifier's or referee's commitment each need the sender's own purchase of
every priced input, made at or after the submission and not used by another task (taken off the
buyer's ``OpenPurchases``), else ``InputNotPurchased``; when the task ends each party gets back
what its delivered purchases cost (at most the allowance) and the rest returns to the requester.

All timers of a task run through one height queue (``QUEUE_TASK``) with a per-block cap; a task
holds at most one live timer (``Task.timer``), so stale entries are skipped. Escrow and bonds
held by tasks are part of the issued supply but of no balance, like deal escrow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from node import crypto
from node.compute import recipes
from node.consensus.receipts import Attribute, Event
from node.consensus.state import HeightQueue, Overlay, StateView, get_account
from node.economy.api import (
    MAX_PROVIDERS_PER_CLASS_HARD,
    NS_COMPUTE_PROVIDER,
    NS_PROVIDER_CLASS,
    NS_TASK,
    QUEUE_TASK,
    EconomyError,
    EconomyKind,
    EconomyParams,
    KindHandler,
    Role,
    burn,
    charge,
    credit,
    economy_params,
    u64,
    u256,
)
from node.economy.datasets import get_dataset
from node.economy.models import Metric, get_model
from node.economy.purchases import (
    ShareState,
    get_purchase,
    open_purchases,
    put_open_purchases,
)
from node.economy.roles import (
    RoleEntry,
    RoleSet,
    adjust_obligations,
    get_role,
    get_roles,
    require_role,
    required_bond,
    roles_key,
)
from node.encoding import Record, limit
from node.errors import DecodeError, InsufficientFunds, InvalidBody
from node.storage.unixfs import DAG_PB_CODEC, RAW_CODEC, parse_cid
from node.types import ZERO_HASH, Address, Amount, Hash32

if TYPE_CHECKING:
    from node.consensus.transition import BlockContext
    from node.consensus.txs import VerifiedTransaction

TASK_ID_TAG = b"NeuroSeed/task/v1"
TAG_VERIFY = b"NeuroSeed/verify/v1"
"""Domain tag of a verifier's (or referee's) commitment."""

MAX_CID_BYTES = 64
MAX_CLASS_BYTES = 128
MAX_DEVICE_NAME = 128
MAX_TASK_INPUTS = 16
MAX_TASK_METRICS = 16
MAX_CHECKPOINTS = 64
MAX_VERIFIERS = 5
MAX_DEVICES = 64
DEVICE_KINDS = ("cpu", "cuda")
REPUTATION_SLASH_WEIGHT = 4
"""reputation = tasks settled ok − 4 × times slashed (see ``reputation``)."""
_SHA2_256 = 0x12


# --- errors (codes 3100–3149) ------------------------------------------------------------------


class TaskError(EconomyError):
    """Base of the compute market's errors."""

    code = 3100
    reason = "invalid compute-market transaction"


class RecipeNotAllowed(TaskError):
    code = 3101
    reason = "the recipe is not in the allow-list"


class TaskParamsInvalid(TaskError):
    code = 3102
    reason = "task parameters outside the recipe's schema"


class InvalidTaskBody(InvalidBody):
    code = 3103
    reason = "invalid compute-market transaction body"


class InvalidProviderRegistration(InvalidBody):
    code = 3104
    reason = "invalid compute provider registration"


class ProviderClassFull(TaskError):
    code = 3105
    reason = "the platform class lists the most providers allowed"


class ProviderHasActiveTasks(TaskError):
    code = 3106
    reason = "a provider with claimed tasks cannot change its platform class"


class UnknownTaskInput(TaskError):
    code = 3107
    reason = "a task input names no registered dataset or model"


class TaskInputMissing(TaskError):
    code = 3108
    reason = "the parameters name a dataset or model the task's inputs do not list"


class TaskLimitsExceeded(TaskError):
    code = 3109
    reason = "the recipe needs more than the task's limits allow"


class TaskDeadlineInvalid(TaskError):
    code = 3110
    reason = "the task's deadline is not ahead within the chain's maximum"


class RequesterCannotPay(InsufficientFunds):
    code = 3111
    reason = "the requester's balance cannot pay the task's escrow and the fee"


class UnknownTask(TaskError):
    code = 3112
    reason = "no such task"


class TaskNotOpen(TaskError):
    code = 3113
    reason = "the task is not open for claims"


class TaskExpired(TaskError):
    code = 3114
    reason = "the task's deadline has passed"


class ProviderNotRegistered(TaskError):
    code = 3115
    reason = "the sender has not registered as a compute provider"


class PlatformClassMismatch(TaskError):
    code = 3116
    reason = "the provider's platform class is not the task's"


class ReputationTooLow(TaskError):
    code = 3117
    reason = "the provider's reputation is below the task's minimum"


class InsufficientHardware(TaskError):
    code = 3118
    reason = "the provider's hardware is below the task's limits"


class ProviderAtCapacity(TaskError):
    code = 3119
    reason = "the provider runs as many tasks as it registered"


class PriceAboveMax(TaskError):
    code = 3120
    reason = "the claimed price is above the task's maximum price"


class ProviderCannotBond(InsufficientFunds):
    code = 3121
    reason = "the provider's balance cannot lock the task bond and the fee"


class TaskNotClaimed(TaskError):
    code = 3122
    reason = "the task is not claimed and awaiting its result"


class NotTaskProvider(TaskError):
    code = 3123
    reason = "only the provider that claimed the task may do this"


class LateResult(TaskError):
    code = 3124
    reason = "the result comes after the task's deadline"


class CheckpointCountMismatch(TaskError):
    code = 3125
    reason = "the number of checkpoints does not fit the task"


class CheckpointChainMismatch(TaskError):
    code = 3126
    reason = "the final link is not the hash chain of the checkpoint CIDs"


class PriceAboveClaim(TaskError):
    code = 3127
    reason = "the price charged is above the claimed price"


class NotVerifying(TaskError):
    code = 3128
    reason = "the task has no verification (or referee) round open"


class NotAVerifier(TaskError):
    code = 3129
    reason = "the sender is not a verifier drawn for the task"


class CommitWindowClosed(TaskError):
    code = 3130
    reason = "the commit window has closed"


class AlreadyCommitted(TaskError):
    code = 3131
    reason = "the verifier has committed already"


class RevealOutsideWindow(TaskError):
    code = 3132
    reason = "reveals are taken only after the commit window, within the reveal window"


class NoCommitment(TaskError):
    code = 3133
    reason = "the verifier made no commitment"


class AlreadyRevealed(TaskError):
    code = 3134
    reason = "the verifier has revealed already"


class RevealMismatch(TaskError):
    code = 3135
    reason = "the reveal does not open the verifier's commitment"


class NotInChallengeWindow(TaskError):
    code = 3136
    reason = "the task is not in its challenge window"


class BadSegment(TaskError):
    code = 3137
    reason = "no such segment of the task"


class ChallengeAgrees(TaskError):
    code = 3138
    reason = "the challenge posts the provider's own state hash"


class NotInDispute(TaskError):
    code = 3139
    reason = "the task has no bisection round open"


class NotDisputeParty(TaskError):
    code = 3140
    reason = "only the provider and the challenger post bisection steps"


class WrongBisectRound(TaskError):
    code = 3141
    reason = "the bisection step is for another round"


class BisectWindowClosed(TaskError):
    code = 3142
    reason = "the bisection round's window has closed"


class AlreadyPosted(TaskError):
    code = 3143
    reason = "the party posted its hash for this round already"


class NotTaskRequester(TaskError):
    code = 3144
    reason = "only the task's requester may cancel it"


class SelfClaim(TaskError):
    code = 3145
    reason = "a requester cannot claim its own task"


class InvalidFailure(TaskError):
    code = 3146
    reason = "the failure report does not fit the task"


class InputNotPurchased(TaskError):
    """The sender reads the task's data but holds no unused purchase of a priced input made at
    or after the task's submission (``open_purchases``)."""

    code = 3147
    reason = "a priced input of the task has no purchase by the sender"


class RequesterCannotChallenge(TaskError):
    code = 3148
    reason = "a requester cannot challenge its own task's result"


class ChallengerAtCapacity(TaskError):
    """The challenger's role bond cannot cover one more ``challenge_slash``: it has as many
    disputes open as ``provider_bond // challenge_slash``, or a bond below the role's."""

    code = 3149
    reason = "the challenger has as many disputes open as its role bond covers"


# --- enums ---------------------------------------------------------------------------------------


class InputKind(IntEnum):
    DATASET = 1  # ref: a registered dataset id (royalties to its owner)
    MODEL = 2  # ref: a registered model id (royalties to its owner)
    CID = 3  # ref: a binary CIDv1 of some other artifact (no royalty)


class TaskState(IntEnum):
    OPEN = 1  # awaiting a claim
    CLAIMED = 2  # awaiting the result (or a failure report)
    DRAWING = 3  # result posted: verifiers and segment drawn at the next block
    VERIFYING = 4  # verifiers commit, then reveal
    CHALLENGE = 5  # the challenge window
    DISPUTE = 6  # bisection rounds
    REFEREE_DRAW = 7  # one step left: the referee is drawn at the next block
    REFEREE = 8  # the referee commits, then reveals
    ENDED = 9  # see ``Outcome``


class Outcome(IntEnum):
    PENDING = 0
    PAID = 1  # settled: provider, verifiers, royalties paid
    PARTIAL = 2  # a failure inside the requester's limits: proven checkpoints paid pro rata
    PROVIDER_SLASHED = 3  # the provider lost a dispute: requester refunded
    EXPIRED = 4  # no claim (or a second missed deadline): refunded
    CANCELLED = 5
    PROVIDER_FAULT = 6  # the provider reported its own fault: refunded, bond returned
    UNDECIDED = 7  # the referee's hash matched neither party (no dispute left): refunded


class FailReason(IntEnum):
    OUT_OF_MEMORY = 1  # inside the requester's device-memory limit
    CRASH = 2  # the recipe itself failed (e.g. diverged) inside the requester's limits
    WALL_TIMEOUT = 3  # the requester's wall-time limit was reached
    PROVIDER_FAULT = 4  # the provider's own fault (hardware, node)


_REQUESTER_FAILURES = frozenset(
    {FailReason.OUT_OF_MEMORY, FailReason.CRASH, FailReason.WALL_TIMEOUT}
)
_USABLE_SHARES = frozenset(
    {ShareState.AWAITING_KEY, ShareState.KEY_POSTED, ShareState.LEAF_DISPUTE, ShareState.PAID}
)
"""A purchase all of whose shares are in these states grants its data (``purchase_grants``)."""
_DELIVERED_SHARES = frozenset({ShareState.KEY_POSTED, ShareState.LEAF_DISPUTE, ShareState.PAID})
"""Shares whose key reached the buyer and that were not refunded: what a party is reimbursed."""

# Queue entries: task id (32) ‖ what (1) ‖ the task's timer (8, big endian).
_DEADLINE = 0
_DRAW = 1
_REVEAL_END = 2
_CHALLENGE_END = 3
_BISECT_DUE = 4
_REFEREE_DRAW = 5

TASK_QUEUE = HeightQueue(QUEUE_TASK)


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderRegister(Record):
    """Transaction body: the sender's (replaceable) compute offer. Needs COMPUTE_PROVIDER."""

    device_kind: str = field(metadata=limit(16))  # one of DEVICE_KINDS
    device_name: str = field(metadata=limit(MAX_DEVICE_NAME))
    devices: int  # devices of this kind on the provider
    memory_bytes: int  # per device (RAM for a CPU provider)
    compute_capability: str = field(metadata=limit(16))  # "9.0" for sm90; "" on CPU
    cpu_cores: int
    platform_class: str = field(metadata=limit(MAX_CLASS_BYTES))  # node.compute.platform
    price_per_device_second: Amount
    max_concurrent: int  # tasks claimed at once


@dataclass(frozen=True, slots=True)
class ComputeProvider(Record):
    """A provider in state (``NS_COMPUTE_PROVIDER + address``); kept after resignation so the
    reputation stays with the address."""

    address: Address
    device_kind: str = field(metadata=limit(16))
    device_name: str = field(metadata=limit(MAX_DEVICE_NAME))
    devices: int
    memory_bytes: int
    compute_capability: str = field(metadata=limit(16))
    cpu_cores: int
    platform_class: str = field(metadata=limit(MAX_CLASS_BYTES))
    price_per_device_second: Amount
    max_concurrent: int
    active_tasks: int
    settled_ok: int
    slashed: int
    height: int  # of the last registration


@dataclass(frozen=True, slots=True)
class ClassProviders(Record):
    """The providers of one platform class, in registration order (verifier draws)."""

    platform_class: str = field(metadata=limit(MAX_CLASS_BYTES))
    providers: tuple[Address, ...] = field(metadata=limit(MAX_PROVIDERS_PER_CLASS_HARD))


@dataclass(frozen=True, slots=True)
class TaskInput(Record):
    kind: int  # InputKind
    ref: bytes = field(metadata=limit(MAX_CID_BYTES))


@dataclass(frozen=True, slots=True)
class TaskLimits(Record):
    """The requester's limits: the worker enforces them; failures inside them are its cost."""

    device_memory: int  # bytes per device
    wall_seconds: int
    steps: int  # at least the recipe's steps


@dataclass(frozen=True, slots=True)
class TaskSubmit(Record):
    recipe: str = field(metadata=limit(16))
    params: bytes = field(metadata=limit(recipes.MAX_PARAMS_BYTES))  # canonical JSON
    inputs: tuple[TaskInput, ...] = field(metadata=limit(MAX_TASK_INPUTS))
    limits: TaskLimits
    deadline: int  # height by which the result must be in a block
    max_price: Amount
    verifier_fee: Amount  # per verifier
    verifiers: int  # 1–5
    min_reputation: int
    platform_class: str = field(metadata=limit(MAX_CLASS_BYTES))


@dataclass(frozen=True, slots=True)
class TaskClaim(Record):
    task_id: Hash32
    price: Amount  # what the provider will charge at most (≤ the task's max price)


@dataclass(frozen=True, slots=True)
class CheckpointEntry(Record):
    """One checkpoint: its artifact's root CID (the link chain's input) and its state hash
    (the sha256 of the checkpoint file: what verifiers reveal)."""

    cid: bytes = field(metadata=limit(MAX_CID_BYTES))
    state_hash: Hash32


@dataclass(frozen=True, slots=True)
class TaskResult(Record):
    task_id: Hash32
    output: bytes = field(metadata=limit(MAX_CID_BYTES))  # the result artifact's root CID
    metrics: tuple[Metric, ...] = field(metadata=limit(MAX_TASK_METRICS))
    checkpoints: tuple[CheckpointEntry, ...] = field(metadata=limit(MAX_CHECKPOINTS))
    final_link: Hash32  # link_k of recipes.chain_links over the checkpoint CIDs
    device_seconds: int
    price: Amount  # charged, ≤ the claimed price


@dataclass(frozen=True, slots=True)
class TaskFail(Record):
    """The provider reports a failure with the checkpoints it can prove (fewer than all)."""

    task_id: Hash32
    reason: int  # FailReason
    checkpoints: tuple[CheckpointEntry, ...] = field(metadata=limit(MAX_CHECKPOINTS))
    final_link: Hash32  # of those checkpoints (ignored when there are none)
    device_seconds: int


@dataclass(frozen=True, slots=True)
class VerifyCommit(Record):
    task_id: Hash32
    commitment: Hash32  # verify_commitment(task_id, sender, state_hash, salt)


@dataclass(frozen=True, slots=True)
class VerifyReveal(Record):
    task_id: Hash32
    state_hash: Hash32
    salt: Hash32


@dataclass(frozen=True, slots=True)
class TaskChallenge(Record):
    task_id: Hash32
    segment: int
    state_hash: Hash32  # the challenger's own state hash at the segment's end


@dataclass(frozen=True, slots=True)
class BisectStep(Record):
    task_id: Hash32
    round: int
    state_hash: Hash32  # the sender's state hash at the round's midpoint step


@dataclass(frozen=True, slots=True)
class TaskCancel(Record):
    task_id: Hash32


@dataclass(frozen=True, slots=True)
class VerifierSlot(Record):
    address: Address
    commitment: Hash32 | None
    state_hash: Hash32 | None  # revealed


@dataclass(frozen=True, slots=True)
class InputBuy(Record):
    """The purchases one party of a task (the provider, a verifier, the referee) used for the
    task's priced inputs, in input order; reimbursed from the input allowance at the end."""

    address: Address
    purchases: tuple[Hash32, ...] = field(metadata=limit(MAX_TASK_INPUTS))


@dataclass(frozen=True, slots=True)
class ResultRecord(Record):
    output: bytes = field(metadata=limit(MAX_CID_BYTES))  # empty for a failure
    metrics: tuple[Metric, ...] = field(metadata=limit(MAX_TASK_METRICS))
    checkpoints: tuple[CheckpointEntry, ...] = field(metadata=limit(MAX_CHECKPOINTS))
    final_link: Hash32
    device_seconds: int
    price: Amount  # charged (for a failure: the claimed price, paid pro rata)
    height: int
    fail_reason: int  # 0 for a result, else FailReason


@dataclass(frozen=True, slots=True)
class Dispute(Record):
    """A bisection over steps [low, high] of one segment; ``low_hash`` is agreed (ZERO_HASH:
    the task's initial state, derived from its inputs). A task may hold several disputes one
    after another (a challenger that loses hands over to the next one): the last one stays on
    the task, and its round numbers follow on from the previous dispute's."""

    challenger: Address
    by_verifier: bool  # opened by a mismatching reveal (else by TASK_CHALLENGE)
    segment: int
    low: int
    high: int
    low_hash: Hash32
    provider_hash: Hash32  # at high
    challenger_hash: Hash32  # at high
    round: int
    provider_mid: Hash32 | None
    challenger_mid: Hash32 | None
    referee: VerifierSlot | None
    window_left: int  # heights of the challenge window left when a TaskChallenge opened it
    lost: int  # bit i: verifier slot i lost a dispute of this task (it is not paid)


@dataclass(frozen=True, slots=True)
class Task(Record):
    """A task in state (``NS_TASK + id``), kept after it ends."""

    id: Hash32
    requester: Address
    recipe: str = field(metadata=limit(16))
    params: bytes = field(metadata=limit(recipes.MAX_PARAMS_BYTES))
    inputs: tuple[TaskInput, ...] = field(metadata=limit(MAX_TASK_INPUTS))
    limits: TaskLimits
    deadline: int
    max_price: Amount
    verifier_fee: Amount
    verifiers: int
    min_reputation: int
    platform_class: str = field(metadata=limit(MAX_CLASS_BYTES))
    steps: int  # recipes.task_steps (0 for merge / evaluate)
    checkpoint_steps: tuple[int, ...] = field(metadata=limit(MAX_CHECKPOINTS))
    devices: int
    submit_height: int
    state: int  # TaskState
    outcome: int  # Outcome
    escrow: Amount  # still held
    provider: Address | None
    price: Amount  # claimed
    bond: Amount  # the provider's, still locked
    claim_height: int
    reopened: bool
    result: ResultRecord | None
    segment: int
    verifier_slots: tuple[VerifierSlot, ...] = field(metadata=limit(MAX_VERIFIERS))
    commit_end: int  # last height of the commit window (verifiers or referee)
    reveal_end: int  # last height of the reveal window
    window_end: int  # last height of the challenge window or of the bisection round
    dispute: Dispute | None
    timer: int  # the one live queue entry carries this; others are stale
    end_height: int
    input_allowance: Amount  # per party: the prices of the priced dataset inputs, summed
    input_buys: tuple[InputBuy, ...] = field(metadata=limit(MAX_VERIFIERS + 2))


@dataclass(frozen=True, slots=True)
class SegmentBounds:
    """Steps [start, end] of a segment and the state hashes at both ends (start: ZERO_HASH for
    the initial state)."""

    index: int
    start: int
    end: int
    start_hash: Hash32
    end_hash: Hash32


# --- keys, ids, reads ----------------------------------------------------------------------------


def task_id(requester: Address, nonce: int) -> Hash32:
    """The id of the task ``requester`` submits with transaction nonce ``nonce``."""
    return crypto.sha256(TASK_ID_TAG + bytes(requester) + nonce.to_bytes(8, "big"))


def task_key(id_: bytes) -> bytes:
    return NS_TASK + id_


def provider_key(address: Address) -> bytes:
    return NS_COMPUTE_PROVIDER + address


def class_key(platform_class: str) -> bytes:
    return NS_PROVIDER_CLASS + hashlib.sha256(platform_class.encode()).digest()


def get_task(view: StateView, id_: bytes) -> Task | None:
    raw = view.get(task_key(id_))
    return None if raw is None else Task.decode(raw)


def get_provider(view: StateView, address: Address) -> ComputeProvider | None:
    raw = view.get(provider_key(address))
    return None if raw is None else ComputeProvider.decode(raw)


def class_providers(view: StateView, platform_class: str) -> tuple[Address, ...]:
    raw = view.get(class_key(platform_class))
    return () if raw is None else ClassProviders.decode(raw).providers


def reputation(provider: ComputeProvider) -> int:
    """Tasks settled ok minus ``REPUTATION_SLASH_WEIGHT`` per slash (may be negative)."""
    return provider.settled_ok - REPUTATION_SLASH_WEIGHT * provider.slashed


def verify_commitment(task: bytes, verifier: Address, state_hash: bytes, salt: bytes) -> Hash32:
    """The commitment a verifier (or referee) posts: it binds the task and the verifier's own
    address, so a copied commitment can only be opened by its author."""
    return crypto.sha256(TAG_VERIFY + bytes(task) + bytes(verifier) + bytes(state_hash) + salt)


def segment_bounds(task: Task, index: int) -> SegmentBounds:
    """Segment ``index`` of a task with a result: checkpoint index−1 → index (merge / evaluate:
    the whole job, steps 0 → 0)."""
    assert task.result is not None
    cps = task.result.checkpoints
    start = task.checkpoint_steps[index - 1] if index > 0 else 0
    start_hash = cps[index - 1].state_hash if index > 0 else ZERO_HASH
    return SegmentBounds(
        index, start, task.checkpoint_steps[index], start_hash, cps[index].state_hash
    )


def bisect_midpoint(dispute: Dispute) -> int:
    """The step both parties post their state hash at in the current round."""
    return (dispute.low + dispute.high) // 2


def input_allowance(view: StateView, inputs: Sequence[TaskInput]) -> int:
    """What one party pays to read a task's priced inputs: the prices of its priced (encrypted)
    dataset inputs, summed. Priced models cannot be bought (no purchase kind sells them)."""
    total = 0
    for item in inputs:
        if item.kind == InputKind.DATASET:
            ds = get_dataset(view, item.ref)
            if ds is not None and ds.price > 0:
                total += ds.price
    return total


def input_parties(verifiers: int) -> int:
    """The parties that may have to read a task's data: the provider, the verifiers and one
    referee."""
    return verifiers + 2


def escrow_for(params: EconomyParams, body: TaskSubmit, allowance: int = 0) -> int:
    """What a submission locks: the maximum price, its royalties (if an input earns any), every
    verifier's fee and the input allowance (``allowance`` per party, ``input_allowance``)."""
    royalty = 0
    if any(i.kind in (InputKind.DATASET, InputKind.MODEL) for i in body.inputs):
        royalty = body.max_price * params.royalty_percent // 100
    inputs = allowance * input_parties(body.verifiers)
    return body.max_price + royalty + body.verifier_fee * body.verifiers + inputs


def bond_for(params: EconomyParams, price: int) -> int:
    """The task bond a claim at ``price`` locks."""
    return max(params.task_min_bond, price * params.task_bond_percent // 100)


def submit_spend(view: StateView, body: TaskSubmit) -> int:
    """What a ``TaskSubmit`` takes from the balance besides the fee (the mempool's check)."""
    return escrow_for(economy_params(view), body, input_allowance(view, body.inputs))


def claim_spend(view: StateView, body: TaskClaim) -> int:
    return bond_for(economy_params(view), body.price)


# --- stateless checks ------------------------------------------------------------------------


def _check_cid(value: bytes, where: str) -> None:
    try:
        cid = parse_cid(value)
    except DecodeError as exc:
        raise InvalidTaskBody(f"{where} is not a binary CID: {exc}") from exc
    if (
        cid.version != 1
        or cid.hashfun.code != _SHA2_256
        or cid.codec.code not in (RAW_CODEC, DAG_PB_CODEC)
        or bytes(cid) != value
    ):
        raise InvalidTaskBody(f"{where} must be a binary CIDv1 (sha2-256, raw or dag-pb)")


def _check_class(value: str, where: str, error: type[InvalidBody]) -> None:
    if not value or not all(33 <= ord(c) < 127 for c in value):
        raise error(f"{where} must be 1–{MAX_CLASS_BYTES} printable ASCII characters, no spaces")


def check_provider_body(body: ProviderRegister) -> None:
    err = InvalidProviderRegistration
    if body.device_kind not in DEVICE_KINDS:
        raise err(f"ProviderRegister.device_kind must be one of {', '.join(DEVICE_KINDS)}")
    if not 1 <= body.devices <= MAX_DEVICES:
        raise err(f"ProviderRegister.devices must be in [1, {MAX_DEVICES}]")
    if body.memory_bytes == 0:
        raise err("ProviderRegister.memory_bytes must be positive")
    if body.max_concurrent == 0:
        raise err("ProviderRegister.max_concurrent must be positive")
    if body.device_kind == "cpu" and body.cpu_cores == 0:
        raise err("ProviderRegister.cpu_cores must be positive for a CPU provider")
    if body.device_kind == "cuda" and not body.compute_capability:
        raise err("ProviderRegister.compute_capability is needed for a CUDA provider")
    _check_class(body.platform_class, "ProviderRegister.platform_class", err)


def check_submit_body(body: TaskSubmit) -> None:
    if not 1 <= body.verifiers <= MAX_VERIFIERS:
        raise InvalidTaskBody(f"TaskSubmit.verifiers must be in [1, {MAX_VERIFIERS}]")
    if body.max_price == 0:
        raise InvalidTaskBody("TaskSubmit.max_price must be positive")
    lim = body.limits
    if lim.device_memory == 0 or lim.wall_seconds == 0:
        raise InvalidTaskBody("TaskSubmit.limits: device_memory and wall_seconds must be positive")
    _check_class(body.platform_class, "TaskSubmit.platform_class", InvalidTaskBody)
    seen: set[tuple[int, bytes]] = set()
    for i, item in enumerate(body.inputs):
        where = f"TaskSubmit.inputs[{i}]"
        if item.kind in (InputKind.DATASET, InputKind.MODEL):
            if len(item.ref) != 32:
                raise InvalidTaskBody(f"{where}.ref must be a 32-byte dataset or model id")
        elif item.kind == InputKind.CID:
            _check_cid(item.ref, f"{where}.ref")
        else:
            raise InvalidTaskBody(
                f"{where}.kind {item.kind} is not 1 (dataset), 2 (model), 3 (cid)"
            )
        if (item.kind, item.ref) in seen:
            raise InvalidTaskBody(f"{where} is listed twice")
        seen.add((item.kind, item.ref))


def _check_checkpoint_entries(entries: Sequence[CheckpointEntry], where: str) -> None:
    for i, entry in enumerate(entries):
        _check_cid(entry.cid, f"{where}.checkpoints[{i}].cid")


def check_result_body(body: TaskResult) -> None:
    _check_cid(body.output, "TaskResult.output")
    if not body.checkpoints:
        raise InvalidTaskBody("TaskResult.checkpoints: at least one checkpoint is needed")
    _check_checkpoint_entries(body.checkpoints, "TaskResult")
    names = [m.name for m in body.metrics]
    if len(set(names)) != len(names):
        raise InvalidTaskBody("TaskResult.metrics: a metric name appears twice")


def check_fail_body(body: TaskFail) -> None:
    if body.reason not in {int(r) for r in FailReason}:
        raise InvalidTaskBody(f"TaskFail.reason {body.reason} is not one of 1–{max(FailReason)}")
    _check_checkpoint_entries(body.checkpoints, "TaskFail")


# --- helpers ---------------------------------------------------------------------------------


def _hex(b: bytes) -> str:
    return "0x" + bytes(b).hex()


def _require_task(view: StateView, id_: bytes) -> Task:
    task = get_task(view, id_)
    if task is None:
        raise UnknownTask(f"no task {_hex(id_)}")
    return task


def _put_task(view: Overlay, task: Task) -> None:
    view.put(task_key(task.id), task.encode())


def _entry(id_: bytes, what: int, timer: int) -> bytes:
    return bytes(id_) + bytes((what,)) + timer.to_bytes(8, "big")


def _parse_entry(entry: bytes) -> tuple[Hash32, int, int]:
    return Hash32(entry[:32]), entry[32], int.from_bytes(entry[33:41], "big")


def _arm(view: Overlay, task: Task, height: int, what: int) -> Task:
    """Give ``task`` a new timer (invalidating the old one) due at ``height``."""
    timer = task.timer + 1
    TASK_QUEUE.push(view, height, _entry(task.id, what, timer))
    return replace(task, timer=timer)


def _event(name: str, id_: bytes, *attrs: Attribute) -> Event:
    return Event(name, (Attribute("task_id", bytes(id_)), *attrs))


def _params_ids(recipe: str, p: Mapping[str, Any]) -> tuple[set[bytes], set[bytes]]:
    """(dataset ids, model ids) the parameters name."""
    datasets: set[bytes] = set()
    models: set[bytes] = set()

    def hexid(v: Any) -> bytes:
        return bytes.fromhex(v) if isinstance(v, str) else b""

    for name in ("dataset", "val_dataset"):
        if name in p:
            datasets.add(hexid(p[name]))
    if recipe == "merge":
        for d in p.get("datasets", []) or []:
            datasets.add(hexid(d))
        for m in p.get("parents", []) or []:
            models.add(hexid(m))
        if p.get("base") is not None:
            models.add(hexid(p["base"]))
    elif "model" in p:
        models.add(hexid(p["model"]))
    return datasets, models


def _take_role_bond(view: Overlay, address: Address, role: int, amount: int) -> int:
    """Take up to ``amount`` from ``address``'s ``role`` bond (not burned: the caller pays it
    out); returns what was taken."""
    entries = list(get_roles(view, address))
    for i, e in enumerate(entries):
        if e.role == role:
            taken = min(e.bond, amount)
            if taken:
                entries[i] = RoleEntry(
                    e.role, e.since, Amount(e.bond - taken), e.obligations, e.metadata
                )
                view.put(roles_key(address), RoleSet(tuple(entries)).encode())
            return taken
    return 0


def _holds_full_bond(view: StateView, params: EconomyParams, address: Address) -> bool:
    entry = get_role(view, address, Role.COMPUTE_PROVIDER)
    return entry is not None and entry.bond >= required_bond(params, Role.COMPUTE_PROVIDER)


def _eligible_verifier(view: StateView, params: EconomyParams, address: Address, cls: str) -> bool:
    if not _holds_full_bond(view, params, address):
        return False
    record = get_provider(view, address)
    return record is not None and record.platform_class == cls


def _draw_index(seed: bytes, id_: bytes, label: bytes, n: int) -> int:
    digest = hashlib.sha256(bytes(seed) + bytes(id_) + label).digest()
    return int.from_bytes(digest[:8], "big") % n


def draw_verifiers(
    seed: bytes, id_: bytes, candidates: Sequence[Address], count: int, label: bytes = b"verifier"
) -> list[Address]:
    """``count`` distinct candidates (fewer if there are fewer), drawn with ``sha256(seed ‖
    task ‖ label ‖ i)``; the seed is a block's parent hash."""
    pool = list(candidates)
    out: list[Address] = []
    for i in range(min(count, len(pool))):
        out.append(pool.pop(_draw_index(seed, id_, label + i.to_bytes(4, "big"), len(pool))))
    return out


def draw_segment(seed: bytes, id_: bytes, segments: int) -> int:
    """The segment verifiers re-run, drawn from a hash that follows the result."""
    return _draw_index(seed, id_, b"segment", segments)


def _candidates(
    view: StateView, params: EconomyParams, task: Task, exclude: set[bytes]
) -> list[Address]:
    return [
        a
        for a in class_providers(view, task.platform_class)
        if bytes(a) not in exclude and _eligible_verifier(view, params, a, task.platform_class)
    ]


# --- priced inputs ---------------------------------------------------------------------------


def _priced_dataset_inputs(view: StateView, task: Task) -> list[Hash32]:
    return [
        Hash32(bytes(item.ref))
        for item in task.inputs
        if item.kind == InputKind.DATASET
        and (ds := get_dataset(view, item.ref)) is not None
        and ds.price > 0
    ]


def find_input_purchases(
    view: StateView, task: Task, buyer: Address
) -> list[tuple[Hash32, Hash32 | None]]:
    """(dataset, purchase) per priced dataset input of ``task``: the oldest of ``buyer``'s open
    purchases of it (``open_purchases``) made at or after the task's submission whose shares all
    grant the data, or None. Bounded: at most ``MAX_OPEN_PURCHASES`` records per input."""
    out: list[tuple[Hash32, Hash32 | None]] = []
    for ref in _priced_dataset_inputs(view, task):
        found: Hash32 | None = None
        for pid in open_purchases(view, buyer, ref):
            record = get_purchase(view, pid)
            if (
                record is not None
                and record.buyer == buyer
                and record.dataset == ref
                and record.height >= task.submit_height
                and all(s.state in _USABLE_SHARES for s in record.shares)
            ):
                found = pid
                break
        out.append((ref, found))
    return out


def _use_purchases(
    view: Overlay, task: Task, buyer: Address, found: Sequence[tuple[Hash32, Hash32 | None]]
) -> Task:
    """Mark ``buyer``'s purchases in ``found`` used (off its open list) and record them on the
    task for reimbursement. The allowance covers ``input_parties`` readers: a later one (the
    referee of a second dispute) reads at its own cost."""
    used: list[Hash32] = []
    for ref, pid in found:
        if pid is None:
            continue
        put_open_purchases(
            view, buyer, ref, [p for p in open_purchases(view, buyer, ref) if p != pid]
        )
        used.append(pid)
    if not used or len(task.input_buys) >= input_parties(task.verifiers):
        return task
    return replace(task, input_buys=(*task.input_buys, InputBuy(buyer, tuple(used))))


def _require_purchases(
    view: StateView, task: Task, buyer: Address, what: str
) -> list[tuple[Hash32, Hash32 | None]]:
    found = find_input_purchases(view, task, buyer)
    missing = [ref for ref, pid in found if pid is None]
    if missing:
        raise InputNotPurchased(
            f"{what}: 0x{buyer.hex()} holds no purchase of priced input {_hex(missing[0])} made "
            f"at or after the task's submission (height {task.submit_height}) and not used by "
            "another task; buy it (Purchase) first",
            data={"dataset": _hex(missing[0])},
        )
    return found


def input_reimbursements(view: StateView, task: Task) -> list[tuple[Address, int]]:
    """What each party that bought the task's priced inputs gets back from the allowance: the
    amounts of its purchases' shares whose key was delivered and not refunded, at most
    ``input_allowance``."""
    out: list[tuple[Address, int]] = []
    for buy in task.input_buys:
        paid = 0
        for pid in buy.purchases:
            record = get_purchase(view, pid)
            if record is not None:
                paid += sum(s.amount for s in record.shares if s.state in _DELIVERED_SHARES)
        out.append((buy.address, min(paid, task.input_allowance)))
    return out


def _reimburse_inputs(view: Overlay, task: Task) -> int:
    """Pay ``input_reimbursements`` from the escrow; returns the total (the rest of the
    allowance goes back to the requester with the escrow's rest)."""
    total = 0
    for address, amount in input_reimbursements(view, task):
        if amount:
            credit(view, address, amount)
            total += amount
    return total


# --- transactions ------------------------------------------------------------------------------


def apply_provider_register(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, ProviderRegister)  # kind dispatch guarantees it
    check_provider_body(body)
    require_role(view, vtx.sender, Role.COMPUTE_PROVIDER, "a compute provider registration")
    params = economy_params(view)
    old = get_provider(view, vtx.sender)
    moving = old is None or old.platform_class != body.platform_class
    if old is not None and moving and old.active_tasks:
        raise ProviderHasActiveTasks(
            f"0x{vtx.sender.hex()} has {old.active_tasks} claimed task(s) in class "
            f"{old.platform_class!r}; change the class once they are settled"
        )
    listed = class_providers(view, body.platform_class)
    cap = min(params.max_providers_per_class, MAX_PROVIDERS_PER_CLASS_HARD)
    if vtx.sender not in listed and len(listed) >= cap:
        # A full list gives up the first entry that no longer holds the role with a full bond
        # (resigned or slashed): a class cannot be locked by addresses that left it.
        stale = next((a for a in listed if not _holds_full_bond(view, params, a)), None)
        if stale is None:
            raise ProviderClassFull(f"class {body.platform_class!r} lists {len(listed)} providers")
        listed = tuple(a for a in listed if a != stale)
    charge(view, vtx)
    if old is not None and moving:
        rest = tuple(a for a in class_providers(view, old.platform_class) if a != vtx.sender)
        if rest:
            view.put(
                class_key(old.platform_class), ClassProviders(old.platform_class, rest).encode()
            )
        else:
            view.delete(class_key(old.platform_class))
    if vtx.sender not in listed:
        view.put(
            class_key(body.platform_class),
            ClassProviders(body.platform_class, (*listed, vtx.sender)).encode(),
        )
    record = ComputeProvider(
        address=vtx.sender,
        device_kind=body.device_kind,
        device_name=body.device_name,
        devices=body.devices,
        memory_bytes=body.memory_bytes,
        compute_capability=body.compute_capability,
        cpu_cores=body.cpu_cores,
        platform_class=body.platform_class,
        price_per_device_second=body.price_per_device_second,
        max_concurrent=body.max_concurrent,
        active_tasks=0 if old is None else old.active_tasks,
        settled_ok=0 if old is None else old.settled_ok,
        slashed=0 if old is None else old.slashed,
        height=ctx.height,
    )
    view.put(provider_key(vtx.sender), record.encode())
    return (
        Event(
            "compute_provider",
            (
                Attribute("provider", vtx.sender),
                Attribute("platform_class", body.platform_class.encode()),
                Attribute("price_per_device_second", u256(body.price_per_device_second)),
            ),
        ),
    )


def apply_task_submit(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, TaskSubmit)  # kind dispatch guarantees it
    check_submit_body(body)
    if body.recipe not in recipes.RECIPES:
        raise RecipeNotAllowed(
            f"recipe {body.recipe!r} is not in the allow-list ({', '.join(recipes.RECIPES)})"
        )
    try:
        p = recipes.validate_task_params(body.recipe, body.params)
    except recipes.UnknownRecipe as exc:
        raise RecipeNotAllowed(exc.message) from exc
    except recipes.InvalidTaskParams as exc:
        raise TaskParamsInvalid(exc.message, data={"field": exc.field}) from exc
    steps = recipes.task_steps(body.recipe, p)
    if steps > body.limits.steps:
        raise TaskLimitsExceeded(
            f"the {body.recipe} recipe runs {steps} steps; limits.steps is {body.limits.steps}"
        )
    cp_steps = tuple(recipes.checkpoint_steps(body.recipe, p))
    if len(cp_steps) > MAX_CHECKPOINTS:
        raise TaskLimitsExceeded(
            f"{len(cp_steps)} checkpoints exceed the {MAX_CHECKPOINTS} a result can carry; "
            "raise checkpoint_every"
        )
    listed = {(i.kind, bytes(i.ref)) for i in body.inputs}
    for i, item in enumerate(body.inputs):
        if item.kind == InputKind.DATASET and get_dataset(view, item.ref) is None:
            raise UnknownTaskInput(f"inputs[{i}]: no dataset {_hex(item.ref)}")
        if item.kind == InputKind.MODEL and get_model(view, item.ref) is None:
            raise UnknownTaskInput(f"inputs[{i}]: no model {_hex(item.ref)}")
    datasets, models = _params_ids(body.recipe, p)
    for kind, ids, what in (
        (InputKind.DATASET, datasets, "dataset"),
        (InputKind.MODEL, models, "model"),
    ):
        for ref in sorted(ids):
            if (kind, ref) not in listed:
                raise TaskInputMissing(f"the parameters name {what} {_hex(ref)}; inputs lack it")
    params = economy_params(view)
    if not ctx.height < body.deadline <= ctx.height + params.max_task_deadline_heights:
        raise TaskDeadlineInvalid(
            f"deadline {body.deadline} must be above this block ({ctx.height}) and at most "
            f"{params.max_task_deadline_heights} heights above it"
        )
    allowance = input_allowance(view, body.inputs)
    escrow = escrow_for(params, body, allowance)
    balance = get_account(view, vtx.sender).balance
    if balance < vtx.tx.fee + escrow:
        raise RequesterCannotPay(
            f"balance {balance} cannot pay the escrow {escrow} + fee {vtx.tx.fee}"
        )
    charge(view, vtx, escrow)
    tid = task_id(vtx.sender, vtx.tx.nonce)
    task = Task(
        id=tid,
        requester=vtx.sender,
        recipe=body.recipe,
        params=body.params,
        inputs=body.inputs,
        limits=body.limits,
        deadline=body.deadline,
        max_price=body.max_price,
        verifier_fee=body.verifier_fee,
        verifiers=body.verifiers,
        min_reputation=body.min_reputation,
        platform_class=body.platform_class,
        steps=steps,
        checkpoint_steps=cp_steps,
        devices=recipes.task_devices(body.recipe, p),
        submit_height=ctx.height,
        state=int(TaskState.OPEN),
        outcome=int(Outcome.PENDING),
        escrow=Amount(escrow),
        provider=None,
        price=Amount(0),
        bond=Amount(0),
        claim_height=0,
        reopened=False,
        result=None,
        segment=0,
        verifier_slots=(),
        commit_end=0,
        reveal_end=0,
        window_end=0,
        dispute=None,
        timer=0,
        end_height=0,
        input_allowance=Amount(allowance),
        input_buys=(),
    )
    task = _arm(view, task, body.deadline, _DEADLINE)
    _put_task(view, task)
    return (
        _event(
            "task_submitted",
            tid,
            Attribute("requester", vtx.sender),
            Attribute("recipe", body.recipe.encode()),
            Attribute("escrow", u256(escrow)),
            Attribute("deadline", u64(body.deadline)),
        ),
    )


def apply_task_claim(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, TaskClaim)  # kind dispatch guarantees it
    task = _require_task(view, body.task_id)
    if task.state != TaskState.OPEN:
        raise TaskNotOpen(f"task {_hex(task.id)} is {TaskState(task.state).name.lower()}")
    if ctx.height > task.deadline:
        raise TaskExpired(f"task {_hex(task.id)} expired at height {task.deadline}")
    sender = vtx.sender
    if sender == task.requester:
        raise SelfClaim(f"0x{sender.hex()} submitted task {_hex(task.id)}")
    require_role(view, sender, Role.COMPUTE_PROVIDER, "a task claim")
    provider = get_provider(view, sender)
    if provider is None:
        raise ProviderNotRegistered(f"0x{sender.hex()} sent no ProviderRegister")
    if provider.platform_class != task.platform_class:
        raise PlatformClassMismatch(
            f"the task needs class {task.platform_class!r}; the provider is "
            f"{provider.platform_class!r}"
        )
    if reputation(provider) < task.min_reputation:
        raise ReputationTooLow(
            f"reputation {reputation(provider)} is below the task's minimum {task.min_reputation}"
        )
    if provider.memory_bytes < task.limits.device_memory or provider.devices < task.devices:
        raise InsufficientHardware(
            f"the task needs {task.devices} device(s) of {task.limits.device_memory} bytes; the "
            f"provider has {provider.devices} of {provider.memory_bytes}"
        )
    if provider.active_tasks >= provider.max_concurrent:
        raise ProviderAtCapacity(f"the provider runs {provider.active_tasks} task(s) already")
    if body.price > task.max_price:
        raise PriceAboveMax(f"price {body.price} is above the maximum {task.max_price}")
    bond = bond_for(economy_params(view), body.price)
    balance = get_account(view, sender).balance
    if balance < vtx.tx.fee + bond:
        raise ProviderCannotBond(
            f"balance {balance} cannot lock the bond {bond} + fee {vtx.tx.fee}"
        )
    charge(view, vtx, bond)
    adjust_obligations(view, sender, Role.COMPUTE_PROVIDER, 1)
    view.put(
        provider_key(sender), replace(provider, active_tasks=provider.active_tasks + 1).encode()
    )
    task = replace(
        task,
        state=int(TaskState.CLAIMED),
        provider=sender,
        price=body.price,
        bond=Amount(bond),
        claim_height=ctx.height,
    )
    _put_task(view, task)
    return (
        _event(
            "task_claimed",
            task.id,
            Attribute("provider", sender),
            Attribute("price", u256(body.price)),
            Attribute("bond", u256(bond)),
        ),
    )


def _require_claimer(task: Task, sender: Address, height: int, what: str) -> None:
    if task.state != TaskState.CLAIMED:
        raise TaskNotClaimed(f"task {_hex(task.id)} is {TaskState(task.state).name.lower()}")
    if sender != task.provider:
        raise NotTaskProvider(f"{what}: 0x{sender.hex()} did not claim task {_hex(task.id)}")
    if height > task.deadline:
        raise LateResult(
            f"{what} at height {height}: task {_hex(task.id)} was due by {task.deadline}"
        )


def _check_chain(task_id_: bytes, entries: Sequence[CheckpointEntry], final_link: bytes) -> None:
    links = recipes.chain_links(task_id_, [e.cid for e in entries])
    if links[-1] != final_link:
        raise CheckpointChainMismatch(
            f"final link {_hex(final_link)} is not {_hex(links[-1])}, the chain of the "
            f"{len(entries)} checkpoint CIDs"
        )


def apply_task_result(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, TaskResult)  # kind dispatch guarantees it
    check_result_body(body)
    task = _require_task(view, body.task_id)
    _require_claimer(task, vtx.sender, ctx.height, "TaskResult")
    if len(body.checkpoints) != len(task.checkpoint_steps):
        raise CheckpointCountMismatch(
            f"{len(body.checkpoints)} checkpoints; the task writes {len(task.checkpoint_steps)}"
        )
    _check_chain(task.id, body.checkpoints, body.final_link)
    if body.price > task.price:
        raise PriceAboveClaim(f"price {body.price} is above the claimed {task.price}")
    found = _require_purchases(view, task, vtx.sender, "TaskResult")
    charge(view, vtx)
    task = _use_purchases(view, task, vtx.sender, found)
    result = ResultRecord(
        output=body.output,
        metrics=body.metrics,
        checkpoints=body.checkpoints,
        final_link=body.final_link,
        device_seconds=body.device_seconds,
        price=body.price,
        height=ctx.height,
        fail_reason=0,
    )
    task = replace(task, state=int(TaskState.DRAWING), result=result)
    _put_task(view, _arm(view, task, ctx.height + 1, _DRAW))
    return (
        _event(
            "task_result",
            task.id,
            Attribute("output", body.output),
            Attribute("final_link", body.final_link),
            Attribute("price", u256(body.price)),
        ),
    )


def apply_task_fail(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, TaskFail)  # kind dispatch guarantees it
    check_fail_body(body)
    task = _require_task(view, body.task_id)
    _require_claimer(task, vtx.sender, ctx.height, "TaskFail")
    k = len(body.checkpoints)
    if k >= len(task.checkpoint_steps):
        raise InvalidFailure(
            f"{k} checkpoints proven of {len(task.checkpoint_steps)}: a finished task posts a "
            "TaskResult"
        )
    if k:
        _check_chain(task.id, body.checkpoints, body.final_link)
        found = _require_purchases(view, task, vtx.sender, "TaskFail")
    else:  # nothing proven: whatever the provider bought is still reimbursed
        found = find_input_purchases(view, task, vtx.sender)
    charge(view, vtx)
    task = _use_purchases(view, task, vtx.sender, found)
    reason = FailReason(body.reason)
    event = _event(
        "task_failed",
        task.id,
        Attribute("reason", u64(body.reason)),
        Attribute("checkpoints", u64(k)),
    )
    if reason not in _REQUESTER_FAILURES or k == 0:
        # Nothing to pay for: the requester gets the escrow back, the provider its bond.
        outcome = Outcome.PROVIDER_FAULT if reason == FailReason.PROVIDER_FAULT else Outcome.PARTIAL
        refund = task.escrow - _reimburse_inputs(view, task)
        credit(view, task.requester, refund)
        assert task.provider is not None
        credit(view, task.provider, task.bond)
        _release(view, task.provider, ok=False, slashed=False)
        _end(view, replace(task, timer=task.timer + 1), outcome, ctx.height)
        return (event,)
    result = ResultRecord(
        output=b"",
        metrics=(),
        checkpoints=body.checkpoints,
        final_link=body.final_link,
        device_seconds=body.device_seconds,
        price=task.price,
        height=ctx.height,
        fail_reason=body.reason,
    )
    task = replace(task, state=int(TaskState.DRAWING), result=result)
    _put_task(view, _arm(view, task, ctx.height + 1, _DRAW))
    return (event,)


def apply_task_cancel(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, TaskCancel)  # kind dispatch guarantees it
    task = _require_task(view, body.task_id)
    if vtx.sender != task.requester:
        raise NotTaskRequester(f"0x{vtx.sender.hex()} did not submit task {_hex(task.id)}")
    if task.state != TaskState.OPEN:
        raise TaskNotOpen(
            f"task {_hex(task.id)} is {TaskState(task.state).name.lower()}: only an unclaimed "
            "task can be cancelled"
        )
    charge(view, vtx)
    refund = task.escrow
    credit(view, task.requester, refund)
    _end(view, replace(task, timer=task.timer + 1), Outcome.CANCELLED, ctx.height)
    return (_event("task_cancelled", task.id, Attribute("refund", u256(refund))),)


def _slot_index(task: Task, sender: Address) -> int:
    for i, slot in enumerate(task.verifier_slots):
        if slot.address == sender:
            return i
    raise NotAVerifier(f"0x{sender.hex()} is not a verifier of task {_hex(task.id)}")


def _referee_slot(task: Task, sender: Address) -> VerifierSlot:
    assert task.dispute is not None
    slot = task.dispute.referee
    if slot is None or slot.address != sender:
        raise NotAVerifier(f"0x{sender.hex()} is not the referee of task {_hex(task.id)}")
    return slot


def _with_slot(task: Task, sender: Address, slot: VerifierSlot) -> Task:
    if task.state == TaskState.REFEREE:
        assert task.dispute is not None
        return replace(task, dispute=replace(task.dispute, referee=slot))
    slots = list(task.verifier_slots)
    slots[_slot_index(task, sender)] = slot
    return replace(task, verifier_slots=tuple(slots))


def _my_slot(task: Task, sender: Address) -> VerifierSlot:
    if task.state == TaskState.REFEREE:
        return _referee_slot(task, sender)
    if task.state == TaskState.VERIFYING:
        return task.verifier_slots[_slot_index(task, sender)]
    raise NotVerifying(f"task {_hex(task.id)} is {TaskState(task.state).name.lower()}")


def apply_verify_commit(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, VerifyCommit)  # kind dispatch guarantees it
    task = _require_task(view, body.task_id)
    slot = _my_slot(task, vtx.sender)
    if ctx.height > task.commit_end:
        raise CommitWindowClosed(f"commitments were due by height {task.commit_end}")
    if slot.commitment is not None:
        raise AlreadyCommitted(f"0x{vtx.sender.hex()} committed already")
    found = _require_purchases(view, task, vtx.sender, "VerifyCommit")
    charge(view, vtx)
    task = _use_purchases(view, task, vtx.sender, found)
    task = _with_slot(task, vtx.sender, replace(slot, commitment=body.commitment))
    _put_task(view, _close_commits_early(view, task, ctx.height))
    return (_event("verify_commit", task.id, Attribute("verifier", vtx.sender)),)


def _phase_slots(task: Task) -> tuple[VerifierSlot, ...]:
    """The slots of the open commit-reveal: the drawn verifiers', or the referee's."""
    if task.state == TaskState.REFEREE:
        assert task.dispute is not None and task.dispute.referee is not None
        return (task.dispute.referee,)
    return task.verifier_slots


def _close_commits_early(view: Overlay, task: Task, height: int) -> Task:
    """Once every drawn slot has committed, the commit window ends at ``height`` (reveals are
    taken from the next height) and the reveal window is moved up with it."""
    if height >= task.commit_end or any(s.commitment is None for s in _phase_slots(task)):
        return task
    reveal_end = min(task.reveal_end, height + max(1, economy_params(view).verify_reveal_heights))
    task = replace(task, commit_end=height, reveal_end=reveal_end)
    return _arm(view, task, reveal_end, _REVEAL_END)


def _close_reveals_early(view: Overlay, task: Task, height: int) -> Task:
    """Once every slot that committed has revealed (reveals are only taken after the commit
    window), the reveal window ends at the next height, whose end of block takes its result."""
    if height + 1 >= task.reveal_end or any(
        s.commitment is not None and s.state_hash is None for s in _phase_slots(task)
    ):
        return task
    return _arm(view, replace(task, reveal_end=height + 1), height + 1, _REVEAL_END)


def apply_verify_reveal(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, VerifyReveal)  # kind dispatch guarantees it
    task = _require_task(view, body.task_id)
    slot = _my_slot(task, vtx.sender)
    if not task.commit_end < ctx.height <= task.reveal_end:
        raise RevealOutsideWindow(
            f"reveals are taken at heights {task.commit_end + 1}–{task.reveal_end}; this block is "
            f"{ctx.height}"
        )
    if slot.commitment is None:
        raise NoCommitment(f"0x{vtx.sender.hex()} made no commitment for task {_hex(task.id)}")
    if slot.state_hash is not None:
        raise AlreadyRevealed(f"0x{vtx.sender.hex()} revealed already")
    if verify_commitment(task.id, vtx.sender, body.state_hash, body.salt) != slot.commitment:
        raise RevealMismatch(
            f"the state hash and salt do not open 0x{vtx.sender.hex()}'s commitment"
        )
    charge(view, vtx)
    task = _with_slot(task, vtx.sender, replace(slot, state_hash=body.state_hash))
    _put_task(view, _close_reveals_early(view, task, ctx.height))
    return (
        _event(
            "verify_reveal",
            task.id,
            Attribute("verifier", vtx.sender),
            Attribute("state_hash", body.state_hash),
        ),
    )


def apply_task_challenge(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, TaskChallenge)  # kind dispatch guarantees it
    task = _require_task(view, body.task_id)
    if task.state != TaskState.CHALLENGE or ctx.height > task.window_end:
        raise NotInChallengeWindow(
            f"task {_hex(task.id)} is {TaskState(task.state).name.lower()}"
            + (f" (window ended at {task.window_end})" if task.state == TaskState.CHALLENGE else "")
        )
    sender = vtx.sender
    if sender == task.provider:
        raise NotDisputeParty("a provider cannot challenge its own result")
    if sender == task.requester:
        raise RequesterCannotChallenge(
            f"0x{sender.hex()} submitted task {_hex(task.id)}: a requester that challenges "
            "could have the result undone and keep it"
        )
    require_role(view, sender, Role.COMPUTE_PROVIDER, "a task challenge")
    record = get_provider(view, sender)
    if record is None:
        raise ProviderNotRegistered(f"0x{sender.hex()} sent no ProviderRegister")
    if record.platform_class != task.platform_class:
        raise PlatformClassMismatch(
            f"the task ran in class {task.platform_class!r}; the challenger is "
            f"{record.platform_class!r}"
        )
    assert task.result is not None
    if body.segment >= len(task.result.checkpoints):
        raise BadSegment(f"segment {body.segment} of {len(task.result.checkpoints)}")
    if body.state_hash == task.result.checkpoints[body.segment].state_hash:
        raise ChallengeAgrees(f"segment {body.segment}'s state hash is the provider's")
    params = economy_params(view)
    if not _may_dispute(view, params, sender):
        raise ChallengerAtCapacity(
            f"0x{sender.hex()} has {open_disputes(view, sender)} dispute(s) open; its bond "
            f"covers {dispute_capacity(params)} stake(s) of {params.challenge_slash}"
        )
    charge(view, vtx)
    left = task.window_end - ctx.height  # the heights the window has left after this one
    task = _open_dispute(view, task, sender, body.segment, body.state_hash, False, ctx.height, left)
    _put_task(view, task)
    return (
        _event(
            "task_challenge",
            task.id,
            Attribute("challenger", sender),
            Attribute("segment", u64(body.segment)),
        ),
    )


def apply_bisect_step(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, BisectStep)  # kind dispatch guarantees it
    task = _require_task(view, body.task_id)
    d = task.dispute
    if task.state != TaskState.DISPUTE or d is None:
        raise NotInDispute(f"task {_hex(task.id)} is {TaskState(task.state).name.lower()}")
    sender = vtx.sender
    is_provider = sender == task.provider
    if not is_provider and sender != d.challenger:
        raise NotDisputeParty(f"0x{sender.hex()} is no party of the dispute")
    if body.round != d.round:
        raise WrongBisectRound(f"round {body.round}; the open round is {d.round}")
    if ctx.height > task.window_end:
        raise BisectWindowClosed(f"round {d.round} was due by height {task.window_end}")
    if (d.provider_mid if is_provider else d.challenger_mid) is not None:
        raise AlreadyPosted(f"0x{sender.hex()} posted round {d.round} already")
    charge(view, vtx)
    if is_provider:
        d = replace(d, provider_mid=body.state_hash)
    else:
        d = replace(d, challenger_mid=body.state_hash)
    events = [
        _event(
            "bisect_step",
            task.id,
            Attribute("party", sender),
            Attribute("round", u64(d.round)),
            Attribute("step", u64(bisect_midpoint(d))),
        )
    ]
    p_mid, c_mid = d.provider_mid, d.challenger_mid
    if p_mid is not None and c_mid is not None:
        mid = bisect_midpoint(d)
        if p_mid == c_mid:
            d = replace(d, low=mid, low_hash=p_mid)
        else:
            d = replace(d, high=mid, provider_hash=p_mid, challenger_hash=c_mid)
        d = replace(d, round=d.round + 1, provider_mid=None, challenger_mid=None)
        task = _next_dispute_round(view, replace(task, dispute=d), ctx.height)
    else:
        task = replace(task, dispute=d)
    _put_task(view, task)
    return tuple(events)


def _open_dispute(
    view: Overlay,
    task: Task,
    challenger: Address,
    segment: int,
    challenger_hash: Hash32,
    by_verifier: bool,
    height: int,
    window_left: int = 0,
) -> Task:
    bounds = segment_bounds(task, segment)
    # The challenger's stake is its role bond: it may not resign while the dispute is open.
    adjust_obligations(view, challenger, Role.COMPUTE_PROVIDER, 1)
    prev = task.dispute  # an earlier dispute of the task, whose challenger lost or went unheard
    d = Dispute(
        challenger=challenger,
        by_verifier=by_verifier,
        segment=segment,
        low=bounds.start,
        high=bounds.end,
        low_hash=bounds.start_hash,
        provider_hash=bounds.end_hash,
        challenger_hash=challenger_hash,
        round=0 if prev is None else prev.round + 1,
        provider_mid=None,
        challenger_mid=None,
        referee=None,
        window_left=window_left,
        lost=0 if prev is None else prev.lost,
    )
    # ``task.segment`` stays the drawn one: the verifiers' reveals are compared with it.
    return _next_dispute_round(view, replace(task, dispute=d), height)


def _next_dispute_round(view: Overlay, task: Task, height: int) -> Task:
    """Bisect while more than one step is in dispute, else have the referee drawn next block."""
    d = task.dispute
    assert d is not None
    if d.high - d.low <= 1:
        return _arm(
            view, replace(task, state=int(TaskState.REFEREE_DRAW)), height + 1, _REFEREE_DRAW
        )
    due = height + max(1, economy_params(view).bisect_step_heights)
    task = replace(task, state=int(TaskState.DISPUTE), window_end=due)
    return _arm(view, task, due, _BISECT_DUE)


# --- end of block ------------------------------------------------------------------------------


def end_block(view: Overlay, ctx: BlockContext) -> None:
    """Take the task queue's due entries (at most ``max_task_work_per_block``): deadlines,
    verifier and referee draws, the ends of reveal and challenge windows and bisection rounds."""
    params = economy_params(view)
    for _, entry in TASK_QUEUE.pop_due(view, ctx.height, max(1, params.max_task_work_per_block)):
        tid, what, timer = _parse_entry(entry)
        task = get_task(view, tid)
        if task is None or task.timer != timer or task.state == TaskState.ENDED:
            continue  # superseded by a later transition of the task
        if what == _DEADLINE:
            _on_deadline(view, params, task, ctx.height)
        elif what == _DRAW:
            _on_draw(view, params, task, ctx)
        elif what == _REVEAL_END:
            if task.state == TaskState.REFEREE:
                _on_referee_reveal_end(view, params, task, ctx.height)
            else:
                _on_reveal_end(view, params, task, ctx.height)
        elif what == _CHALLENGE_END:
            _settle(view, params, task, ctx.height)
        elif what == _BISECT_DUE:
            _on_bisect_due(view, params, task, ctx.height)
        elif what == _REFEREE_DRAW:
            _on_referee_draw(view, params, task, ctx)


def _on_deadline(view: Overlay, params: EconomyParams, task: Task, height: int) -> None:
    if task.state == TaskState.OPEN:
        credit(view, task.requester, task.escrow)
        _end(view, task, Outcome.EXPIRED, height)
        return
    _provider_missed(view, params, task, height, Outcome.EXPIRED)


def _provider_missed(
    view: Overlay, params: EconomyParams, task: Task, height: int, outcome: Outcome
) -> None:
    """Claimed, no result (the deadline passed, or the provider reported its own fault): burn
    part of the bond, return the rest, reopen the task once (a second time it ends with
    ``outcome`` and the requester is refunded)."""
    assert task.provider is not None
    slash = task.bond * params.task_miss_slash_percent // 100
    burn(view, slash)
    credit(view, task.provider, task.bond - slash)
    _release(view, task.provider, ok=False, slashed=True)
    task = replace(task, provider=None, price=Amount(0), bond=Amount(0), claim_height=0)
    if task.reopened:
        credit(view, task.requester, task.escrow)
        _end(view, replace(task, timer=task.timer + 1), outcome, height)
        return
    deadline = height + max(1, params.task_reopen_heights)
    task = replace(task, state=int(TaskState.OPEN), reopened=True, deadline=deadline)
    _put_task(view, _arm(view, task, deadline, _DEADLINE))


def _on_draw(view: Overlay, params: EconomyParams, task: Task, ctx: BlockContext) -> None:
    assert task.result is not None and task.provider is not None
    seed = bytes(ctx.parent_hash)
    segment = draw_segment(seed, task.id, len(task.result.checkpoints))
    exclude = {bytes(task.provider), bytes(task.requester)}
    chosen = draw_verifiers(seed, task.id, _candidates(view, params, task, exclude), task.verifiers)
    if not chosen:  # nobody to verify: straight to the challenge window
        _open_challenge_window(view, params, replace(task, segment=segment), ctx.height)
        return
    commit_end = ctx.height + max(1, params.verify_commit_heights)
    reveal_end = commit_end + max(1, params.verify_reveal_heights)
    task = replace(
        task,
        state=int(TaskState.VERIFYING),
        segment=segment,
        verifier_slots=tuple(VerifierSlot(a, None, None) for a in chosen),
        commit_end=commit_end,
        reveal_end=reveal_end,
    )
    _put_task(view, _arm(view, task, reveal_end, _REVEAL_END))


def _open_challenge_window(view: Overlay, params: EconomyParams, task: Task, height: int) -> None:
    end = height + max(1, params.task_challenge_heights)
    task = replace(task, state=int(TaskState.CHALLENGE), window_end=end)
    _put_task(view, _arm(view, task, end, _CHALLENGE_END))


def dispute_capacity(params: EconomyParams) -> int:
    """How many disputes one challenger may have open at once: as many stakes of
    ``challenge_slash`` as a full provider bond covers (no limit without a stake)."""
    if params.challenge_slash <= 0:
        return MAX_PROVIDERS_PER_CLASS_HARD * MAX_CHECKPOINTS
    return params.provider_bond // params.challenge_slash


def open_disputes(view: StateView, address: Address) -> int:
    """The disputes ``address`` has open as a challenger: its COMPUTE_PROVIDER obligations less
    its claimed tasks (each holds one obligation)."""
    entry = get_role(view, address, Role.COMPUTE_PROVIDER)
    if entry is None:
        return 0
    record = get_provider(view, address)
    return max(0, entry.obligations - (record.active_tasks if record is not None else 0))


def _may_dispute(view: StateView, params: EconomyParams, address: Address) -> bool:
    """``address`` holds the COMPUTE_PROVIDER role with a full bond and has a free dispute slot
    (``dispute_capacity``): its stake covers one more lost dispute."""
    if not _holds_full_bond(view, params, address):
        return False
    return open_disputes(view, address) < dispute_capacity(params)


def _next_verifier_dispute(
    view: Overlay, params: EconomyParams, task: Task, start: int, height: int
) -> Task | None:
    """Open a dispute with the first verifier from slot ``start`` on (draw order) whose reveal
    differs from the provider's and who may dispute (``_may_dispute``: a verifier that resigned
    or is out of stake since its draw has none to dispute with); None if there is none."""
    assert task.result is not None
    claimed = task.result.checkpoints[task.segment].state_hash
    for slot in task.verifier_slots[start:]:
        if slot.state_hash is None or slot.state_hash == claimed:
            continue
        if not _may_dispute(view, params, slot.address):
            continue
        return _open_dispute(view, task, slot.address, task.segment, slot.state_hash, True, height)
    return None


def _on_reveal_end(view: Overlay, params: EconomyParams, task: Task, height: int) -> None:
    disputed = _next_verifier_dispute(view, params, task, 0, height)
    if disputed is not None:
        _put_task(view, disputed)
        return
    _open_challenge_window(view, params, task, height)


def _after_dispute(
    view: Overlay, params: EconomyParams, task: Task, height: int, *, undecided: bool = False
) -> None:
    """The dispute did not prove the provider wrong (its challenger lost, or no referee
    answered): the next challenge gets its turn, and the task is settled only when none is
    left. A verifier's dispute hands over to the next mismatching verifier in draw order, then
    to a challenge window (the whole window: it never opened); a TaskChallenge's dispute
    returns to its challenge window for the heights it had left. ``undecided`` (the referee
    matched neither party): the next verifier, if any, else the task ends undecided."""
    d = task.dispute
    assert d is not None
    if d.by_verifier:
        index = _verifier_index(task, d.challenger)
        disputed = _next_verifier_dispute(view, params, task, index + 1, height)
        if disputed is not None:
            _put_task(view, disputed)
            return
        if undecided:
            _undecided(view, task, height)
            return
        _open_challenge_window(view, params, task, height)
        return
    if undecided:
        _undecided(view, task, height)
        return
    if d.window_left <= 0:
        _settle(view, params, task, height)
        return
    end = height + d.window_left
    task = replace(task, state=int(TaskState.CHALLENGE), window_end=end)
    _put_task(view, _arm(view, task, end, _CHALLENGE_END))


def _verifier_index(task: Task, address: Address) -> int:
    return next(i for i, s in enumerate(task.verifier_slots) if s.address == address)


def _on_bisect_due(view: Overlay, params: EconomyParams, task: Task, height: int) -> None:
    d = task.dispute
    assert d is not None
    if d.provider_mid is None:  # the provider did not answer (whether or not the challenger did)
        _provider_loses(view, params, task, height, referee=None)
    else:
        _challenger_loses(view, params, task, height, referee=None)


def _on_referee_draw(view: Overlay, params: EconomyParams, task: Task, ctx: BlockContext) -> None:
    d = task.dispute
    assert d is not None and task.provider is not None
    exclude = {bytes(task.provider), bytes(d.challenger), bytes(task.requester)}
    exclude.update(bytes(s.address) for s in task.verifier_slots)
    pool = _candidates(view, params, task, exclude)
    if not pool:  # every other provider of the class verified already: take one of them
        exclude = {bytes(task.provider), bytes(d.challenger), bytes(task.requester)}
        pool = _candidates(view, params, task, exclude)
    chosen = draw_verifiers(bytes(ctx.parent_hash), task.id, pool, 1, b"referee")
    if not chosen:
        _no_verdict(view, params, task, ctx.height)
        return
    commit_end = ctx.height + max(1, params.verify_commit_heights)
    reveal_end = commit_end + max(1, params.verify_reveal_heights)
    task = replace(
        task,
        state=int(TaskState.REFEREE),
        dispute=replace(d, referee=VerifierSlot(chosen[0], None, None)),
        commit_end=commit_end,
        reveal_end=reveal_end,
    )
    _put_task(view, _arm(view, task, reveal_end, _REVEAL_END))


def _on_referee_reveal_end(view: Overlay, params: EconomyParams, task: Task, height: int) -> None:
    d = task.dispute
    assert d is not None and d.referee is not None
    answer = d.referee.state_hash
    if answer is not None and answer == d.provider_hash:
        _challenger_loses(view, params, task, height, referee=d.referee.address)
    elif answer is not None and answer == d.challenger_hash:
        _provider_loses(view, params, task, height, referee=d.referee.address)
    elif answer is None:
        _no_verdict(view, params, task, height)
    else:
        adjust_obligations(view, d.challenger, Role.COMPUTE_PROVIDER, -1)
        _after_dispute(view, params, task, height, undecided=True)


# --- outcomes ------------------------------------------------------------------------------------


def _release(view: Overlay, provider: Address, *, ok: bool, slashed: bool) -> None:
    """One claimed task of ``provider`` is over: free its slot and count the outcome."""
    adjust_obligations(view, provider, Role.COMPUTE_PROVIDER, -1)
    record = get_provider(view, provider)
    if record is not None:
        view.put(
            provider_key(provider),
            replace(
                record,
                active_tasks=max(0, record.active_tasks - 1),
                settled_ok=record.settled_ok + int(ok),
                slashed=record.slashed + int(slashed),
            ).encode(),
        )


def _end(view: Overlay, task: Task, outcome: Outcome, height: int) -> None:
    _put_task(
        view,
        replace(
            task,
            state=int(TaskState.ENDED),
            outcome=int(outcome),
            escrow=Amount(0),
            bond=Amount(0),
            end_height=height,
        ),
    )


def _pay_verifiers(view: Overlay, task: Task, agree: bool) -> int:
    """Pay the fee to each verifier whose reveal agreed with the provider (``agree``) or, when
    the provider lost, disagreed with it and lost no dispute of the task; returns what was
    paid."""
    assert task.result is not None
    claimed = task.result.checkpoints[task.segment].state_hash
    lost = task.dispute.lost if task.dispute is not None else 0
    paid = 0
    for i, slot in enumerate(task.verifier_slots):
        if lost >> i & 1:
            continue
        if slot.state_hash is not None and (slot.state_hash == claimed) == agree:
            credit(view, slot.address, task.verifier_fee)
            paid += task.verifier_fee
    return paid


def royalty_split(total: int, owners: Sequence[Address]) -> list[tuple[Address, int]]:
    """``total`` over ``owners`` (one per royalty-earning input): equal floor shares, the
    remainder to the first."""
    if not owners or not total:
        return []
    share = total // len(owners)
    out = [(o, share) for o in owners]
    out[0] = (owners[0], share + total - share * len(owners))
    return out


def _input_owners(view: StateView, task: Task) -> list[Address]:
    owners: list[Address] = []
    for item in task.inputs:
        if item.kind == InputKind.DATASET:
            ds = get_dataset(view, item.ref)
            if ds is not None:
                owners.append(ds.owner)
        elif item.kind == InputKind.MODEL:
            model = get_model(view, item.ref)
            if model is not None:
                owners.append(model.owner)
    return owners


def provider_pay(task: Task) -> int:
    """What settlement pays the provider: the price charged, or for a failure inside the
    requester's limits the claimed price pro rata to the steps its checkpoints prove."""
    assert task.result is not None
    r = task.result
    if not r.fail_reason:
        return r.price
    proven = task.checkpoint_steps[len(r.checkpoints) - 1]
    return r.price * proven // task.steps if task.steps else 0


def _settle(view: Overlay, params: EconomyParams, task: Task, height: int) -> None:
    """The provider's result stands: pay it, the verifiers and the royalties; refund the rest."""
    assert task.result is not None and task.provider is not None
    pay = provider_pay(task)
    credit(view, task.provider, pay)
    royalty = pay * params.royalty_percent // 100
    owners = _input_owners(view, task)
    if not owners:
        royalty = 0
    for owner, amount in royalty_split(royalty, owners):
        credit(view, owner, amount)
    fees = _pay_verifiers(view, task, agree=True)
    inputs = _reimburse_inputs(view, task)
    credit(view, task.requester, task.escrow - pay - royalty - fees - inputs)
    credit(view, task.provider, task.bond)
    failed = bool(task.result.fail_reason)
    _release(view, task.provider, ok=not failed, slashed=False)
    _end(view, task, Outcome.PARTIAL if failed else Outcome.PAID, height)


def _split_stake(
    view: Overlay,
    stake: int,
    winner: Address,
    referee: Address | None,
    fee: int,
    params: EconomyParams,
) -> None:
    reward = stake * params.dispute_reward_percent // 100
    credit(view, winner, reward)
    referee_pay = min(fee, stake - reward) if referee is not None else 0
    if referee is not None:
        credit(view, referee, referee_pay)
    burn(view, stake - reward - referee_pay)


def _provider_loses(
    view: Overlay, params: EconomyParams, task: Task, height: int, referee: Address | None
) -> None:
    d = task.dispute
    assert d is not None and task.provider is not None
    _split_stake(view, task.bond, d.challenger, referee, task.verifier_fee, params)
    adjust_obligations(view, d.challenger, Role.COMPUTE_PROVIDER, -1)
    fees = _pay_verifiers(view, task, agree=False)
    inputs = _reimburse_inputs(view, task)
    credit(view, task.requester, task.escrow - fees - inputs)
    _release(view, task.provider, ok=False, slashed=True)
    _end(view, task, Outcome.PROVIDER_SLASHED, height)


def _challenger_loses(
    view: Overlay, params: EconomyParams, task: Task, height: int, referee: Address | None
) -> None:
    d = task.dispute
    assert d is not None and task.provider is not None
    stake = _take_role_bond(view, d.challenger, Role.COMPUTE_PROVIDER, params.challenge_slash)
    adjust_obligations(view, d.challenger, Role.COMPUTE_PROVIDER, -1)
    _split_stake(view, stake, task.provider, referee, task.verifier_fee, params)
    record = get_provider(view, d.challenger)
    if record is not None:
        view.put(provider_key(d.challenger), replace(record, slashed=record.slashed + 1).encode())
    slot = next((i for i, s in enumerate(task.verifier_slots) if s.address == d.challenger), None)
    if slot is not None:  # a verifier proven wrong is not paid, whatever comes next
        task = replace(task, dispute=replace(d, lost=d.lost | 1 << slot))
    _after_dispute(view, params, task, height)


def _no_verdict(view: Overlay, params: EconomyParams, task: Task, height: int) -> None:
    """No referee could be drawn or the referee did not reveal: nobody proved the result
    wrong, so it stands as far as this dispute goes. The challenger is not slashed (nobody
    proved it wrong either) and its obligation is freed; the next challenge, if any, gets its
    turn (``_after_dispute``)."""
    d = task.dispute
    assert d is not None
    adjust_obligations(view, d.challenger, Role.COMPUTE_PROVIDER, -1)
    _after_dispute(view, params, task, height)


def _undecided(view: Overlay, task: Task, height: int) -> None:
    """The referee's hash matched neither party's (and no other challenge is left): nobody is
    slashed or paid, the requester gets the escrow back and the provider its bond. The
    challenger's obligation was closed by the caller."""
    assert task.provider is not None and task.dispute is not None
    credit(view, task.requester, task.escrow - _reimburse_inputs(view, task))
    credit(view, task.provider, task.bond)
    _release(view, task.provider, ok=False, slashed=False)
    _end(view, task, Outcome.UNDECIDED, height)


# --- registration ------------------------------------------------------------------------------


def _provider_records(view: StateView, vtx: VerifiedTransaction) -> int:
    body = vtx.body
    assert isinstance(body, ProviderRegister)
    new = view.get(provider_key(vtx.sender)) is None
    return int(new) + int(view.get(class_key(body.platform_class)) is None)


def _one_record(view: StateView, vtx: VerifiedTransaction) -> int:
    return 1


def _no_records(view: StateView, vtx: VerifiedTransaction) -> int:
    return 0


HANDLERS: tuple[KindHandler, ...] = (
    KindHandler(
        int(EconomyKind.PROVIDER_REGISTER),
        ProviderRegister,
        apply_provider_register,
        _provider_records,
        check_provider_body,
    ),
    KindHandler(
        int(EconomyKind.TASK_SUBMIT), TaskSubmit, apply_task_submit, _one_record, check_submit_body
    ),
    KindHandler(int(EconomyKind.TASK_CLAIM), TaskClaim, apply_task_claim, _no_records),
    KindHandler(
        int(EconomyKind.TASK_RESULT), TaskResult, apply_task_result, _no_records, check_result_body
    ),
    KindHandler(int(EconomyKind.VERIFY_COMMIT), VerifyCommit, apply_verify_commit, _no_records),
    KindHandler(int(EconomyKind.VERIFY_REVEAL), VerifyReveal, apply_verify_reveal, _no_records),
    KindHandler(int(EconomyKind.TASK_CHALLENGE), TaskChallenge, apply_task_challenge, _no_records),
    KindHandler(int(EconomyKind.BISECT_STEP), BisectStep, apply_bisect_step, _no_records),
    KindHandler(int(EconomyKind.TASK_CANCEL), TaskCancel, apply_task_cancel, _no_records),
    KindHandler(
        int(EconomyKind.TASK_FAIL), TaskFail, apply_task_fail, _no_records, check_fail_body
    ),
)

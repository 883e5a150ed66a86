"""The compute agent: a node's side of the compute market (DESIGN §10; docs/compute-market.md).

One trio service signing with the node's **operator account**. Every committed block it reads
the block's transactions for new ``TaskSubmit``s of its platform class (plus, at start, the open
tasks of that class in state) and looks at every watched task it is involved in (its claim,
its work, its draws, its disputes) and at up to ``tasks_per_block`` others (round-robin), each
a bounded state read:

* **Provider.** With an offer on chain (``offer`` sends ``ProviderRegister``), an open task of
  this node's platform class whose limits fit the local ones (memory, wall time, devices,
  steps), whose inputs are all free and whose maximum price covers this node's ask
  (its offer's ``price_per_device_second`` on chain × devices × wall seconds) is claimed (``TaskClaim``) while a slot
  is free. Once the claim is in a block the task runs in the background: its inputs are fetched
  (``fetch``: the artifact service) and exported to files, the recipe runs in a child process
  (``node.compute.worker``, the requester's limits ∩ the local ones), the checkpoints and the
  result are imported into the blob store and provided, and ``TaskResult`` is posted. A failure
  inside the requester's limits (OOM, the recipe's own crash, its wall time) becomes a
  ``TaskFail`` with the checkpoints written so far; any other failure is a ``PROVIDER_FAULT``.
  Nothing a task does can stop the node: every job error is caught and logged.
* **Verifier / referee / dispute party.** When the draw names this node for a task, it fetches
  the segment's start checkpoint, re-runs the segment (merge and evaluate: the whole job) in a
  child process, commits ``verify_commitment(task, me, hash, salt)`` and reveals once the commit
  window has closed. In a dispute where it is the provider or the challenger it replays the
  segment from its start to each round's midpoint and posts ``BisectStep``. A re-run this node
  cannot complete for a reason of its own (its limits below the task's, a timeout, an input it
  cannot fetch or buy, a crash) is no answer: it abstains (no commitment, reveal or step). Only
  a start checkpoint of the provider's that does not load answers as a mismatch.

Progress of the tasks this node works on (``progress``, for ``ns_getTask``) and what it sent,
computed and drew (claims, results, verification answers and salts, commit / reveal / bisect
markers) are saved to ``data_dir/compute/state`` (msgpack, atomic, mode 0600) on every change
and read back at start: after a restart a verifier still reveals with its salt, nothing is sent
twice, and a claimed task that was running is run again (or its result posted) before its
deadline.

Priced dataset inputs are bought (``node.input_purchases``): the provider, and a drawn verifier or
referee, each sends its own ``Purchase`` with a one-off key kept under ``data_dir/compute/
purchases``, waits for the owner's key, fetches the encrypted artifact with the purchase as its
grant and decrypts it into the job's input file. A task whose priced inputs this node cannot buy
(no CUSTOMER role, a balance short of the prices and the bond, a priced model or composite) is
not claimed (``PricedInputRefused``). Error codes 3180–3199.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack
import trio

from node import crypto
from node.api import ViewState
from node.compute import recipes
from node.consensus import fees
from node.consensus.txs import decode_transaction, make_transaction, verify_transaction
from node.economy import tasks as tk
from node.economy.api import EconomyKind
from node.economy.datasets import get_dataset
from node.economy.models import Metric, get_model
from node.encoding import Record
from node.errors import NeuroSeedError
from node.types import Address, Amount, Hash32

log = logging.getLogger(__name__)

COMPUTE_DIR = "compute"
MAX_TRACKED = 4096  # watched tasks kept in memory
SCAN_AT_START = 10_000  # task records read at start to find the open ones
STATE_FILE = "state"  # what the agent sent and computed, kept across restarts (0600)
_ABSTAIN = "abstain-"  # a marker in _Local.sent: this node could not re-run that segment
PROGRESS_SAVE_S = 5.0
ANNOUNCE_PARALLEL = 8  # DHT provider records of a posted result queued at once
FETCH_ATTEMPTS = 10  # a verifier's re-run whose inputs are not found yet is tried again ...
FETCH_RETRY_S = 3.0  # ... this many seconds later (the provider may still be announcing)  # a change of progress alone is saved at most this often
STATE_VERSION = 1
SWEEP_EVERY = 64  # blocks between two looks for files of ended tasks (work dirs, purchase keys)
MAX_STATE_BYTES = 64 << 20  # a larger state file is refused (it is never that big)


# --- errors (3180–3199) ------------------------------------------------------------------------


class ComputeAgentError(NeuroSeedError):
    code = 3180
    reason = "compute agent error"


class ComputeAgentDisabled(ComputeAgentError):
    """The node runs no compute agent (no operator account, or not started)."""

    code = 3181
    reason = "the compute agent is not available"


class PricedInputRefused(ComputeAgentError):
    """A priced task input this node cannot buy (no CUSTOMER role, a balance short of the
    prices and the bond, a priced model or composite): the task is not claimed."""

    code = 3182
    reason = "the task needs a priced input this provider cannot buy"


class TaskOutsideLimits(ComputeAgentError):
    """The task asks for more than this node's local limits (memory, wall time, devices)."""

    code = 3183
    reason = "the task does not fit this provider's local limits"


class InputUnavailable(ComputeAgentError):
    """A task input (or a checkpoint to verify from) could not be fetched."""

    code = 3184
    reason = "a task input could not be fetched"


class InputNotBought(InputUnavailable):
    """A priced input could not be bought (or its key did not come in time): a verifier or
    referee then abstains rather than report a mismatch it never computed."""

    code = 3188
    reason = "a priced task input could not be bought"


class NotTaskRunner(ComputeAgentError):
    code = 3185
    reason = "this node does not run that task"


class UnknownTaskId(ComputeAgentError):
    code = 3186
    reason = "no such task"


class NotAProvider(ComputeAgentError):
    """The operator account holds no COMPUTE_PROVIDER offer on chain."""

    code = 3187
    reason = "this node has no compute offer on chain"


class ComputeStateCorrupt(ComputeAgentError):
    """The agent's state file (``data_dir/compute/state``) cannot be read back."""

    code = 3199
    reason = "the compute agent's state file is corrupt"


# --- settings and collaborators ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ComputeSettings:
    """Node-local limits and policy (none of them is a consensus rule)."""

    max_concurrent: int = 1  # tasks run at once (also the offer's max_concurrent)
    memory_bytes: int = 4 << 30  # per task (RLIMIT_DATA of the child; device memory on GPUs)
    wall_seconds: int = 3600  # a task's wall time at most
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int = 1  # torch threads (part of the CPU platform class)
    devices: int = 1  # devices offered
    price_per_device_second: int = 1
    platform_class: str = ""  # "" = ask the worker (node.compute.platform) once
    provide: bool = True  # claim tasks (else only verify when drawn)
    # Watched tasks looked at per block (bounded work), besides those this node is involved in:
    # reading one and deciding on it takes about 25 µs (an open task, in-memory store), so
    # 512 is about 15 ms a block and MAX_TRACKED open tasks are all seen within 8 blocks.
    tasks_per_block: int = 512
    poll_interval_s: float = 0.5
    fee_tip_divisor: int = 10
    keep_finished: int = 256  # progress records kept for ended tasks
    # Claim only a task whose deadline is at least this many heights away: room to buy priced
    # inputs, run and post (or post a TaskFail in time when an input's key does not come).
    claim_margin_heights: int = 10


class ChainSource(Protocol):
    def read_view(self) -> Any: ...


Submit = Callable[[bytes], Awaitable[Hash32]]
PendingNonce = Callable[[Address], Awaitable[int]]
Fetch = Callable[[bytes], Awaitable[None]]  # make a root complete in the blob store
Provide = Callable[[bytes], Awaitable[None]]
Drop = Callable[[Hash32], bool]  # forget one of our transactions in the local mempool
RunJob = Callable[..., Awaitable[dict[str, Any]]]


def _head(view: Any) -> int:
    head = view.head
    return 0 if head is None else int(head.height)


@dataclass
class TaskProgress:
    """What this node does for a task: its role, the stage and the step counts."""

    role: str  # provider | verifier | referee | dispute
    stage: str = "queued"  # queued, fetching, running, uploading, posted, failed, ...
    done: int = 0
    total: int = 0
    error: str = ""
    updated_height: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "stage": self.stage,
            "done": self.done,
            "total": self.total,
            "error": self.error,
            "updated_height": self.updated_height,
        }


@dataclass
class _Local:
    """Per task: what was already sent or started, so a block never repeats work."""

    claimed_at: int = -1
    claim_tx: Hash32 | None = None  # our TaskClaim, until the task shows who won the claim
    running: bool = False
    posted: bool = False
    # verification: (label) -> hash computed, salt, commit / reveal sent
    answer: dict[str, Hash32] = field(default_factory=dict)
    computing: set[str] = field(default_factory=set)
    salt: dict[str, Hash32] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    result: bytes | None = None  # the encoded TaskResult once built (posted again on a restart)

    def to_state(self) -> dict[str, Any]:
        """What survives a restart (``computing`` does not: a re-run starts again)."""
        return {
            "claimed_at": self.claimed_at,
            "claim_tx": None if self.claim_tx is None else bytes(self.claim_tx),
            "running": self.running,
            "posted": self.posted,
            "answer": {k: bytes(v) for k, v in sorted(self.answer.items())},
            "salt": {k: bytes(v) for k, v in sorted(self.salt.items())},
            "sent": sorted(self.sent),
            "result": self.result,
        }

    @classmethod
    def from_state(cls, obj: Any) -> _Local:
        """The inverse of ``to_state``; ``ComputeStateCorrupt`` on any other shape."""
        if not isinstance(obj, dict) or set(obj) != _LOCAL_FIELDS:
            raise ComputeStateCorrupt("a task entry has other fields than expected")
        claim_tx, result = obj["claim_tx"], obj["result"]
        if (
            type(obj["claimed_at"]) is not int
            or type(obj["running"]) is not bool
            or type(obj["posted"]) is not bool
            or not (claim_tx is None or _is_hash(claim_tx))
            or not (result is None or isinstance(result, bytes))
            or not isinstance(obj["sent"], list)
            or not all(isinstance(s, str) for s in obj["sent"])
        ):
            raise ComputeStateCorrupt("a task entry has a field of the wrong type")
        return cls(
            claimed_at=obj["claimed_at"],
            claim_tx=None if claim_tx is None else Hash32(claim_tx),
            running=obj["running"],
            posted=obj["posted"],
            answer=_hash_map(obj["answer"]),
            salt=_hash_map(obj["salt"]),
            sent=set(obj["sent"]),
            result=result,
        )


_TASK_KINDS: dict[int, Any] = {
    int(EconomyKind.TASK_CLAIM): tk.TaskClaim,
    int(EconomyKind.TASK_RESULT): tk.TaskResult,
    int(EconomyKind.TASK_FAIL): tk.TaskFail,
    int(EconomyKind.VERIFY_COMMIT): tk.VerifyCommit,
    int(EconomyKind.VERIFY_REVEAL): tk.VerifyReveal,
    int(EconomyKind.TASK_CHALLENGE): tk.TaskChallenge,
    int(EconomyKind.BISECT_STEP): tk.BisectStep,
    int(EconomyKind.TASK_CANCEL): tk.TaskCancel,
}  # the task transactions other than submissions: their bodies start with the task id

_LOCAL_FIELDS = frozenset(
    {"claimed_at", "claim_tx", "running", "posted", "answer", "salt", "sent", "result"}
)


def _is_hash(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _hash_map(obj: Any) -> dict[str, Hash32]:
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and _is_hash(v) for k, v in obj.items()
    ):
        raise ComputeStateCorrupt("a task entry's hashes are not 32-byte values by label")
    return {k: Hash32(v) for k, v in obj.items()}


def _progress_from_state(obj: Any) -> TaskProgress:
    names = ("role", "stage", "done", "total", "error", "updated_height")
    if not isinstance(obj, dict) or set(obj) != set(names):
        raise ComputeStateCorrupt("a progress entry has other fields than expected")
    kinds = (str, str, int, int, str, int)
    if not all(type(obj[n]) is t for n, t in zip(names, kinds, strict=True)):
        raise ComputeStateCorrupt("a progress entry has a field of the wrong type")
    return TaskProgress(**{n: obj[n] for n in names})


def encode_state(local: Mapping[Hash32, _Local], progress: Mapping[Hash32, TaskProgress]) -> bytes:
    """The agent's state file: msgpack ``{"v", "tasks": {id: entry}, "progress": {id: …}}``."""
    return bytes(
        msgpack.packb(
            {
                "v": STATE_VERSION,
                "tasks": {bytes(k): v.to_state() for k, v in local.items()},
                "progress": {bytes(k): v.as_json() for k, v in progress.items()},
            },
            use_bin_type=True,
        )
    )


def decode_state(raw: bytes) -> tuple[dict[Hash32, _Local], dict[Hash32, TaskProgress]]:
    """``encode_state``'s inverse; ``ComputeStateCorrupt`` when ``raw`` is anything else."""
    try:
        tree = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ComputeStateCorrupt(f"not msgpack: {exc}") from None
    if not isinstance(tree, dict) or tree.get("v") != STATE_VERSION:
        raise ComputeStateCorrupt(f"not a version-{STATE_VERSION} compute state")
    tasks, progress = tree.get("tasks"), tree.get("progress")
    if set(tree) != {"v", "tasks", "progress"} or not isinstance(tasks, dict):
        raise ComputeStateCorrupt("the state holds other fields than v, tasks and progress")
    if not isinstance(progress, dict) or not all(_is_hash(k) for k in (*tasks, *progress)):
        raise ComputeStateCorrupt("the state's task ids are not 32-byte ids")
    return (
        {Hash32(k): _Local.from_state(v) for k, v in tasks.items()},
        {Hash32(k): _progress_from_state(v) for k, v in progress.items()},
    )


def write_state_file(path: Path, raw: bytes) -> None:
    """Replace ``path`` with ``raw`` atomically (a temporary file, fsync, rename, fsync of the
    directory); the file is the owner's only (mode 0600: it holds the verifiers' salts)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state_file(path: Path) -> tuple[dict[Hash32, _Local], dict[Hash32, TaskProgress]]:
    """The state in ``path`` (empty when there is none); ``ComputeStateCorrupt`` when it cannot
    be read back."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return {}, {}
    except OSError as exc:
        raise ComputeStateCorrupt(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_STATE_BYTES:
        raise ComputeStateCorrupt(f"{path} is larger than {MAX_STATE_BYTES} bytes")
    return decode_state(raw)


ResultHook = Callable[[tk.Task, dict[str, Any]], dict[str, Any]]


async def _default_run_job(
    job: Mapping[str, Any], *, time_limit_s: float, on_progress: Any
) -> dict[str, Any]:
    from node.compute.worker import run_job_async

    return await run_job_async(job, time_limit_s=time_limit_s, on_progress=on_progress)


class ComputeAgent:
    """See the module docstring. Call ``run`` in the node's nursery (``nursery.start``)."""

    def __init__(
        self,
        chain: ChainSource,
        submit: Submit,
        operator_key: crypto.PrivateKey,
        data_dir: Path,
        settings: ComputeSettings | None = None,
        *,
        blobs: Any = None,
        fetch: Fetch | None = None,
        provide: Provide | None = None,
        pending_nonce: PendingNonce | None = None,
        drop: Drop | None = None,
        run_job: RunJob | None = None,
        result_hook: ResultHook | None = None,
        fetch_granted: Callable[[bytes, Any], Awaitable[None]] | None = None,
        peer_id: bytes | None = None,
    ) -> None:
        self._chain = chain
        self._submit = submit
        self._key = operator_key
        self.address: Address = operator_key.address
        self.settings = settings or ComputeSettings()
        self._blobs = blobs
        self._fetch = fetch
        self._provide = provide
        self._pending_nonce = pending_nonce
        self._drop = drop
        self._run_job: RunJob = run_job or _default_run_job
        self._result_hook = result_hook  # tests: a cheating provider
        self._fetch_granted = fetch_granted  # priced inputs: fetch with a purchase's access
        self._peer_id = peer_id
        self._buyer: Any = None  # node.input_purchases.InputBuyer, made on first use
        self._dir = Path(data_dir) / COMPUTE_DIR
        self._watched: dict[Hash32, None] = {}
        self._involved: set[Hash32] = set()  # visited first every block (see on_head)
        self._hot: dict[Hash32, int] = {}  # touched by a recent block: visited first until then
        self._watch_class: str | None = None  # the platform class the watched tasks are of
        self._local: dict[Hash32, _Local] = {}
        self.progress: dict[Hash32, TaskProgress] = {}
        self._cursor = 0
        self._next_nonce = 0
        self._tx_lock = trio.Lock()
        self._head_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._platform: str | None = self.settings.platform_class or None
        self._scanned_blocks = -1
        self.last_head = -1
        self._state_path = self._dir / STATE_FILE
        self._saved: bytes | None = None  # the state file's content as last written
        self._saved_tasks: bytes | None = None  # ... without the progress records
        self._saved_at = -math.inf  # time.monotonic() of that write

    # --- life cycle --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        private_dir(self._dir)
        self._load()
        view = self._chain.read_view()
        self._scan_open_tasks(view)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await self._resume(view)
                except NeuroSeedError as exc:
                    log.error("compute agent: resuming: %s", exc.message)
                while True:
                    view = self._chain.read_view()
                    if _head(view) != self.last_head:
                        try:
                            await self.on_head(view)
                        except NeuroSeedError as exc:
                            log.error("compute agent: %s", exc.message)
                    self._save()
                    with trio.move_on_after(self.settings.poll_interval_s):
                        await self._head_changed.wait()
                    self._head_changed = trio.Event()
        finally:
            self._nursery = None
            self._save()

    # --- state kept across restarts ----------------------------------------------------------

    def _load(self) -> None:
        """Read the state file back (before the first ``on_head``). A file that cannot be read
        is set aside as ``state.corrupt`` and the agent starts clean, with a warning."""
        try:
            local, progress = read_state_file(self._state_path)
        except ComputeStateCorrupt as exc:
            aside = self._state_path.with_name(STATE_FILE + ".corrupt")
            log.warning(
                "compute agent: %s; starting without the saved state (moved to %s)",
                exc.message,
                aside,
            )
            with contextlib.suppress(OSError):
                os.replace(self._state_path, aside)
            return
        for tid, entry in list(local.items())[:MAX_TRACKED]:
            entry.running = False  # cut by the stop: started again (or posted) by _resume
            self._local[tid] = entry
        for tid, prog in list(progress.items())[: MAX_TRACKED + self.settings.keep_finished]:
            self.progress[tid] = prog

    async def _resume(self, view: Any) -> None:
        """After a restart: forget the saved entries of tasks that ended, watch the others, and
        post again a result built before the stop while the task still waits for it (the
        node's mempool did not survive). A claimed task whose run was cut starts again in
        ``_step``, unless its deadline has passed."""
        state = ViewState(view)
        head = _head(view)
        for tid in list(self._local):
            task = tk.get_task(state, tid)
            if task is None or task.state == tk.TaskState.ENDED:
                del self._local[tid]
                continue
            self._watch(tid)
            local = self._local[tid]
            mine = task.state == tk.TaskState.CLAIMED and task.provider == self.address
            if not mine:
                continue
            if head >= task.deadline:
                local.posted = True  # too late to run: the chain times the task out
            elif local.result is not None:
                log.info("task 0x%s: posting the result built before the stop", tid.hex()[:16])
                try:
                    await self.send_transaction(tk.TaskResult.decode(local.result), view)
                except NeuroSeedError as exc:
                    log.warning("task 0x%s: posting again: %s", tid.hex()[:16], exc.message)
                local.posted = True
                prog = self.progress.setdefault(tid, TaskProgress("provider"))
                prog.stage, prog.done = "posted", task.steps
        self._trim_progress()
        self._save()
        await self._sweep(view)

    def _save(self) -> bool:
        """Write the state file when what it holds changed (atomic; mode 0600). A write that
        fails is logged, never raised: the agent goes on and tries again on the next change.
        True when the file holds the tasks' state as it is now (progress may lag)."""
        raw = encode_state(self._local, self.progress)
        if raw == self._saved:
            return True
        # What must survive a stop (claims, salts, what was sent) is written at once; a change
        # of progress alone (step counts, several a second while a task runs) at most every
        # PROGRESS_SAVE_S, so a running task does not fsync at every poll.
        tasks = encode_state(self._local, {})
        now = time.monotonic()
        if tasks == self._saved_tasks and now - self._saved_at < PROGRESS_SAVE_S:
            return True
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            write_state_file(self._state_path, raw)
        except OSError as exc:
            log.error("compute agent: cannot save %s: %s", self._state_path, exc)
            return False
        self._saved, self._saved_tasks, self._saved_at = raw, tasks, now
        return True

    def _keep_result(self, local: _Local, body: tk.TaskResult) -> None:
        """Remember the result about to be posted (saved first: a stop after this point posts
        it again instead of re-running the task)."""
        local.result = bytes(body.encode())
        self._save()

    def notify_block(self) -> None:
        self._head_changed.set()

    def _scan_open_tasks(self, view: Any) -> None:
        """At start (and when this node's platform class changes): watch the tasks in state
        of this node's class that have not ended (bounded read)."""
        iterate = getattr(view, "iter_state", None)
        self._scanned_blocks = _head(view)
        cls = self._watch_class = self._class_of(view)
        if iterate is None or cls is None:
            return
        for n, (_key, value) in enumerate(iterate(tk.task_key(b"")), 1):
            t = tk.Task.decode(value)
            if t.state != tk.TaskState.ENDED and t.platform_class == cls:
                self._watch(t.id)
            if n >= SCAN_AT_START:
                break

    def _class_of(self, view: Any) -> str | None:
        """The platform class whose tasks this node watches: its offer's on chain (a provider
        claims only tasks of its class, and verifiers and referees are drawn from the task's
        class), else the configured or probed one; None while neither is known (no offer: the
        node can neither claim nor be drawn)."""
        record = tk.get_provider(ViewState(view), self.address)
        return record.platform_class if record is not None else self._platform

    def _watch(self, task_id: Hash32) -> None:
        if task_id in self._watched:
            return
        if len(self._watched) >= MAX_TRACKED:
            return
        self._watched[task_id] = None

    # --- platform ----------------------------------------------------------------------------

    async def platform_info(self) -> dict[str, Any]:
        """This machine's platform class and hardware, from a child (the node has no torch)."""
        code = (
            "import json,sys;from node.compute.platform import hardware,platform_class;"
            "print(json.dumps({'class':platform_class(sys.argv[1],int(sys.argv[2])),"
            "'hw':hardware()}))"
        )
        dev = self.settings.device
        proc = await trio.run_process(
            [sys.executable, "-c", code, dev, str(self.settings.threads)],
            capture_stdout=True,
            capture_stderr=True,
        )
        info: dict[str, Any] = json.loads(proc.stdout)
        return info

    async def platform_class(self) -> str:
        if self._platform is None:
            self._platform = str((await self.platform_info())["class"])
        return self._platform

    # --- provider: the offer -----------------------------------------------------------------

    async def offer(
        self, price_per_device_second: int | None = None, max_concurrent: int | None = None
    ) -> Hash32:
        """Send (or replace) this node's ``ProviderRegister`` from its hardware and settings."""
        s = self.settings
        # One probe (a torch child) gives both the hardware and, on the first offer, the class
        # (then cached); a failed probe still sends the offer when the class is known already.
        cls = self._platform
        try:
            info = await self.platform_info()
            hw: dict[str, Any] = info["hw"]
            if cls is None:
                cls = self._platform = str(info["class"])
        except Exception:  # best effort: the offer still goes out with the settings
            if cls is None:
                raise
            hw = {}
        cuda = hw.get("cuda") or []
        if s.device.startswith("cuda") and cuda:
            first = cuda[0]
            body = tk.ProviderRegister(
                device_kind="cuda",
                device_name=str(first["name"])[: tk.MAX_DEVICE_NAME],
                devices=min(s.devices, len(cuda)),
                memory_bytes=int(first["memory_bytes"]),
                compute_capability=str(first["capability"]),
                cpu_cores=int(hw.get("cpu_cores", 1)),
                platform_class=cls,
                price_per_device_second=Amount(
                    price_per_device_second or s.price_per_device_second
                ),
                max_concurrent=max_concurrent or s.max_concurrent,
            )
        else:
            body = tk.ProviderRegister(
                device_kind="cpu",
                device_name=f"{hw.get('machine', 'cpu')}-{hw.get('isa', '')}"[: tk.MAX_DEVICE_NAME],
                devices=s.devices,
                memory_bytes=min(s.memory_bytes, int(hw.get("memory_bytes", s.memory_bytes))),
                compute_capability="",
                cpu_cores=int(hw.get("cpu_cores", 1)),
                platform_class=cls,
                price_per_device_second=Amount(
                    price_per_device_second or s.price_per_device_second
                ),
                max_concurrent=max_concurrent or s.max_concurrent,
            )
        return await self.send_transaction(body)

    def provider_record(self, view: Any | None = None) -> tk.ComputeProvider | None:
        view = self._chain.read_view() if view is None else view
        return tk.get_provider(ViewState(view), self.address)

    # --- every block -------------------------------------------------------------------------

    async def on_head(self, view: Any) -> None:
        """Every block: first every watched task this node is involved in (``_is_involved``)
        or that a recent block touched, then the others round-robin with what is left of
        ``tasks_per_block`` (at least one): however many open tasks are watched, a task where
        this node has a window to meet is looked at in every block."""
        head = _head(view)
        self.last_head = head
        if self._class_of(view) != self._watch_class:
            self._scan_open_tasks(view)  # a new or first offer: the open tasks of its class
        self._read_new_blocks(view, head)
        self._hot = {t: until for t, until in self._hot.items() if until >= head}
        if head % SWEEP_EVERY == 0:
            await self._sweep(view)
        first = [t for t in self._watched if t in self._involved or t in self._hot]
        ids = [t for t in self._watched if t not in self._involved and t not in self._hot]
        batch = list(first)
        if ids:
            count = min(len(ids), max(1, self.settings.tasks_per_block - len(first)))
            start = self._cursor % len(ids)
            batch += [ids[(start + i) % len(ids)] for i in range(count)]
            self._cursor = (start + count) % len(ids)
        state = ViewState(view)
        for tid in batch:
            task = tk.get_task(state, tid)
            if task is None:
                continue
            try:
                await self._step(view, state, head, task)
            except NeuroSeedError as exc:
                log.warning("task 0x%s: %s", tid.hex()[:16], exc.message)
            local = self._local.get(tid)
            busy = local is not None and (local.running or bool(local.computing))
            if task.state == tk.TaskState.ENDED and tid in self._watched and not busy:
                del self._watched[tid]
                self._local.pop(tid, None)
                self._involved.discard(tid)
                self._trim_progress()
                await self._remove_work(tid)
            elif self._is_involved(task):
                self._involved.add(tid)
            else:
                self._involved.discard(tid)

    def _is_involved(self, task: tk.Task) -> bool:
        """Whether ``task`` has (or is about to have) a window this node must meet: it claimed
        it or its claim is pending, it has work in progress for it, it is drawn for it or a
        party of its dispute, or a draw is due at the next block (verifiers, referee)."""
        me, local = self.address, self._local.get(task.id)
        if local is not None and (local.claim_tx is not None or local.running or local.computing):
            return True
        st = task.state
        if st in (tk.TaskState.DRAWING, tk.TaskState.REFEREE_DRAW, tk.TaskState.DISPUTE):
            return True  # a draw next block, or a dispute whose referee is drawn at its end
        if task.provider == me and st != tk.TaskState.OPEN:
            return True
        if any(s.address == me for s in task.verifier_slots):
            return True
        d = task.dispute
        return d is not None and d.referee is not None and d.referee.address == me

    def _read_new_blocks(self, view: Any, head: int) -> None:
        """Watch the tasks of this node's class submitted in the blocks since the last look
        (their ``platform_class`` read from the body before any signature is checked), and mark
        the watched tasks another task transaction touched as hot for two blocks (a result's
        verifiers are drawn at the next block)."""
        first = max(self._scanned_blocks + 1, 1)
        cls = self._watch_class
        for height in range(first, head + 1):
            block = view.get_block(height)
            if block is None:
                continue
            for raw in block.txs:
                try:
                    tx = decode_transaction(bytes(raw)).tx
                    if tx.kind in _TASK_KINDS:
                        body = _TASK_KINDS[tx.kind].decode(tx.body)
                        if body.task_id in self._watched:
                            self._hot[Hash32(body.task_id)] = head + 2
                        continue
                    if tx.kind != int(EconomyKind.TASK_SUBMIT) or cls is None:
                        continue
                    if tk.TaskSubmit.decode(tx.body).platform_class != cls:
                        continue
                    vtx = verify_transaction(bytes(raw))  # its sender makes the task id
                except NeuroSeedError:
                    continue
                self._watch(tk.task_id(vtx.sender, vtx.tx.nonce))
        self._scanned_blocks = head

    def _trim_progress(self) -> None:
        extra = len(self.progress) - self.settings.keep_finished - len(self._watched)
        for tid in list(self.progress)[: max(0, extra)]:
            if tid not in self._watched:
                del self.progress[tid]

    async def _step(self, view: Any, state: Any, head: int, task: tk.Task) -> None:
        local = self._local.setdefault(task.id, _Local())
        me = self.address
        st = task.state
        if local.claim_tx is not None and st != tk.TaskState.OPEN:
            self._settle_claim(task, local)
        if st == tk.TaskState.OPEN:
            if self.settings.provide and local.claimed_at < 0:
                await self._maybe_claim(view, state, head, task, local)
            return
        if st == tk.TaskState.CLAIMED:
            if task.provider == me and not local.running and not local.posted:
                local.running = True
                self._start(self._provide_task, task, local)
            return
        if st == tk.TaskState.VERIFYING:
            slot = next((s for s in task.verifier_slots if s.address == me), None)
            if slot is not None:
                await self._verify(view, head, task, local, slot, "verify", None)
            return
        if st in (tk.TaskState.DISPUTE, tk.TaskState.REFEREE) and task.dispute is not None:
            d = task.dispute
            if st == tk.TaskState.REFEREE and d.referee is not None and d.referee.address == me:
                await self._verify(view, head, task, local, d.referee, "referee", d.high)
            elif st == tk.TaskState.DISPUTE and me in (task.provider, d.challenger):
                await self._bisect(view, head, task, local)

    def _start(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        if self._nursery is None:
            raise ComputeAgentDisabled("the compute agent is not running")
        self._nursery.start_soon(fn, *args)

    # --- provider: claim ---------------------------------------------------------------------

    def ask_price(self, task: tk.Task, record: tk.ComputeProvider | None = None) -> int:
        """What this node charges for ``task``: its price for the task's devices over the
        requester's whole wall-time limit (the worst case it commits to). The price per
        device-second is the one of this node's offer on chain (``record``, read when not
        given: ``ns_computeOffer`` may have set another than the settings'); the settings'
        only while there is no offer."""
        if record is None:
            record = self.provider_record()
        per_second = (
            self.settings.price_per_device_second
            if record is None
            else int(record.price_per_device_second)
        )
        return per_second * task.devices * task.limits.wall_seconds

    def check_task(self, state: Any, task: tk.Task, record: tk.ComputeProvider) -> None:
        """Raise why this node would not run ``task`` (local limits, priced inputs)."""
        s = self.settings
        if task.limits.device_memory > s.memory_bytes:
            raise TaskOutsideLimits(
                f"the task wants {task.limits.device_memory} bytes per device, this node gives "
                f"{s.memory_bytes}"
            )
        if task.limits.wall_seconds > s.wall_seconds:
            raise TaskOutsideLimits(
                f"the task's wall time {task.limits.wall_seconds} s exceeds {s.wall_seconds} s"
            )
        if task.devices > min(s.devices, record.devices):
            raise TaskOutsideLimits(f"the task wants {task.devices} devices")
        from node.economy.api import economy_params
        from node.input_purchases import CannotBuy, check_buyable

        bond = tk.bond_for(economy_params(state), self.ask_price(task, record))
        try:
            check_buyable(state, task, self.address, spare=bond)
        except CannotBuy as exc:
            raise PricedInputRefused(str(exc)) from None

    async def _maybe_claim(
        self, view: Any, state: Any, head: int, task: tk.Task, local: _Local
    ) -> None:
        record = tk.get_provider(state, self.address)
        if record is None or record.platform_class != task.platform_class:
            return
        if record.active_tasks >= record.max_concurrent or task.requester == self.address:
            return
        if tk.reputation(record) < task.min_reputation:
            return
        if task.deadline - head < max(1, self.settings.claim_margin_heights):
            return  # too close to its deadline to run it in time
        running = sum(1 for x in self._local.values() if x.running)
        if running >= self.settings.max_concurrent:
            return
        price = self.ask_price(task, record)
        if price > task.max_price:
            return
        try:
            self.check_task(state, task, record)
        except ComputeAgentError as exc:
            log.info("not claiming task 0x%s: %s", task.id.hex()[:16], exc.message)
            local.claimed_at = head  # decided: never again
            return
        local.claim_tx = await self.send_transaction(tk.TaskClaim(task.id, Amount(price)), view)
        local.claimed_at = head
        log.info("claiming task 0x%s for %d", task.id.hex()[:16], price)
        self.progress[task.id] = TaskProgress("provider", "claimed", 0, task.steps, "", head)

    def _settle_claim(self, task: tk.Task, local: _Local) -> None:
        """Forget our ``TaskClaim`` once the task left OPEN. When another provider won the
        race, our claim can never execute: the proposer drops it from its pool, but this node's
        own pool keeps it at our next nonce, so every later transaction of the operator (a
        verifier's commit, …) would wait behind a nonce gap on the other nodes forever. Removing
        it here lets the next transaction take that nonce."""
        tx_id, local.claim_tx = local.claim_tx, None
        if tx_id is None or task.provider == self.address:
            return
        dropped = self._drop is not None and self._drop(tx_id)
        log.info(
            "task 0x%s: our claim lost (%s)%s",
            task.id.hex()[:16],
            "unclaimed" if task.provider is None else f"provider 0x{task.provider.hex()[:16]}",
            "; dropped it from the local pool" if dropped else "",
        )

    # --- provider: run -----------------------------------------------------------------------

    def _task_dir(self, task: tk.Task) -> Path:
        """The task's work directory (inputs, decrypted priced inputs, checkpoints, output;
        mode 0700), removed once the task has ended (``_remove_work``)."""
        return self._dir / task.id.hex()

    async def _remove_work(self, task_id: bytes) -> None:
        """Delete an ended task's work directory: what it produced was imported into the blob
        store (which serves it from there) before it was posted."""
        path = self._dir / bytes(task_id).hex()
        if path.exists():
            await trio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))

    async def _sweep(self, view: Any) -> None:
        """Remove what ended tasks left behind: the work directories of tasks ended or unknown
        (not among the saved ones) and, once their purchases can no longer be disputed, the
        one-off purchase keys (``InputBuyer.forget_ended``)."""
        state = ViewState(view)
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._dir):
                if len(entry.name) != 64 or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    tid = Hash32(bytes.fromhex(entry.name))
                except ValueError:
                    continue
                if tid in self._local:
                    continue
                task = tk.get_task(state, tid)
                if task is None or task.state == tk.TaskState.ENDED:
                    await self._remove_work(tid)
        from node.input_purchases import PURCHASES_DIR

        if (self._dir / PURCHASES_DIR).is_dir():
            self.input_buyer().forget_ended(view)  # a state read and an unlink per key file

    async def _input_file(self, root: bytes, dest: Path) -> Path:
        """Make ``root`` complete in the blob store (fetching it) and export it to ``dest``."""
        from node.storage.importer import export_file, missing_blocks

        if self._blobs is None:
            raise InputUnavailable("this node has no blob store")
        blobs = self._blobs
        complete = blobs.has(root) and not await trio.to_thread.run_sync(
            missing_blocks, blobs, root
        )
        if not complete:
            if self._fetch is None:
                raise InputUnavailable(f"artifact {root.hex()[:20]}… is not stored here")
            try:
                await self._fetch(root)
            except NeuroSeedError as exc:
                raise InputUnavailable(f"cannot fetch {root.hex()[:20]}…: {exc.message}") from exc
        if dest.exists():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")

        def write() -> None:
            with open(tmp, "wb") as f:
                export_file(blobs, root, f)
            tmp.replace(dest)

        await trio.to_thread.run_sync(write)
        return dest

    def input_buyer(self) -> Any:
        """The buyer of this node's priced inputs (``node.input_purchases.InputBuyer``)."""
        from node.input_purchases import PURCHASES_DIR, InputBuyer

        if self._buyer is None:
            self._buyer = InputBuyer(
                self._dir / PURCHASES_DIR,
                self._key,
                self.send_transaction,
                self._chain.read_view,
                fetch=self._fetch_granted,
                peer_id=self._peer_id,
                poll_interval_s=self.settings.poll_interval_s,
            )
        return self._buyer

    async def _priced_input(self, task: tk.Task, ds: Any, dest: Path) -> Path:
        """Buy priced dataset ``ds`` as this node's party of ``task`` (or reuse what it bought
        for it), fetch it with the purchase as its grant and decrypt it to ``dest``."""
        from node.input_purchases import CannotBuy, InputNotDelivered, role_in

        role = role_in(task, self.address)
        prog = self.progress.get(task.id)
        if prog is not None:
            prog.stage = "buying inputs"
        try:
            path: Path = await self.input_buyer().input_file(task, role, ds, self._blobs, dest)
        except (CannotBuy, InputNotDelivered) as exc:
            raise InputNotBought(str(exc)) from exc
        return path

    async def _job_inputs(self, view: Any, task: tk.Task, work: Path) -> dict[str, Any]:
        """The job fields naming local files of the task's inputs (fetched and exported)."""
        state = ViewState(view)
        p = recipes.validate_task_params(task.recipe, task.params)
        files: dict[bytes, Path] = {}
        specs: dict[bytes, Any] = {}
        for n, item in enumerate(task.inputs):
            if item.kind == tk.InputKind.DATASET:
                ds = get_dataset(state, item.ref)
                if ds is None or not ds.root:
                    raise InputUnavailable(f"dataset 0x{item.ref.hex()[:16]} has no file")
                if ds.price > 0:
                    files[bytes(item.ref)] = await self._priced_input(task, ds, work / f"in{n}")
                    continue
                files[bytes(item.ref)] = await self._input_file(ds.root, work / f"in{n}")
            elif item.kind == tk.InputKind.MODEL:
                m = get_model(state, item.ref)
                if m is None:
                    raise InputUnavailable(f"model 0x{item.ref.hex()[:16]} is not registered")
                files[bytes(item.ref)] = await self._input_file(m.root, work / f"in{n}")
                specs[bytes(item.ref)] = json.loads(m.spec)

        def path_of(hex_id: str) -> str:
            ref = bytes.fromhex(hex_id.removeprefix("0x"))
            if ref not in files:
                raise InputUnavailable(f"input {hex_id} is not among the task's inputs")
            return str(files[ref])

        job: dict[str, Any] = {}
        if task.recipe in recipes.TRAINING_RECIPES or task.recipe == "evaluate":
            job["data"] = path_of(p["dataset"])
            if p.get("val_dataset"):
                job["val_data"] = path_of(p["val_dataset"])
            if task.recipe in ("finetune", "evaluate"):
                ref = bytes.fromhex(str(p["model"]).removeprefix("0x"))
                job["spec"] = specs.get(ref)
                key = "init" if task.recipe == "finetune" else "model"
                job[key] = path_of(p["model"])
        else:  # merge
            parents = [str(x) for x in p["parents"]]
            job["parents"] = [path_of(x) for x in parents]
            job["specs"] = [specs.get(bytes.fromhex(x.removeprefix("0x"))) for x in parents]
            if p.get("base"):
                job["base"] = path_of(str(p["base"]))
            if p.get("datasets"):
                job["data"] = path_of(str(next(iter(p["datasets"]))))
        return job

    def _job(
        self, task: tk.Task, work: Path, kind: str, inputs: Mapping[str, Any]
    ) -> dict[str, Any]:
        s = self.settings
        memory = min(task.limits.device_memory, s.memory_bytes)
        job: dict[str, Any] = {
            "kind": "evaluate" if task.recipe == "evaluate" and kind == "task" else kind,
            "recipe": task.recipe,
            "params": task.params.decode(),
            "task_id": task.id.hex(),
            "threads": s.threads,
            "device": s.device,
            "output": str(
                work / ("metrics.json" if task.recipe == "evaluate" else "out.safetensors")
            ),
            **inputs,
        }
        if s.device.startswith("cuda"):
            job["cuda_memory_bytes"] = max(memory, 64 << 20)  # the share of the device it may use
        else:
            job["memory_limit_bytes"] = max(memory, 64 << 20)
        if task.recipe in recipes.TRAINING_RECIPES and kind == "task":
            job["checkpoint_dir"] = str(work / "checkpoints")
        return job

    def _wall(self, task: tk.Task) -> float:
        return float(min(task.limits.wall_seconds, self.settings.wall_seconds))

    def _on_progress(self, tid: Hash32) -> Callable[[dict[str, Any]], None]:
        def on(msg: dict[str, Any]) -> None:
            prog = self.progress.get(tid)
            if prog is None or msg.get("stage") == "start":
                return
            prog.stage = "running"
            with contextlib.suppress(TypeError, ValueError):
                prog.done, prog.total = int(msg.get("done", 0)), int(msg.get("total", 0))

        return on

    async def _provide_task(self, task: tk.Task, local: _Local) -> None:
        """Fetch, run, upload, post: every error ends in a TaskFail, never in the node."""
        from node.compute.worker import (
            InvalidTrainingData,
            JobFailed,
            JobTimeout,
            TaskOutOfMemory,
        )

        prog = self.progress.setdefault(task.id, TaskProgress("provider"))
        prog.role, prog.total = "provider", task.steps
        work = self._task_dir(task)
        reason = tk.FailReason.PROVIDER_FAULT
        try:
            private_dir(work)
            prog.stage = "fetching"
            inputs = await self._job_inputs(self._chain.read_view(), task, work)
            job = self._job(task, work, "task", inputs)
            prog.stage = "running"
            try:
                result = await self._run_job(
                    job, time_limit_s=self._wall(task), on_progress=self._on_progress(task.id)
                )
            except TaskOutOfMemory:
                reason = tk.FailReason.OUT_OF_MEMORY
                raise
            except JobTimeout:
                reason = tk.FailReason.WALL_TIMEOUT
                raise
            except (JobFailed, InvalidTrainingData):  # the recipe's own failure (diverged, …)
                reason = tk.FailReason.CRASH
                raise
            if self._result_hook is not None:
                result = self._result_hook(task, result)
            prog.stage = "uploading"
            body = await self._result_body(task, result)
            self._keep_result(local, body)
            await self.send_transaction(body)
            prog.stage, prog.done = "posted", task.steps
            local.posted = True
            # Announced after the result is sent (the records go out a few a second, so 32
            # checkpoints take seconds); a verifier retries a fetch that finds no provider yet.
            self._start(self._announce, task, [body.output, *(e.cid for e in body.checkpoints)])
        except Exception as exc:  # a task never stops the node
            message = exc.message if isinstance(exc, NeuroSeedError) else repr(exc)
            log.warning("task 0x%s failed: %s", task.id.hex()[:16], message)
            prog.stage, prog.error = "failed", message[:500]
            try:
                await self._post_failure(task, work, reason)
            except Exception as post_exc:  # logged: the claim then runs to its deadline
                log.error("task 0x%s: cannot post its failure: %r", task.id.hex()[:16], post_exc)
            local.posted = True
        finally:
            local.running = False

    async def _import(self, path: Path, *, announce: bool = True) -> bytes:
        from node.storage.importer import import_file

        if self._blobs is None:
            raise InputUnavailable("this node has no blob store to upload into")
        blobs = self._blobs

        def work() -> bytes:
            with open(path, "rb") as f:
                return bytes(import_file(blobs, f).root)

        root = await trio.to_thread.run_sync(work)
        if announce and self._provide is not None:
            await self._provide(root)
        return root

    async def _announce(self, task: tk.Task, roots: list[bytes]) -> None:
        """Provide a posted result's artifacts (DHT records) in the background; the host paces
        its announcements (``provide_interval_s``)."""
        if self._provide is None:
            return
        provide = self._provide
        limiter = trio.CapacityLimiter(ANNOUNCE_PARALLEL)

        async def one(root: bytes) -> None:
            async with limiter:
                try:
                    await provide(root)
                except Exception as exc:  # the blob store still serves it to a direct ask
                    log.warning(
                        "task 0x%s: cannot announce %s…: %r",
                        task.id.hex()[:16],
                        root.hex()[:20],
                        exc,
                    )

        async with trio.open_nursery() as nursery:
            for root in dict.fromkeys(roots):
                nursery.start_soon(one, root)

    async def _result_body(self, task: tk.Task, result: Mapping[str, Any]) -> tk.TaskResult:
        """The ``TaskResult`` of a finished job, its files imported into the blob store (not
        yet announced: see ``_announce``)."""
        output = await self._import(Path(result["output"]), announce=False)
        if task.recipe in recipes.TRAINING_RECIPES:
            entries = []
            for c in result["checkpoints"]:
                cid = await self._import(Path(c["path"]), announce=False)
                entries.append(tk.CheckpointEntry(cid, Hash32(bytes.fromhex(c["sha256"]))))
        else:  # merge / evaluate: the one "checkpoint" is the output itself
            digest = await trio.to_thread.run_sync(_sha256_file, Path(result["output"]))
            entries = [tk.CheckpointEntry(output, Hash32(digest))]
        links = recipes.chain_links(task.id, [e.cid for e in entries])
        metrics = tuple(
            Metric.of(str(k)[:64], round(float(v) * 1_000_000))
            for k, v in sorted(dict(result.get("metrics") or {}).items())
            if isinstance(v, int | float) and math.isfinite(float(v))
        )[: tk.MAX_TASK_METRICS]
        return tk.TaskResult(
            task_id=task.id,
            output=output,
            metrics=metrics,
            checkpoints=tuple(entries),
            final_link=Hash32(links[-1]),
            device_seconds=math.ceil(float(result.get("device_seconds", 0))),
            price=Amount(task.price),
        )

    async def _post_failure(self, task: tk.Task, work: Path, reason: tk.FailReason) -> None:
        """``TaskFail`` with the checkpoints on disk (in order, none missing), imported."""
        entries: list[tk.CheckpointEntry] = []
        if reason != tk.FailReason.PROVIDER_FAULT and task.recipe in recipes.TRAINING_RECIPES:
            for step in task.checkpoint_steps[:-1]:
                path = work / "checkpoints" / checkpoint_file_name(step)
                if not path.exists():
                    break
                digest = await trio.to_thread.run_sync(_sha256_file, path)
                entries.append(tk.CheckpointEntry(await self._import(path), Hash32(digest)))
        links = recipes.chain_links(task.id, [e.cid for e in entries])
        # With no checkpoint the chain ignores the link: link_0, the empty chain's head.
        head = links[-1] if links else recipes.chain_start(task.id)
        await self.send_transaction(
            tk.TaskFail(task.id, int(reason), tuple(entries), Hash32(head), 0)
        )

    # --- verifier, referee, dispute parties ---------------------------------------------------

    async def _state_hash_at(self, task: tk.Task, segment: int, to_step: int, label: str) -> Hash32:
        """Re-run ``task`` from the start of ``segment`` to ``to_step`` (merge / evaluate: the
        whole job) and return the state hash there."""
        view = self._chain.read_view()
        private_dir(self._task_dir(task))
        work = self._task_dir(task) / f"{label}-{secrets.token_hex(4)}"
        private_dir(work)
        try:
            inputs = await self._job_inputs(view, task, work)
            if task.recipe not in recipes.TRAINING_RECIPES:
                job = self._job(task, work, "task", inputs)
                result = await self._run_job(job, time_limit_s=self._wall(task), on_progress=None)
                digest = await trio.to_thread.run_sync(_sha256_file, Path(result["output"]))
                return Hash32(digest)
            bounds = tk.segment_bounds(task, segment)
            job = self._job(task, work, "task_segment", inputs)
            start: str | None = None
            if bounds.index > 0:
                assert task.result is not None
                cid = task.result.checkpoints[bounds.index - 1].cid
                start = str(await self._input_file(cid, work / "start.safetensors"))
            job.update(start=start, from_step=bounds.start, to_step=to_step, output="")
            try:
                result = await self._run_job(job, time_limit_s=self._wall(task), on_progress=None)
            except _provider_artifact_errors() as exc:
                if start is None:
                    raise  # no file of the provider's was loaded: not its fault
                # The provider's own checkpoint does not load: the same on every node, a
                # mismatch with the hash it posted.
                log.warning(
                    "task 0x%s: the provider's start checkpoint is invalid: %s",
                    task.id.hex()[:16],
                    exc.message,
                )
                return rerun_failed_hash(task.id)
            return Hash32(bytes.fromhex(result["state_hash"]))
        finally:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))

    def rerun_refusal(self, task: tk.Task) -> str | None:
        """Why this node cannot re-run ``task`` within the task's own limits (its memory, wall
        time or devices below them), or None. Such a node abstains without running: a re-run
        cut by a local limit proves nothing about the provider."""
        s = self.settings
        if task.limits.device_memory > s.memory_bytes:
            return f"the task's memory {task.limits.device_memory} exceeds {s.memory_bytes} bytes"
        if task.limits.wall_seconds > s.wall_seconds:
            return f"the task's wall time {task.limits.wall_seconds} s exceeds {s.wall_seconds} s"
        if task.devices > s.devices:
            return f"the task wants {task.devices} devices, this node has {s.devices}"
        return None

    def _abstain(self, task: tk.Task, local: _Local, key: str, why: str) -> None:
        """Never answer ``key``: no commitment, no reveal, no bisection step (the verifier's fee
        goes back to the requester; an unanswered slot accuses nobody)."""
        log.warning("task 0x%s: not re-running %s: %s", task.id.hex()[:16], key, why)
        local.sent.add(_ABSTAIN + key)
        self.progress.setdefault(task.id, TaskProgress("verifier")).stage = "abstained"
        self._save()

    def _compute(self, task: tk.Task, local: _Local, key: str, segment: int, to_step: int) -> None:
        if key in local.answer or key in local.computing or _ABSTAIN + key in local.sent:
            return
        refusal = self.rerun_refusal(task)
        if refusal is not None:
            self._abstain(task, local, key, refusal)
            return
        local.computing.add(key)

        async def work() -> None:
            try:
                for attempt in range(1, FETCH_ATTEMPTS + 1):
                    try:
                        local.answer[key] = await self._state_hash_at(task, segment, to_step, key)
                        break
                    except InputNotBought:
                        raise
                    except InputUnavailable as exc:
                        # The provider announces its checkpoints after posting the result, a
                        # few a second: the one this segment starts from may not be found yet.
                        if attempt == FETCH_ATTEMPTS:
                            raise
                        log.info(
                            "task 0x%s: %s (try %d of %d)",
                            task.id.hex()[:16],
                            exc.message,
                            attempt,
                            FETCH_ATTEMPTS,
                        )
                        await trio.sleep(FETCH_RETRY_S)
            except Exception as exc:
                # Nothing was computed (a priced input not bought, a fetch that failed, this
                # node's memory, wall time, disk or process): abstain. A hash standing for
                # "failed" would be the same on every node whose re-run fails for a local
                # reason, and would convict an honest provider. A start checkpoint of the
                # provider's that does not load is the one failure that is its fault: that
                # answer comes back from _state_hash_at as a hash, not as an error.
                message = exc.message if isinstance(exc, NeuroSeedError) else repr(exc)
                self._abstain(task, local, key, f"re-run failed: {message}")
            finally:
                local.computing.discard(key)
                self.notify_block()

        self._start(work)

    async def _verify(
        self,
        view: Any,
        head: int,
        task: tk.Task,
        local: _Local,
        slot: tk.VerifierSlot,
        role: str,
        to_step: int | None,
    ) -> None:
        segment = task.segment if task.dispute is None else task.dispute.segment
        end = tk.segment_bounds(task, segment).end if to_step is None else to_step
        key = f"{role}-{segment}-{end}"  # the re-run's answer: the same in every dispute
        # What was sent is per dispute: the same node may referee the same step again in a
        # later dispute of the task (dispute rounds keep counting across a task's disputes).
        turn = key if task.dispute is None else f"{key}@{task.dispute.round}"
        prog = self.progress.setdefault(task.id, TaskProgress(role))
        prog.role = role
        if slot.commitment is None:
            # Sent now, it lands at head + 1 at the earliest: past commit_end it is refused.
            if head + 1 > task.commit_end or _ABSTAIN + key in local.sent:
                return
            if key not in local.answer:
                if key not in local.computing:
                    log.info(
                        "task 0x%s: drawn as %s of segment %d, re-running it",
                        task.id.hex()[:16],
                        role,
                        segment,
                    )
                prog.stage = "re-running"
                self._compute(task, local, key, segment, end)
                return
            if "c" + turn in local.sent:
                return
            salt = local.salt.setdefault(turn, Hash32(secrets.token_bytes(32)))
            if not self._save():  # the salt is on disk before the commitment can be in a block
                return  # not committed: a restart could not reveal it; tried again next block
            commitment = tk.verify_commitment(task.id, self.address, local.answer[key], salt)
            await self.send_transaction(tk.VerifyCommit(task.id, commitment), view)
            local.sent.add("c" + turn)
            prog.stage = "committed"
            log.info("task 0x%s: %s commitment sent", task.id.hex()[:16], role)
            return
        if slot.state_hash is None and task.commit_end < head + 1 <= task.reveal_end:
            if "r" + turn in local.sent or key not in local.answer or turn not in local.salt:
                return
            await self.send_transaction(
                tk.VerifyReveal(task.id, local.answer[key], local.salt[turn]), view
            )
            local.sent.add("r" + turn)
            prog.stage = "revealed"
            log.info("task 0x%s: %s reveal sent", task.id.hex()[:16], role)

    async def _bisect(self, view: Any, head: int, task: tk.Task, local: _Local) -> None:
        d = task.dispute
        assert d is not None
        mine = d.provider_mid if task.provider == self.address else d.challenger_mid
        if mine is not None or head + 1 > task.window_end:
            return
        mid = tk.bisect_midpoint(d)
        key = f"bisect-{d.segment}-{mid}"
        self.progress.setdefault(task.id, TaskProgress("dispute")).stage = f"bisect round {d.round}"
        if key not in local.answer:
            self._compute(task, local, key, d.segment, mid)
            return
        sent = f"b{d.round}"
        if sent in local.sent:
            return
        await self.send_transaction(tk.BisectStep(task.id, d.round, local.answer[key]), view)
        local.sent.add(sent)

    # --- transactions ------------------------------------------------------------------------

    async def send_transaction(self, body: Record, view: Any | None = None) -> Hash32:
        """Sign ``body`` with the operator key (next nonce, cost + tip) and submit it."""
        view = self._chain.read_view() if view is None else view
        async with self._tx_lock:
            if self._pending_nonce is not None:
                nonce = await self._pending_nonce(self.address)
            else:
                nonce = max(view.get_account(self.address).nonce, self._next_nonce)
            chain_id = view.chain.chain_id
            draft = make_transaction(self._key, chain_id, nonce, 0, body).encode()
            vtx = await trio.to_thread.run_sync(verify_transaction, draft)
            cost = fees.cost_of(view.params, ViewState(view), vtx)
            fee = cost + cost // max(1, self.settings.fee_tip_divisor)
            signed = make_transaction(self._key, chain_id, nonce, fee, body)
            tx_id = await self._submit(signed.encode())
            self._next_nonce = nonce + 1
            return tx_id

    # --- reads for RPC -----------------------------------------------------------------------

    def task_progress(self, task_id: bytes) -> dict[str, Any] | None:
        prog = self.progress.get(Hash32(bytes(task_id)))
        return None if prog is None else prog.as_json()

    def status(self) -> dict[str, Any]:
        return {
            "address": "0x" + bytes(self.address).hex(),
            "platform_class": self._platform,
            "watched": len(self._watched),
            "running": sum(1 for x in self._local.values() if x.running),
            "settings": {
                "max_concurrent": self.settings.max_concurrent,
                "memory_bytes": self.settings.memory_bytes,
                "wall_seconds": self.settings.wall_seconds,
                "device": self.settings.device,
                "threads": self.settings.threads,
                "provide": self.settings.provide,
                "price_per_device_second": self.settings.price_per_device_second,
            },
            "tasks": {"0x" + k.hex(): v.as_json() for k, v in self.progress.items()},
        }


def private_dir(path: Path) -> Path:
    """Make ``path`` (and its missing parents) a directory of the owner's only (mode 0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def rerun_failed_hash(task_id: bytes) -> Hash32:
    """The answer of a re-run that could not load the provider's own start checkpoint: a hash
    no honest run produces, so it mismatches the provider's."""
    return Hash32(crypto.sha256(b"NeuroSeed/rerun-failed/v1" + task_id))


def _provider_artifact_errors() -> tuple[type[NeuroSeedError], ...]:
    """The worker's typed errors for a checkpoint or model file that does not load (invalid,
    of another task or step): the provider's fault when the file is its start checkpoint."""
    from node.compute.worker import CheckpointMismatch, InvalidCheckpoint
    from node.merge.recipe import InvalidModelFile

    return (InvalidCheckpoint, CheckpointMismatch, InvalidModelFile)


def checkpoint_file_name(step: int) -> str:
    """The worker's checkpoint file name (``node.compute.checkpoints.checkpoint_name``, which
    imports torch)."""
    return f"ckpt-{step:09d}.safetensors"


def _sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()

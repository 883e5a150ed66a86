"""Block sync: ``/neuroseed/sync/1`` (DESIGN §5, §6). A new or lagging node fetches blocks with
their seen commits by height range from several peers in parallel, verifies every commit against
the validator set of its height, applies the blocks strictly in order through the chain service,
and leaves syncing once it is within a margin of the best peer's head, for consensus to take over.

**Serving** (the handler ``SyncService.handle_request``; it replaces the minimal one of
``catchup.py``, so run the catch-up service with ``CatchupSettings(serve_sync=False)``):

* ``GetStatus`` → ``StatusResponse(base, head, head_hash)``: this node serves ``base..head``;
* ``GetHeaders`` / ``GetBlocks(start, count)`` → consecutive headers / blocks from ``start``, each
  with its seen commit, at most ``count`` (≤ ``max_serve_blocks``) and ``max_response_bytes``
  (``messages.take_within``), read from the chain's published ``ReadView`` in a worker thread;
* errors as ``ErrorResponse`` with typed codes: ``RangeUnavailable`` (start outside
  ``base..head``), ``SyncBusy`` (more than ``max_serving`` requests being served), and the
  ``DecodeError`` code of an undecodable request (whose sender is also penalized).

**Client.** Every ``status_interval_s`` (and at start) the node asks each connected peer for its
status. When the best head is more than ``start_margin`` above its own, the node is *syncing*
(``status()``): the missing range is split into windows of ``window`` blocks, fetched from
several peers at once (at most ``max_in_flight`` requests, ``max_per_peer`` per peer, each with
``request_timeout_s``; a failed or timed-out window is retried on a peer that has not failed it,
the least busy first, round-robin), and never more than ``max_ahead_blocks`` above the applied
head (memory bound). Each response is decoded and verified in a worker thread (``verify_window``):
consecutive heights from the one asked, the body matches the header (tx, evidence and last-commit
roots), the parent hashes link, ``validators_hash`` follows the previous header's
``next_validators_hash``, and every commit carries precommits of more than 2/3 of the power of
the validator set of its height. Windows are applied strictly in order, each first checked to
link to the applied head. A peer that serves undecodable data, a body its header does not name, a
bad commit or blocks that do not link is penalized (``Network.penalize``) and dropped from the
sync for ``drop_s``; what it served and is not applied yet is fetched again elsewhere. A block
that is committed and served as committed but breaks this node's rules (a bad transaction, a bad
last commit, execution) is the validators' doing, not the peer's: nobody is penalized, the sync
stops below it and is not tried again until the head moves (logged as an error: most likely this
node's software is out of date). A peer that times out ``max_peer_failures`` times in a row is left out of the
run (no penalty). When the run reaches its target the statuses are asked again; the node leaves
syncing once within ``done_margin`` of the best head.

**Validator sets** (DESIGN §5: every set change applies at h+2 and is committed by the header's
``next_validators_hash``). The set of height h is the one whose hash is header h's
``validators_hash``, and that must equal header h-1's ``next_validators_hash`` (checked inside a
window and against the applied head). Sets are learnt from the applied state
(``ChainService.validator_context`` of the next height gives the sets of h+1 and h+2) and kept by
hash; a commit whose set is not known yet (a change further ahead than the applied state shows) is
checked when it is applied (``ChainService.commit`` checks every commit against the set of its
height from state), so bad data is still refused, only found later.

**The single writer.** Two ways to apply, chosen by whether the consensus service runs:

* *exclusive* — during ``run``'s initial sync, before ``ConsensusService.run`` starts (start this
  service first; ``nursery.start(sync.run)`` returns once the initial sync is done). Nothing else
  calls the chain service, so each window is applied in one worker thread with
  ``ChainService.validate(block, verified)`` then ``ChainService.commit``; the transactions'
  signatures were already recovered by the verification thread (``verified``), so recovery for
  later windows overlaps execution of earlier ones. The pool, the ``on_commit`` hook and height
  waiters are updated through ``ConsensusService.after_external_commit``. No consensus WAL is
  rotated per block.
* *cooperative* — once consensus runs (a running node that fell behind): each block goes through
  ``ConsensusService.commit_from_peer``, which commits it on the consensus task (so the chain
  keeps one caller at a time) and starts the next height; a block consensus or the catch-up
  service committed meanwhile is skipped.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from node.chain import ChainService, ReadView
from node.consensus.blocks import (
    Block,
    Header,
    compute_evidence_root,
    compute_last_commit_hash,
    compute_tx_root,
)
from node.consensus.transition import BlockResult, check_commit, verify_block_transactions
from node.consensus.txs import MAX_TX_BYTES_HARD, VerifiedTransaction
from node.consensus.validators import ValidatorSet
from node.consensus_service import ConsensusService
from node.errors import DecodeError, InvalidBlock, InvalidCommit
from node.p2p.api import (
    PROTOCOL_SYNC,
    Network,
    P2PError,
    PeerId,
    PeerUnreachable,
)
from node.p2p.messages import (
    MAX_SYNC_BLOCKS,
    MAX_SYNC_HEADERS,
    BlocksResponse,
    BlockWithCommit,
    GetBlocks,
    GetHeaders,
    GetStatus,
    HeadersResponse,
    HeaderWithCommit,
    RemoteError,
    StatusResponse,
    decode_request,
    decode_response,
    error_response,
    take_within,
)
from node.types import ZERO_HASH, Hash32, Height

log = logging.getLogger(__name__)

_SETS_KEPT = 16
_COMMIT_ATTEMPTS = 200  # cooperative mode: tries of one block while the consensus queue is full


# --- errors --------------------------------------------------------------------------------------


class SyncError(P2PError):
    code = 2140
    reason = "sync error"


class RangeUnavailable(SyncError):
    """The requested start height is outside what the responder serves (``base..head``)."""

    code = 2141
    reason = "requested heights are not served"


class SyncBusy(SyncError):
    """The responder serves too many sync requests now; ask another peer or later."""

    code = 2142
    reason = "too many sync requests"


class BadSyncData(SyncError):
    """A peer's response failed verification (the peer is penalized and dropped)."""

    code = 2143
    reason = "bad sync data"


# --- settings and status -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncSettings:
    # client
    status_interval_s: float = 2.0  # ask every peer's status this often
    status_timeout_s: float = 2.0
    request_timeout_s: float = 10.0  # one GetBlocks
    window: int = 64  # blocks per GetBlocks
    max_in_flight: int = 8  # GetBlocks requests at once
    max_per_peer: int = 2  # ... to one peer
    max_ahead_blocks: int = 512  # fetched, not yet applied (memory bound)
    start_margin: int = 2  # sync when the best head is more than this above ours
    done_margin: int = 1  # stop syncing when within this of the best head
    max_peer_failures: int = 3  # timeouts/errors in a row before a peer is left out of a run
    max_window_rounds: int = 3  # times every usable peer failed one window before a run ends
    retry_backoff_s: float = 0.5  # before a window is asked again of peers that failed it
    max_failed_runs: int = 3  # runs without progress before a sync session ends
    drop_s: float = 600.0  # a peer that served bad data is not used for this long
    verify_threads: int = 2  # worker threads verifying windows at once
    initial_sync: bool = True  # in run(): sync before returning started (consensus not yet up)
    initial_peer_wait_s: float = 0.0  # ... waiting this long for a first connected peer
    follow: bool = True  # keep polling statuses after the initial sync
    # server
    serve: bool = True
    max_serving: int = 16  # requests served at once
    max_serve_blocks: int = MAX_SYNC_BLOCKS
    max_response_bytes: int = 16 << 20  # ≤ messages.BlocksResponse.MAX_BYTES


@dataclass(frozen=True, slots=True)
class PeerStatus:
    peer: PeerId
    base: int
    head: int
    head_hash: Hash32


@dataclass(frozen=True, slots=True)
class SyncStatus:
    syncing: bool
    head_height: int
    target_height: int  # the best head of the peers in use (0 before any status)
    peers: tuple[PeerId, ...]  # peers that served blocks in the current (or last) sync
    dropped: tuple[PeerId, ...]  # peers dropped for bad data
    blocks_applied: int  # by this service, since it started


# --- verification (pure; runs in a worker thread) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedWindow:
    """Consecutive blocks from ``start`` with their commits, checked by ``verify_window``.

    ``checked[i]``: block i's commit was verified (False: its validator set was not known yet,
    so it is checked when the block is applied). ``verified[i]``: block i's transactions with
    their signers recovered, when asked for (None for a block where that failed: the apply
    verifies that block itself and says why).
    """

    start: int
    items: tuple[BlockWithCommit, ...]
    hashes: tuple[Hash32, ...]
    checked: tuple[bool, ...]
    verified: tuple[list[VerifiedTransaction] | None, ...] | None

    @property
    def end(self) -> int:
        """The last height (inclusive)."""
        return self.start + len(self.items) - 1

    @property
    def deferred(self) -> int:
        """Commits left to check on apply."""
        return self.checked.count(False)


def verify_window(
    chain_id: int,
    start: int,
    asked: int,
    items: Sequence[BlockWithCommit],
    sets: Mapping[Hash32, ValidatorSet],
    *,
    recover_txs: bool,
) -> VerifiedWindow:
    """Check a peer's blocks (see the module docstring); raise ``BadSyncData`` with the reason.

    ``items`` come from a decoded ``BlocksResponse`` (consecutive heights, each commit for its
    block's hash: ``BlocksResponse.check``). ``sets`` maps validator-set hashes to known sets.
    Everything checked here is what a peer can get wrong; a block that is committed and carries
    the body its header names but breaks the rules (a bad transaction signature, a bad last
    commit, execution) is the validators' doing, found by the apply.
    """
    if not items:
        raise BadSyncData("no blocks")
    if len(items) > asked:
        raise BadSyncData(f"{len(items)} blocks for {asked} asked")
    if items[0].block.header.height != start:
        raise BadSyncData(f"blocks from height {items[0].block.header.height}, asked {start}")
    hashes: list[Hash32] = []
    checked: list[bool] = []
    verified: list[list[VerifiedTransaction] | None] = []
    prev: Header | None = None
    for item in items:
        block, commit = item.block, item.commit
        h = block.header
        block_hash = h.hash()
        if h.chain_id != chain_id:
            raise BadSyncData(f"block {h.height} is for chain {h.chain_id}")
        if prev is not None:
            if h.parent_hash != hashes[-1]:
                raise BadSyncData(f"block {h.height} does not link to block {prev.height}")
            if h.validators_hash != prev.next_validators_hash:
                raise BadSyncData(
                    f"block {h.height}'s validators hash is not block {prev.height}'s next "
                    "validators hash"
                )
        _check_body(block)
        vals = sets.get(h.validators_hash)
        if vals is not None:
            try:
                check_commit(chain_id, commit, h.height, block_hash, vals, h.time)
            except InvalidBlock as exc:
                raise BadSyncData(f"block {h.height}: {exc.message}") from exc
        checked.append(vals is not None)
        if recover_txs:
            try:
                verified.append(verify_block_transactions(block.txs, MAX_TX_BYTES_HARD))
            except InvalidBlock:
                verified.append(None)
        hashes.append(block_hash)
        prev = h
    return VerifiedWindow(
        start,
        tuple(items),
        tuple(hashes),
        tuple(checked),
        tuple(verified) if recover_txs else None,
    )


def _check_body(block: Block) -> None:
    """The body is the one the header commits to (the commit signs only the header)."""
    h = block.header
    if h.tx_root != compute_tx_root(block.txs):
        raise BadSyncData(f"block {h.height}: tx root does not match the transactions")
    if h.evidence_root != compute_evidence_root(block.evidence):
        raise BadSyncData(f"block {h.height}: evidence root does not match the evidence")
    if h.last_commit_hash != compute_last_commit_hash(block.last_commit):
        raise BadSyncData(f"block {h.height}: last commit hash does not match the last commit")


def _decode_and_verify(
    data: bytes,
    chain_id: int,
    start: int,
    asked: int,
    sets: Mapping[Hash32, ValidatorSet],
    recover_txs: bool,
) -> VerifiedWindow | None:
    """Decode a ``GetBlocks`` answer and verify it; None if the peer sent no blocks."""
    resp = decode_response(BlocksResponse, data)
    if not resp.blocks:
        return None
    return verify_window(chain_id, start, asked, resp.blocks, sets, recover_txs=recover_txs)


# --- serving (worker thread) ---------------------------------------------------------------------


def _stored(view: ReadView, start: int, count: int) -> Iterator[BlockWithCommit]:
    for h in range(start, min(start + count - 1, view.head_height) + 1):
        block, commit = view.get_block(h), view.get_commit(h)
        if block is None or commit is None:
            return
        yield BlockWithCommit(block, commit)


def _blocks_response(view: ReadView, start: int, count: int, max_bytes: int) -> bytes:
    kept = take_within(_stored(view, start, count), max_bytes, max_items=count)
    return BlocksResponse(kept).encode()


def _headers_response(view: ReadView, start: int, count: int, max_bytes: int) -> bytes:
    headers = (HeaderWithCommit(b.block.header, b.commit) for b in _stored(view, start, count))
    return HeadersResponse(take_within(headers, max_bytes, max_items=count)).encode()


# --- applying (worker thread, exclusive mode) ------------------------------------------------------


@dataclass(slots=True)
class _Applied:
    """What applying (part of) a window did: ``blocks`` committed, then maybe stopped at a block
    the peer is to blame for (``blame``: a bad commit, no link) or that breaks the rules although
    committed (``invalid``: not the peer's fault; the sync cannot go past it)."""

    blocks: list[tuple[Block, BlockResult]] = field(default_factory=list)
    blame: str | None = None
    invalid: str | None = None


def _apply_exclusive(chain: ChainService, window: VerifiedWindow, offset: int) -> _Applied:
    """Validate and commit ``window.items[offset:]`` in order; stop at the first bad block."""
    out = _Applied()
    chain_id = chain.chain.chain_id
    for i in range(offset, len(window.items)):
        block, commit = window.items[i].block, window.items[i].commit
        h = block.header
        try:
            if not window.checked[i]:  # the set of this height is known now: the head's next
                vals = chain.validator_context(h.height).current
                check_commit(chain_id, commit, h.height, window.hashes[i], vals, h.time)
        except InvalidBlock as exc:
            out.blame = f"block {h.height}: {exc.message}"
            return out
        verified = None if window.verified is None else window.verified[i]
        try:
            chain.validate(block, verified)
            result = chain.commit(block, commit)
        except InvalidCommit as exc:
            out.blame = f"block {h.height}: {exc.message}"
            return out
        except InvalidBlock as exc:
            out.invalid = f"block {h.height}: {exc.message}"
            return out
        out.blocks.append((block, result))
    return out


# --- the service ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Fetched:
    peer: PeerId
    window: VerifiedWindow


@dataclass(order=True, slots=True)
class _Window:
    start: int
    end: int
    not_before: float = field(default=0.0, compare=False)
    rounds: int = field(default=0, compare=False)
    tried: set[PeerId] = field(default_factory=set, compare=False)


class SyncService:
    """Serves ``/neuroseed/sync/1`` and syncs this node from its peers (module docstring)."""

    def __init__(
        self,
        network: Network,
        chain: ChainService,
        consensus: ConsensusService,
        settings: SyncSettings | None = None,
    ) -> None:
        self.network = network
        self.chain = chain
        self.consensus = consensus
        self.settings = settings or SyncSettings()
        self.chain_id = chain.chain.chain_id
        self.stats: Counter[str] = Counter()
        self.requests_by_peer: Counter[PeerId] = Counter()  # GetBlocks sent, per peer
        self.max_in_flight_seen = 0
        self._peers: dict[PeerId, PeerStatus] = {}
        self._dropped: dict[PeerId, float] = {}
        self._used: list[PeerId] = []
        self._syncing = False
        self._exclusive = False
        self._target = 0
        self._serving = 0
        self._sets: OrderedDict[Hash32, ValidatorSet] = OrderedDict()
        self._invalid_at: int | None = None  # a committed block here breaks this node's rules
        self._wake = trio.Event()
        self._verify_limiter = trio.CapacityLimiter(max(1, self.settings.verify_threads))

    # --- public ------------------------------------------------------------------------------

    def status(self) -> SyncStatus:
        return SyncStatus(
            syncing=self._syncing,
            head_height=self.chain.head_height,
            target_height=self._target,
            peers=tuple(self._used),
            dropped=tuple(self._dropped),
            blocks_applied=self.stats["blocks_applied"],
        )

    @property
    def syncing(self) -> bool:
        return self._syncing

    def poke(self) -> None:
        """Ask the peers' statuses now (e.g. a peer showed traffic far ahead)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve, then (if ``initial_sync``) sync before reporting started, then follow."""
        if self.settings.serve:
            self.network.set_handler(PROTOCOL_SYNC, self.handle_request)
        if self.settings.initial_sync:
            # Exclusive only while consensus has not started a height: then this service is
            # the chain's only caller (the caller starts consensus after ``started``).
            self._exclusive = self.consensus.state.validators is None
            try:
                await self._initial_sync()
            finally:
                self._exclusive = False
        task_status.started()
        if self.settings.follow:
            await self._follow()
        else:
            await trio.sleep_forever()

    # --- client: sessions ----------------------------------------------------------------------

    async def _initial_sync(self) -> None:
        deadline = trio.current_time() + self.settings.initial_peer_wait_s
        while not self._connected() and trio.current_time() < deadline:
            await trio.sleep(0.1)
        await self.poll_statuses()
        if self._should_start():
            await self._session()

    async def _follow(self) -> None:
        while True:
            await self.poll_statuses()
            if self._should_start():
                await self._session()
            with trio.move_on_after(self.settings.status_interval_s):
                await self._wake.wait()
            self._wake = trio.Event()

    def _connected(self) -> list[PeerId]:
        me = self.network.peer_id
        return sorted(p.peer_id for p in self.network.peers() if p.connected and p.peer_id != me)

    def _is_dropped(self, peer: PeerId) -> bool:
        until = self._dropped.get(peer)
        if until is None:
            return False
        if until <= trio.current_time():
            del self._dropped[peer]
            return False
        return True

    def _usable(self) -> dict[PeerId, PeerStatus]:
        connected = set(self._connected())
        return {p: s for p, s in self._peers.items() if p in connected and not self._is_dropped(p)}

    def _best_head(self) -> int:
        return max((s.head for s in self._usable().values()), default=0)

    def _should_start(self) -> bool:
        head = self.chain.head_height
        if self._invalid_at == head + 1:
            return False  # the next committed block is invalid here: no peer can help
        return self._best_head() > head + self.settings.start_margin

    async def poll_statuses(self) -> None:
        """Ask every connected peer (not dropped) for its status, in parallel."""
        peers = [p for p in self._connected() if not self._is_dropped(p)]
        for gone in set(self._peers) - set(peers):
            del self._peers[gone]
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(self._poll_one, peer)

    async def _poll_one(self, peer: PeerId) -> None:
        try:
            data = await self.network.request(
                peer, PROTOCOL_SYNC, GetStatus().encode(), timeout_s=self.settings.status_timeout_s
            )
            resp = decode_response(StatusResponse, data)
        except DecodeError as exc:
            self._peers.pop(peer, None)
            await self._drop(peer, f"sent an undecodable status: {exc.message}")
            return
        except P2PError as exc:
            log.debug("status of %r: %s", peer, exc)
            self._peers.pop(peer, None)
            return
        self._peers[peer] = PeerStatus(peer, resp.base, resp.head, resp.head_hash)

    async def _session(self) -> None:
        """Sync until within ``done_margin`` of the best head (or no progress can be made)."""
        self._syncing = True
        self._used = []
        self.stats["sessions"] += 1
        failed_runs = 0
        log.info(
            "syncing: head %d, best peer head %d (%d peers)",
            self.chain.head_height,
            self._best_head(),
            len(self._usable()),
        )
        try:
            while True:
                target = self._best_head()
                self._target = target
                if target <= self.chain.head_height + self.settings.done_margin:
                    break
                if self._invalid_at == self.chain.head_height + 1:
                    break  # the next committed block is invalid here (logged)
                applied = await self._run(target)
                if applied == 0:
                    failed_runs += 1
                    if failed_runs >= self.settings.max_failed_runs:
                        log.warning("sync made no progress in %d runs; giving up", failed_runs)
                        break
                    await trio.sleep(self.settings.retry_backoff_s)
                else:
                    failed_runs = 0
                await self.poll_statuses()
        finally:
            self._syncing = False
        log.info("sync done: head %d (best peer head %d)", self.chain.head_height, self._target)

    # --- client: one run towards a target --------------------------------------------------------

    async def _run(self, target: int) -> int:
        """Fetch and apply blocks up to ``target``; the number of blocks applied."""
        run = _Run(self, target)
        return await run.go()

    # --- helpers used by runs --------------------------------------------------------------------

    def _refresh_sets(self) -> None:
        """Learn the validator sets of the next two heights from the applied state (by hash)."""
        ctx = self.chain.validator_context(self.chain.head_height + 1)
        for vals in (ctx.current, ctx.next):
            key = vals.hash()
            self._sets[key] = vals
            self._sets.move_to_end(key)
        while len(self._sets) > _SETS_KEPT:
            self._sets.popitem(last=False)

    def _note_used(self, peer: PeerId) -> None:
        if peer not in self._used:
            self._used.append(peer)

    async def _drop(self, peer: PeerId, reason: str) -> None:
        """Penalize ``peer`` for bad data and leave it out of syncing for ``drop_s``."""
        if self._is_dropped(peer):
            return  # a second answer that was in flight when it was dropped: one penalty
        log.warning("sync: dropping peer %r: %s", peer, reason)
        self.stats["peers_dropped"] += 1
        self._dropped[peer] = trio.current_time() + self.settings.drop_s
        self._peers.pop(peer, None)
        if peer in self._used:
            self._used.remove(peer)
        with contextlib.suppress(P2PError):
            await self.network.penalize(peer, reason)

    async def _apply(self, fetched: _Fetched) -> tuple[int, str | None, str | None]:
        """Apply the part of a fetched window above the head: (blocks applied, why the peer is
        to blame, why the chain cannot go on) — see ``_Applied``."""
        window = fetched.window
        head = self.chain.head_height
        if window.end <= head:
            return 0, None, None
        offset = head + 1 - window.start
        assert offset >= 0, "windows are applied in order"
        if offset > 0 and window.hashes[offset - 1] != self.chain.store.get_block_hash(head):
            return 0, f"block {head} is not the one committed here", None
        head_header = self.chain.head
        first = window.items[offset].block.header
        parent = ZERO_HASH if head_header is None else head_header.hash()
        if first.parent_hash != parent:
            return 0, f"block {first.height} does not link to the applied head", None
        if head_header is not None and first.validators_hash != head_header.next_validators_hash:
            blame = f"block {first.height}'s validators hash does not follow the applied head"
            return 0, blame, None
        if self._exclusive:
            return await self._apply_exclusive(window, offset)
        return await self._apply_cooperative(window, offset)

    async def _apply_exclusive(
        self, window: VerifiedWindow, offset: int
    ) -> tuple[int, str | None, str | None]:
        assert self.consensus.state.validators is None, "consensus started during the sync"
        out = await trio.to_thread.run_sync(_apply_exclusive, self.chain, window, offset)
        for block, result in out.blocks:
            self.consensus.after_external_commit(block, result)
        self.stats["blocks_applied"] += len(out.blocks)
        return len(out.blocks), out.blame, out.invalid

    async def _apply_cooperative(
        self, window: VerifiedWindow, offset: int
    ) -> tuple[int, str | None, str | None]:
        applied = 0
        for i in range(offset, len(window.items)):
            item = window.items[i]
            height = item.block.header.height
            for _ in range(_COMMIT_ATTEMPTS):
                head = self.chain.head_height
                if head >= height:
                    break  # committed (by us, or meanwhile by consensus or the catch-up service)
                if head + 1 != height:  # pragma: no cover - windows are applied in order
                    return applied, None, None
                try:
                    # ChainService.commit checks the commit against the set of its height, then
                    # executes the block.
                    done = await self.consensus.commit_from_peer(item.block, item.commit)
                except InvalidCommit as exc:
                    return applied, f"block {height}: {exc.message}", None
                except InvalidBlock as exc:
                    return applied, None, f"block {height}: {exc.message}"
                if done:
                    applied += 1
                    self.stats["blocks_applied"] += 1
                else:
                    await trio.sleep(0.05)  # the consensus queue is full: try again
            else:
                return applied, None, None  # consensus is busy: the window is tried again
            if self.chain.store.get_block_hash(height) != window.hashes[i]:
                return applied, f"block {height} is not the one committed here", None
        return applied, None, None

    # --- serving ---------------------------------------------------------------------------------

    async def handle_request(self, peer: PeerId, data: bytes) -> bytes:
        """The ``/neuroseed/sync/1`` handler."""
        try:
            req = decode_request(PROTOCOL_SYNC, data)
        except DecodeError as exc:
            self.stats["bad_requests"] += 1
            with contextlib.suppress(P2PError):
                await self.network.penalize(peer, f"sent an undecodable sync request: {exc}")
            return error_response(exc.code, exc.message)
        view = self.chain.read_view()
        head = view.head_height
        base = min(head, 1)
        if isinstance(req, GetStatus):
            head_hash = view.head.hash() if view.head is not None else ZERO_HASH
            return StatusResponse(Height(base), Height(head), head_hash).encode()
        assert isinstance(req, GetBlocks | GetHeaders)
        if req.start < max(base, 1) or req.start > head:
            return error_response(
                RangeUnavailable.code, f"height {req.start} is outside {base}..{head}"
            )
        if self._serving >= self.settings.max_serving:
            self.stats["busy"] += 1
            return error_response(SyncBusy.code, "too many sync requests; try later")
        max_bytes = min(self.settings.max_response_bytes, BlocksResponse.MAX_BYTES)
        self._serving += 1
        try:
            if isinstance(req, GetBlocks):
                count = min(req.count, self.settings.max_serve_blocks, MAX_SYNC_BLOCKS)
                self.stats["served_blocks_requests"] += 1
                return await trio.to_thread.run_sync(
                    _blocks_response, view, req.start, count, max_bytes
                )
            count = min(req.count, MAX_SYNC_HEADERS)
            self.stats["served_headers_requests"] += 1
            return await trio.to_thread.run_sync(
                _headers_response, view, req.start, count, max_bytes
            )
        finally:
            self._serving -= 1


class _Run:
    """One run of fetches and applies from the head to ``target`` (see the module docstring).

    The dispatcher (``go``) keeps up to ``max_in_flight`` windows in flight; each fetch task
    verifies its answer and files it under ``ready``; the applier applies the window holding the
    next height as soon as it is there. A window that fails goes back to ``pending``.
    """

    def __init__(self, service: SyncService, target: int) -> None:
        self.s = service
        self.settings = service.settings
        self.target = target
        self.next = service.chain.head_height + 1
        self.pending: list[_Window] = []
        w = self.settings.window
        for start in range(self.next, target + 1, w):
            heapq.heappush(self.pending, _Window(start, min(start + w - 1, target)))
        self.ready: dict[int, _Fetched] = {}
        self.in_flight: Counter[PeerId] = Counter()
        self.failures: Counter[PeerId] = Counter()
        self.left_out: set[PeerId] = set()
        self.applying = False
        self.turn = 0
        self.applied = 0
        self.failed: str | None = None
        self._changed = trio.Event()
        self._ready_changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    def changed(self) -> None:
        self._changed.set()

    async def go(self) -> int:
        self.s._refresh_sets()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._applier)
            try:
                while self.next <= self.target and self.failed is None:
                    delay = self._dispatch()
                    if self.failed is not None:
                        break
                    with trio.move_on_after(delay):
                        await self._changed.wait()
                    self._changed = trio.Event()
            finally:
                nursery.cancel_scope.cancel()
        if self.failed is not None:
            log.info("sync run stopped at height %d: %s", self.next, self.failed)
        return self.applied

    # --- scheduling ----------------------------------------------------------------------------

    def _idle(self) -> bool:
        """Nothing will move the next height on unless a fetch is started."""
        return (
            not self.in_flight
            and not self.applying
            and not any(start <= self.next <= f.window.end for start, f in self.ready.items())
        )

    def _dispatch(self) -> float:
        """Start fetches while there is room; the time until a delayed window may go (a long
        wait when only events matter). Sets ``failed`` when the run cannot go on."""
        usable = {p: st for p, st in self.s._usable().items() if p not in self.left_out}
        now = trio.current_time()
        wait = 3600.0
        limit = self.next + self.settings.max_ahead_blocks
        deferred: list[_Window] = []
        while self.pending and sum(self.in_flight.values()) < self.settings.max_in_flight:
            win = heapq.heappop(self.pending)
            if win.end < self.next:
                continue  # applied meanwhile (cooperative mode)
            if win.start < self.next:
                win = _Window(self.next, win.end, win.not_before, win.rounds, win.tried)
            if win.start > limit:
                deferred.append(win)
                break
            if win.not_before > now:
                wait = min(wait, win.not_before - now)
                deferred.append(win)
                continue
            peer = self._pick(win, usable)
            if peer is not None:
                self._start_fetch(win, peer, usable[peer])
                continue
            deferred.append(win)
            candidates = {p for p, st in usable.items() if st.base <= win.start <= st.head}
            if candidates and candidates <= win.tried:
                # Every peer that could serve it failed it: another round, a little later.
                win.rounds += 1
                if win.rounds >= self.settings.max_window_rounds:
                    self.failed = f"every peer failed blocks {win.start}..{win.end}"
                    break
                win.tried = set()
                win.not_before = now + self.settings.retry_backoff_s
                wait = min(wait, self.settings.retry_backoff_s)
            elif not candidates and win.start <= self.next and self._idle():
                self.failed = f"no usable peer serves height {win.start}"
                break
        for win in deferred:
            heapq.heappush(self.pending, win)
        return wait

    def _pick(self, win: _Window, usable: Mapping[PeerId, PeerStatus]) -> PeerId | None:
        """The least busy peer that serves ``win.start`` and has not failed it, preferring
        peers that have the whole window; ties in turn (round-robin)."""
        peers = sorted(usable)
        n = len(peers)
        best: tuple[tuple[bool, int, int], PeerId] | None = None
        for i, p in enumerate(peers):
            st = usable[p]
            if (
                p in win.tried
                or self.in_flight[p] >= self.settings.max_per_peer
                or not st.base <= win.start <= st.head
            ):
                continue
            key = (st.head < win.end, self.in_flight[p], (i - self.turn) % n)
            if best is None or key < best[0]:
                best = (key, p)
        if best is None:
            return None
        self.turn += 1
        return best[1]

    def _start_fetch(self, win: _Window, peer: PeerId, st: PeerStatus) -> None:
        assert self._nursery is not None
        count = min(min(win.end, st.head) - win.start + 1, MAX_SYNC_BLOCKS)
        self.in_flight[peer] += 1
        total = sum(self.in_flight.values())
        self.s.max_in_flight_seen = max(self.s.max_in_flight_seen, total)
        self.s.requests_by_peer[peer] += 1
        self._nursery.start_soon(self._fetch, win, peer, count)

    # --- fetching ------------------------------------------------------------------------------

    async def _fetch(self, win: _Window, peer: PeerId, count: int) -> None:
        s = self.s
        try:
            outcome = await self._fetch_verified(win.start, peer, count)
        finally:
            self.in_flight[peer] -= 1
            if self.in_flight[peer] <= 0:
                del self.in_flight[peer]
        if isinstance(outcome, VerifiedWindow) and s._is_dropped(peer):
            outcome = "bad"  # dropped while this answer was on its way: not used
        if isinstance(outcome, VerifiedWindow):
            self.failures.pop(peer, None)
            s._note_used(peer)
            s.stats["windows_fetched"] += 1
            if outcome.end < win.end:  # a partial answer: the rest goes back in the queue
                heapq.heappush(self.pending, _Window(outcome.end + 1, win.end))
            self.ready[outcome.start] = _Fetched(peer, outcome)
            self._ready_changed.set()
        else:
            win.tried.add(peer)
            if outcome == "bad":
                self._forget(peer)
            else:
                s.stats["fetch_failures"] += 1
                self.failures[peer] += 1
                if outcome == "gone" or self.failures[peer] >= self.settings.max_peer_failures:
                    self.left_out.add(peer)
            heapq.heappush(self.pending, win)
        self.changed()

    async def _fetch_verified(self, start: int, peer: PeerId, count: int) -> VerifiedWindow | str:
        """The verified window, or why not: ``bad`` (peer dropped), ``gone``, ``failed``."""
        s = self.s
        request = GetBlocks(Height(start), count).encode()
        try:
            data = await s.network.request(
                peer, PROTOCOL_SYNC, request, timeout_s=self.settings.request_timeout_s
            )
        except PeerUnreachable as exc:
            log.debug("GetBlocks(%d) to %r: %s", start, peer, exc)
            s._peers.pop(peer, None)
            return "gone"
        except P2PError as exc:
            log.debug("GetBlocks(%d) to %r: %s", start, peer, exc)
            return "failed"
        try:
            window = await trio.to_thread.run_sync(
                _decode_and_verify,
                data,
                s.chain_id,
                start,
                count,
                dict(s._sets),
                s._exclusive,
                limiter=s._verify_limiter,
            )
        except RemoteError as exc:
            log.debug("GetBlocks(%d) to %r: %s", start, peer, exc)
            return "failed"
        except DecodeError as exc:
            await s._drop(peer, f"sent an undecodable BlocksResponse: {exc.message}")
            return "bad"
        except BadSyncData as exc:
            await s._drop(peer, exc.message)
            return "bad"
        if window is None:
            await s._drop(peer, f"served no blocks from height {start}, within its status")
            return "bad"
        return window

    # --- applying ------------------------------------------------------------------------------

    async def _applier(self) -> None:
        s = self.s
        while True:
            self.next = s.chain.head_height + 1
            fetched = self._ready_for(self.next)
            if fetched is None:
                await self._ready_changed.wait()
                self._ready_changed = trio.Event()
                continue
            self.applying = True
            try:
                applied, blame, invalid = await s._apply(fetched)
            finally:
                self.applying = False
            self.applied += applied
            self.next = s.chain.head_height + 1
            s._refresh_sets()
            window = fetched.window
            if invalid is not None:
                # Committed by the validators, served as committed, and invalid under this
                # node's rules: no peer can help; an operator must (log it once per height).
                if s._invalid_at != self.next:
                    log.error(
                        "sync: the committed chain's %s is invalid under this node's rules "
                        "(is this node's software out of date?)",
                        invalid,
                    )
                s._invalid_at = self.next
                self.failed = f"committed block invalid here: {invalid}"
                self.changed()
                return
            if blame is not None:
                await s._drop(fetched.peer, blame)
                if window.end >= self.next:
                    heapq.heappush(self.pending, _Window(self.next, window.end))
                self._forget(fetched.peer)
            elif window.end >= self.next:
                # Not all applied and nobody to blame (the consensus queue stayed full): again.
                self.ready[window.start] = fetched
                await trio.sleep(0.05)
            self.changed()

    def _forget(self, peer: PeerId) -> None:
        """Fetch again elsewhere what a dropped peer served and is not applied yet."""
        for start, fetched in list(self.ready.items()):
            if fetched.peer == peer:
                del self.ready[start]
                heapq.heappush(self.pending, _Window(start, fetched.window.end))

    def _ready_for(self, height: int) -> _Fetched | None:
        """The fetched window holding ``height`` (windows wholly below it are discarded)."""
        for start in sorted(self.ready):
            fetched = self.ready[start]
            if fetched.window.end < height:
                del self.ready[start]
            elif start <= height:
                return self.ready.pop(start)
            else:
                break
        return None


__all__ = [
    "BadSyncData",
    "PeerStatus",
    "RangeUnavailable",
    "SyncBusy",
    "SyncError",
    "SyncService",
    "SyncSettings",
    "SyncStatus",
    "VerifiedWindow",
    "verify_window",
]

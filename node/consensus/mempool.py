"""The mempool: verified transactions waiting for a block, per sender in nonce order (DESIGN §4).

It lives on the node's trio thread (single-threaded, no locks) and holds transactions that arrive
already decoded and signature-checked (``VerifiedTransaction``). Admission is checked against the
latest committed state (a ``StateView``) with the same rules as the block-level transition
(``transition.check_transaction``), except that a nonce gap is never a rejection here: gaps are
normal under gossip, so such a transaction waits in a bounded per-sender queue of future nonces
and is promoted when the gap fills (DESIGN §4: "a nonce gap is rejected only inside a block").

Per sender, the held transactions form two runs over nonces:

* **pending** — ``[account nonce, pending_end)``, contiguous, and the sender's balance covers the
  fee + amount of every one of them in order: executable in the next block, in nonce order;
* **queued (future)** — nonces above ``pending_end`` (which itself is absent), at most
  ``max_future_per_sender`` of them.

Priority is fee per byte (DESIGN §4). ``select`` takes a heap over the senders' next executable
transactions, so a block is ordered by fee per byte yet keeps each sender's nonce order. When the
pool is full, a better-paying newcomer evicts the lowest fee-per-byte *tail* of a sender's run:
removing a tail never opens a gap in anyone's sequence. As in go-ethereum's txpool, a queued
(gapped) newcomer may only evict queued transactions, never executable ones, so that transactions
which cannot run yet cannot push out ones that can.

Every rejection raises a typed error (``node.errors``) and is counted by reason in ``stats()``.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from node.consensus.fees import cost_of
from node.consensus.params import VotableParams
from node.consensus.state import Account, StateView, get_account
from node.consensus.txs import Bond, Transfer, TxKind, VerifiedTransaction
from node.economy.registry import max_spend as economy_max_spend
from node.errors import (
    AlreadyKnown,
    ConfigError,
    FeeTooLow,
    FutureQueueFull,
    InsufficientFunds,
    InvalidTransaction,
    MempoolFull,
    MempoolRejected,
    NeuroSeedError,
    NonceTooLow,
    ReplacementUnderpriced,
    TransactionTooLarge,
    UnknownKind,
    WrongChain,
)
from node.types import Address, ChainId, Hash32

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class MempoolLimits:
    max_txs: int = 10_000
    max_bytes: int = 64 * MIB  # sum of the encoded sizes of the held transactions
    max_future_per_sender: int = 64  # queued transactions (behind a nonce gap) per sender
    replace_bump_percent: int = 10  # a same-nonce replacement must raise the fee by this much

    def __post_init__(self) -> None:
        if self.max_txs < 1 or self.max_bytes < 1:
            raise ConfigError("mempool max_txs and max_bytes must be at least 1")
        if self.max_future_per_sender < 0:
            raise ConfigError("mempool max_future_per_sender must not be negative")
        if self.replace_bump_percent < 0:
            raise ConfigError("mempool replace_bump_percent must not be negative")


class AddStatus(StrEnum):
    PENDING = "pending"  # executable now: next in its sender's nonce sequence
    QUEUED = "queued"  # behind a nonce gap; promoted when the gap fills


@dataclass(frozen=True, slots=True)
class AddResult:
    tx_id: Hash32
    status: AddStatus
    replaced: Hash32 | None = None  # the same-nonce transaction this one replaced
    promoted: tuple[Hash32, ...] = ()  # queued transactions this one made executable
    evicted: tuple[Hash32, ...] = ()  # other transactions removed to make room
    dropped: tuple[Hash32, ...] = ()  # removed as stale or no longer fundable


@dataclass(frozen=True, slots=True)
class CommitResult:
    included: int  # held transactions that the block included
    promoted: tuple[Hash32, ...] = ()
    dropped: tuple[Hash32, ...] = ()  # stale (nonce now below the account's) or unfundable


# Rejections counted in ``stats()`` from the start, so metrics have a stable set of keys.
_REJECTIONS = (
    WrongChain,
    TransactionTooLarge,
    AlreadyKnown,
    NonceTooLow,
    ReplacementUnderpriced,
    FeeTooLow,
    UnknownKind,
    InsufficientFunds,
    FutureQueueFull,
    MempoolFull,
)


# Event counters, also present from the start.
_EVENTS = (
    "added",
    "replaced",
    "promoted",
    "evicted",
    "removed",
    "included",
    "dropped_stale",
    "dropped_unfunded",
    "dropped_future_cap",
    "dropped_invalid",
)


def _reason_key(error: type[Exception]) -> str:
    return "rejected_" + re.sub(r"(?<!^)(?=[A-Z])", "_", error.__name__).lower()


def compute_max_spend(vtx: VerifiedTransaction, view: StateView | None = None) -> int:
    """What the transaction takes from the sender's balance at most: fee + any amount it moves.

    A new transaction kind that moves value from the sender must be added here (economy kinds:
    ``node.economy.registry.max_spend``, which reads ``view`` for role bonds), or the mempool
    would admit sequences the state transition rejects for insufficient funds.
    """
    body = vtx.body
    if isinstance(body, Transfer | Bond):
        return vtx.tx.fee + body.amount
    if view is not None:
        extra = economy_max_spend(view, vtx)
        if extra is not None:
            return vtx.tx.fee + extra
    # UNBOND returns the bond only after the unbonding period; votes move nothing.
    return vtx.tx.fee


# Fee per byte as an integer: floor(fee · 2^64 / size). For sizes below 2^32 this orders exactly
# like the ratio (two different ratios differ by at least 1/(s1·s2) > 2^-64, which the scaling
# lifts above 1), and integer comparisons keep ``select`` and eviction fast.
_FEE_PER_BYTE_SHIFT = 64


def compute_fee_per_byte_key(fee: int, size: int) -> int:
    return (fee << _FEE_PER_BYTE_SHIFT) // size


@dataclass(frozen=True, slots=True, eq=False)
class _Entry:
    vtx: VerifiedTransaction
    sender: Address
    nonce: int
    fee: int
    size: int
    spend: int
    fee_per_byte: int  # see compute_fee_per_byte_key
    seq: int  # arrival order, the tie-break

    @property
    def tx_id(self) -> Hash32:
        return self.vtx.tx_id


@dataclass(slots=True, eq=False)
class _Sender:
    """One sender's held transactions. Mutable bookkeeping, owned by the ``Mempool``."""

    address: Address
    nonce: int  # the account nonce at the last sync with committed state
    balance: int  # the account balance at the last sync
    txs: dict[int, _Entry] = field(default_factory=dict)  # every held tx, by nonce
    pending_end: int = 0  # pending run is [nonce, pending_end); pending_end is never held
    pending_spend: int = 0  # total spend of the pending run
    future: list[int] = field(default_factory=list)  # sorted queued nonces, all > pending_end
    pushed_tail: _Entry | None = None  # the tail last pushed onto a tails heap (dedupe) ...
    pushed_queued: bool = False  # ... and onto which one

    def tail(self) -> tuple[_Entry, bool] | None:
        """The highest-nonce held transaction and whether it is queued."""
        if self.future:
            return self.txs[self.future[-1]], True
        if self.pending_end > self.nonce:
            return self.txs[self.pending_end - 1], False
        return None

    def descending(self) -> Iterator[tuple[_Entry, bool]]:
        """Held transactions from the tail down: the order in which eviction may take them."""
        for n in reversed(self.future):
            yield self.txs[n], True
        for n in range(self.pending_end - 1, self.nonce - 1, -1):
            yield self.txs[n], False

    def spend_before(self, nonce: int) -> int:
        """Total spend of the held transactions that run before ``nonce`` (pending and queued)."""
        if nonce < self.pending_end:  # a replacement inside the run: O(run), rare
            return sum(self.txs[n].spend for n in range(self.nonce, nonce))
        # Appending to the run (the common case) is O(1); a queued nonce adds the queue's.
        queued = self.future[: bisect.bisect_left(self.future, nonce)]
        return self.pending_spend + sum(self.txs[n].spend for n in queued)


# A tails-heap item: (fee per byte, arrival, push counter, entry); lowest fee per byte first.
_TailItem = tuple[int, int, int, _Entry]


class Mempool:
    """Transactions waiting for a block. Not thread-safe: use it from one thread (the trio one)."""

    def __init__(self, chain_id: ChainId | int, limits: MempoolLimits | None = None) -> None:
        self._chain_id = chain_id
        self._limits = limits or MempoolLimits()
        self._by_id: dict[Hash32, _Entry] = {}
        self._senders: dict[Address, _Sender] = {}
        self._bytes = 0
        self._arrival = itertools.count()
        self._pushes = itertools.count()
        # Lazy min-heaps of each sender's tail, split by whether the tail is queued, so that a
        # queued newcomer can look at queued tails only. Stale items are skipped when popped.
        self._tails_queued: list[_TailItem] = []
        self._tails_pending: list[_TailItem] = []
        self._counters: Counter[str] = Counter(dict.fromkeys(_EVENTS, 0))
        self._counters.update(dict.fromkeys(map(_reason_key, _REJECTIONS), 0))

    # --- queries -------------------------------------------------------------------------------

    @property
    def limits(self) -> MempoolLimits:
        return self._limits

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, tx_id: object) -> bool:
        return tx_id in self._by_id

    def contains(self, tx_id: Hash32) -> bool:
        return tx_id in self._by_id

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, tx_id: Hash32) -> VerifiedTransaction | None:
        entry = self._by_id.get(tx_id)
        return None if entry is None else entry.vtx

    def is_pending(self, tx_id: Hash32) -> bool:
        """Whether the transaction is held and executable (not queued behind a gap)."""
        entry = self._by_id.get(tx_id)
        if entry is None:
            return False
        return entry.nonce < self._senders[entry.sender].pending_end

    def pending_nonce(self, address: Address, view: StateView) -> int:
        """The next nonce the sender should use: account nonce + its contiguous pending run."""
        nonce = get_account(view, address).nonce
        sender = self._senders.get(address)
        if sender is None or nonce < sender.nonce:
            return nonce
        return max(nonce, sender.pending_end)

    def stats(self) -> dict[str, int]:
        """Gauges and counters (rejections by reason, evictions, drops) for metrics and RPC."""
        pending = sum(s.pending_end - s.nonce for s in self._senders.values())
        out = {
            "txs": len(self._by_id),
            "bytes": self._bytes,
            "pending": pending,
            "queued": len(self._by_id) - pending,
            "senders": len(self._senders),
        }
        out.update(self._counters)
        return out

    # --- admission -----------------------------------------------------------------------------

    def add(self, vtx: VerifiedTransaction, view: StateView, params: VotableParams) -> AddResult:
        """Admit ``vtx`` against the latest committed state ``view`` or raise why not.

        Raises ``WrongChain``, ``TransactionTooLarge``, ``AlreadyKnown``, ``NonceTooLow``,
        ``ReplacementUnderpriced``, ``FeeTooLow``, ``UnknownKind`` (no fee schedule),
        ``InsufficientFunds``, ``FutureQueueFull`` or ``MempoolFull``; the pool is unchanged by
        a rejection except for catching up with ``view`` on the sender's account.
        """
        try:
            return self._add(vtx, view, params)
        except (MempoolRejected, InvalidTransaction) as exc:
            self._counters[_reason_key(type(exc))] += 1
            raise

    def _add(self, vtx: VerifiedTransaction, view: StateView, params: VotableParams) -> AddResult:
        tx = vtx.tx
        limits = self._limits
        if tx.chain_id != self._chain_id:
            raise WrongChain(f"transaction for chain {tx.chain_id}, this chain is {self._chain_id}")
        if vtx.size > params.max_tx_bytes:
            raise TransactionTooLarge(
                f"transaction of {vtx.size} bytes exceeds max_tx_bytes {params.max_tx_bytes}"
            )
        if vtx.size > limits.max_bytes:
            raise TransactionTooLarge(
                f"transaction of {vtx.size} bytes exceeds the mempool's {limits.max_bytes} bytes"
            )
        if vtx.tx_id in self._by_id:
            raise AlreadyKnown(f"transaction 0x{vtx.tx_id.hex()} is already in the mempool")

        account = get_account(view, vtx.sender)
        dropped: list[Hash32] = []
        sender = self._senders.get(vtx.sender)
        if sender is None:
            sender = _Sender(vtx.sender, account.nonce, account.balance, pending_end=account.nonce)
        elif (sender.nonce, sender.balance) != (account.nonce, account.balance):
            # The caller's view is newer than the last commit we heard of: catch up first.
            self._resync(sender, account, dropped, frozenset())
            self._touch(sender)  # it may now be empty, and stays consistent if we reject below
        nonce = tx.nonce
        if nonce < account.nonce:
            raise NonceTooLow(
                f"nonce {nonce} is below the account nonce {account.nonce}; "
                f"the next usable nonce is {max(account.nonce, sender.pending_end)}"
            )

        old = sender.txs.get(nonce)
        if old is not None:
            bump = limits.replace_bump_percent
            if tx.fee * 100 < old.fee * (100 + bump) or tx.fee <= old.fee:
                needed = max(old.fee + 1, -(-old.fee * (100 + bump) // 100))
                raise ReplacementUnderpriced(
                    f"nonce {nonce} is already held with fee {old.fee}; a replacement needs a "
                    f"fee of at least {needed} (+{bump}%), got {tx.fee}"
                )

        cost = cost_of(params, view, vtx)
        if tx.fee < cost:
            raise FeeTooLow(f"fee {tx.fee} is below the cost {cost} of this transaction")

        spend = compute_max_spend(vtx, view)
        before = sender.spend_before(nonce)
        if before + spend > account.balance:
            raise InsufficientFunds(
                f"balance {account.balance} cannot pay fee + amount {spend} on top of "
                f"{before} for the sender's earlier transactions in the mempool"
            )

        queued = nonce > sender.pending_end  # pending_end itself is never held
        if old is None and queued and len(sender.future) >= limits.max_future_per_sender:
            raise FutureQueueFull(
                f"sender already has {len(sender.future)} transactions queued behind a nonce gap "
                f"(limit {limits.max_future_per_sender}); send nonce {sender.pending_end} first"
            )

        entry = _Entry(
            vtx=vtx,
            sender=vtx.sender,
            nonce=nonce,
            fee=tx.fee,
            size=vtx.size,
            spend=spend,
            fee_per_byte=compute_fee_per_byte_key(tx.fee, vtx.size),
            seq=next(self._arrival),
        )
        victims = self._plan_eviction(entry, old, queued)  # raises MempoolFull; no change yet

        evicted: list[Hash32] = []
        for victim in victims:
            owner = self._senders[victim.sender]
            self._remove_entry(owner, victim, dropped)
            self._counters["evicted"] += 1
            evicted.append(victim.tx_id)
            if owner is not sender:
                self._touch(owner)

        self._senders[sender.address] = sender
        promoted: list[Hash32] = []
        self._by_id[entry.tx_id] = entry
        self._bytes += entry.size
        if old is not None:
            del self._by_id[old.tx_id]
            self._bytes -= old.size
            sender.txs[nonce] = entry
            self._counters["replaced"] += 1
            if not queued:
                # A bigger spend may leave later pending transactions unfundable.
                self._settle(sender, promoted, dropped)
        else:
            sender.txs[nonce] = entry
            if queued:
                bisect.insort(sender.future, nonce)
            else:
                sender.pending_end += 1
                sender.pending_spend += spend
                self._promote(sender, promoted, dropped)
        self._counters["added"] += 1
        self._touch(sender)
        status = AddStatus.PENDING if nonce < sender.pending_end else AddStatus.QUEUED
        return AddResult(
            entry.tx_id,
            status,
            None if old is None else old.tx_id,
            tuple(promoted),
            tuple(evicted),
            tuple(dropped),
        )

    def _plan_eviction(self, new: _Entry, replaced: _Entry | None, queued: bool) -> list[_Entry]:
        """The tails to evict so that ``new`` fits, cheapest fee per byte first; no change made.

        Every victim must pay strictly less per byte than ``new``. Victims are tails, or the
        predecessor of a planned victim of the same sender, so no sender's sequence gets a gap;
        ``new``'s own sender may only lose nonces above ``new``'s. Raises ``MempoolFull``.
        """
        limits = self._limits
        count_over = len(self._by_id) + (replaced is None) - limits.max_txs
        bytes_over = (
            self._bytes + new.size - (0 if replaced is None else replaced.size) - limits.max_bytes
        )
        if count_over <= 0 and bytes_over <= 0:
            return []
        heaps = [self._tails_queued] if queued else [self._tails_queued, self._tails_pending]
        taken: list[tuple[list[_TailItem], _TailItem]] = []  # valid items popped: restore on fail
        seen: set[Address] = set()  # senders whose tail was popped in this plan
        chains: dict[Address, Iterator[tuple[_Entry, bool]]] = {}
        local: list[_TailItem] = []  # the next tail of senders that already lost one
        victims: list[_Entry] = []

        def evictable(entry: _Entry, is_queued: bool) -> bool:
            if queued and not is_queued:
                return False
            return entry.sender != new.sender or entry.nonce > new.nonce

        def next_global() -> tuple[list[_TailItem], _TailItem] | None:
            best: tuple[list[_TailItem], _TailItem] | None = None
            for heap in heaps:
                while heap:
                    item = heap[0]
                    entry = item[3]
                    owner = self._senders.get(entry.sender)
                    tail = None if owner is None else owner.tail()
                    valid = (
                        tail is not None
                        and tail[0] is entry
                        and tail[1] == (heap is self._tails_queued)
                        and entry.sender not in seen
                    )
                    if valid:
                        break
                    heapq.heappop(heap)  # stale or a duplicate: drop it for good
                if heap and (best is None or heap[0] < best[1]):
                    best = (heap, heap[0])
            return best

        while count_over > 0 or bytes_over > 0:
            top = next_global()
            if local and (top is None or local[0] < top[1]):
                candidate = heapq.heappop(local)[3]
            elif top is not None:
                heap, item = top
                heapq.heappop(heap)
                taken.append((heap, item))
                candidate = item[3]
                seen.add(candidate.sender)
                if not evictable(candidate, heap is self._tails_queued):
                    continue
                chains[candidate.sender] = self._senders[candidate.sender].descending()
                next(chains[candidate.sender])  # the tail itself
            else:
                candidate = None
            if candidate is None or candidate.fee_per_byte >= new.fee_per_byte:
                for heap, item in taken:
                    heapq.heappush(heap, item)
                raise MempoolFull(
                    f"mempool is full ({len(self._by_id)} transactions, {self._bytes} bytes) and "
                    f"this transaction's fee per byte {new.fee / new.size:.6g} does not beat the "
                    "cheapest evictable one; raise the fee"
                )
            victims.append(candidate)
            count_over -= 1
            bytes_over -= candidate.size
            following = next(chains[candidate.sender], None)
            if following is not None and evictable(*following):
                pred = following[0]
                heapq.heappush(local, (pred.fee_per_byte, pred.seq, next(self._pushes), pred))
        for heap, item in taken:
            if item[3] not in victims:
                heapq.heappush(heap, item)
        return victims

    # --- block building ------------------------------------------------------------------------

    def select(self, max_txs: int, max_bytes: int) -> list[VerifiedTransaction]:
        """Executable transactions for the next block: best fee per byte first, nonce order kept.

        A heap holds each sender's next executable transaction. A transaction that does not fit
        the remaining byte budget is skipped, and with it the rest of its sender's run (they
        cannot go before it). The pool is not changed.
        """
        heap: list[tuple[int, int, _Entry]] = []
        for sender in self._senders.values():
            if sender.pending_end > sender.nonce:
                first = sender.txs[sender.nonce]
                heap.append((-first.fee_per_byte, first.seq, first))
        heapq.heapify(heap)
        out: list[VerifiedTransaction] = []
        used = 0
        while heap and len(out) < max_txs:
            _, _, entry = heapq.heappop(heap)
            if used + entry.size > max_bytes:
                continue
            out.append(entry.vtx)
            used += entry.size
            sender = self._senders[entry.sender]
            if entry.nonce + 1 < sender.pending_end:
                nxt = sender.txs[entry.nonce + 1]
                heapq.heappush(heap, (-nxt.fee_per_byte, nxt.seq, nxt))
        return out

    # --- events ----------------------------------------------------------------------------------

    def on_block_committed(
        self,
        included_tx_ids: Iterable[Hash32],
        view: StateView,
        *,
        senders: Iterable[Address] = (),
    ) -> CommitResult:
        """Catch up with a committed block; ``view`` is the state after it.

        Removes the included transactions, drops those whose nonce is now below the account
        nonce, re-checks the pending run against the new balance and promotes queued ones that
        became executable. Only the senders touched are visited: those of included transactions
        the pool held, plus ``senders`` — pass the block's senders so that a transaction the pool
        did not hold (a same-nonce competitor) also retires the pool's copy of that nonce.
        """
        included = frozenset(included_tx_ids)
        touched: dict[Address, None] = dict.fromkeys(senders)
        for tx_id in included:
            entry = self._by_id.get(tx_id)
            if entry is not None:
                touched[entry.sender] = None
        promoted: list[Hash32] = []
        dropped: list[Hash32] = []
        before = self._counters["included"]
        for address in touched:
            sender = self._senders.get(address)
            if sender is None:
                continue
            self._resync(sender, get_account(view, address), dropped, included, promoted)
            self._touch(sender)
        # An included transaction the view does not account for (the caller passed an older
        # view) must still go: it can never be included again.
        for tx_id in included:
            entry = self._by_id.get(tx_id)
            if entry is not None:
                sender = self._senders[entry.sender]
                self._remove_entry(sender, entry, dropped)
                self._counters["included"] += 1
                self._touch(sender)
        return CommitResult(self._counters["included"] - before, tuple(promoted), tuple(dropped))

    def on_params_changed(self, view: StateView, params: VotableParams) -> tuple[Hash32, ...]:
        """Drop what new votable parameters make invalid (fee below cost, too large). O(pool).

        Parameter changes are rare (a validator vote), so a full pass is fine here.
        """
        dropped: list[Hash32] = []
        for sender in list(self._senders.values()):
            for nonce in sorted(sender.txs):
                entry = sender.txs.get(nonce)
                if entry is None:
                    continue  # already dropped with an earlier one
                try:
                    cost = cost_of(params, view, entry.vtx)
                except UnknownKind:
                    cost = None
                if cost is None or entry.fee < cost or entry.size > params.max_tx_bytes:
                    self._remove_entry(sender, entry, dropped)
                    self._counters["dropped_invalid"] += 1
                    dropped.append(entry.tx_id)
            self._touch(sender)
        return tuple(dropped)

    def remove(self, tx_id: Hash32) -> bool:
        """Remove a transaction (e.g. one a block builder found invalid); False if not held.

        Later transactions of the same sender are kept but queued: they wait behind the new gap.
        """
        entry = self._by_id.get(tx_id)
        if entry is None:
            return False
        sender = self._senders[entry.sender]
        self._remove_entry(sender, entry, [])
        self._counters["removed"] += 1
        self._touch(sender)
        return True

    def drop_refused_heads(
        self, check: Callable[[VerifiedTransaction], None], *, limit: int = 256
    ) -> list[Hash32]:
        """Drop each sender's next executable transaction that the state rules of its kind now
        refuse (``check`` — ``ChainService.check_admission`` — raises).

        Such a transaction can never be included, and the sender's later ones would wait behind
        its nonce forever (a claim that lost a race, a key posted after the deadline). Transfers
        are left out: the pool's own nonce and balance checks already cover them. At most
        ``limit`` checks per call, so the work after a block stays bounded.
        """
        dropped: list[Hash32] = []
        checked = 0
        for sender in list(self._senders.values()):
            if checked >= limit:
                break
            entry = sender.txs.get(sender.nonce)
            if entry is None or entry.vtx.tx.kind == TxKind.TRANSFER:
                continue
            checked += 1
            try:
                check(entry.vtx)
            except NeuroSeedError:  # the kind's refusal (an InvalidTransaction, as a rule)
                dropped.append(entry.tx_id)
                self._remove_entry(sender, entry, dropped)
                self._counters["removed"] += 1
                self._touch(sender)
        return dropped

    # --- per-sender bookkeeping ----------------------------------------------------------------

    def _forget(self, sender: _Sender, entry: _Entry) -> None:
        del self._by_id[entry.tx_id]
        del sender.txs[entry.nonce]
        self._bytes -= entry.size

    def _remove_entry(self, sender: _Sender, entry: _Entry, dropped: list[Hash32]) -> None:
        """Remove one transaction; a pending one demotes the rest of the run to queued."""
        nonce = entry.nonce
        if nonce >= sender.pending_end:
            del sender.future[bisect.bisect_left(sender.future, nonce)]
            self._forget(sender, entry)
            return
        self._forget(sender, entry)
        demoted = range(nonce + 1, sender.pending_end)
        sender.pending_spend -= entry.spend + sum(sender.txs[n].spend for n in demoted)
        sender.future[:0] = demoted
        sender.pending_end = nonce
        self._cap_future(sender, dropped)

    def _promote(self, sender: _Sender, promoted: list[Hash32], dropped: list[Hash32]) -> None:
        """Move queued transactions that now continue the pending run into it, while funded."""
        while sender.future and sender.future[0] == sender.pending_end:
            entry = sender.txs[sender.pending_end]
            del sender.future[0]
            if sender.pending_spend + entry.spend > sender.balance:
                # Its admission check could not count the gap's transactions; now it is unfundable.
                self._forget(sender, entry)
                self._counters["dropped_unfunded"] += 1
                dropped.append(entry.tx_id)
                return
            sender.pending_end += 1
            sender.pending_spend += entry.spend
            self._counters["promoted"] += 1
            promoted.append(entry.tx_id)

    def _settle(self, sender: _Sender, promoted: list[Hash32], dropped: list[Hash32]) -> None:
        """Re-walk the pending run against the balance: keep the funded prefix, drop the first
        unfunded transaction, queue the rest behind that gap, then promote. O(sender's txs)."""
        spend = 0
        n = sender.nonce
        while n < sender.pending_end:
            entry = sender.txs[n]
            if spend + entry.spend > sender.balance:
                break
            spend += entry.spend
            n += 1
        if n < sender.pending_end:
            unfunded = sender.txs[n]
            self._forget(sender, unfunded)
            self._counters["dropped_unfunded"] += 1
            dropped.append(unfunded.tx_id)
            sender.future[:0] = range(n + 1, sender.pending_end)
            sender.pending_end = n
        sender.pending_spend = spend
        self._promote(sender, promoted, dropped)
        self._cap_future(sender, dropped)

    def _resync(
        self,
        sender: _Sender,
        account: Account,
        dropped: list[Hash32],
        included: frozenset[Hash32],
        promoted: list[Hash32] | None = None,
    ) -> None:
        """Bring one sender in line with its committed account: drop nonces below it, re-check
        funds, promote. Work is proportional to this sender's transactions."""
        new = account.nonce
        if new > sender.nonce:
            for n in range(sender.nonce, min(sender.pending_end, new)):
                self._retire(sender, sender.txs[n], dropped, included)
            sender.pending_end = max(sender.pending_end, new)
            stale = bisect.bisect_left(sender.future, new)
            for n in sender.future[:stale]:
                self._retire(sender, sender.txs[n], dropped, included)
            del sender.future[:stale]
        elif new < sender.nonce:
            # An older view than the one last seen: the held run now sits behind a gap.
            sender.future[:0] = range(sender.nonce, sender.pending_end)
            sender.pending_end = new
        sender.nonce = new
        sender.balance = account.balance
        self._settle(sender, [] if promoted is None else promoted, dropped)

    def _retire(
        self, sender: _Sender, entry: _Entry, dropped: list[Hash32], included: frozenset[Hash32]
    ) -> None:
        self._forget(sender, entry)
        if entry.tx_id in included:
            self._counters["included"] += 1
        else:
            self._counters["dropped_stale"] += 1
            dropped.append(entry.tx_id)

    def _cap_future(self, sender: _Sender, dropped: list[Hash32]) -> None:
        """Demotions may overfill the queue: drop the highest nonces, which depend on the most."""
        while len(sender.future) > self._limits.max_future_per_sender:
            entry = sender.txs[sender.future.pop()]
            self._forget(sender, entry)
            self._counters["dropped_future_cap"] += 1
            dropped.append(entry.tx_id)

    def _touch(self, sender: _Sender) -> None:
        """After any change to a sender: forget it if empty, else make its tail evictable."""
        tail = sender.tail()
        if tail is None:
            if self._senders.get(sender.address) is sender:
                del self._senders[sender.address]
            sender.pushed_tail = None
            return
        entry, is_queued = tail
        if entry is sender.pushed_tail and is_queued == sender.pushed_queued:
            return
        heap = self._tails_queued if is_queued else self._tails_pending
        heapq.heappush(heap, (entry.fee_per_byte, entry.seq, next(self._pushes), entry))
        sender.pushed_tail = entry
        sender.pushed_queued = is_queued
        if len(self._tails_queued) + len(self._tails_pending) > 2 * len(self._senders) + 64:
            self._rebuild_tails()

    def _rebuild_tails(self) -> None:
        """Drop the stale items the lazy heaps collected; O(senders), amortized by the doubling."""
        self._tails_queued = []
        self._tails_pending = []
        for sender in self._senders.values():
            tail = sender.tail()
            if tail is None:  # pragma: no cover - empty senders are removed by _touch
                continue
            entry, is_queued = tail
            heap = self._tails_queued if is_queued else self._tails_pending
            heap.append((entry.fee_per_byte, entry.seq, next(self._pushes), entry))
            sender.pushed_tail = entry
            sender.pushed_queued = is_queued
        heapq.heapify(self._tails_queued)
        heapq.heapify(self._tails_pending)

    # --- testing aid -----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Verify every internal invariant (for tests and debugging; O(pool))."""
        total_bytes = 0
        count = 0
        for address, s in self._senders.items():
            if s.address != address or not s.txs:
                raise AssertionError(f"sender 0x{address.hex()} is misfiled or empty")
            if s.pending_end < s.nonce or s.pending_end in s.txs:
                raise AssertionError("pending run out of bounds")
            pending = list(range(s.nonce, s.pending_end))
            if sorted(s.txs) != pending + s.future or sorted(set(s.future)) != s.future:
                raise AssertionError("pending run and queue do not partition the held nonces")
            if s.future and s.future[0] <= s.pending_end:
                raise AssertionError("a queued nonce continues the pending run")
            if len(s.future) > self._limits.max_future_per_sender:
                raise AssertionError("future queue over its limit")
            spend = sum(s.txs[n].spend for n in pending)
            if spend != s.pending_spend or spend > s.balance:
                raise AssertionError("pending spend is wrong or unfunded")
            for n, entry in s.txs.items():
                if entry.nonce != n or self._by_id.get(entry.tx_id) is not entry:
                    raise AssertionError("index out of sync")
                total_bytes += entry.size
                count += 1
        if count != len(self._by_id) or total_bytes != self._bytes:
            raise AssertionError("counts out of sync")
        if count > self._limits.max_txs or total_bytes > self._limits.max_bytes:
            raise AssertionError("limits exceeded")


__all__ = [
    "AddResult",
    "AddStatus",
    "CommitResult",
    "Mempool",
    "MempoolLimits",
    "compute_fee_per_byte_key",
    "compute_max_spend",
]

"""An in-memory ``Network`` for tests: drops, duplicates, delays (hence reorders), partitions,
crashes, and the size limits of the real host (DESIGN §1, §6).

Usage::

    net = MemoryNetwork(seed=1, drop=0.2, duplicate=0.1, delay_ms=(5, 50))
    a, b, c = net.add_host("a"), net.add_host("b"), net.add_host("c")  # fully connected
    async with net:
        await b.subscribe(topic, validator)
        await a.publish(topic, data)
        msg = await b.next_message()

**Determinism.** Run under ``trio.testing.MockClock`` (e.g. pytest-trio's ``autojump_clock``).
Every fault decision (drop, duplicate, each copy's delay) is a hash of the seed and the message's
identity on its link — (sender, receiver, origin, sequence number) for gossip, (requester,
request number) for requests — never a draw from a shared random stream, so it does not depend on
the order in which trio happens to run tasks (trio shuffles its run queue). In-flight messages
wait in one heap ordered by (arrival time, sender, receiver, identity), and one scheduler task
hands them over, so the same seed and the same sends give the same arrivals (``trace``) on every
run. Keep ``delay_ms[0] ≥ 1`` for a fully reproducible trace.

**Gossip.** ``publish`` sends to every connected peer subscribed to the topic; a receiver drops a
message id (origin, seqno) it has seen, runs the topic validator, and on ``ACCEPT`` delivers it to
``next_message`` and forwards it to its other subscribed peers (so messages route around a missing
link). ``IGNORE`` drops it; ``REJECT`` drops it and penalizes the forwarder. A copy made by the
``duplicate`` fault bypasses the seen-cache (the application sees it, as it would a re-publish) but
is not forwarded again. Faults apply per link and per copy.

**Scores.** Each host keeps a score per peer: −1 per ``REJECT`` and per ``penalize``; at
``−ban_threshold`` the host disconnects the peer (``connect`` links them again, scores reset).

**Requests** go to the peer's handler for the protocol with the same random delays (no drops or
duplicates: streams are reliable). Not connected → ``PeerUnreachable`` at once; lost in a partition
→ ``RequestTimeout``; no handler, a handler's ``NeuroSeedError`` or a response above
``MAX_RESPONSE_BYTES`` → ``RequestFailed``; the peer stopping or disconnecting meanwhile →
``PeerUnreachable``. Other exceptions of handlers and validators are bugs: they propagate and end
the network's nursery.

**Providers.** ``provide`` adds the host to a provider table shared by the whole network (a DHT
with perfect reach); ``find_providers`` lists the other hosts that announced a key, in
announcement order. Records outlive a host's crash and restart, as DHT records held by other
nodes do; a stopped host cannot announce or look up.

**Faults.** ``partition([{a, b}, {c, d}])`` silently cuts every link between groups (hosts not
named are cut from all): connections still look up (as a silent partition does to libp2p), and
messages, requests and responses crossing it — sent or in flight — are lost; ``heal()`` ends it.
``disconnect(a, b)`` closes the link (peers see it; pending requests fail). ``stop(host)`` is a
crash: messages to it are lost, its pending requests fail, its subscriptions, handlers, inbox,
seen-cache and scores are gone; ``start(host)`` brings it back empty (the node subscribes and
registers handlers again), connected to its old peers. ``set_faults`` changes drop / duplicate /
delay for what is sent from then on.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import trio

from node.errors import NeuroSeedError
from node.p2p.api import (
    DEFAULT_PROVIDER_LIMIT,
    MAX_GOSSIP_BYTES,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    GossipMessage,
    HostStopped,
    MessageTooLarge,
    PeerId,
    PeerInfo,
    PeerUnreachable,
    RequestFailed,
    RequestHandler,
    RequestTimeout,
    TopicValidator,
    Verdict,
    check_content_key,
)

DEFAULT_BAN_THRESHOLD = 5


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One hand-over by the scheduler: ``kind`` is ``gossip``, ``request`` or ``response``;
    ``delivered`` is False when the message was lost on arrival (partition, stopped or
    disconnected receiver)."""

    time_ms: float
    kind: str
    src: str
    dst: str
    what: str  # topic or protocol
    digest: str  # first 8 bytes of sha256(data), hex
    copy: int
    delivered: bool


@dataclass(frozen=True, slots=True)
class _Gossip:
    topic: str
    data: bytes
    origin: str
    seqno: int


@dataclass(slots=True)
class _GossipArrival:
    msg: _Gossip
    src: str
    dst: str
    dst_epoch: int
    copy: int


@dataclass(slots=True)
class _RequestArrival:
    src: str
    dst: str
    src_epoch: int
    dst_epoch: int
    rid: int
    protocol: str
    payload: bytes
    response_delay: float


@dataclass(slots=True)
class _ResponseArrival:
    src: str  # the responder
    dst: str  # the requester
    dst_epoch: int
    rid: int
    protocol: str
    payload: bytes | None
    error: NeuroSeedError | None


_Arrival = _GossipArrival | _RequestArrival | _ResponseArrival


@dataclass(slots=True)
class _Pending:
    peer: str
    done: trio.Event = field(default_factory=trio.Event)
    result: bytes | None = None
    error: NeuroSeedError | None = None

    def finish(self, result: bytes | None, error: NeuroSeedError | None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).digest()[:8].hex()


class MemoryHost:
    """One node's ``Network`` on a ``MemoryNetwork``; create with ``MemoryNetwork.add_host``."""

    def __init__(self, net: MemoryNetwork, name: str) -> None:
        self._net = net
        self.name = name
        self._peer_id = PeerId(name.encode())
        self.running = True
        self.epoch = 0
        # Survive restarts, like libp2p's time-based seqno: message ids are never reused.
        self._seqno = 0
        self._next_rid = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self._validators: dict[str, TopicValidator] = {}
        self._handlers: dict[str, RequestHandler] = {}
        self._seen: set[tuple[str, int]] = set()
        self._scores: dict[str, int] = {}
        self._pending: dict[int, _Pending] = {}
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[GossipMessage](math.inf)
        self._arrivals_send, self._arrivals_recv = trio.open_memory_channel[_GossipArrival](
            math.inf
        )
        self._backlog: list[_RequestArrival] = []
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"MemoryHost({self.name!r}, running={self.running})"

    # --- Network ---------------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        return self._peer_id

    async def publish(self, topic: str, data: bytes) -> None:
        self._check_running()
        if len(data) > self._net.max_message:
            raise MessageTooLarge(f"{len(data)} bytes exceed {self._net.max_message}")
        self._seqno += 1
        msg = _Gossip(topic, bytes(data), self.name, self._seqno)
        self._seen.add((self.name, self._seqno))
        self._net.stats["published"] += 1
        for peer in self._net._connected_peers(self):
            if topic in peer._validators:
                self._net._send_gossip(self, peer, msg)
        await trio.lowlevel.checkpoint()

    async def subscribe(self, topic: str, validator: TopicValidator) -> None:
        self._check_running()
        self._validators[topic] = validator
        await trio.lowlevel.checkpoint()

    async def next_message(self) -> GossipMessage:
        self._check_running()
        try:
            return await self._inbox_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise HostStopped(f"{self.name} stopped") from None

    def set_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._check_running()
        self._handlers[protocol] = handler

    async def request(
        self, peer: PeerId, protocol: str, payload: bytes, *, timeout_s: float = 10.0
    ) -> bytes:
        self._check_running()
        if len(payload) > MAX_REQUEST_BYTES:
            raise MessageTooLarge(f"request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}")
        dst = self._net._hosts_by_id.get(peer)
        if dst is None or dst is self or not self._net._connected(self, dst):
            raise PeerUnreachable(f"{self.name} is not connected to {peer!r}")
        self._next_rid += 1
        rid = self._next_rid
        pending = _Pending(dst.name)
        self._pending[rid] = pending
        try:
            self._net._send_request(self, dst, rid, protocol, bytes(payload))
            with trio.move_on_after(timeout_s):
                await pending.done.wait()
        finally:
            self._pending.pop(rid, None)
        if not pending.done.is_set():
            raise RequestTimeout(f"{protocol} to {dst.name}: no response in {timeout_s} s")
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def peers(self) -> list[PeerInfo]:
        out = []
        for name in sorted(self._net._known.get(self.name, ())):
            other = self._net._hosts[name]
            out.append(
                PeerInfo(other.peer_id, (f"/memory/{name}",), self._net._connected(self, other))
            )
        return out

    async def penalize(self, peer: PeerId, reason: str) -> None:
        other = self._net._hosts_by_id.get(peer)
        if other is not None and self.running:
            self._net._penalize(self, other, reason)
        await trio.lowlevel.checkpoint()

    async def provide(self, key: bytes) -> None:
        self._check_running()
        providers = self._net._providers.setdefault(check_content_key(key), {})
        providers[self.name] = None
        await trio.lowlevel.checkpoint()

    async def find_providers(self, key: bytes, limit: int = DEFAULT_PROVIDER_LIMIT) -> list[PeerId]:
        self._check_running()
        names = self._net._providers.get(check_content_key(key), {})
        await trio.lowlevel.checkpoint()
        found = [self._net._hosts[n].peer_id for n in names if n != self.name]
        return found[: max(0, limit)]

    # --- extras for tests ------------------------------------------------------------------

    def score(self, peer: MemoryHost) -> int:
        """This host's score for ``peer`` (0 = no complaints)."""
        return self._scores.get(peer.name, 0)

    @property
    def subscriptions(self) -> frozenset[str]:
        return frozenset(self._validators)

    # --- internals -------------------------------------------------------------------------

    def _check_running(self) -> None:
        if not self.running:
            raise HostStopped(f"{self.name} is stopped")

    async def _run_epoch(self, epoch: int) -> None:
        if not self.running or epoch != self.epoch:
            return  # stopped (and maybe restarted) before this task began
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._process_gossip)
                for item in self._backlog:
                    nursery.start_soon(self._serve, item)
                self._backlog.clear()

    async def _process_gossip(self) -> None:
        async for arrival in self._arrivals_recv:
            await self._handle_gossip(arrival)

    async def _handle_gossip(self, arrival: _GossipArrival) -> None:
        msg = arrival.msg
        validator = self._validators.get(msg.topic)
        if validator is None:
            return
        mid = (msg.origin, msg.seqno)
        if arrival.copy == 0:
            if mid in self._seen:
                self._net.stats["seen"] += 1
                return
            self._seen.add(mid)
        sender = self._net._hosts[arrival.src]
        gm = GossipMessage(msg.topic, msg.data, sender.peer_id)
        verdict = await validator(gm)
        self._net.stats[f"verdict_{verdict.value}"] += 1
        if verdict is Verdict.ACCEPT:
            self._inbox_send.send_nowait(gm)
            if arrival.copy == 0:
                for peer in self._net._connected_peers(self):
                    if peer.name not in (arrival.src, msg.origin) and msg.topic in peer._validators:
                        self._net._send_gossip(self, peer, msg)
        elif verdict is Verdict.REJECT:
            self._net._penalize(self, sender, f"rejected message on {msg.topic}")

    async def _serve(self, arrival: _RequestArrival) -> None:
        handler = self._handlers.get(arrival.protocol)
        payload: bytes | None = None
        error: NeuroSeedError | None = None
        requester = self._net._hosts[arrival.src]
        if handler is None:
            error = RequestFailed(f"{self.name} does not support {arrival.protocol}")
        else:
            try:
                payload = bytes(await handler(requester.peer_id, arrival.payload))
            except NeuroSeedError as exc:
                error = RequestFailed(f"{self.name} failed {arrival.protocol}: {exc}")
            if payload is not None and len(payload) > MAX_RESPONSE_BYTES:
                payload = None
                error = RequestFailed(f"response exceeds {MAX_RESPONSE_BYTES} bytes")
        self._net._send_response(self, arrival, payload, error)


class MemoryNetwork:
    """Hosts, links and faults; an async context manager that runs the delivery scheduler."""

    def __init__(
        self,
        seed: int,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay_ms: tuple[float, float] = (1.0, 10.0),
        max_message: int = MAX_GOSSIP_BYTES,
        ban_threshold: int = DEFAULT_BAN_THRESHOLD,
    ) -> None:
        self.seed = seed
        self.max_message = max_message
        self.ban_threshold = ban_threshold
        self.drop = 0.0
        self.duplicate = 0.0
        self.delay_ms = (0.0, 0.0)
        self.set_faults(drop=drop, duplicate=duplicate, delay_ms=delay_ms)
        self.trace: list[TraceEvent] = []
        self.stats: Counter[str] = Counter()
        self._hosts: dict[str, MemoryHost] = {}
        self._hosts_by_id: dict[bytes, MemoryHost] = {}
        self._links: set[frozenset[str]] = set()
        self._known: dict[str, set[str]] = {}
        self._providers: dict[bytes, dict[str, None]] = {}  # content key -> hosts, in order
        self._groups: dict[str, int] | None = None
        self._heap: list[tuple[float, tuple[Any, ...], int, _Arrival]] = []
        self._counter = 0
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> MemoryNetwork:
        if self._nursery is not None:
            raise RuntimeError("the network is already running")
        self._nursery_cm = trio.open_nursery()
        nursery: trio.Nursery = await self._nursery_cm.__aenter__()
        self._nursery = nursery
        nursery.start_soon(self._scheduler)
        for host in self._hosts.values():
            if host.running:
                nursery.start_soon(host._run_epoch, host.epoch)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            result: bool | None = await self._nursery_cm.__aexit__(exc_type, exc, tb)
        finally:
            self._nursery = None
            for host in self._hosts.values():
                host._nursery = None
        return result

    # --- hosts and links -------------------------------------------------------------------

    def add_host(self, name: str, *, connect: bool = True) -> MemoryHost:
        """A new running host, linked to every existing host unless ``connect`` is False."""
        if name in self._hosts:
            raise ValueError(f"host {name!r} exists")
        host = MemoryHost(self, name)
        existing = list(self._hosts.values())
        self._hosts[name] = host
        self._hosts_by_id[bytes(host.peer_id)] = host
        self._known[name] = set()
        if connect:
            for other in existing:
                self.connect(host, other)
        self._start_epoch(host)
        return host

    def host(self, name: str) -> MemoryHost:
        return self._hosts[name]

    @property
    def hosts(self) -> list[MemoryHost]:
        return list(self._hosts.values())

    def connect(self, a: MemoryHost, b: MemoryHost) -> None:
        """Link ``a`` and ``b`` (again); their scores for each other are reset."""
        if a is b:
            raise ValueError("cannot connect a host to itself")
        self._links.add(frozenset((a.name, b.name)))
        self._known[a.name].add(b.name)
        self._known[b.name].add(a.name)
        a._scores.pop(b.name, None)
        b._scores.pop(a.name, None)

    def disconnect(self, a: MemoryHost, b: MemoryHost) -> None:
        """Close the link; requests pending between them fail with ``PeerUnreachable``."""
        self._links.discard(frozenset((a.name, b.name)))
        self._fail_pending(a, b.name, PeerUnreachable(f"{b.name} disconnected"))
        self._fail_pending(b, a.name, PeerUnreachable(f"{a.name} disconnected"))

    def partition(self, groups: Iterable[Collection[MemoryHost]]) -> None:
        mapping: dict[str, int] = {}
        for i, group in enumerate(groups):
            for host in group:
                if host.name in mapping:
                    raise ValueError(f"{host.name} is in two groups")
                mapping[host.name] = i
        self._groups = mapping
        self.stats["partitions"] += 1

    def heal(self) -> None:
        self._groups = None

    def stop(self, host: MemoryHost) -> None:
        """Crash ``host``: its tasks are cancelled and everything it held is lost."""
        if not host.running:
            return
        host.running = False
        if host._scope is not None:
            host._scope.cancel()
        host._inbox_send.close()
        host._arrivals_send.close()
        for rid, pending in list(host._pending.items()):
            pending.finish(None, HostStopped(f"{host.name} stopped"))
            host._pending.pop(rid, None)
        for other in self._hosts.values():
            if other is not host:
                self._fail_pending(other, host.name, PeerUnreachable(f"{host.name} stopped"))
        self.stats["stops"] += 1

    def start(self, host: MemoryHost) -> None:
        """Restart a stopped host, empty, with its old links."""
        if host.running:
            return
        host._reset_state()
        host.running = True
        host.epoch += 1
        self._start_epoch(host)

    def set_faults(
        self,
        *,
        drop: float | None = None,
        duplicate: float | None = None,
        delay_ms: tuple[float, float] | None = None,
    ) -> None:
        if drop is not None:
            if not 0.0 <= drop <= 1.0:
                raise ValueError("drop must be in [0, 1]")
            self.drop = drop
        if duplicate is not None:
            if not 0.0 <= duplicate <= 1.0:
                raise ValueError("duplicate must be in [0, 1]")
            self.duplicate = duplicate
        if delay_ms is not None:
            lo, hi = delay_ms
            if not 0 <= lo <= hi:
                raise ValueError("delay_ms must be (lo, hi) with 0 ≤ lo ≤ hi")
            self.delay_ms = (float(lo), float(hi))

    # --- internals: topology ---------------------------------------------------------------

    def _start_epoch(self, host: MemoryHost) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(host._run_epoch, host.epoch)

    def _connected(self, a: MemoryHost, b: MemoryHost) -> bool:
        return a.running and b.running and frozenset((a.name, b.name)) in self._links

    def _reachable(self, a: MemoryHost, b: MemoryHost) -> bool:
        if not self._connected(a, b):
            return False
        if self._groups is None:
            return True
        ga, gb = self._groups.get(a.name), self._groups.get(b.name)
        return ga is not None and ga == gb

    def _connected_peers(self, host: MemoryHost) -> list[MemoryHost]:
        return [
            self._hosts[n]
            for n in sorted(self._known[host.name])
            if self._connected(host, self._hosts[n])
        ]

    def _fail_pending(self, host: MemoryHost, peer: str, error: NeuroSeedError) -> None:
        for pending in host._pending.values():
            if pending.peer == peer:
                pending.finish(None, error)

    def _penalize(self, host: MemoryHost, peer: MemoryHost, reason: str) -> None:
        score = host._scores.get(peer.name, 0) - 1
        host._scores[peer.name] = score
        self.stats["penalties"] += 1
        if score <= -self.ban_threshold and self._connected(host, peer):
            self.stats["bans"] += 1
            self.disconnect(host, peer)

    # --- internals: randomness and scheduling ----------------------------------------------

    def _uniforms(self, *key: object) -> list[float]:
        """Four uniforms in [0, 1) from the seed and ``key`` (independent of task order)."""
        d = hashlib.blake2b(repr((self.seed, *key)).encode(), digest_size=32).digest()
        return [int.from_bytes(d[i : i + 8], "big") / 2.0**64 for i in range(0, 32, 8)]

    def _delay(self, u: float) -> float:
        lo, hi = self.delay_ms
        return (lo + (hi - lo) * u) / 1000.0

    def _push(self, delay_s: float, key: tuple[Any, ...], item: _Arrival) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (trio.current_time() + delay_s, key, self._counter, item))
        self._wakeup.set()

    def _send_gossip(self, src: MemoryHost, dst: MemoryHost, msg: _Gossip) -> None:
        self.stats["gossip_sent"] += 1
        if not self._reachable(src, dst):
            self.stats["gossip_lost"] += 1
            return
        u = self._uniforms("gossip", src.name, src.epoch, dst.name, msg.origin, msg.seqno)
        if u[0] < self.drop:
            self.stats["gossip_dropped"] += 1
            return
        copies = 2 if u[1] < self.duplicate else 1
        if copies == 2:
            self.stats["gossip_duplicated"] += 1
        for c in range(copies):
            key = (src.name, dst.name, 0, msg.origin, msg.seqno, c, src.epoch)
            self._push(
                self._delay(u[2 + c]), key, _GossipArrival(msg, src.name, dst.name, dst.epoch, c)
            )

    def _send_request(
        self, src: MemoryHost, dst: MemoryHost, rid: int, protocol: str, payload: bytes
    ) -> None:
        self.stats["requests"] += 1
        u = self._uniforms("request", src.name, dst.name, rid)
        if not self._reachable(src, dst):
            self.stats["requests_lost"] += 1
            return
        arrival = _RequestArrival(
            src.name, dst.name, src.epoch, dst.epoch, rid, protocol, payload, self._delay(u[1])
        )
        self._push(self._delay(u[0]), (src.name, dst.name, 1, src.name, rid, 0, src.epoch), arrival)

    def _send_response(
        self,
        responder: MemoryHost,
        req: _RequestArrival,
        payload: bytes | None,
        error: NeuroSeedError | None,
    ) -> None:
        requester = self._hosts[req.src]
        if not self._reachable(responder, requester) or requester.epoch != req.src_epoch:
            self.stats["responses_lost"] += 1
            return
        arrival = _ResponseArrival(
            responder.name, requester.name, req.src_epoch, req.rid, req.protocol, payload, error
        )
        key = (responder.name, requester.name, 2, requester.name, req.rid, 0, responder.epoch)
        self._push(req.response_delay, key, arrival)

    async def _scheduler(self) -> None:
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, _, item = heapq.heappop(self._heap)
                self._dispatch(item)
            if self._heap:
                with trio.move_on_at(self._heap[0][0]):
                    await self._wakeup.wait()
            else:
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    def _record(
        self, kind: str, src: str, dst: str, what: str, data: bytes, copy: int, ok: bool
    ) -> None:
        t = round(trio.current_time() * 1000.0, 6)
        self.trace.append(TraceEvent(t, kind, src, dst, what, _digest(data), copy, ok))
        self.stats[f"{kind}_{'delivered' if ok else 'lost'}"] += 1

    def _dispatch(self, item: _Arrival) -> None:
        src, dst = self._hosts[item.src], self._hosts[item.dst]
        live = self._reachable(src, dst) and dst.epoch == item.dst_epoch
        if isinstance(item, _GossipArrival):
            self._record(
                "gossip", item.src, item.dst, item.msg.topic, item.msg.data, item.copy, live
            )
            if live:
                dst._arrivals_send.send_nowait(item)
        elif isinstance(item, _RequestArrival):
            self._record("request", item.src, item.dst, item.protocol, item.payload, 0, live)
            if live:
                if dst._nursery is not None:
                    dst._nursery.start_soon(dst._serve, item)
                else:  # its tasks are starting: serve once they run
                    dst._backlog.append(item)
            elif dst.epoch != item.dst_epoch or not dst.running:
                # The connection was reset under the request: the requester hears at once.
                pending = src._pending.get(item.rid) if src.epoch == item.src_epoch else None
                if pending is not None:
                    pending.finish(None, PeerUnreachable(f"{dst.name} restarted"))
        else:
            data = item.payload if item.payload is not None else b""
            self._record("response", item.src, item.dst, item.protocol, data, 0, live)
            if live:
                pending = dst._pending.get(item.rid)
                if pending is not None:
                    pending.finish(item.payload, item.error)

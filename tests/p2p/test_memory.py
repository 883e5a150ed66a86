"""The in-memory network: gossip with validators, faults, determinism, requests, partitions,
penalties and crashes — all on trio's MockClock (pytest-trio's ``autojump_clock``)."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from node.errors import NotFound
from node.p2p.api import (
    MAX_GOSSIP_BYTES,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    GossipMessage,
    HostStopped,
    MessageTooLarge,
    Network,
    PeerId,
    PeerUnreachable,
    RequestFailed,
    RequestTimeout,
    Verdict,
)
from node.p2p.memory import MemoryHost, MemoryNetwork, TraceEvent

TOPIC = "/neuroseed/7/votes/1"
OTHER = "/neuroseed/7/txs/1"


def verdict_by_prefix(msg: GossipMessage) -> Verdict:
    if msg.data.startswith(b"bad"):
        return Verdict.REJECT
    if msg.data.startswith(b"old"):
        return Verdict.IGNORE
    return Verdict.ACCEPT


async def validator(msg: GossipMessage) -> Verdict:
    return verdict_by_prefix(msg)


class App:
    """A host's consumer: subscribes, records what is validated and what is delivered."""

    def __init__(self, host: MemoryHost) -> None:
        self.host = host
        self.validated: list[GossipMessage] = []
        self.got: list[GossipMessage] = []
        self.times: list[float] = []

    async def validate(self, msg: GossipMessage) -> Verdict:
        self.validated.append(msg)
        return verdict_by_prefix(msg)

    async def subscribe(self, *topics: str) -> None:
        for t in topics or (TOPIC,):
            await self.host.subscribe(t, self.validate)

    async def collect(self) -> None:
        try:
            while True:
                self.got.append(await self.host.next_message())
                self.times.append(trio.current_time())
        except HostStopped:
            return

    @property
    def data(self) -> list[bytes]:
        return [m.data for m in self.got]


async def run_apps(
    net: MemoryNetwork, body: Callable[[dict[str, App]], Awaitable[None]], *topics: str
) -> dict[str, App]:
    apps = {h.name: App(h) for h in net.hosts}
    async with net, trio.open_nursery() as nursery:
        for app in apps.values():
            await app.subscribe(*topics)
            nursery.start_soon(app.collect)
        await body(apps)
        await trio.sleep(10)  # let everything in flight land
        nursery.cancel_scope.cancel()
    return apps


def line(net: MemoryNetwork, *names: str) -> list[MemoryHost]:
    """Hosts linked in a line: a - b - c ..."""
    hosts = [net.add_host(n, connect=False) for n in names]
    for x, y in itertools.pairwise(hosts):
        net.connect(x, y)
    return hosts


# --- gossip ------------------------------------------------------------------------------------


async def test_gossip_reaches_every_subscriber_once(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(1, delay_ms=(5, 5))
    for n in "abcd":
        net.add_host(n)
    assert isinstance(net.host("a"), MemoryHost)
    host: Network = net.host("a")  # the interface, statically

    async def body(apps: dict[str, App]) -> None:
        await host.publish(TOPIC, b"hello")

    apps = await run_apps(net, body)
    assert apps["a"].got == []  # never delivered to its own publisher
    for n in "bcd":
        assert apps[n].data == [b"hello"]
    # With equal delays the origin's copy arrives first; forwarded copies are deduplicated.
    assert apps["b"].got[0].sender == PeerId(b"a")
    assert all(len(apps[n].validated) == 1 for n in "bcd")


async def test_only_subscribers_of_the_topic(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(1)
    a, b, c = (net.add_host(n) for n in "abc")
    async with net:
        await b.subscribe(TOPIC, validator)
        await c.subscribe(OTHER, validator)
        await a.publish(TOPIC, b"one")
        with trio.fail_after(1):
            assert (await b.next_message()).data == b"one"
        with trio.move_on_after(5) as scope:
            await c.next_message()
        assert scope.cancelled_caught
    assert c.subscriptions == frozenset({OTHER})


async def test_messages_are_forwarded_around_missing_links(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(2)
    a, b, c = line(net, "a", "b", "c")

    async def body(apps: dict[str, App]) -> None:
        await a.publish(TOPIC, b"good")
        await a.publish(TOPIC, b"old")  # IGNOREd by b: not forwarded, no penalty
        await a.publish(TOPIC, b"bad")  # REJECTed by b: not forwarded, a penalized

    apps = await run_apps(net, body)
    assert apps["b"].data == [b"good"]
    assert apps["c"].data == [b"good"]
    assert apps["c"].got[0].sender == b.peer_id  # the forwarder, not the origin
    assert [m.data for m in apps["c"].validated] == [b"good"]
    assert b.score(a) == -1 and c.score(b) == 0 and a.score(b) == 0


async def test_a_republish_of_the_same_bytes_is_a_new_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(3)
    a, _ = net.add_host("a"), net.add_host("b")

    async def body(apps: dict[str, App]) -> None:
        for _ in range(3):
            await a.publish(TOPIC, b"vote")
            await trio.sleep(1)

    apps = await run_apps(net, body)
    assert apps["b"].data == [b"vote"] * 3


async def test_size_limit(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(1)
    a, _ = net.add_host("a"), net.add_host("b")
    async with net:
        await a.publish(TOPIC, b"x" * MAX_GOSSIP_BYTES)
        with pytest.raises(MessageTooLarge):
            await a.publish(TOPIC, b"x" * (MAX_GOSSIP_BYTES + 1))
    small = MemoryNetwork(1, max_message=100)
    h = small.add_host("a")
    async with small:
        with pytest.raises(MessageTooLarge):
            await h.publish(TOPIC, b"x" * 101)


# --- faults --------------------------------------------------------------------------------


async def test_drops_duplicates_delays_and_reordering(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(5, drop=0.3, duplicate=0.2, delay_ms=(10, 200))
    a, _ = net.add_host("a"), net.add_host("b")
    sent_at: dict[bytes, float] = {}

    async def body(apps: dict[str, App]) -> None:
        for i in range(300):
            data = i.to_bytes(2, "big")
            sent_at[data] = trio.current_time()
            await a.publish(TOPIC, data)
            await trio.sleep(0.001)

    apps = await run_apps(net, body)
    got = apps["b"].data
    distinct = set(got)
    assert 150 < len(distinct) < 260  # ~70 % survive the drops
    assert len(got) - len(distinct) > 15  # duplicates reach the application
    assert got != sorted(got)  # reordered
    for m, t in zip(apps["b"].got, apps["b"].times, strict=True):
        assert 0.010 - 1e-9 <= t - sent_at[m.data] <= 0.200 + 1e-9
    assert net.stats["gossip_dropped"] == 300 - len(distinct)
    assert net.stats["gossip_duplicated"] == len(got) - len(distinct)


async def test_set_faults_makes_the_network_fair_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(6, drop=1.0)
    a, _, _ = (net.add_host(n) for n in "abc")

    async def body(apps: dict[str, App]) -> None:
        for i in range(20):
            await a.publish(TOPIC, b"lost%d" % i)
        await trio.sleep(1)
        net.set_faults(drop=0.0, duplicate=0.0, delay_ms=(1, 2))
        for i in range(20):
            await a.publish(TOPIC, b"m%d" % i)

    apps = await run_apps(net, body)
    for n in "bc":
        assert sorted(apps[n].data) == sorted(b"m%d" % i for i in range(20))
    with pytest.raises(ValueError):
        net.set_faults(drop=1.5)
    with pytest.raises(ValueError):
        net.set_faults(delay_ms=(5, 1))


def _scenario(seed: int) -> tuple[list[TraceEvent], dict[str, list[bytes]]]:
    """Four hosts, each publishing from its own task at the same virtual times (so trio's
    shuffled scheduling is in play), with drops, duplicates and delays; plus requests."""
    net = MemoryNetwork(seed, drop=0.2, duplicate=0.2, delay_ms=(1, 40))
    hosts = [net.add_host(n) for n in "abcd"]
    net.disconnect(hosts[0], hosts[2])

    async def echo(peer: PeerId, payload: bytes) -> bytes:
        await trio.sleep(0.003)
        return payload[::-1]

    async def publisher(h: MemoryHost) -> None:
        for i in range(25):
            await h.publish(TOPIC, b"%s-%d" % (h.name.encode(), i))
            if i % 5 == 0:
                peer = hosts[(hosts.index(h) + 1) % 4]
                await h.request(peer.peer_id, "/echo/1", b"%s?%d" % (h.name.encode(), i))
            await trio.sleep(0.005)

    async def main() -> dict[str, list[bytes]]:
        async def body(apps: dict[str, App]) -> None:
            for h in hosts:
                h.set_handler("/echo/1", echo)
            async with trio.open_nursery() as nursery:
                for h in hosts:
                    nursery.start_soon(publisher, h)

        apps = await run_apps(net, body)
        return {n: app.data for n, app in apps.items()}

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return net.trace, got


def test_same_seed_same_delivery_trace() -> None:
    trace1, got1 = _scenario(42)
    trace2, got2 = _scenario(42)
    assert len(trace1) > 200
    assert {e.kind for e in trace1} == {"gossip", "request", "response"}
    assert any(e.copy for e in trace1)  # duplicates happened
    assert trace1 == trace2
    assert got1 == got2
    trace3, _ = _scenario(43)
    assert trace3 != trace1


# --- validators, penalties, disconnects -------------------------------------------------------


async def test_rejects_penalize_the_forwarder_until_it_is_disconnected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(7, ban_threshold=3)
    a, b, c = (net.add_host(n) for n in "abc")

    async def body(apps: dict[str, App]) -> None:
        await a.publish(TOPIC, b"bad1")
        await a.publish(TOPIC, b"bad2")
        await trio.sleep(1)
        assert b.score(a) == -2 and c.score(a) == -2
        assert all(p.connected for p in b.peers())
        await a.publish(TOPIC, b"bad3")
        await trio.sleep(1)
        # Both b and c dropped a; b and c stay linked.
        assert {p.peer_id: p.connected for p in b.peers()} == {a.peer_id: False, c.peer_id: True}
        assert [p.connected for p in a.peers()] == [False, False]
        await a.publish(TOPIC, b"good-but-banned")
        await trio.sleep(1)
        # penalize() counts the same way.
        for _ in range(3):
            await b.penalize(c.peer_id, "sent an invalid block")
        await trio.sleep(1)
        assert not any(p.connected for p in b.peers())
        await b.penalize(PeerId(b"nobody"), "unknown peers are ignored")
        net.connect(a, b)  # an explicit reconnect resets the scores
        net.connect(b, c)
        assert b.score(a) == 0 and b.score(c) == 0
        await a.publish(TOPIC, b"welcome-back")

    apps = await run_apps(net, body)
    assert apps["b"].data == [b"welcome-back"]
    assert apps["c"].data == [b"welcome-back"]  # forwarded by b
    assert len(apps["b"].validated) == 4
    assert net.stats["bans"] == 3


async def test_partition_and_heal(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(8, delay_ms=(5, 10))
    a, b, c, d, e = (net.add_host(n) for n in "abcde")

    async def body(apps: dict[str, App]) -> None:
        net.partition([{a, b}, {c, d}])  # e: named nowhere, so cut from everyone
        await a.publish(TOPIC, b"side-ab")
        await c.publish(TOPIC, b"side-cd")
        await e.publish(TOPIC, b"alone")
        await trio.sleep(1)
        assert all(p.connected for p in a.peers())  # a silent partition: links look up
        net.heal()
        await b.publish(TOPIC, b"b-then-cut")
        net.partition([{a}, {b, c, d, e}])  # cut while b's message to a is in flight
        await trio.sleep(1)
        net.heal()
        await d.publish(TOPIC, b"healed")

    apps = await run_apps(net, body)
    assert apps["a"].data == [b"healed"]
    assert apps["b"].data == [b"side-ab", b"healed"]
    assert apps["c"].data == [b"b-then-cut", b"healed"]
    assert apps["d"].data == [b"side-cd", b"b-then-cut"]
    assert apps["e"].data == [b"b-then-cut", b"healed"]
    with pytest.raises(ValueError):
        net.partition([{a}, {a}])


async def test_disconnect_routes_around(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(9)
    a, b, c = (net.add_host(n) for n in "abc")
    net.disconnect(a, b)

    async def body(apps: dict[str, App]) -> None:
        await a.publish(TOPIC, b"via-c")

    apps = await run_apps(net, body)
    assert apps["b"].data == [b"via-c"]
    assert apps["b"].got[0].sender == c.peer_id
    assert {p.peer_id: p.connected for p in a.peers()} == {b.peer_id: False, c.peer_id: True}


# --- requests ----------------------------------------------------------------------------------


async def test_requests(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(10, drop=1.0, duplicate=1.0, delay_ms=(20, 30))  # streams never drop
    a, b, c = (net.add_host(n) for n in "abc")
    net.disconnect(a, c)
    seen: list[PeerId] = []

    async def echo(peer: PeerId, payload: bytes) -> bytes:
        seen.append(peer)
        return payload.upper()

    async def failing(peer: PeerId, payload: bytes) -> bytes:
        raise NotFound("no such height")

    async def huge(peer: PeerId, payload: bytes) -> bytes:
        return b"x" * (MAX_RESPONSE_BYTES + 1)

    async def slow(peer: PeerId, payload: bytes) -> bytes:
        await trio.sleep(100)
        return b""

    async with net:
        b.set_handler("/echo/1", echo)
        b.set_handler("/fail/1", failing)
        b.set_handler("/huge/1", huge)
        b.set_handler("/slow/1", slow)
        t0 = trio.current_time()
        assert await a.request(b.peer_id, "/echo/1", b"hi") == b"HI"
        assert 0.040 - 1e-9 <= trio.current_time() - t0 <= 0.060 + 1e-9
        assert seen == [a.peer_id]
        big = b"y" * MAX_REQUEST_BYTES
        assert await a.request(b.peer_id, "/echo/1", big) == big.upper()
        with pytest.raises(MessageTooLarge):
            await a.request(b.peer_id, "/echo/1", big + b"y")
        with pytest.raises(RequestFailed, match="does not support"):
            await a.request(b.peer_id, "/nothing/1", b"")
        with pytest.raises(RequestFailed, match="no such height"):
            await a.request(b.peer_id, "/fail/1", b"")
        with pytest.raises(RequestFailed, match="exceeds"):
            await a.request(b.peer_id, "/huge/1", b"")
        with pytest.raises(RequestTimeout):
            await a.request(b.peer_id, "/slow/1", b"", timeout_s=5)
        with pytest.raises(PeerUnreachable):
            await a.request(c.peer_id, "/echo/1", b"")
        with pytest.raises(PeerUnreachable):
            await a.request(a.peer_id, "/echo/1", b"")
        with pytest.raises(PeerUnreachable):
            await a.request(PeerId(b"nobody"), "/echo/1", b"")
        net.partition([{a}, {b, c}])
        with pytest.raises(RequestTimeout):
            await a.request(b.peer_id, "/echo/1", b"lost", timeout_s=2)
        net.heal()
        # The peer disconnecting or crashing under a pending request fails it at once.
        async with trio.open_nursery() as nursery:

            async def cut() -> None:
                await trio.sleep(1)
                net.disconnect(a, b)

            nursery.start_soon(cut)
            t0 = trio.current_time()
            with pytest.raises(PeerUnreachable):
                await a.request(b.peer_id, "/slow/1", b"")
            assert trio.current_time() - t0 == pytest.approx(1)
        net.connect(a, b)
        async with trio.open_nursery() as nursery:

            async def crash() -> None:
                await trio.sleep(1)
                net.stop(b)

            nursery.start_soon(crash)
            with pytest.raises(PeerUnreachable):
                await a.request(b.peer_id, "/slow/1", b"")
        with pytest.raises(PeerUnreachable):
            await a.request(b.peer_id, "/echo/1", b"")


# --- crashes -----------------------------------------------------------------------------------


async def test_stop_and_start(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(11, delay_ms=(50, 60))
    a, b = net.add_host("a"), net.add_host("b")

    async def echo(peer: PeerId, payload: bytes) -> bytes:
        return payload

    async with net:
        await b.subscribe(TOPIC, validator)
        b.set_handler("/echo/1", echo)
        await a.publish(TOPIC, b"before")
        assert (await b.next_message()).data == b"before"
        await a.publish(TOPIC, b"in-flight")
        await trio.sleep(0.01)
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                with pytest.raises(HostStopped):
                    await b.next_message()

            nursery.start_soon(waiter)
            await trio.sleep(0.001)
            net.stop(b)
        await a.publish(TOPIC, b"while-down")
        assert [p.connected for p in a.peers()] == [False]
        with pytest.raises(HostStopped):
            await b.publish(TOPIC, b"x")
        with pytest.raises(HostStopped):
            await b.next_message()
        with pytest.raises(HostStopped):
            await b.request(a.peer_id, "/echo/1", b"")
        await trio.sleep(1)
        net.start(b)
        # A restart is a new process: nothing subscribed, no handlers, links back.
        assert b.subscriptions == frozenset()
        assert [p.connected for p in a.peers()] == [True]
        with pytest.raises(RequestFailed, match="does not support"):
            await a.request(b.peer_id, "/echo/1", b"")
        await a.publish(TOPIC, b"unsubscribed")
        await trio.sleep(1)
        await b.subscribe(TOPIC, validator)
        await a.publish(TOPIC, b"after")
        with trio.fail_after(1):
            assert (await b.next_message()).data == b"after"
        with trio.move_on_after(5):
            extra = await b.next_message()
            raise AssertionError(f"unexpected {extra}")
        # b's messages still get ids a has not seen (its sequence numbers survive the restart).
        await a.subscribe(TOPIC, validator)
        await b.publish(TOPIC, b"from-b")
        with trio.fail_after(1):
            assert (await a.next_message()).data == b"from-b"
    net.start(a)  # starting a running host is a no-op
    assert net.stats["stops"] == 1


async def test_stop_before_the_network_runs(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(12)
    a, b = net.add_host("a"), net.add_host("b")
    net.stop(b)
    async with net:
        await a.subscribe(TOPIC, validator)
        await trio.sleep(1)
        net.start(b)
        await b.publish(TOPIC, b"hello")
        with trio.fail_after(1):
            assert (await a.next_message()).data == b"hello"
    with pytest.raises(ValueError):
        net.add_host("a")
    with pytest.raises(ValueError):
        net.connect(a, a)


async def test_a_validator_bug_is_not_swallowed(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(13)
    a, b = net.add_host("a"), net.add_host("b")

    async def broken(msg: GossipMessage) -> Verdict:
        raise KeyError("bug")

    with pytest.RaisesGroup(KeyError, flatten_subgroups=True):
        async with net:
            await b.subscribe(TOPIC, broken)
            await a.publish(TOPIC, b"x")
            await trio.sleep(1)

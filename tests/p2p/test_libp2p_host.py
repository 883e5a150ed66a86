"""``Libp2pHost`` on real py-libp2p hosts over loopback TCP (two or three hosts in one process).

Real clock (libp2p does not run under trio's MockClock), ephemeral ports on 127.0.0.1, short
timings, every test bounded by ``trio.fail_after``. Skipped where the ``p2p`` extra
(``libp2p``) is not installed. The identity-file tests at the end need no libp2p.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from node.errors import KeystoreError
from node.p2p import api
from node.p2p.identity import (
    generate_secret,
    is_valid_secret,
    load_node_key,
    load_or_create_node_key,
    node_key_path,
)

TOPIC = api.topic_name(7, api.Topic.TXS)


def _libp2p_host() -> Any:
    pytest.importorskip("libp2p", reason="the p2p extra (libp2p) is not installed")
    from node.p2p import libp2p_host

    return libp2p_host


def _settings(**overrides: Any) -> Any:
    base = {
        "heartbeat_s": 0.2,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.4,
        "discovery_interval_s": 0.5,
        "ping_interval_s": 2.0,
        "ping_timeout_s": 3.0,
        "dial_timeout_s": 2.0,
        "handler_timeout_s": 5.0,
    }
    base.update(overrides)
    return _libp2p_host().Libp2pSettings(**base)


class Hosts:
    """Starts hosts in one nursery, each under its own cancel scope so it can be stopped alone."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._scopes: dict[int, tuple[trio.CancelScope, trio.Event]] = {}

    async def start(
        self,
        *,
        key: bytes | None = None,
        bootstrap: Sequence[str] = (),
        port: int = 0,
        **settings: Any,
    ) -> Any:
        lh = _libp2p_host()
        host = lh.Libp2pHost(
            key or generate_secret(),
            [f"/ip4/127.0.0.1/tcp/{port}"],
            bootstrap,
            _settings(**settings),
        )
        scope, done = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await host.run(task_status=task_status)
            finally:
                done.set()

        await self._nursery.start(run)
        self._scopes[id(host)] = (scope, done)
        return host

    async def stop(self, host: Any) -> None:
        scope, done = self._scopes.pop(id(host))
        scope.cancel()
        await done.wait()


@asynccontextmanager
async def hosts(limit_s: float = 30.0) -> AsyncIterator[Hosts]:
    _libp2p_host()  # skip here: a skip raised inside the nursery would be an ExceptionGroup
    with trio.fail_after(limit_s):
        async with trio.open_nursery() as nursery:
            yield Hosts(nursery)
            nursery.cancel_scope.cancel()


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    start = time.monotonic()
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)
        return time.monotonic() - start
    raise AssertionError(f"not within {timeout_s} s: {what}")


def port_of(addr: str) -> int:
    parts = addr.split("/")
    return int(parts[parts.index("tcp") + 1])


async def accept_all(msg: api.GossipMessage) -> api.Verdict:
    return api.Verdict.ACCEPT


async def next_message(host: Any, timeout_s: float = 5.0) -> api.GossipMessage:
    with trio.fail_after(timeout_s):
        msg: api.GossipMessage = await host.next_message()
        return msg


# --- gossip ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_gossip_reaches_all_hosts() -> None:
    async with hosts() as net:
        b = await net.start()
        a = await net.start(bootstrap=b.listen_addrs)
        c = await net.start(bootstrap=b.listen_addrs)
        assert all(
            addr.endswith("/p2p/" + _libp2p_host().peer_id_text(b.peer_id))
            for addr in b.listen_addrs
        )
        for h in (a, b, c):
            await h.subscribe(TOPIC, accept_all)
        await eventually(lambda: all(len(h.topic_peers(TOPIC)) == 2 for h in (a, b, c)), "mesh")

        await a.publish(TOPIC, b"batch-1")
        got_b, got_c = await next_message(b), await next_message(c)
        assert (got_b.topic, got_b.data, got_b.sender) == (TOPIC, b"batch-1", a.peer_id)
        assert got_c.data == b"batch-1" and got_c.sender in (a.peer_id, b.peer_id)

        await c.publish(TOPIC, b"batch-2")
        assert (await next_message(a)).data == b"batch-2"
        assert (await next_message(b)).data == b"batch-2"

        largest = os.urandom(_libp2p_host().MAX_GOSSIP_DATA)  # envelope included, fits 1 MiB
        await b.publish(TOPIC, largest)
        assert (await next_message(a)).data == largest
        assert (await next_message(c)).data == largest
        with trio.move_on_after(0.3):  # the publisher gets nothing back (api convention)
            pytest.fail(f"publisher received {await c.next_message()}")


@pytest.mark.slow
async def test_rejected_gossip_stops_at_the_validator_and_scores_the_forwarder() -> None:
    async def b_validator(msg: api.GossipMessage) -> api.Verdict:
        if msg.data.startswith(b"bad"):
            return api.Verdict.REJECT
        if msg.data.startswith(b"old"):
            return api.Verdict.IGNORE
        return api.Verdict.ACCEPT

    async with hosts() as net:
        # A line a - b - c: a and c want one peer each, so discovery adds no a - c link.
        b = await net.start(disconnect_threshold=25.0)
        a = await net.start(bootstrap=b.listen_addrs, target_peers=1)
        c = await net.start(bootstrap=b.listen_addrs, target_peers=1)
        await a.subscribe(TOPIC, accept_all)
        await b.subscribe(TOPIC, b_validator)
        await c.subscribe(TOPIC, accept_all)
        await eventually(lambda: len(b.topic_peers(TOPIC)) == 2, "b sees a and c")
        await eventually(lambda: b.peer_id in c.topic_peers(TOPIC), "c sees b")
        assert not a.is_connected(c.peer_id)

        await a.publish(TOPIC, b"old-1")  # IGNORE: dropped, no penalty
        await a.publish(TOPIC, b"bad-1")  # REJECT: dropped, a scored down
        await a.publish(TOPIC, b"good-1")
        got = await next_message(c)
        assert (got.data, got.sender) == (b"good-1", b.peer_id)  # nothing before it
        assert (await next_message(b)).data == b"good-1"
        assert 9.0 < b.misbehaviour(a.peer_id) <= 10.0  # one invalid message, weight 10
        assert c.misbehaviour(b.peer_id) == 0.0

        # Past disconnect_threshold (25 points) b drops a and refuses it for ban_s.
        await a.publish(TOPIC, b"bad-2")
        await a.publish(TOPIC, b"bad-3")
        await eventually(lambda: b.misbehaviour(a.peer_id) >= 25.0, "three rejects counted")
        await eventually(lambda: not b.is_connected(a.peer_id), "b disconnects a")
        with pytest.raises(api.P2PError):  # banned: b resets a's streams and closes its link
            await a.request(b.peer_id, api.PROTOCOL_SYNC, b"x", timeout_s=2.0)


@pytest.mark.slow
async def test_penalize_disconnects_past_the_threshold() -> None:
    async with hosts() as net:
        b = await net.start(disconnect_threshold=25.0)  # 3 reports of 10 points (decaying)
        a = await net.start()
        await a.connect(b.listen_addrs[0])
        assert b.is_connected(a.peer_id)
        await b.penalize(a.peer_id, "bad block part")
        await b.penalize(a.peer_id, "bad block part")
        assert b.is_connected(a.peer_id)
        await b.penalize(a.peer_id, "bad block part")
        await eventually(lambda: not a.is_connected(b.peer_id), "a sees the disconnect")
        with pytest.raises(api.P2PError):  # banned: b resets a's streams and closes its link
            await a.request(b.peer_id, api.PROTOCOL_SYNC, b"x", timeout_s=2.0)
        await eventually(lambda: not a.is_connected(b.peer_id), "b closes a's new connection")


# --- request / response ------------------------------------------------------------------------


@pytest.mark.slow
async def test_request_response(caplog: pytest.LogCaptureFixture) -> None:
    big = bytes(range(256)) * (5 * 4096)  # 5 MiB: five frames of MAX_FRAME_BYTES

    async def echo(peer: api.PeerId, payload: bytes) -> bytes:
        return peer + b"|" + payload

    async def blocks(peer: api.PeerId, payload: bytes) -> bytes:
        return big

    async def refuses(peer: api.PeerId, payload: bytes) -> bytes:
        raise api.RequestFailed("no such block")

    async def buggy(peer: api.PeerId, payload: bytes) -> bytes:
        raise ZeroDivisionError("oops")

    async def slow(peer: api.PeerId, payload: bytes) -> bytes:
        await trio.sleep(10)
        return b""

    async with hosts() as net:
        b = await net.start()
        b.set_handler("/test/echo/1", echo)
        b.set_handler("/test/blocks/1", blocks)
        a = await net.start(bootstrap=b.listen_addrs)
        b.set_handler("/test/refuses/1", refuses)  # after start, too
        b.set_handler("/test/buggy/1", buggy)
        b.set_handler("/test/slow/1", slow)
        await eventually(lambda: a.is_connected(b.peer_id), "bootstrap connection")

        assert await a.request(b.peer_id, "/test/echo/1", b"ping") == a.peer_id + b"|ping"
        assert await a.request(b.peer_id, "/test/echo/1", b"") == a.peer_id + b"|"
        one_mib = os.urandom(api.MAX_REQUEST_BYTES)
        assert await a.request(b.peer_id, "/test/echo/1", one_mib) == a.peer_id + b"|" + one_mib

        start = time.monotonic()
        assert await a.request(b.peer_id, "/test/blocks/1", b"") == big
        logging.getLogger(__name__).info("5 MiB response: %.3f s", time.monotonic() - start)

        with pytest.raises(api.RequestFailed, match="no such block"):
            await a.request(b.peer_id, "/test/refuses/1", b"")
        with (
            caplog.at_level(logging.ERROR, logger="node.p2p.libp2p_host"),
            pytest.raises(api.RequestFailed, match="internal error"),
        ):
            await a.request(b.peer_id, "/test/buggy/1", b"")
        assert "ZeroDivisionError" in caplog.text
        with pytest.raises(api.RequestFailed, match="does not serve"):
            await a.request(b.peer_id, "/test/nobody/1", b"")
        with pytest.raises(api.RequestTimeout):
            await a.request(b.peer_id, "/test/slow/1", b"", timeout_s=0.5)
        with pytest.raises(api.MessageTooLarge):
            await a.request(b.peer_id, "/test/echo/1", bytes(api.MAX_REQUEST_BYTES + 1))
        with pytest.raises(api.MessageTooLarge):
            await a.publish(TOPIC, bytes(api.MAX_GOSSIP_BYTES))
        stranger = _libp2p_host().Libp2pHost(generate_secret(), []).peer_id
        with pytest.raises(api.PeerUnreachable):
            await a.request(stranger, "/test/echo/1", b"", timeout_s=2.0)
        # Still fine after all that.
        assert await a.request(b.peer_id, "/test/echo/1", b"again") == a.peer_id + b"|again"
        await net.stop(a)
        with pytest.raises(api.HostStopped):
            await a.request(b.peer_id, "/test/echo/1", b"")


# --- discovery and connections -----------------------------------------------------------------


@pytest.mark.slow
async def test_dht_finds_the_third_host_through_the_bootstrap_host() -> None:
    async with hosts() as net:
        b = await net.start()
        c = await net.start(bootstrap=b.listen_addrs)
        await eventually(lambda: c.is_connected(b.peer_id), "c - b")
        a = await net.start(bootstrap=b.listen_addrs)
        took = await eventually(lambda: a.is_connected(c.peer_id), "a finds c through b's DHT")
        logging.getLogger(__name__).info("a connected to c %.2f s after starting", took)

        def known() -> dict[api.PeerId, api.PeerInfo]:
            return {p.peer_id: p for p in a.peers()}

        # c's listen address arrives with identify when c was the one that dialed.
        await eventually(lambda: bool(known()[c.peer_id].addrs), "c's address in a's peerstore")
        assert known()[c.peer_id].connected and known()[b.peer_id].connected


@pytest.mark.slow
async def test_a_restarted_bootstrap_peer_is_reconnected() -> None:
    async def echo(peer: api.PeerId, payload: bytes) -> bytes:
        return payload

    key = generate_secret()
    async with hosts() as net:
        b = await net.start(key=key)
        port = port_of(b.listen_addrs[0])
        a = await net.start(bootstrap=b.listen_addrs)
        await eventually(lambda: a.is_connected(b.peer_id), "first connection")

        await net.stop(b)
        await eventually(lambda: not a.is_connected(b.peer_id), "a sees b go")
        await trio.sleep(0.5)  # a's redials fail meanwhile (libp2p then blocks b for 60 s)

        b2 = await net.start(key=key, port=port)
        b2.set_handler("/test/echo/1", echo)
        assert b2.peer_id == b.peer_id
        took = await eventually(lambda: a.is_connected(b.peer_id), "a reconnects to b")
        logging.getLogger(__name__).info("reconnected %.2f s after the restart", took)
        assert await a.request(b.peer_id, "/test/echo/1", b"back") == b"back"


@pytest.mark.slow
async def test_a_silent_peer_is_disconnected_by_ping() -> None:
    async def silent(stream: Any) -> None:
        await trio.sleep_forever()

    async with hosts() as net:
        fast_ping = {"ping_interval_s": 0.5, "ping_timeout_s": 1.0}
        a = await net.start(target_peers=0, **fast_ping)  # target 0: no discovery redial
        b = await net.start(target_peers=0, **fast_ping)
        await a.connect(b.listen_addrs[0])
        await trio.sleep(1.0)  # two ping rounds pass
        assert a.is_connected(b.peer_id)
        # b stops answering pings (a stand-in for a silent partition, which loopback lacks).
        from libp2p.custom_types import TProtocol

        b._host.set_stream_handler(TProtocol(api.PROTOCOL_PING), silent)
        took = await eventually(lambda: not a.is_connected(b.peer_id), "a drops silent b")
        assert took < 0.5 + 1.0 + 1.0  # ping interval + ping timeout + slack


@pytest.mark.slow
async def test_a_port_in_use_is_refused() -> None:
    async with hosts() as net:
        a = await net.start()
        with pytest.raises(api.P2PError, match="cannot listen"):
            await net.start(port=port_of(a.listen_addrs[0]))


@pytest.mark.slow
async def test_the_peer_id_follows_the_key() -> None:
    lh = _libp2p_host()
    key = generate_secret()
    one, two = lh.Libp2pHost(key, []), lh.Libp2pHost(key, [])
    assert one.peer_id == two.peer_id != lh.Libp2pHost(generate_secret(), []).peer_id
    assert lh.peer_id_text(one.peer_id).startswith("16Uiu2")  # secp256k1, identity multihash
    with pytest.raises(ValueError):
        lh.Libp2pHost(b"\x00" * 32, [])


# --- identity file (no libp2p needed) ------------------------------------------------------------


def test_node_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    secret = load_or_create_node_key(tmp_path)
    path = node_key_path(tmp_path)
    assert is_valid_secret(secret)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == secret.hex() + "\n"
    assert load_or_create_node_key(tmp_path) == secret
    assert load_node_key(path) == secret
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_node_key_file_must_be_private_and_well_formed(tmp_path: Path) -> None:
    load_or_create_node_key(tmp_path)
    path = node_key_path(tmp_path)
    path.chmod(0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        load_or_create_node_key(tmp_path)
    for bad in ("zz" * 32, "00" * 32, "ff" * 32, "ab" * 31, "ab" * 300):
        path.write_text(bad)
        path.chmod(0o600)
        with pytest.raises(KeystoreError, match="not a p2p key file"):
            load_node_key(path)

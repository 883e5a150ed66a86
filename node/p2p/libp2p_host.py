"""``Libp2pHost``: the node's ``api.Network`` over py-libp2p 0.8.1 (DESIGN §6) — the only module
that imports libp2p.

TCP + Noise + Yamux; gossipsub for topics; Kademlia (server mode) for peer discovery; our own
request/response on raw streams. Behaviour of py-libp2p 0.8.1 this module works around (read
``libp2p-notes.md`` and the library source):

* **Services.** Host, Pubsub, GossipSub and KadDHT run under ``background_trio_service`` inside
  ``run()``, i.e. inside the caller's nursery, but under a shielded scope: cancelling the caller
  first stops our own tasks, then ``host.close()`` closes every connection, then the services are
  cancelled. (Cancelled directly, the swarm closes its connections under cancellation and leaks
  their sockets: ``ResourceWarning`` at garbage collection.)
* **Listening.** libp2p binds with ``SO_REUSEPORT`` (for hole punching), so a second process can
  listen on the same port and the kernel splits inbound connections between the two; ``run``
  first checks that each fixed TCP port is free.
* **Gossipsub.** Heartbeat ~1 s (default 120 s); adaptive gossip off, because after 30 s its
  "network health" estimate (0 when no peer has a positive score) stretches the heartbeat to
  30–60 s; per-(forwarder, topic) rate limit raised (default 10/s, own publishes included; excess
  is dropped silently). Outbound RPCs above 1 MiB, envelope included, are dropped silently, so
  ``publish`` refuses payloads above ``MAX_GOSSIP_DATA``. Bursts beyond the 32-RPC per-peer queue
  are dropped: batch, and never rely on gossip alone.
* **Validation.** libp2p validators return a bool and every ``False`` counts as an invalid message
  against the forwarder (P4) — 0.8.1 has no IGNORE. We map ``REJECT`` → ``False`` (scored),
  ``ACCEPT`` → ``True`` and ``IGNORE`` → ``False`` *without* the penalty: the scorer and the
  validation cache are wrapped so that an IGNORE neither counts against the forwarder nor is cached
  as invalid (a later copy is validated again). Own publishes skip our validators.
* **Scoring.** Off by default in libp2p; here P4 (invalid messages) only, with publish/graylist
  thresholds, so a peer that forwards a few REJECTed messages is no longer heard. ``penalize``
  keeps an app-level ledger; past ``disconnect_threshold`` (ledger + gossip P4) the peer is
  disconnected and banned for ``ban_s``.
* **Request/response.** Our own framing (``framing.py``; the built-in helper fails above
  ~6.5 MiB): the request is one message (≤ ``MAX_REQUEST_BYTES``), the answer a one-byte status
  frame (0 ok, 1 error) then one message (≤ ``MAX_RESPONSE_BYTES``, or the error text). A stream
  carries one exchange after another: the server reads the next request until the stream ends
  or stays idle ``serve_idle_stream_s``; the requester keeps up to ``max_idle_streams`` idle
  streams per (peer, protocol) for ``idle_stream_s`` and reuses them (a new stream costs a
  protocol negotiation and starts with a small Yamux window: reuse cut the CPU of 8 MiB
  responses by ~15%). A reused stream that fails (the server closed it meanwhile) is replaced
  by a new one once; the protocols are idempotent reads. Ping always uses a new stream. A handler's ``NeuroSeedError`` reaches the requester as ``RequestFailed``; any other
  exception is a bug: logged with its traceback here, answered as "internal error" (a remote peer
  must not be able to crash the node by asking).
* **Content routing.** ``provide`` sends Kademlia ADD_PROVIDER records (keyed by the CID's
  multihash) to the peers closest to the key; receivers keep them 48 h, so every provided key is
  announced again every ``reprovide_s`` (and every ``reprovide_check_s`` while no announcement
  has reached anybody yet, e.g. before the first connection). py-libp2p rate-limits
  ADD_PROVIDER to 10 per 10 s per sender, dropping the excess silently: we raise that limit on
  our own DHT and pace our announcements (``provide_interval_s``). Its ``find_providers``
  answers from the local store alone once that knows one provider, so ``find_providers`` here
  merges the local records with a lookup at the closest and the connected peers.
* **Raw streams** (``set_raw_handler`` / ``open_raw_stream``): a bare stream with no framing, for
  bulk transfers and the benchmarks' bound.
* **Connections.** libp2p's auto-connector (dials every peer in the peerstore up to 200
  connections, banned ones included) is switched off: bootstrap redials and a discovery loop over
  the DHT routing table (up to ``target_peers``) do the dialing. A failed dial blocks the peer for
  60 s: ``unblock_peer`` before each deliberate dial. Notifee callbacks run on the
  connect/disconnect path: they only start tasks. Bootstrap peers are redialled with exponential
  backoff; an app-level ping closes silent connections.
"""

from __future__ import annotations

import logging
import random
import secrets
import socket
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.exceptions import StreamFailure
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as Libp2pPeerInfo
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.tools.anyio_service import background_trio_service
from multiformats import CID

from node.errors import NeuroSeedError
from node.p2p import api
from node.p2p.framing import (
    FrameError,
    ReadWriteAdapter,
    read_frame,
    read_message,
    write_frame,
    write_message,
)
from node.p2p.identity import is_valid_secret

logger = logging.getLogger(__name__)

# Room for the gossip envelope (topic, origin, seqno, signature, key, signed peer record): libp2p
# drops an outbound RPC above 1 MiB *including* it, silently.
GOSSIP_ENVELOPE_RESERVE = 16 << 10
MAX_GOSSIP_DATA = api.MAX_GOSSIP_BYTES - GOSSIP_ENVELOPE_RESERVE

_STATUS_OK = b"\x00"
_STATUS_ERROR = b"\x01"
_MAX_ERROR_TEXT = 1024
_SHUTDOWN_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Libp2pSettings:
    """Tunables; the defaults suit a network, tests shorten the timings."""

    heartbeat_s: float = 1.0
    max_messages_per_topic_per_second: float = 200.0
    validation_timeout_s: float = 5.0
    inbox_size: int = 4096
    dial_timeout_s: float = 5.0
    handler_timeout_s: float = 60.0
    reconnect_initial_s: float = 0.25
    reconnect_max_s: float = 30.0
    # A bootstrap connection that lasted this long is redialled at once when it drops; a shorter
    # one (say the peer keeps kicking us) keeps the backoff growing.
    stable_connection_s: float = 10.0
    discovery_interval_s: float = 30.0
    target_peers: int = 32
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 5.0
    penalty_per_report: float = 10.0
    disconnect_threshold: float = 100.0
    penalty_half_life_s: float = 60.0
    ban_s: float = 600.0
    # Gossip P4: each invalid (REJECTed) message costs `invalid_message_weight`; a peer under
    # `publish_threshold` is not heard on that topic until the counter decays.
    invalid_message_weight: float = 10.0
    publish_threshold: float = -50.0
    graylist_threshold: float = -80.0
    # Content routing: announce again this often (records live 48 h at the receivers), check
    # this often for announcements due (or that reached nobody yet); at most one announcement
    # per `provide_interval_s` (receivers rate-limit ADD_PROVIDER per sender).
    reprovide_s: float = 12 * 3600.0
    reprovide_check_s: float = 60.0
    provide_interval_s: float = 0.25
    provide_timeout_s: float = 30.0
    find_providers_timeout_s: float = 10.0
    provider_query_timeout_s: float = 5.0
    # Request streams kept for reuse (see the module docstring).
    reuse_streams: bool = True
    max_idle_streams: int = 8  # per (peer, protocol)
    idle_stream_s: float = 10.0  # a requester drops an idle stream after this long
    serve_idle_stream_s: float = 30.0  # a server ends a stream with no new request this long


# --- small helpers ------------------------------------------------------------------------------


class _Lru:
    """A bounded insertion-ordered map (oldest entries fall out)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[bytes, bytes] = OrderedDict()

    def put(self, key: bytes, value: bytes = b"") -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def pop(self, key: bytes, default: bytes) -> bytes:
        return self._data.pop(key, default)


class _IgnoreAwareScorer:
    """Wraps libp2p's ``PeerScorer``: one pending IGNORE verdict for (forwarder, topic) cancels the
    invalid-message count that libp2p records right after the validator returns ``False``.
    Which message of a (peer, topic) pair cancels which does not matter: only the count is kept."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._pending: defaultdict[tuple[Any, str], int] = defaultdict(int)

    def expect_ignore(self, peer: Any, topic: str) -> None:
        self._pending[(peer, topic)] += 1

    def on_invalid_message(self, peer: Any, topic: str) -> None:
        key = (peer, topic)
        if self._pending.get(key, 0) > 0:
            self._pending[key] -= 1
            if not self._pending[key]:
                del self._pending[key]
            return
        self._inner.on_invalid_message(peer, topic)

    def remove_peer(self, peer: Any) -> None:
        for key in [k for k in self._pending if k[0] == peer]:
            del self._pending[key]
        self._inner.remove_peer(peer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _IgnoreAwareValidationCache:
    """Wraps libp2p's ``ValidationCache`` so an IGNOREd message is not cached as invalid (its next
    copy, from another forwarder, is validated again rather than counted against that peer)."""

    _MAX_PENDING = 10_000

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._skip: set[bytes] = set()

    def skip_failure(self, msg_id: bytes) -> None:
        if len(self._skip) >= self._MAX_PENDING:
            self._skip.clear()
        self._skip.add(msg_id)

    def put(self, msg_id: bytes, result: Any) -> None:
        if not result.is_valid and msg_id in self._skip:
            self._skip.discard(msg_id)
            return
        self._inner.put(msg_id, result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _ConnectionEvents:
    """A libp2p notifee (the six ``INotifee`` methods, duck-typed). These run on the connection's
    own path: they record and start tasks, never dial or wait."""

    def __init__(self, owner: Libp2pHost) -> None:
        self._owner = owner

    async def connected(self, network: Any, conn: Any) -> None:
        self._owner._on_connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._owner._on_disconnected(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, maddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, maddr: Any) -> None:
        return None


def _check_ports_free(addrs: Sequence[Any]) -> None:
    """Bind each fixed TCP listen port once without ``SO_REUSEPORT``: that fails if any socket
    (a libp2p listener of another process included) holds it."""
    for addr in addrs:
        parts = str(addr).split("/")
        if "tcp" not in parts or parts[1] not in ("ip4", "ip6"):
            continue
        port = int(parts[parts.index("tcp") + 1])
        if port == 0:
            continue
        family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                sock.bind((parts[2], port))
            except OSError as e:
                raise api.P2PError(f"cannot listen on {addr}: {e.strerror}") from e


async def _no_auto_connect() -> None:
    return None


def _quiet_libp2p_logging() -> None:
    # "Failed to read DHT message from stream" and friends, at WARNING, on every closed stream.
    logging.getLogger("libp2p.kad_dht").setLevel(logging.ERROR)
    # "Failed to open TCP stream", at ERROR, on every failed dial: we report dials ourselves.
    logging.getLogger("libp2p.transport.tcp").setLevel(logging.CRITICAL)


def _parse_multiaddr(text: str) -> Any:
    try:
        return multiaddr.Multiaddr(text)
    except (ValueError, LookupError) as e:
        raise ValueError(f"{text!r} is not a multiaddr: {e}") from e


def _parse_peer_addr(text: str) -> Any:
    try:
        return info_from_p2p_addr(_parse_multiaddr(text))
    except (ValueError, LookupError) as e:
        raise ValueError(f"{text!r} is not a peer address (…/p2p/<peer id>): {e}") from e


def peer_id_text(peer: api.PeerId) -> str:
    """The usual base58 form of a peer id (``16Uiu2…`` for secp256k1 keys), for logs and UIs."""
    return str(ID(peer).to_base58())


def _pid(peer: api.PeerId) -> Any:
    return ID(bytes(peer))


def _peer(pid: Any) -> api.PeerId:
    return api.PeerId(bytes(pid.to_bytes()))


def _short(pid: Any) -> str:
    text = str(pid)
    return text[-8:]


def _content_multihash(key: bytes) -> bytes:
    """The DHT key of a content key: the multihash of the binary CID (as kubo keys providers)."""
    api.check_content_key(key)
    try:
        cid = CID.decode(key)
    except Exception as e:  # multiformats raises several unrelated types
        raise api.InvalidContentKey(f"not a binary CID: {e}") from e
    if bytes(cid) != key:
        raise api.InvalidContentKey("not the canonical binary form of its CID")
    return bytes(cid.digest)


# Receivers' ADD_PROVIDER limit per sender and 10 s window (py-libp2p's default is 10).
_PROVIDER_RATE_MAX = 100
_PROVIDER_LOOKUP_ROUNDS = 3
_PROVIDER_LOOKUP_WIDTH = 10


@dataclass(slots=True)
class _Announcement:
    key: bytes  # the content key (binary CID)
    last_ok: float | None = None  # when an announcement last reached at least one peer


RawStreamHandler = Callable[[api.PeerId, "RawStream"], Awaitable[None]]


class RawStream:
    """A bare libp2p stream, trio-style: ``send_all``, ``receive_some`` (b"" at the end of the
    stream), ``close`` (ends our side; the peer reads b""), ``reset``. libp2p's errors become
    ``PeerUnreachable`` (connection gone) or ``RequestFailed``."""

    def __init__(self, owner: Libp2pHost, stream: Any) -> None:
        self._owner = owner
        self._stream = stream
        self._pid = stream.muxed_conn.peer_id

    @property
    def peer(self) -> api.PeerId:
        return _peer(self._pid)

    def _error(self, e: BaseException) -> api.P2PError:
        if not self._owner._connected(self._pid):
            return api.PeerUnreachable(f"lost the connection to {_short(self._pid)}")
        return api.RequestFailed(f"stream to {_short(self._pid)} failed: {e!r}")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.write(data if type(data) is bytes else bytes(data))
        except BaseLibp2pError as e:
            raise self._error(e) from e

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return bytes(await self._stream.read(max_bytes))
        except StreamEOF:
            return b""
        except BaseLibp2pError as e:
            raise self._error(e) from e

    async def close(self) -> None:
        await _close(self._stream)

    async def reset(self) -> None:
        await _reset(self._stream)


class Libp2pHost:
    """One node on a libp2p network. Build it, then ``await nursery.start(host.run)`` (which
    returns the listen addresses, each ending in ``/p2p/<peer id>``); cancel to stop. An instance
    runs once; to restart, build a new one with the same key."""

    def __init__(
        self,
        identity_key: bytes,
        listen_addrs: Sequence[str],
        bootstrap_addrs: Sequence[str] = (),
        settings: Libp2pSettings | None = None,
    ) -> None:
        if not is_valid_secret(identity_key):
            raise ValueError("identity_key must be a 32-byte secp256k1 secret")
        self._settings = settings or Libp2pSettings()
        self._key_pair: Any = create_new_key_pair(identity_key)
        self._id: Any = ID.from_pubkey(self._key_pair.public_key)
        self._listen: list[Any] = [_parse_multiaddr(a) for a in listen_addrs]
        self._bootstrap: dict[Any, list[Any]] = {}
        for text in bootstrap_addrs:
            info = _parse_peer_addr(text)
            if info.peer_id != self._id:  # a shared bootstrap list may name this node too
                self._bootstrap.setdefault(info.peer_id, []).extend(info.addrs)

        self._validators: dict[str, api.TopicValidator] = {}
        self._handlers: dict[str, api.RequestHandler] = {}
        self._raw_handlers: dict[str, RawStreamHandler] = {}
        self._announcements: dict[bytes, _Announcement] = {}  # multihash -> state
        self._idle_streams: dict[tuple[Any, str], list[tuple[Any, float]]] = {}
        self._announce_lock = trio.Lock()
        self._last_announce = float("-inf")
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[api.GossipMessage](
            self._settings.inbox_size
        )
        self._accepted_from = _Lru(8192)  # msg id -> forwarder, from validator to delivery
        self._delivered = _Lru(8192)  # msg ids already handed to next_message
        self._penalties: dict[Any, tuple[float, float]] = {}  # pid -> (points, at time)
        self._banned_until: dict[Any, float] = {}
        self._reconnecting: set[Any] = set()
        self._redial_delay: dict[Any, float] = {}  # bootstrap pid -> wait before the next dial
        self._connected_since: dict[Any, float] = {}
        self.dropped_messages = 0  # accepted gossip lost because the inbox was full

        self._started = False
        self._stopping = False
        self._running = False
        self._host: Any = None
        self._pubsub: Any = None
        self._dht: Any = None
        self._scorer: _IgnoreAwareScorer | None = None
        self._vcache: _IgnoreAwareValidationCache | None = None
        self._nursery: trio.Nursery | None = None
        self._listen_addrs: tuple[str, ...] = ()

    # --- identity and state -------------------------------------------------------------------

    @property
    def peer_id(self) -> api.PeerId:
        return _peer(self._id)

    @property
    def listen_addrs(self) -> tuple[str, ...]:
        """The addresses peers can dial (with ``/p2p/<peer id>``), once running."""
        return self._listen_addrs

    def is_connected(self, peer: api.PeerId) -> bool:
        return self._connected(_pid(peer))

    def _connected(self, pid: Any) -> bool:
        host = self._host
        return host is not None and bool(host.get_network().get_connections(pid))

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, ...]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self._started:
            raise RuntimeError("a Libp2pHost runs once; build a new one to restart")
        self._started = True
        _quiet_libp2p_logging()
        _check_ports_free(self._listen)
        # libp2p's own tasks run under a shielded scope: if our caller's cancellation reached them,
        # the swarm would start closing connections under cancellation and leave their sockets
        # open (observed). Instead we close the host gracefully first, then cancel that scope.
        stack_scope = trio.CancelScope(shield=True)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    addrs = await nursery.start(self._run_stack, stack_scope)
                    task_status.started(addrs)
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._shut_down(stack_scope)
        finally:
            self._stopping = True
            self._running = False

    async def _shut_down(self, stack_scope: trio.CancelScope) -> None:
        self._stopping = True
        self._running = False
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()  # our loops first: no dial races the close
        if self._host is not None:
            with trio.move_on_after(_SHUTDOWN_GRACE_S) as grace:
                try:
                    await self._host.close()
                except (BaseLibp2pError, OSError) as e:
                    logger.warning("p2p host did not close cleanly: %r", e)
            if grace.cancelled_caught:
                logger.warning("p2p host took over %.0f s to close", _SHUTDOWN_GRACE_S)
        stack_scope.cancel()
        self._inbox_send.close()  # next_message: the rest of the inbox, then HostStopped

    async def _run_stack(
        self, stack_scope: trio.CancelScope, *, task_status: trio.TaskStatus[tuple[str, ...]]
    ) -> None:
        """Build and run libp2p (host, pubsub, gossipsub, DHT) until ``stack_scope`` is cancelled."""
        s = self._settings
        host: Any = new_host(key_pair=self._key_pair, listen_addrs=self._listen)
        gossip_options: dict[str, Any] = {
            "degree": 6,
            "degree_low": 4,
            "degree_high": 12,
            "heartbeat_interval": s.heartbeat_s,  # annotated int, used as a float by trio.sleep
            "score_params": self._score_params(),
            "adaptive_gossip_enabled": False,
            "max_messages_per_topic_per_second": s.max_messages_per_topic_per_second,
        }
        gossipsub: Any = GossipSub([PROTOCOL_ID_V12, PROTOCOL_ID_V11], **gossip_options)
        scorer = _IgnoreAwareScorer(gossipsub.scorer)
        gossipsub.scorer = scorer
        pubsub: Any = Pubsub(
            host,
            gossipsub,
            max_inbound_rpc_size=api.MAX_GOSSIP_BYTES,
            validation_timeout=s.validation_timeout_s,
        )
        vcache = _IgnoreAwareValidationCache(pubsub.validation_cache)
        pubsub.validation_cache = vcache
        dht: Any = KadDHT(host, DHTMode.SERVER)
        dht._provider_rate_max = max(dht._provider_rate_max, _PROVIDER_RATE_MAX)
        network: Any = host.get_network()
        # libp2p's auto-connector dials every peer in the peerstore (banned ones too) until it has
        # 200 connections; our discovery loop and bootstrap redials decide whom to dial instead.
        network.auto_connector.maybe_connect = _no_auto_connect
        network.register_notifee(_ConnectionEvents(self))
        host.set_stream_handler(TProtocol(api.PROTOCOL_PING), self._serve_ping)
        for protocol in self._handlers:
            self._install_handler(host, protocol)
        for protocol in self._raw_handlers:
            self._install_raw_handler(host, protocol)

        with stack_scope:
            async with (
                host.run(listen_addrs=self._listen),
                background_trio_service(pubsub),
                background_trio_service(gossipsub),
                background_trio_service(dht),
                trio.open_nursery() as stack_nursery,
            ):
                await pubsub.wait_until_ready()
                self._host, self._pubsub, self._dht = host, pubsub, dht
                self._scorer, self._vcache = scorer, vcache
                # Our own tasks live in a nursery of their own, cancelled before host.close().
                self._nursery = await stack_nursery.start(self._own_tasks)
                self._running = not self._stopping
                for topic in list(self._validators):
                    await self._join(topic)
                for pid in self._bootstrap:
                    self._start_reconnect(pid)
                self._spawn(self._ping_loop)
                self._spawn(self._discovery_loop)
                self._spawn(self._reprovide_loop)
                self._listen_addrs = tuple(str(a) for a in host.get_addrs())
                logger.info("p2p host %s listening on %s", self._id, self._listen_addrs)
                task_status.started(self._listen_addrs)
                await trio.sleep_forever()

    @staticmethod
    async def _own_tasks(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await trio.sleep_forever()

    def _score_params(self) -> Any:
        s = self._settings
        decay = 0.5 ** (s.heartbeat_s / s.penalty_half_life_s)  # the scorer decays per heartbeat
        return ScoreParams(
            p4_invalid_messages=TopicScoreParams(
                weight=s.invalid_message_weight, cap=1000.0, decay=decay
            ),
            publish_threshold=s.publish_threshold,
            gossip_threshold=s.publish_threshold,
            graylist_threshold=s.graylist_threshold,
        )

    def _require_running(self) -> None:
        if not self._running or self._stopping:
            raise api.HostStopped("the p2p host is not running")

    def _spawn(self, fn: Any, *args: Any) -> bool:
        nursery = self._nursery
        if nursery is None or self._stopping:
            return False
        try:
            nursery.start_soon(fn, *args)
        except RuntimeError:  # the nursery is closing
            return False
        return True

    # --- gossip -------------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > MAX_GOSSIP_DATA:
            raise api.MessageTooLarge(
                f"gossip message of {len(data)} bytes exceeds {MAX_GOSSIP_DATA}"
            )
        self._require_running()
        try:
            await self._pubsub.publish(topic, bytes(data))
        except BaseLibp2pError as e:
            raise api.P2PError(f"publish on {topic}: {e}") from e

    async def subscribe(self, topic: str, validator: api.TopicValidator) -> None:
        joined = topic in self._validators
        self._validators[topic] = validator
        if self._running and not joined:
            await self._join(topic)

    async def next_message(self) -> api.GossipMessage:
        try:
            return await self._inbox_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise api.HostStopped("the p2p host has stopped") from None

    async def _join(self, topic: str) -> None:
        async def validate(forwarder: Any, msg: Any) -> bool:
            return await self._validate(topic, forwarder, msg)

        self._pubsub.set_topic_validator(topic, validate, True)
        subscription = await self._pubsub.subscribe(topic)
        self._spawn(self._deliver, topic, subscription)

    async def _validate(self, topic: str, forwarder: Any, msg: Any) -> bool:
        if forwarder == self._id:  # our own publish: we made it, it is valid
            return True
        msg_id: bytes = self._pubsub.get_message_id(msg)
        if msg_id in self._accepted_from:  # a concurrent copy already passed
            return True
        verdict = await self._verdict(topic, forwarder, msg)
        if verdict is api.Verdict.ACCEPT:
            self._accepted_from.put(msg_id, bytes(forwarder.to_bytes()))
            return True
        if verdict is api.Verdict.IGNORE and self._scorer is not None and self._vcache is not None:
            self._scorer.expect_ignore(forwarder, topic)
            self._vcache.skip_failure(msg_id)
        return False

    async def _verdict(self, topic: str, forwarder: Any, msg: Any) -> api.Verdict:
        if list(msg.topicIDs) != [topic] or len(msg.data) > api.MAX_GOSSIP_BYTES:
            return api.Verdict.REJECT  # we only ever publish single-topic, bounded messages
        validator = self._validators.get(topic)
        if validator is None:
            return api.Verdict.IGNORE
        gossip = api.GossipMessage(topic=topic, data=bytes(msg.data), sender=_peer(forwarder))
        # Stop before libp2p's own timeout, which would count against the forwarder: our
        # slowness is not the peer's fault.
        with trio.move_on_after(self._settings.validation_timeout_s * 0.8):
            try:
                return await validator(gossip)
            except Exception:
                logger.exception("gossip validator for %s failed; ignoring the message", topic)
                return api.Verdict.IGNORE
        logger.warning("gossip validator for %s timed out; ignoring the message", topic)
        return api.Verdict.IGNORE

    async def _deliver(self, topic: str, subscription: Any) -> None:
        own = bytes(self._id.to_bytes())
        while True:
            try:
                msg = await subscription.get()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            origin = bytes(msg.from_id)
            if origin == own:
                continue  # libp2p hands our own publishes back to us
            msg_id: bytes = self._pubsub.get_message_id(msg)
            if msg_id in self._delivered:
                continue
            self._delivered.put(msg_id)
            sender = self._accepted_from.pop(msg_id, origin)
            message = api.GossipMessage(
                topic=topic, data=bytes(msg.data), sender=api.PeerId(sender)
            )
            try:
                self._inbox_send.send_nowait(message)
            except trio.WouldBlock:
                self.dropped_messages += 1
                if self.dropped_messages % 1000 == 1:
                    logger.warning("gossip inbox full: %d messages dropped", self.dropped_messages)

    # --- request / response --------------------------------------------------------------------

    def set_handler(self, protocol: str, handler: api.RequestHandler) -> None:
        if protocol == api.PROTOCOL_PING:
            raise ValueError(f"{protocol} is served by the host itself")
        if protocol in self._raw_handlers:
            raise ValueError(f"{protocol} is already served on raw streams")
        self._handlers[protocol] = handler
        if self._host is not None:
            self._install_handler(self._host, protocol)

    def _install_handler(self, host: Any, protocol: str) -> None:
        async def serve(stream: Any) -> None:
            await self._serve(protocol, stream)

        host.set_stream_handler(TProtocol(protocol), serve)

    async def _serve(self, protocol: str, stream: Any) -> None:
        """Answer the requests of one stream in turn, until it ends or stays idle."""
        pid = stream.muxed_conn.peer_id
        io = ReadWriteAdapter(stream, eof_errors=(StreamEOF,))
        s = self._settings
        wait = s.handler_timeout_s  # for the first request; then serve_idle_stream_s
        try:
            while True:
                if self._is_banned(pid):  # its connection is being closed; answer nothing
                    await _reset(stream)
                    return
                with trio.move_on_after(wait) as idle:
                    request = await read_message(io, max_bytes=api.MAX_REQUEST_BYTES)
                if idle.cancelled_caught or request is None:  # no (further) request
                    await _close(stream)
                    return
                with trio.move_on_after(s.handler_timeout_s) as scope:
                    status, body = await self._answer(protocol, pid, request)
                    await write_frame(io, status)
                    await write_message(io, body)
                if scope.cancelled_caught:
                    logger.debug("%s request from %s timed out", protocol, _short(pid))
                    await _reset(stream)
                    return
                wait = s.serve_idle_stream_s
        except (BaseLibp2pError, FrameError) as e:
            logger.debug("%s stream from %s failed: %r", protocol, _short(pid), e)
            await _reset(stream)

    async def _answer(self, protocol: str, pid: Any, request: bytes) -> tuple[bytes, bytes]:
        handler = self._handlers[protocol]
        try:
            response = await handler(_peer(pid), request)
        except NeuroSeedError as e:
            logger.debug("%s handler refused %s: %r", protocol, _short(pid), e)
            return _STATUS_ERROR, f"{type(e).__name__}: {e}".encode()[:_MAX_ERROR_TEXT]
        except Exception:
            logger.exception("%s handler failed on a request from %s", protocol, _short(pid))
            return _STATUS_ERROR, b"internal error"
        if len(response) > api.MAX_RESPONSE_BYTES:
            logger.error("%s handler answered %d bytes; over the limit", protocol, len(response))
            return _STATUS_ERROR, b"response too large"
        return _STATUS_OK, bytes(response)

    async def _serve_ping(self, stream: Any) -> None:
        io = ReadWriteAdapter(stream, eof_errors=(StreamEOF,))
        try:
            with trio.move_on_after(self._settings.ping_timeout_s):
                nonce = await read_message(io, max_bytes=64)
                if nonce is not None:
                    await write_frame(io, _STATUS_OK)
                    await write_message(io, nonce)
                await _close(stream)
                return
            await _reset(stream)
        except (BaseLibp2pError, FrameError):
            await _reset(stream)

    async def request(
        self, peer: api.PeerId, protocol: str, payload: bytes, *, timeout_s: float = 10.0
    ) -> bytes:
        """One exchange, on an idle stream of an earlier one or a new stream. Dials the peer
        first if it is not connected but its address is known (peerstore or DHT).
        ``PeerUnreachable``: no connection could be made, or it broke meanwhile;
        ``RequestTimeout``; ``RequestFailed``: the peer answered with an error, does not serve
        ``protocol``, or broke the framing."""
        if len(payload) > api.MAX_REQUEST_BYTES:
            raise api.MessageTooLarge(
                f"request of {len(payload)} bytes exceeds {api.MAX_REQUEST_BYTES}"
            )
        self._require_running()
        pid = _pid(peer)
        if pid == self._id:
            raise api.RequestFailed("cannot send a request to ourselves")
        with trio.move_on_after(timeout_s):
            while True:
                stream = self._take_idle_stream(pid, protocol)
                reused = stream is not None
                if stream is None:
                    stream = await self._open_stream(pid, protocol)
                try:
                    status, body = await self._exchange(stream, payload)
                except (BaseLibp2pError, FrameError) as e:
                    await _reset(stream)
                    if reused and self._connected(pid):
                        continue  # closed by the server while idle: ask on a new stream
                    if not self._connected(pid):
                        raise api.PeerUnreachable(f"lost the connection to {_short(pid)}") from e
                    raise api.RequestFailed(f"{_short(pid)} {protocol}: {e!r}") from e
                except BaseException:
                    await _reset(stream)
                    raise
                if not self._keep_idle_stream(pid, protocol, stream):
                    await _close(stream)
                if status == _STATUS_OK:
                    return body
                text = body.decode("utf-8", "replace")
                raise api.RequestFailed(f"{_short(pid)} {protocol}: remote error: {text}")
        if not self._connected(pid):
            raise api.PeerUnreachable(f"cannot reach {_short(pid)} within {timeout_s} s")
        raise api.RequestTimeout(f"{_short(pid)} {protocol}: no response within {timeout_s} s")

    def _take_idle_stream(self, pid: Any, protocol: str) -> Any:
        """The most recently used idle stream to ``pid`` for ``protocol``, if one is fresh."""
        entries = self._idle_streams.get((pid, protocol))
        oldest = trio.current_time() - self._settings.idle_stream_s
        while entries:
            stream, since = entries.pop()
            if since >= oldest:
                return stream
            self._spawn(_close, stream)
        return None

    def _keep_idle_stream(self, pid: Any, protocol: str, stream: Any) -> bool:
        s = self._settings
        if not s.reuse_streams or protocol == api.PROTOCOL_PING or self._stopping:
            return False
        entries = self._idle_streams.setdefault((pid, protocol), [])
        if len(entries) >= s.max_idle_streams:
            return False
        entries.append((stream, trio.current_time()))
        return True

    def _sweep_idle_streams(self) -> None:
        """Close idle streams past ``idle_stream_s`` and forget those of gone peers."""
        oldest = trio.current_time() - self._settings.idle_stream_s
        for key, entries in list(self._idle_streams.items()):
            keep = []
            for stream, since in entries:
                if since >= oldest and self._connected(key[0]):
                    keep.append((stream, since))
                else:
                    self._spawn(_close, stream)
            if keep:
                self._idle_streams[key] = keep
            else:
                del self._idle_streams[key]

    @staticmethod
    async def _exchange(stream: Any, payload: bytes) -> tuple[bytes, bytes]:
        io = ReadWriteAdapter(stream, eof_errors=(StreamEOF,))
        await write_message(io, payload, max_bytes=api.MAX_REQUEST_BYTES)
        status = await read_frame(io, max_bytes=1)
        body = await read_message(io, max_bytes=api.MAX_RESPONSE_BYTES)
        if status not in (_STATUS_OK, _STATUS_ERROR) or body is None:
            raise FrameError(f"bad response (status {status!r})")
        return status, body

    async def _open_stream(self, pid: Any, protocol: str) -> Any:
        if not self._connected(pid) and not await self._dial(pid):
            raise api.PeerUnreachable(f"cannot connect to {_short(pid)}")
        try:
            return await self._host.new_stream(pid, [TProtocol(protocol)])
        except StreamFailure as e:  # protocol negotiation failed: the peer does not serve it
            raise api.RequestFailed(f"{_short(pid)} does not serve {protocol}") from e
        except (BaseLibp2pError, OSError) as e:  # no usable connection
            raise api.PeerUnreachable(f"no stream to {_short(pid)}: {e!r}") from e

    # --- raw streams ----------------------------------------------------------------------------

    def set_raw_handler(self, protocol: str, handler: RawStreamHandler) -> None:
        """Serve ``protocol`` with ``handler(peer, stream)`` on bare streams (no framing). The
        stream is closed when the handler returns and reset when it raises; a handler's
        ``P2PError`` is the peer's doing (logged at debug), any other exception is a bug."""
        if protocol == api.PROTOCOL_PING or protocol in self._handlers:
            raise ValueError(f"{protocol} is already served as request/response")
        self._raw_handlers[protocol] = handler
        if self._host is not None:
            self._install_raw_handler(self._host, protocol)

    def _install_raw_handler(self, host: Any, protocol: str) -> None:
        async def serve(stream: Any) -> None:
            await self._serve_raw(protocol, stream)

        host.set_stream_handler(TProtocol(protocol), serve)

    async def _serve_raw(self, protocol: str, stream: Any) -> None:
        pid = stream.muxed_conn.peer_id
        if self._is_banned(pid):
            await _reset(stream)
            return
        try:
            await self._raw_handlers[protocol](_peer(pid), RawStream(self, stream))
        except (api.P2PError, BaseLibp2pError) as e:
            logger.debug("%s raw stream from %s failed: %r", protocol, _short(pid), e)
            await _reset(stream)
        except Exception:
            logger.exception("%s raw handler failed on a stream from %s", protocol, _short(pid))
            await _reset(stream)
        else:
            await _close(stream)

    async def open_raw_stream(
        self, peer: api.PeerId, protocol: str, *, timeout_s: float = 10.0
    ) -> RawStream:
        """A new bare stream to ``peer`` for ``protocol`` (dialling it first if needed); the
        caller closes or resets it. ``PeerUnreachable``, ``RequestFailed`` (protocol not
        served) or ``RequestTimeout``."""
        self._require_running()
        pid = _pid(peer)
        if pid == self._id:
            raise api.RequestFailed("cannot open a stream to ourselves")
        with trio.move_on_after(timeout_s):
            return RawStream(self, await self._open_stream(pid, protocol))
        raise api.RequestTimeout(f"no {protocol} stream to {_short(pid)} within {timeout_s} s")

    # --- content routing ------------------------------------------------------------------------

    async def provide(self, key: bytes) -> None:
        mh = _content_multihash(key)
        self._require_running()
        self._announcements.setdefault(mh, _Announcement(key))
        await self._announce(mh)

    async def find_providers(
        self, key: bytes, limit: int = api.DEFAULT_PROVIDER_LIMIT
    ) -> list[api.PeerId]:
        mh = _content_multihash(key)
        self._require_running()
        store = self._dht.provider_store
        found: dict[Any, Any] = {}  # pid -> PeerInfo, in discovery order

        def add(infos: Iterable[Any]) -> None:
            for info in infos:
                if info.peer_id != self._id and not self._is_banned(info.peer_id):
                    found.setdefault(info.peer_id, info)

        add(store.get_providers(mh))
        if len(found) < limit:
            with trio.move_on_after(self._settings.find_providers_timeout_s):
                await self._lookup_providers(mh, limit, add)
        peerstore = self._host.get_peerstore()
        for pid, info in found.items():
            if info.addrs:
                peerstore.add_addrs(pid, info.addrs, 3600)
        return [_peer(pid) for pid in list(found)[: max(0, limit)]]

    async def _lookup_providers(
        self, mh: bytes, limit: int, add: Callable[[Iterable[Any]], None]
    ) -> None:
        """Ask the peers closest to ``mh`` and the connected ones for provider records, then the
        closer peers they name, for a few rounds (py-libp2p's own lookup stops at local records)."""
        store = self._dht.provider_store
        queried: set[Any] = {self._id}
        try:
            closest = list(await self._dht.peer_routing.find_closest_peers_network(mh))
        except (BaseLibp2pError, OSError) as e:
            logger.debug("closest-peer lookup failed: %r", e)
            closest = []
        candidates = list(dict.fromkeys([*closest, *self._host.get_connected_peers()]))
        before = -1
        for _ in range(_PROVIDER_LOOKUP_ROUNDS):
            batch = [p for p in candidates if p not in queried][:_PROVIDER_LOOKUP_WIDTH]
            if not batch:
                return
            queried.update(batch)
            closer: list[Any] = []

            async def ask(pid: Any, closer: list[Any] = closer) -> None:
                with trio.move_on_after(self._settings.provider_query_timeout_s):
                    providers, nearer = await store._get_providers_from_peer_with_closers(pid, mh)
                    add(providers)
                    closer.extend(nearer)

            async with trio.open_nursery() as nursery:
                for pid in batch:
                    nursery.start_soon(ask, pid)
            candidates = [*candidates, *(p for p in closer if p not in candidates)]
            count = len(store.get_providers(mh))
            if count == before:
                return
            before = count

    async def _announce(self, mh: bytes) -> None:
        """One paced ADD_PROVIDER round for ``mh``; records success for the re-announce loop."""
        s = self._settings
        async with self._announce_lock:
            wait = self._last_announce + s.provide_interval_s - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            self._last_announce = trio.current_time()
            ok = False
            with trio.move_on_after(s.provide_timeout_s):
                try:
                    ok = bool(await self._dht.provider_store.provide(mh))
                except (BaseLibp2pError, OSError) as e:
                    logger.debug("announcing %s failed: %r", mh.hex(), e)
        state = self._announcements.get(mh)
        if ok and state is not None:
            state.last_ok = trio.current_time()
        elif not ok:
            logger.debug("announcement of %s reached no peer yet; will retry", mh.hex())

    def announced(self, key: bytes) -> bool:
        """Whether an announcement of ``key`` has reached at least one peer."""
        state = self._announcements.get(_content_multihash(key))
        return state is not None and state.last_ok is not None

    async def _reprovide_loop(self) -> None:
        s = self._settings
        while True:
            await trio.sleep(s.reprovide_check_s)
            now = trio.current_time()
            for mh, state in list(self._announcements.items()):
                if state.last_ok is None or now - state.last_ok >= s.reprovide_s:
                    await self._announce(mh)

    # --- connections ----------------------------------------------------------------------------

    async def connect(self, addr: str) -> api.PeerId:
        """Dial ``addr`` (which must end in ``/p2p/<peer id>``); raises ``PeerUnreachable``."""
        self._require_running()
        info = _parse_peer_addr(addr)
        self._host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
        if not await self._dial(info.peer_id):
            raise api.PeerUnreachable(f"cannot connect to {addr}")
        return _peer(info.peer_id)

    async def _dial(self, pid: Any, addrs: Iterable[Any] = ()) -> bool:
        """One deliberate dial (lifting libp2p's 60 s block on failed peers first)."""
        if self._is_banned(pid) or self._host is None:
            return False
        if self._connected(pid):
            return True
        host = self._host
        addrs = list(addrs)
        with trio.move_on_after(self._settings.dial_timeout_s):
            try:
                if not addrs and not self._known_addrs(pid):
                    found = await self._dht.find_peer(pid)
                    addrs = list(found.addrs) if found is not None else []
                    if not addrs:
                        return False
                host.get_network().unblock_peer(pid)
                await host.connect(Libp2pPeerInfo(pid, addrs))
                return True
            except (BaseLibp2pError, OSError) as e:
                logger.debug("dial %s failed: %r", _short(pid), e)
        return False

    def _known_addrs(self, pid: Any) -> list[Any]:
        try:
            return list(self._host.get_peerstore().addrs(pid))
        except PeerStoreError:
            return []

    def _on_connected(self, pid: Any) -> None:
        self._connected_since.setdefault(pid, trio.current_time())
        if self._is_banned(pid):
            self._spawn(self._disconnect, pid)

    def _on_disconnected(self, pid: Any) -> None:
        if self._connected(pid):
            return  # another connection to it remains
        for key in [k for k in self._idle_streams if k[0] == pid]:
            del self._idle_streams[key]  # their streams died with the connection
        since = self._connected_since.pop(pid, None)
        if pid in self._bootstrap:
            lasted = trio.current_time() - since if since is not None else 0.0
            if lasted >= self._settings.stable_connection_s:
                self._redial_delay.pop(pid, None)
            self._start_reconnect(pid)

    def _start_reconnect(self, pid: Any) -> None:
        if pid not in self._reconnecting and self._spawn(self._reconnect, pid):
            self._reconnecting.add(pid)

    async def _reconnect(self, pid: Any) -> None:
        """Dial a bootstrap peer until connected: at once after a stable connection dropped,
        else after a growing, jittered delay."""
        s = self._settings
        failures = 0
        try:
            while not self._connected(pid):
                banned_for = self._banned_until.get(pid, 0.0) - trio.current_time()
                if banned_for > 0:
                    await trio.sleep(banned_for)
                    continue
                delay = self._redial_delay.get(pid)
                if delay is not None:
                    await trio.sleep(delay * random.uniform(1.0, 1.25))
                self._redial_delay[pid] = min(
                    max(2 * (delay or 0.0), s.reconnect_initial_s), s.reconnect_max_s
                )
                if await self._dial(pid, self._bootstrap[pid]):
                    logger.info("connected to bootstrap peer %s", _short(pid))
                    await self._populate_routing_table(pid)
                    break
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.info(
                        "bootstrap peer %s unreachable (%d tries); retrying", _short(pid), failures
                    )
        finally:
            self._reconnecting.discard(pid)

    async def _populate_routing_table(self, via: Any) -> None:
        """Connecting alone does not fill Kademlia's table (libp2p-notes): add the peer, then
        look ourselves up through it, then dial what we learnt."""
        with trio.move_on_after(max(self._settings.dial_timeout_s, 10.0)):
            try:
                await self._dht.add_peer(via)
                await self._dht.refresh_routing_table()
            except (BaseLibp2pError, OSError) as e:
                logger.debug("routing table refresh via %s failed: %r", _short(via), e)
        await self._dial_known_peers()

    async def _discovery_loop(self) -> None:
        while True:
            await trio.sleep(self._settings.discovery_interval_s)
            if len(self._host.get_connected_peers()) >= self._settings.target_peers:
                continue
            with trio.move_on_after(max(self._settings.dial_timeout_s, 10.0)):
                try:
                    await self._dht.refresh_routing_table()
                except (BaseLibp2pError, OSError) as e:
                    logger.debug("routing table refresh failed: %r", e)
            await self._dial_known_peers()

    async def _dial_known_peers(self) -> None:
        connected = set(self._host.get_connected_peers())
        room = self._settings.target_peers - len(connected)
        candidates = [
            info
            for info in self._dht.routing_table.get_peer_infos()
            if info.peer_id not in connected
            and info.peer_id != self._id
            and not self._is_banned(info.peer_id)
        ]
        if room <= 0 or not candidates:
            return
        limiter = trio.CapacityLimiter(8)

        async def dial(info: Any) -> None:
            async with limiter:
                if await self._dial(info.peer_id, info.addrs):
                    logger.info("connected to discovered peer %s", _short(info.peer_id))

        async with trio.open_nursery() as nursery:
            for info in candidates[:room]:
                nursery.start_soon(dial, info)

    async def _ping_loop(self) -> None:
        while True:
            await trio.sleep(self._settings.ping_interval_s)
            self._sweep_idle_streams()
            async with trio.open_nursery() as nursery:
                for pid in self._host.get_connected_peers():
                    nursery.start_soon(self._ping, pid)
                    if self._misbehaviour(pid) >= self._settings.disconnect_threshold:
                        nursery.start_soon(self._ban, pid, "invalid gossip")

    async def _ping(self, pid: Any) -> None:
        if not self._connected(pid):  # gone meanwhile: request() would dial it again
            return
        nonce = secrets.token_bytes(8)
        try:
            reply = await self.request(
                _peer(pid), api.PROTOCOL_PING, nonce, timeout_s=self._settings.ping_timeout_s
            )
        except api.P2PError as e:
            reply = b""
            logger.info("peer %s failed a ping (%s); closing its connection", _short(pid), e)
        if reply != nonce:
            await self._disconnect(pid)

    async def _disconnect(self, pid: Any) -> None:
        host = self._host
        if host is None:
            return
        with trio.move_on_after(self._settings.dial_timeout_s):
            try:
                await host.get_network().close_peer(pid)
            except (BaseLibp2pError, OSError) as e:
                logger.debug("closing %s failed: %r", _short(pid), e)

    # --- peers and scores -----------------------------------------------------------------------

    def topic_peers(self, topic: str) -> list[api.PeerId]:
        """Peers known to be subscribed to ``topic`` (gossip reaches them once the mesh forms)."""
        if self._pubsub is None:
            return []
        return [_peer(pid) for pid in self._pubsub.peer_topics.get(topic, ())]

    def misbehaviour(self, peer: api.PeerId) -> float:
        """Penalty points of ``peer`` (decaying): ``penalize`` reports plus REJECTed gossip it
        forwarded; at ``disconnect_threshold`` it is disconnected and banned for ``ban_s``."""
        return self._misbehaviour(_pid(peer))

    def peers(self) -> list[api.PeerInfo]:
        host = self._host
        if host is None:
            return [api.PeerInfo(_peer(pid), (), False) for pid in self._bootstrap]
        known = dict.fromkeys(
            [*host.get_connected_peers(), *self._bootstrap, *self._dht.routing_table.get_peer_ids()]
        )
        result = []
        for pid in known:
            if pid == self._id:
                continue
            addrs = tuple(str(a) for a in self._known_addrs(pid))
            result.append(api.PeerInfo(_peer(pid), addrs, self._connected(pid)))
        return result

    async def penalize(self, peer: api.PeerId, reason: str) -> None:
        pid = _pid(peer)
        s = self._settings
        points = self._ledger(pid) + s.penalty_per_report
        self._penalties[pid] = (points, trio.current_time())
        logger.info("peer %s penalized (%s): %.0f points", _short(pid), reason, points)
        if self._misbehaviour(pid) >= s.disconnect_threshold:
            await self._ban(pid, reason)

    def _ledger(self, pid: Any) -> float:
        points, at = self._penalties.get(pid, (0.0, 0.0))
        if not points:
            return 0.0
        elapsed = trio.current_time() - at
        return float(points * 0.5 ** (elapsed / self._settings.penalty_half_life_s))

    def _misbehaviour(self, pid: Any) -> float:
        """App penalties plus the gossip scorer's invalid-message debt, in points."""
        gossip = 0.0
        if self._scorer is not None and self._validators:
            gossip = float(self._scorer.score(pid, list(self._validators)))
        return self._ledger(pid) + max(0.0, -gossip)

    def _is_banned(self, pid: Any) -> bool:
        until = self._banned_until.get(pid)
        if until is None:
            return False
        if trio.current_time() >= until:
            del self._banned_until[pid]
            self._penalties.pop(pid, None)
            return False
        return True

    async def _ban(self, pid: Any, reason: str) -> None:
        logger.warning(
            "disconnecting peer %s for %.0f s: %s", _short(pid), self._settings.ban_s, reason
        )
        self._banned_until[pid] = trio.current_time() + self._settings.ban_s
        if self._host is not None:  # forget where it is, so nothing dials it meanwhile
            self._host.get_peerstore().clear_addrs(pid)
            self._dht.routing_table.remove_peer(pid)
        await self._disconnect(pid)


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(BaseLibp2pError, OSError):
        await stream.reset()


async def _close(stream: Any) -> None:
    try:
        await stream.close()
    except (BaseLibp2pError, OSError):
        await _reset(stream)

"""The peer-to-peer interface the node uses (DESIGN §6); implemented by ``libp2p_host.Libp2pHost``
(py-libp2p, the only libp2p importer) and ``memory.MemoryNetwork`` (tests: drops, delays,
duplicates and reorders messages, and enforces the same size limits).

Two kinds of traffic:

* **Gossip** — best-effort publish/subscribe on topics named per chain id (``topic_name``).
  Every received message goes through the topic's validator **before** it is delivered or
  re-gossiped; the validator returns ``ACCEPT``, ``IGNORE`` (drop, no penalty: duplicates, stale
  heights) or ``REJECT`` (drop and score the forwarder down: undecodable, bad signature).
* **Request/response** — on raw streams with our own framing (4-byte big-endian length, frames
  ≤ ``MAX_FRAME_BYTES``): ``request(peer, protocol, payload)`` sends one request and reads one
  response; a handler registered with ``set_handler`` answers. Long responses are split by the
  protocol itself (ranges), never one huge frame.

Peers are identified by ``PeerId`` (the libp2p peer id bytes, or a name in memory).

Conventions every implementation keeps (``memory.MemoryNetwork`` is the reference):

* ``publish`` neither runs the local validator nor delivers to the local ``next_message``: the node
  feeds its own messages back itself. (py-libp2p runs a topic's validator on the host's own
  publishes too: the libp2p host must return ``ACCEPT`` there for messages from itself.)
* A message is identified by (origin, sequence number), as in gossipsub: a re-publish of the same
  bytes is a new message (periodic re-gossip must get through); a repeat of one message id is
  dropped before validation.
* Request and response payloads are single byte strings: a request ≤ ``MAX_REQUEST_BYTES``, a
  response ≤ ``MAX_RESPONSE_BYTES`` (sent as several frames by ``framing.write_message``).
  A handler's ``P2PError``/``NeuroSeedError`` reaches the requester as ``RequestFailed``; the wire
  messages of ``messages.py`` carry application errors as ``ErrorResponse`` instead.
* ``request`` raises ``PeerUnreachable`` when the peer is not connected (or the connection is
  reset while waiting), ``RequestTimeout`` after ``timeout_s``, ``RequestFailed`` otherwise.
* **Content routing** (DHT provider records): ``provide(key)`` announces that this node serves
  the content ``key`` (an artifact's binary root CID) and keeps announcing it (records expire);
  ``find_providers(key, limit)`` returns other peers that announced it (never this node), which
  may be offline or no longer hold it: callers try them and fall back on the others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import NewType, Protocol

from node.errors import NeuroSeedError

PeerId = NewType("PeerId", bytes)

# py-libp2p's gossipsub refuses inbound RPCs over 1 MiB; keep every gossip message well below.
MAX_GOSSIP_BYTES = 1 << 20
MAX_GOSSIP_PAYLOAD = 256 << 10  # tx batches, block parts: ≤ 256 KiB (DESIGN §6)
MAX_FRAME_BYTES = 1 << 20  # one request/response frame on a raw stream
MAX_REQUEST_BYTES = MAX_FRAME_BYTES  # a whole request
MAX_RESPONSE_BYTES = 64 << 20  # a whole response (several frames)

PROTOCOL_SYNC = "/neuroseed/sync/1"
PROTOCOL_CATCHUP = "/neuroseed/catchup/1"
PROTOCOL_CHUNKS = "/neuroseed/chunks/1"
PROTOCOL_PULL = "/neuroseed/pull/1"  # missing block parts and transactions by hash
PROTOCOL_PING = "/neuroseed/ping/1"

MAX_CONTENT_KEY_BYTES = 128  # a binary CID (an artifact's root) names the content
DEFAULT_PROVIDER_LIMIT = 20


class Topic(StrEnum):
    TXS = "txs"
    PROPOSALS = "proposals"
    VOTES = "votes"
    EVIDENCE = "evidence"


def topic_name(chain_id: int, topic: Topic) -> str:
    return f"/neuroseed/{chain_id}/{topic.value}/1"


class Verdict(Enum):
    ACCEPT = "accept"
    IGNORE = "ignore"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class GossipMessage:
    topic: str
    data: bytes
    sender: PeerId  # the peer that forwarded it to us (not necessarily the origin)


TopicValidator = Callable[[GossipMessage], Awaitable[Verdict]]
RequestHandler = Callable[[PeerId, bytes], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class PeerInfo:
    peer_id: PeerId
    addrs: tuple[str, ...]
    connected: bool


class P2PError(NeuroSeedError):
    """Base of the network layer's errors (translated from the transport's own)."""

    code = 2100
    reason = "network error"


class PeerUnreachable(P2PError):
    code = 2101
    reason = "peer unreachable"


class RequestFailed(P2PError):
    code = 2102
    reason = "request failed"


class RequestTimeout(RequestFailed):
    code = 2103
    reason = "request timed out"


class MessageTooLarge(P2PError):
    code = 2104
    reason = "message too large"


class HostStopped(P2PError):
    """The local host is stopped (crashed, or shut down)."""

    code = 2105
    reason = "host stopped"


class InvalidContentKey(P2PError):
    """A provider-record key that is not a binary CIDv1 of at most ``MAX_CONTENT_KEY_BYTES``."""

    code = 2169
    reason = "invalid content key"


def check_content_key(key: object) -> bytes:
    """``key`` if it is a plausible binary CID (bytes, 1..``MAX_CONTENT_KEY_BYTES``, CIDv1 prefix);
    ``InvalidContentKey`` otherwise. Implementations parse it further as they need."""
    if type(key) is not bytes:
        raise InvalidContentKey(f"a content key is bytes, not {type(key).__name__}")
    if not 0 < len(key) <= MAX_CONTENT_KEY_BYTES:
        raise InvalidContentKey(f"a content key is 1..{MAX_CONTENT_KEY_BYTES} bytes")
    if key[0] != 0x01:
        raise InvalidContentKey("a content key is a binary CIDv1 (first byte 0x01)")
    return key


class Network(Protocol):
    """One node's view of the network. All methods are called from the node's trio loop."""

    @property
    def peer_id(self) -> PeerId: ...

    async def publish(self, topic: str, data: bytes) -> None:
        """Gossip ``data``; raises ``MessageTooLarge`` above ``MAX_GOSSIP_BYTES``."""
        ...

    async def subscribe(self, topic: str, validator: TopicValidator) -> None:
        """Deliver accepted messages of ``topic`` to ``next_message``."""
        ...

    async def next_message(self) -> GossipMessage:
        """The next accepted gossip message, of any subscribed topic."""
        ...

    def set_handler(self, protocol: str, handler: RequestHandler) -> None: ...

    async def request(
        self, peer: PeerId, protocol: str, payload: bytes, *, timeout_s: float = 10.0
    ) -> bytes:
        """One request/response exchange; raises ``PeerUnreachable``, ``RequestTimeout`` or
        ``RequestFailed`` (and ``MessageTooLarge`` for a payload above ``MAX_REQUEST_BYTES``)."""
        ...

    def peers(self) -> list[PeerInfo]: ...

    async def penalize(self, peer: PeerId, reason: str) -> None:
        """Score ``peer`` down for bad data; disconnects it past the threshold."""
        ...

    async def provide(self, key: bytes) -> None:
        """Announce (and keep re-announcing) that this node provides the content ``key``, a
        binary CID; ``InvalidContentKey`` for anything else. Returns once announced (or, with no
        peer to tell yet, once recorded for the next announcement)."""
        ...

    async def find_providers(self, key: bytes, limit: int = DEFAULT_PROVIDER_LIMIT) -> list[PeerId]:
        """Up to ``limit`` other peers that announced ``key``, each once; [] when none is known."""
        ...

"""Artifact block exchange: ``/neuroseed/chunks/1`` (DESIGN §6, §7, §8).

An artifact is a UnixFS DAG (``node.storage.unixfs``): a root CID, dag-pb nodes, raw leaves of
1 MiB. Blocks travel by CID over the request/response framing of ``api.Network``.

**Wire.** A ``ChunkRequest`` (a canonical record, ``node.encoding``) names the artifact's root
CID, 1..``MAX_BLOCKS_PER_REQUEST`` distinct block CIDs (CIDv1, sha2-256, raw or dag-pb) and
optionally a signed ``AccessRequest``. The response has one entry per CID, in order: ``OK`` with
the block's bytes, or ``NOT_FOUND`` / ``DENIED`` with none; eight 1 MiB blocks keep it near
8 MiB. It is sent as ``u32 header length || ChunkResponseHeader || block bytes``: the header is a
canonical record of the statuses and sizes, then the blocks' bytes back to back, exactly as many
as the sizes add up to (one byte form per response). Carrying the blocks outside msgpack saves
the canonical-form check three passes over every byte (unpack, re-pack, compare: ~0.8 CPU s per
GiB). Everything is size-checked before decoding and strictly decoded.

**Serving** (``ChunkServer``). The server answers only for blocks it can place in the named
root's DAG, walking the dag-pb nodes it holds (an index per root, cached once complete): a
requester cannot reach a priced artifact's blocks by naming a free root. For each block it asks
``policy.authorize(peer, root, block_cid, access, leaf_index=...)``; ``access`` is the request's
``AccessRequest`` once ``verify_access`` accepted it (signature by the address it names, bound to
the requesting peer's id, not expired, for this root and chain), else None. An invalid access
request is treated as none (every block it was needed for is ``DENIED``). A malformed request is
refused (``MalformedChunkMessage``) and its sender penalized; more than ``max_per_peer``
requests of one peer at once are refused with ``ChunksBusy``.

**Access requests** (DESIGN §8): ``AccessTerms`` (chain id, root CID, the requester's account
address and libp2p peer id, grant id — the on-chain purchase, deal or task id —, expiry in unix
ms, nonce) signed with ``TAG_ACCESS`` by the account key (``crypto.PrivateKey.sign``, as
transactions are). The policy then checks the grant on chain for ``VerifiedAccess.address``.

**Fetching** (``ChunkFetcher.fetch``). Walks the DAG from the root: blocks already in the store
are read there (so a second fetch resumes where the first stopped), missing ones are queued,
dag-pb nodes first. With ``leaves``, only the nodes on the paths to those leaf indexes and the
leaves themselves are fetched. Providers work in parallel on one shared queue (work stealing:
a fast provider simply takes more), ``requests_per_provider`` requests in flight each and
``max_in_flight`` in all. Every block is verified against its CID in a worker thread (as a
view into the response: no copy); the blocks of one response that match are then stored with one
``BlobStore.put_many(..., verified=True)`` in that thread (no second hash, one synced index write
per response). A provider that sends a block that does not match its
CID, or an undecodable response, is penalized (``Network.penalize``) and dropped from the fetch;
its blocks are asked of the others. Timeouts and failed requests are retried after an
exponential backoff; after ``max_provider_failures`` in a row the provider is left out (no
penalty). Blocks every remaining provider refused (``NOT_FOUND``/``DENIED``) or that nobody is
left to ask end the fetch, once everything else is stored, with ``BlockUnavailable`` naming the
first of them (``.report`` says what was fetched). When the whole artifact is present the root
is pinned with all its blocks.

Leaf indexes count ``unixfs.CHUNK_SIZE`` leaves from the start of the file (leaf i holds bytes
``[i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE)``), as the format fixes it.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import trio
from multiformats import CID

from node import crypto
from node.encoding import Record, limit
from node.errors import DecodeError, InvalidSignature, NeuroSeedError
from node.p2p.api import (
    MAX_RESPONSE_BYTES,
    PROTOCOL_CHUNKS,
    Network,
    P2PError,
    PeerId,
)
from node.storage import unixfs
from node.storage.blobstore import BlobStore
from node.types import Address, ChainId, Hash32, Signature, TimestampMs

log = logging.getLogger(__name__)

TAG_ACCESS = b"NeuroSeed/access/v1"
"""Domain tag of access-request signatures (``crypto.signing_digest``)."""

MAX_CID_BYTES = 128
MAX_PEER_ID_BYTES = 128
MAX_BLOCK_BYTES = 1 << 20  # a raw leaf is at most one 1 MiB chunk; a dag-pb node ~10 KiB
MAX_BLOCKS_PER_REQUEST = 8  # so a response stays near 8 MiB
MAX_CHUNK_REQUEST_BYTES = 4 << 10
MAX_CHUNK_RESPONSE_BYTES = MAX_BLOCKS_PER_REQUEST * (MAX_BLOCK_BYTES + 16) + 64
MAX_ACCESS_LIFETIME_MS = 24 * 3600 * 1000  # an access request may not be valid for longer

assert MAX_CHUNK_RESPONSE_BYTES <= MAX_RESPONSE_BYTES


def now_ms() -> int:
    """Unix time in milliseconds (the clock access requests expire by)."""
    return time.time_ns() // 1_000_000


# --- errors ------------------------------------------------------------------------------------


class ChunkError(P2PError):
    code = 2150
    reason = "artifact block exchange error"


class MalformedChunkMessage(ChunkError, DecodeError):
    """A chunk request or response that is not a valid canonical message."""

    code = 2151
    reason = "malformed chunk message"


class ChunkMessageTooLarge(MalformedChunkMessage):
    code = 2152
    reason = "chunk message too large"


class InvalidChunkRequest(MalformedChunkMessage):
    """Decoded, but asks for no block, too many, or the same one twice."""

    code = 2153
    reason = "invalid chunk request"


class InvalidBlockCid(InvalidChunkRequest):
    """Not a canonical binary CIDv1 with sha2-256 and the raw or dag-pb codec."""

    code = 2154
    reason = "invalid block CID"


class ChunksBusy(ChunkError):
    """The server is answering too many of this peer's (or everybody's) requests now."""

    code = 2155
    reason = "too many chunk requests"


class AccessError(ChunkError):
    """An access request that does not grant anything to this requester now."""

    code = 2156
    reason = "invalid access request"


class AccessSignatureInvalid(AccessError):
    code = 2157
    reason = "access request not signed by the address it names"


class AccessPeerMismatch(AccessError):
    code = 2158
    reason = "access request names another peer"


class AccessExpired(AccessError):
    code = 2159
    reason = "access request expired"


class AccessWrongChain(AccessError):
    code = 2160
    reason = "access request is for another chain"


class AccessRootMismatch(AccessError):
    code = 2161
    reason = "access request is for another artifact"


class AccessLifetimeTooLong(AccessError):
    code = 2162
    reason = "access request expires too far ahead"


class BlockUnavailable(ChunkError):
    """No provider served a block (each refused it, or none is left to ask)."""

    code = 2163
    reason = "no provider can serve the block"

    def __init__(
        self, message: str = "", *, data: object | None = None, report: FetchReport | None = None
    ) -> None:
        super().__init__(message, data=data)
        self.report = report


class BadChunkData(ChunkError):
    """A provider's response failed verification (it is penalized and dropped)."""

    code = 2164
    reason = "bad block data from a provider"


class MalformedArtifact(ChunkError):
    """Blocks that match their CIDs but do not form a UnixFS file (the artifact itself is bad)."""

    code = 2165
    reason = "artifact is not a valid UnixFS file"


class LeafOutOfRange(ChunkError):
    code = 2166
    reason = "leaf index beyond the end of the artifact"


# --- wire records --------------------------------------------------------------------------------


class BlockStatus(IntEnum):
    OK = 0
    NOT_FOUND = 1
    DENIED = 2


@dataclass(frozen=True, slots=True)
class AccessTerms(Record):
    """What an access request asserts; signed with ``TAG_ACCESS`` by ``address``'s key."""

    chain_id: ChainId
    root: bytes = field(metadata=limit(MAX_CID_BYTES))
    address: Address
    peer_id: bytes = field(metadata=limit(MAX_PEER_ID_BYTES))
    grant_id: Hash32
    expires_ms: TimestampMs
    nonce: int


@dataclass(frozen=True, slots=True)
class AccessRequest(Record):
    terms: AccessTerms
    signature: Signature


@dataclass(frozen=True, slots=True)
class ChunkRequest(Record):
    root: bytes = field(metadata=limit(MAX_CID_BYTES))
    cids: tuple[bytes, ...] = field(metadata=limit(MAX_BLOCKS_PER_REQUEST))
    access: AccessRequest | None


@dataclass(frozen=True, slots=True)
class ChunkResponseHeader(Record):
    statuses: tuple[int, ...] = field(metadata=limit(MAX_BLOCKS_PER_REQUEST))
    sizes: tuple[int, ...] = field(metadata=limit(MAX_BLOCKS_PER_REQUEST))


@dataclass(frozen=True, slots=True)
class BlockEntry:
    status: int
    data: bytes  # empty unless OK


@dataclass(frozen=True, slots=True)
class ChunkResponse:
    """One entry per requested CID; on the wire ``u32 n || header (n bytes) || blocks``."""

    blocks: tuple[BlockEntry, ...]

    def encode(self) -> bytes:
        header = ChunkResponseHeader(
            tuple(int(e.status) for e in self.blocks), tuple(len(e.data) for e in self.blocks)
        ).encode()
        parts = [len(header).to_bytes(_HEADER_LENGTH_BYTES, "big"), header]
        parts.extend(e.data for e in self.blocks if e.data)
        return b"".join(parts)


_HEADER_LENGTH_BYTES = 4
MAX_RESPONSE_HEADER_BYTES = 256


def check_block_cid(raw: bytes, what: str = "CID") -> CID:
    """The CID ``raw`` encodes, if it is one the exchange carries (``InvalidBlockCid`` else)."""
    if type(raw) is not bytes or not 0 < len(raw) <= MAX_CID_BYTES:
        raise InvalidBlockCid(f"{what}: a CID is 1..{MAX_CID_BYTES} bytes")
    try:
        cid = CID.decode(raw)
    except Exception as exc:  # multiformats raises several unrelated types
        raise InvalidBlockCid(f"{what}: not a binary CID ({exc})") from exc
    if bytes(cid) != raw:
        raise InvalidBlockCid(f"{what}: not the canonical binary form of its CID")
    if cid.version != 1 or cid.hashfun.code != unixfs.SHA2_256 or len(cid.raw_digest) != 32:
        raise InvalidBlockCid(f"{what}: not a CIDv1 with sha2-256")
    if cid.codec.code not in (unixfs.RAW_CODEC, unixfs.DAG_PB_CODEC):
        raise InvalidBlockCid(f"{what}: codec is neither raw nor dag-pb")
    return cid.set(base="base32")


def _cid_text(raw: bytes) -> str:
    try:
        return str(CID.decode(raw).set(base="base32"))
    except Exception:
        return raw.hex()


def decode_chunk_request(data: bytes) -> ChunkRequest:
    """Strictly decode and check a request (``MalformedChunkMessage`` and subclasses)."""
    if len(data) > MAX_CHUNK_REQUEST_BYTES:
        raise ChunkMessageTooLarge(
            f"chunk request of {len(data)} bytes exceeds {MAX_CHUNK_REQUEST_BYTES}"
        )
    try:
        req = ChunkRequest.decode(data, max_size=MAX_CHUNK_REQUEST_BYTES)
    except DecodeError as exc:
        raise MalformedChunkMessage(f"undecodable chunk request: {exc.message}") from exc
    if not req.cids:
        raise InvalidChunkRequest("a chunk request names no block")
    if len(set(req.cids)) != len(req.cids):
        raise InvalidChunkRequest("a chunk request names a block twice")
    check_block_cid(req.root, "root")
    for i, cid in enumerate(req.cids):
        check_block_cid(cid, f"cids[{i}]")
    return req


def decode_chunk_response(data: bytes, asked: int) -> ChunkResponse:
    """Strictly decode a response to a request for ``asked`` blocks."""
    return ChunkResponse(
        tuple(BlockEntry(status, bytes(view)) for status, view in _split_response(data, asked))
    )


def _split_response(data: bytes, asked: int) -> list[tuple[int, memoryview]]:
    """``decode_chunk_response`` without copying: (status, the block's bytes as a view into
    ``data``) per entry. The fetcher hashes and stores the views as they are: one pass less
    over every byte."""
    if len(data) > MAX_CHUNK_RESPONSE_BYTES:
        raise ChunkMessageTooLarge(
            f"chunk response of {len(data)} bytes exceeds {MAX_CHUNK_RESPONSE_BYTES}"
        )
    n = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "big")
    if len(data) < _HEADER_LENGTH_BYTES or not 0 < n <= MAX_RESPONSE_HEADER_BYTES:
        raise MalformedChunkMessage("chunk response without a valid header length")
    end = _HEADER_LENGTH_BYTES + n
    try:
        header = ChunkResponseHeader.decode(
            data[_HEADER_LENGTH_BYTES:end], max_size=MAX_RESPONSE_HEADER_BYTES
        )
    except DecodeError as exc:
        raise MalformedChunkMessage(f"undecodable chunk response: {exc.message}") from exc
    if len(header.statuses) != asked or len(header.sizes) != asked:
        raise MalformedChunkMessage(
            f"{len(header.statuses)} statuses and {len(header.sizes)} sizes for {asked} blocks"
        )
    if end + sum(header.sizes) != len(data):
        raise MalformedChunkMessage("block sizes do not add up to the response's length")
    view = memoryview(data)
    entries: list[tuple[int, memoryview]] = []
    pos = end
    for status, size in zip(header.statuses, header.sizes, strict=True):
        if status not in (BlockStatus.OK, BlockStatus.NOT_FOUND, BlockStatus.DENIED):
            raise MalformedChunkMessage(f"unknown block status {status}")
        if status != BlockStatus.OK and size:
            raise MalformedChunkMessage("data with a NOT_FOUND or DENIED entry")
        if size > MAX_BLOCK_BYTES:
            raise MalformedChunkMessage(f"a block of {size} bytes exceeds {MAX_BLOCK_BYTES}")
        entries.append((status, view[pos : pos + size]))
        pos += size
    return entries


# --- access requests -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedAccess:
    """An access request ``verify_access`` accepted: the policy checks the grant on chain."""

    address: Address
    grant_id: Hash32
    chain_id: int
    root: bytes
    expires_ms: int


def sign_access(key: crypto.PrivateKey, terms: AccessTerms) -> AccessRequest:
    """Sign ``terms`` (whose ``address`` must be ``key``'s)."""
    if terms.address != key.address:
        raise ValueError("the terms name another address than the signing key's")
    return AccessRequest(terms, key.sign(TAG_ACCESS, terms.chain_id, terms.encode()))


def verify_access(
    req: AccessRequest,
    peer: PeerId,
    now: int,
    *,
    chain_id: int | None = None,
    max_lifetime_ms: int = MAX_ACCESS_LIFETIME_MS,
) -> Address:
    """The address that signed ``req``, if it grants anything to ``peer`` at unix ms ``now``:
    signed by the address it names, for ``peer`` (the stream's authenticated peer), not
    expired nor valid for longer than ``max_lifetime_ms``, and for ``chain_id`` when given.
    Raises the matching ``AccessError`` otherwise."""
    t = req.terms
    if chain_id is not None and t.chain_id != chain_id:
        raise AccessWrongChain(f"access request for chain {t.chain_id}, this is {chain_id}")
    if t.peer_id != bytes(peer):
        raise AccessPeerMismatch("the access request names another peer than the requester")
    if now >= t.expires_ms:
        raise AccessExpired(f"access request expired at {t.expires_ms} (now {now})")
    if t.expires_ms - now > max_lifetime_ms:
        raise AccessLifetimeTooLong(
            f"access request valid for {t.expires_ms - now} ms, more than {max_lifetime_ms}"
        )
    try:
        signer = crypto.recover_signer(TAG_ACCESS, t.chain_id, t.encode(), req.signature)
    except InvalidSignature as exc:
        raise AccessSignatureInvalid(f"bad access signature: {exc.message}") from exc
    if signer != t.address:
        raise AccessSignatureInvalid("the access request is not signed by the address it names")
    return signer


# --- policy --------------------------------------------------------------------------------------


class AccessPolicy(Protocol):
    """Decides whether ``peer`` may have one block of the artifact ``root``.

    ``leaf_index`` is the block's leaf index in the file (0: the header leaf, public under
    format v1), None for a dag-pb node. ``access`` is the peer's verified access request, if it
    sent a valid one; the node's policy checks ``access.grant_id`` on chain for
    ``access.address`` (and ``access.chain_id``)."""

    async def authorize(
        self,
        peer: PeerId,
        root: bytes,
        block_cid: bytes,
        access: VerifiedAccess | None,
        *,
        leaf_index: int | None,
    ) -> bool: ...


class OpenPolicy:
    """Serves every block of every artifact to anyone (free artifacts, tests, benchmarks)."""

    async def authorize(
        self,
        peer: PeerId,
        root: bytes,
        block_cid: bytes,
        access: VerifiedAccess | None,
        *,
        leaf_index: int | None,
    ) -> bool:
        return True


# --- DAG walking (worker threads) ----------------------------------------------------------------


def _is_dag_pb(cid: CID) -> bool:
    return bool(cid.codec.code == unixfs.DAG_PB_CODEC)


def build_dag_index(store: BlobStore, root: bytes) -> tuple[dict[bytes, int | None], bool]:
    """Every block of ``root``'s DAG that the dag-pb nodes in ``store`` name: CID -> its lowest
    leaf index (None for a dag-pb node); and whether every dag-pb node was present."""
    chunk = unixfs.CHUNK_SIZE
    root_cid = check_block_cid(root, "root")
    if not _is_dag_pb(root_cid):
        return {root: 0}, True
    index: dict[bytes, int | None] = {}
    complete = True
    stack: list[tuple[bytes, int]] = [(root, 0)]
    seen: set[tuple[bytes, int]] = set()
    while stack:
        cid, offset = stack.pop()
        if (cid, offset) in seen:
            continue
        seen.add((cid, offset))
        index[cid] = None
        data = store.get(cid)
        if data is None:
            complete = False
            continue
        try:
            node = unixfs.decode_node(data)
        except unixfs.MalformedNode:
            complete = False
            continue
        pos = offset
        for link, size in zip(node.links, node.blocksizes, strict=True):
            child = bytes(link.cid)
            if _is_dag_pb(link.cid):
                stack.append((child, pos))
            else:
                leaf = pos // chunk
                old = index.get(child)
                index[child] = leaf if old is None else min(old, leaf)
            pos += size
    return index, complete


# --- the server ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServeSettings:
    max_per_peer: int = 8  # requests of one peer answered at once
    max_serving: int = 64  # requests answered at once
    index_cache_entries: int = 1 << 18  # CIDs kept in cached DAG indexes (all roots together)
    max_access_lifetime_ms: int = MAX_ACCESS_LIFETIME_MS


class ChunkServer:
    """Answers ``/neuroseed/chunks/1`` from ``store`` under ``policy`` (module docstring).
    ``install()`` registers the handler (again after a host restart)."""

    def __init__(
        self,
        store: BlobStore,
        network: Network,
        policy: AccessPolicy,
        *,
        chain_id: int | None = None,
        settings: ServeSettings | None = None,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.network = network
        self.policy = policy
        self.chain_id = chain_id
        self.settings = settings or ServeSettings()
        self.stats: Counter[str] = Counter()
        self._clock_ms = clock_ms
        self._serving: Counter[PeerId] = Counter()
        self._serving_total = 0
        self._indexes: OrderedDict[bytes, dict[bytes, int | None]] = OrderedDict()
        self._indexed_entries = 0

    def install(self) -> None:
        self.network.set_handler(PROTOCOL_CHUNKS, self.handle_request)

    async def handle_request(self, peer: PeerId, payload: bytes) -> bytes:
        try:
            req = decode_chunk_request(payload)
        except MalformedChunkMessage as exc:
            self.stats["bad_requests"] += 1
            await self.network.penalize(peer, f"bad chunk request: {exc.message}")
            raise
        s = self.settings
        if self._serving[peer] >= s.max_per_peer or self._serving_total >= s.max_serving:
            self.stats["busy"] += 1
            raise ChunksBusy(f"already answering {self._serving[peer]} requests of this peer")
        self._serving[peer] += 1
        self._serving_total += 1
        try:
            return await self._answer(peer, req)
        finally:
            self._serving_total -= 1
            self._serving[peer] -= 1
            if not self._serving[peer]:
                del self._serving[peer]

    async def _answer(self, peer: PeerId, req: ChunkRequest) -> bytes:
        access = self._verified(peer, req)
        index = await self._index(req.root)
        statuses: list[BlockStatus] = []
        for cid in req.cids:
            if cid not in index:
                statuses.append(BlockStatus.NOT_FOUND)
            elif await self.policy.authorize(peer, req.root, cid, access, leaf_index=index[cid]):
                statuses.append(BlockStatus.OK)
            else:
                statuses.append(BlockStatus.DENIED)
        payload, counts = await trio.to_thread.run_sync(self._respond, req.cids, statuses)
        self.stats.update(counts)
        self.stats["requests"] += 1
        return payload

    def _verified(self, peer: PeerId, req: ChunkRequest) -> VerifiedAccess | None:
        if req.access is None:
            return None
        t = req.access.terms
        try:
            if t.root != req.root:
                raise AccessRootMismatch("the access request names another root")
            address = verify_access(
                req.access,
                peer,
                self._clock_ms(),
                chain_id=self.chain_id,
                max_lifetime_ms=self.settings.max_access_lifetime_ms,
            )
        except AccessError as exc:
            self.stats["bad_access"] += 1
            log.debug("ignoring an access request of %r: %s", peer, exc.message)
            return None
        return VerifiedAccess(address, t.grant_id, t.chain_id, t.root, t.expires_ms)

    async def _index(self, root: bytes) -> Mapping[bytes, int | None]:
        cached = self._indexes.get(root)
        if cached is not None:
            self._indexes.move_to_end(root)
            return cached
        index, complete = await trio.to_thread.run_sync(build_dag_index, self.store, root)
        if complete and len(index) <= self.settings.index_cache_entries:
            self._indexes[root] = index
            self._indexed_entries += len(index)
            while self._indexed_entries > self.settings.index_cache_entries:
                _, dropped = self._indexes.popitem(last=False)
                self._indexed_entries -= len(dropped)
        return index

    def _respond(
        self, cids: Sequence[bytes], statuses: Sequence[BlockStatus]
    ) -> tuple[bytes, Counter[str]]:
        """Read the allowed blocks and encode the response (worker thread)."""
        counts: Counter[str] = Counter()
        entries: list[BlockEntry] = []
        for cid, status in zip(cids, statuses, strict=True):
            data = self.store.get(cid) if status is BlockStatus.OK else None
            if status is BlockStatus.OK and (data is None or len(data) > MAX_BLOCK_BYTES):
                if data is not None:
                    log.warning("not serving block %s: %d bytes", _cid_text(cid), len(data))
                status = BlockStatus.NOT_FOUND
            if data is not None and status is BlockStatus.OK:
                entries.append(BlockEntry(BlockStatus.OK, data))
                counts["blocks_served"] += 1
                counts["bytes_served"] += len(data)
            else:
                entries.append(BlockEntry(status, b""))
                counts["not_found" if status is BlockStatus.NOT_FOUND else "denied"] += 1
        return ChunkResponse(tuple(entries)).encode(), counts


# --- the fetcher ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchSettings:
    blocks_per_request: int = MAX_BLOCKS_PER_REQUEST
    requests_per_provider: int = 4  # in flight to one provider (≤ the server's max_per_peer)
    max_in_flight: int = 8  # in flight in all (each up to ~8 MiB)
    request_timeout_s: float = 30.0
    max_provider_failures: int = 4  # failed requests in a row before a provider is left out
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0

    def __post_init__(self) -> None:
        if not 1 <= self.blocks_per_request <= MAX_BLOCKS_PER_REQUEST:
            raise ValueError(f"blocks_per_request must be 1..{MAX_BLOCKS_PER_REQUEST}")
        if self.requests_per_provider < 1 or self.max_in_flight < 1:
            raise ValueError("requests_per_provider and max_in_flight must be at least 1")


@dataclass(frozen=True, slots=True)
class FetchProgress:
    blocks_fetched: int
    bytes_fetched: int
    blocks_present: int  # found in the store, not fetched
    blocks_known: int  # blocks of the walk so far (the total once every node is known)


@dataclass(frozen=True, slots=True)
class FetchReport:
    root: bytes
    file_size: int | None  # None when the root itself could not be had
    complete: bool  # the whole artifact is present (and pinned)
    blocks_fetched: int
    bytes_fetched: int
    blocks_present: int
    blocks_by_peer: Mapping[PeerId, int]
    bad_peers: tuple[PeerId, ...]
    requests: int
    failed_requests: int
    missing: tuple[bytes, ...]  # blocks no provider served (BlockUnavailable)


class _State(IntEnum):
    PROBING = 0  # being looked up in the store
    QUEUED = 1
    IN_FLIGHT = 2
    DONE = 3  # in the store
    UNAVAILABLE = 4


@dataclass(slots=True, eq=False)
class _Want:
    cid: bytes
    cid_obj: CID
    is_node: bool
    expected_size: int | None  # from the parent's blocksizes (None: the root)
    state: _State = _State.PROBING
    offsets: list[int] = field(default_factory=list)  # where it sits in the file
    node: unixfs.FileNode | None = None
    refused: dict[PeerId, str] = field(default_factory=dict)  # provider -> NOT_FOUND / DENIED
    missing_reason: str = ""


@dataclass(frozen=True, slots=True)
class _Placement:
    cid: bytes
    cid_obj: CID
    offset: int
    size: int | None


@dataclass(slots=True)
class _Provider:
    peer: PeerId
    failures: int = 0  # in a row (requests failing together in one outage count once)
    epoch: int = 0  # counted failures so far: a request started before the last one is stale
    not_before: float = 0.0
    dropped: str | None = None


_Probed = unixfs.FileNode | int | None  # a present node, a present leaf's size, or absent


class ChunkFetcher:
    """Downloads artifacts into ``store`` from providers over ``network`` (module docstring)."""

    def __init__(
        self,
        store: BlobStore,
        network: Network,
        settings: FetchSettings | None = None,
        *,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.network = network
        self.settings = settings or FetchSettings()
        self._clock_ms = clock_ms

    async def fetch(
        self,
        root: bytes,
        providers: Sequence[PeerId],
        *,
        leaves: Collection[int] | None = None,
        access: AccessRequest | None = None,
        progress: Callable[[FetchProgress], None] | None = None,
    ) -> FetchReport:
        """Fetch the artifact ``root`` (or, with ``leaves``, those leaf indexes and the nodes
        above them) from ``providers``; returns what was done. Raises ``InvalidBlockCid``,
        ``LeafOutOfRange``, ``AccessError`` (an access request not made for this root and
        peer, or expired), ``MalformedArtifact``, ``BlockUnavailable`` and the blob store's
        errors (quota, disk)."""
        root_cid = check_block_cid(root, "root")
        wanted: list[int] | None = None
        if leaves is not None:
            chosen = set(leaves)
            if any(type(i) is not int or i < 0 for i in chosen):
                raise LeafOutOfRange("leaf indexes are integers from 0")
            wanted = sorted(chosen)
        if access is not None:
            t = access.terms
            if t.root != root:
                raise AccessRootMismatch("the access request names another root")
            verify_access(access, self.network.peer_id, self._clock_ms())
        run = _Fetch(self, root, root_cid, providers, wanted, access, progress)
        return await run.run()


class _Fetch:
    """One ``fetch`` call's state; everything but the thread functions runs on the trio loop."""

    def __init__(
        self,
        owner: ChunkFetcher,
        root: bytes,
        root_cid: CID,
        providers: Sequence[PeerId],
        wanted: list[int] | None,
        access: AccessRequest | None,
        progress: Callable[[FetchProgress], None] | None,
    ) -> None:
        self.store = owner.store
        self.network = owner.network
        self.settings = owner.settings
        self.root = root
        self.root_cid = root_cid
        me = owner.network.peer_id
        self.providers = {p: _Provider(p) for p in dict.fromkeys(providers) if p != me}
        self.wanted = wanted
        self.access = access
        self.progress = progress
        self.chunk = unixfs.CHUNK_SIZE
        self.wants: dict[bytes, _Want] = {}
        self.nodes_q: deque[_Want] = deque()
        self.leaves_q: deque[_Want] = deque()
        self.expanded: set[tuple[bytes, int]] = set()
        self.unavailable: list[_Want] = []
        self.busy = 0  # requests in flight and discoveries running
        self.finished = False
        self.changed = trio.Event()
        self.limiter = trio.CapacityLimiter(self.settings.max_in_flight)
        self.file_size: int | None = None
        self.fetched = 0
        self.bytes = 0
        self.present = 0
        self.requests = 0
        self.failed_requests = 0
        self.by_peer: Counter[PeerId] = Counter()
        self.bad_peers: list[PeerId] = []
        self.fatal: NeuroSeedError | None = None  # ends the fetch (malformed artifact, disk)
        self.scope: trio.CancelScope | None = None

    # --- driver ----------------------------------------------------------------------------

    async def run(self) -> FetchReport:
        await self.discover([_Placement(self.root, self.root_cid, 0, None)])
        async with trio.open_nursery() as nursery:
            self.scope = nursery.cancel_scope
            for peer in self.providers:
                for _ in range(self.settings.requests_per_provider):
                    nursery.start_soon(self.worker, peer)
        if self.fatal is not None:
            raise self.fatal
        report = self.report()
        if self.unavailable:
            first = self.unavailable[0]
            refusals = ", ".join(f"{_peer_text(p)} {why}" for p, why in first.refused.items())
            reasons = first.missing_reason + (f": {refusals}" if refusals else "")
            raise BlockUnavailable(
                f"block {_cid_text(first.cid)} of {_cid_text(self.root)} could not be fetched "
                f"({reasons}); {len(self.unavailable)} block(s) missing, "
                f"{self.fetched} fetched",
                data={"cid": _cid_text(first.cid), "missing": len(self.unavailable)},
                report=report,
            )
        if self.wanted is None:
            await self.store.pin_async(self.root, list(self.wants))
        return report

    def report(self) -> FetchReport:
        missing = tuple(w.cid for w in self.unavailable)
        return FetchReport(
            root=self.root,
            file_size=self.file_size,
            complete=self.wanted is None and not missing,
            blocks_fetched=self.fetched,
            bytes_fetched=self.bytes,
            blocks_present=self.present,
            blocks_by_peer=dict(self.by_peer),
            bad_peers=tuple(self.bad_peers),
            requests=self.requests,
            failed_requests=self.failed_requests,
            missing=missing,
        )

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def idle(self) -> bool:
        return not self.nodes_q and not self.leaves_q and self.busy == 0

    def live(self) -> list[_Provider]:
        return [p for p in self.providers.values() if p.dropped is None]

    # --- the walk --------------------------------------------------------------------------

    def covers(self, start: int, end: int) -> bool:
        """Whether bytes ``[start, end)`` hold a wanted leaf."""
        if self.wanted is None:
            return True
        if end <= start:
            return False
        lo, hi = start // self.chunk, (end - 1) // self.chunk
        i = bisect.bisect_left(self.wanted, lo)
        return i < len(self.wanted) and self.wanted[i] <= hi

    def expand(self, want: _Want, offset: int) -> list[_Placement]:
        """The wanted children of the node ``want`` placed at ``offset``."""
        if (want.cid, offset) in self.expanded:
            return []
        self.expanded.add((want.cid, offset))
        node = want.node
        assert node is not None
        out: list[_Placement] = []
        pos = offset
        for link, size in zip(node.links, node.blocksizes, strict=True):
            if self.covers(pos, pos + size):
                out.append(_Placement(bytes(link.cid), link.cid, pos, size))
            pos += size
        return out

    def on_root(self, size: int) -> None:
        self.file_size = size
        if self.wanted:
            count = max(1, -(-size // self.chunk))
            if self.wanted[-1] >= count:
                raise LeafOutOfRange(
                    f"leaf {self.wanted[-1]} asked; {_cid_text(self.root)} has {count} leaves"
                )

    def on_present(self, want: _Want, size: int) -> list[_Placement]:
        """``want`` is in the store now: record it, expand it if it is a node."""
        want.state = _State.DONE
        if want.cid == self.root:
            self.on_root(size)
        if want.node is None:
            return []
        out: list[_Placement] = []
        for offset in want.offsets:
            out.extend(self.expand(want, offset))
        return out

    async def discover(self, placements: list[_Placement]) -> None:
        """Register ``placements``: look up blocks new to this fetch in the store (reading and
        expanding the nodes found there), queue the missing ones."""
        self.busy += 1
        try:
            pending = placements
            while pending:
                fresh: list[_Want] = []
                more: list[_Placement] = []
                for pl in pending:
                    want = self.wants.get(pl.cid)
                    if want is None:
                        want = _Want(pl.cid, pl.cid_obj, _is_dag_pb(pl.cid_obj), pl.size)
                        self.wants[pl.cid] = want
                        fresh.append(want)
                    elif pl.size is not None and want.expected_size not in (None, pl.size):
                        raise MalformedArtifact(
                            f"block {_cid_text(pl.cid)} is linked with sizes "
                            f"{want.expected_size} and {pl.size}"
                        )
                    want.offsets.append(pl.offset)
                    if want.node is not None and want.state is _State.DONE:
                        more.extend(self.expand(want, pl.offset))
                if fresh:
                    found = await trio.to_thread.run_sync(
                        _probe, self.store, [(w.cid, w.is_node, w.expected_size) for w in fresh]
                    )
                    for want, got in zip(fresh, found, strict=True):
                        if got is None:
                            self.enqueue(want)
                            continue
                        self.present += 1
                        if isinstance(got, unixfs.FileNode):
                            want.node = got
                            more.extend(self.on_present(want, got.filesize))
                        else:
                            more.extend(self.on_present(want, got))
                pending = more
        finally:
            self.busy -= 1
            self.notify()

    def enqueue(self, want: _Want) -> None:
        """Queue ``want`` again, unless every live provider refused it (then it is missing)."""
        live = self.live()
        if not live:
            self.mark_unavailable(want, "no provider left to ask")
            return
        if all(p.peer in want.refused for p in live):
            self.mark_unavailable(want, "refused by every provider")
            return
        want.state = _State.QUEUED
        (self.nodes_q if want.is_node else self.leaves_q).appendleft(want)

    def mark_unavailable(self, want: _Want, why: str) -> None:
        want.state = _State.UNAVAILABLE
        want.missing_reason = why
        self.unavailable.append(want)

    def take(self, peer: PeerId) -> list[_Want]:
        """Up to ``blocks_per_request`` queued blocks ``peer`` has not refused, nodes first."""
        n = self.settings.blocks_per_request
        batch: list[_Want] = []
        for q in (self.nodes_q, self.leaves_q):
            skipped: list[_Want] = []
            while q and len(batch) < n:
                want = q.popleft()
                if peer in want.refused:
                    skipped.append(want)
                else:
                    batch.append(want)
            q.extendleft(reversed(skipped))
        for want in batch:
            want.state = _State.IN_FLIGHT
        return batch

    # --- providers -------------------------------------------------------------------------

    async def worker(self, peer: PeerId) -> None:
        try:
            await self._work(self.providers[peer])
        except NeuroSeedError as exc:  # not the provider's doing: the whole fetch fails
            if self.fatal is None:
                self.fatal = exc
            assert self.scope is not None
            self.scope.cancel()

    async def _work(self, prov: _Provider) -> None:
        while not self.finished and prov.dropped is None:
            changed = self.changed
            async with self.limiter:  # (a checkpoint: check the provider's state after it)
                backing_off = prov.not_before > trio.current_time()
                ready = prov.dropped is None and not self.finished and not backing_off
                batch = self.take(prov.peer) if ready else []
                if batch:
                    await self.request(prov, batch)
                    continue
            if backing_off:  # wait, but wake early if the fetch ends meanwhile
                with trio.move_on_at(prov.not_before):
                    await changed.wait()
                continue
            if self.idle():
                self.finished = True
                self.notify()
                return
            await changed.wait()

    async def request(self, prov: _Provider, batch: list[_Want]) -> None:
        self.busy += 1
        try:
            await self._request(prov, batch)
        finally:
            for want in batch:  # left in flight only if the fetch is being torn down
                if want.state is _State.IN_FLIGHT:
                    want.state = _State.QUEUED
            self.busy -= 1
            self.notify()

    async def _request(self, prov: _Provider, batch: list[_Want]) -> None:
        s = self.settings
        payload = ChunkRequest(self.root, tuple(w.cid for w in batch), self.access).encode()
        self.requests += 1
        epoch = prov.epoch
        try:
            data = await self.network.request(
                prov.peer, PROTOCOL_CHUNKS, payload, timeout_s=s.request_timeout_s
            )
            resp = _split_response(data, len(batch))  # no copy, a small header: on the loop
        except MalformedChunkMessage as exc:
            await self.bad_provider(prov, batch, f"undecodable response: {exc.message}")
            return
        except P2PError as exc:
            self.failed(prov, batch, exc, stale=epoch != prov.epoch)
            return
        served = [(w, block) for w, (status, block) in zip(batch, resp, strict=True) if status == 0]
        results = await trio.to_thread.run_sync(_verify_and_store, self.store, served)
        bad: str | None = None
        more: list[_Placement] = []
        for (want, block), result in zip(served, results, strict=True):
            if isinstance(result, str):
                bad = bad or result
                self.enqueue(want)
                continue
            self.fetched += 1
            self.bytes += len(block)
            self.by_peer[prov.peer] += 1
            want.node = result
            size = result.filesize if result is not None else len(block)
            more.extend(self.on_present(want, size))
        for want, (status, _) in zip(batch, resp, strict=True):
            if status != BlockStatus.OK:
                want.refused[prov.peer] = BlockStatus(status).name
                self.enqueue(want)
        if bad is not None:
            await self.bad_provider(prov, [], bad)
        else:
            prov.failures = 0
        if self.progress is not None:
            self.progress(FetchProgress(self.fetched, self.bytes, self.present, len(self.wants)))
        if more:
            await self.discover(more)

    def failed(self, prov: _Provider, batch: list[_Want], exc: P2PError, *, stale: bool) -> None:
        """A request that failed without the peer proving bad: retry later, maybe elsewhere.
        ``stale``: it was sent before the last counted failure (the same outage)."""
        s = self.settings
        self.failed_requests += 1
        if not stale:
            prov.failures += 1
            prov.epoch += 1
            log.debug(
                "chunk request to %r failed (%d in a row) at %.3f: %s",
                prov.peer,
                prov.failures,
                trio.current_time(),
                exc,
            )
            if prov.failures >= s.max_provider_failures:
                self.drop(prov, f"{prov.failures} failed requests in a row (last: {exc.message})")
            else:
                backoff = min(s.backoff_initial_s * 2 ** (prov.failures - 1), s.backoff_max_s)
                prov.not_before = max(prov.not_before, trio.current_time() + backoff)
        for want in batch:
            self.enqueue(want)

    async def bad_provider(self, prov: _Provider, batch: list[_Want], why: str) -> None:
        """``prov`` sent data that failed verification: penalize it and stop using it."""
        if prov.dropped is None:
            self.bad_peers.append(prov.peer)
            self.drop(prov, why)
            await self.network.penalize(prov.peer, f"bad artifact blocks: {why}")
        for want in batch:
            self.enqueue(want)

    def drop(self, prov: _Provider, why: str) -> None:
        if prov.dropped is not None:
            return
        prov.dropped = why
        log.info("leaving provider %r out of the fetch of %s: %s", prov.peer, self.root, why)
        for q in (self.nodes_q, self.leaves_q):
            queued = list(q)
            q.clear()
            for want in reversed(queued):  # enqueue puts each at the front: keep the order
                self.enqueue(want)
        self.notify()


def _peer_text(peer: PeerId) -> str:
    raw = bytes(peer)
    if not raw:
        return "-"
    return raw.decode() if raw.isascii() and raw.isalnum() else raw.hex()[-12:]


# --- thread functions ----------------------------------------------------------------------------


def _probe(store: BlobStore, items: Iterable[tuple[bytes, bool, int | None]]) -> list[_Probed]:
    """For each (cid, is_node, expected size): None if absent, else the decoded node or the
    leaf's size (worker thread)."""
    out: list[_Probed] = []
    for cid, is_node, expected in items:
        if not is_node:
            size = store.size(cid)
            if size is not None and expected is not None and size != expected:
                raise MalformedArtifact(
                    f"leaf {_cid_text(cid)} is {size} bytes, its parent says {expected}"
                )
            out.append(size)
            continue
        data = store.get(cid)
        if data is None:
            out.append(None)
            continue
        out.append(_decode_node(cid, data, expected))
    return out


def _decode_node(cid: bytes, data: bytes, expected: int | None) -> unixfs.FileNode:
    try:
        node = unixfs.decode_node(data)
    except unixfs.MalformedNode as exc:
        raise MalformedArtifact(f"node {_cid_text(cid)}: {exc.message}") from exc
    if expected is not None and node.filesize != expected:
        raise MalformedArtifact(
            f"node {_cid_text(cid)} holds {node.filesize} bytes, its parent says {expected}"
        )
    return node


def _block_matches(cid: CID, data: bytes | memoryview) -> bool:
    """``unixfs.verify_block`` for a buffer: ``data`` is the block ``cid`` names."""
    return bool(
        cid.version == 1
        and cid.hashfun.code == unixfs.SHA2_256
        and cid.codec.code in (unixfs.RAW_CODEC, unixfs.DAG_PB_CODEC)
        and hashlib.sha256(data).digest() == cid.raw_digest
    )


def _verify_and_store(
    store: BlobStore, served: Sequence[tuple[_Want, memoryview]]
) -> list[unixfs.FileNode | str | None]:
    """Verify each served block against its CID, then store those that match with one
    ``put_many`` (worker thread): no second hash in the store, one synced index write and one
    fsync per shard directory for the whole response. Per block: the decoded node (None for a
    leaf), or why it failed verification."""
    out: list[unixfs.FileNode | str | None] = []
    good: list[tuple[bytes, memoryview]] = []
    for want, data in served:
        if not _block_matches(want.cid_obj, data):
            out.append(f"block {_cid_text(want.cid)} does not match its CID")
            continue
        node: unixfs.FileNode | None = None
        if want.is_node:
            node = _decode_node(want.cid, bytes(data), want.expected_size)
        elif want.expected_size is not None and len(data) != want.expected_size:
            raise MalformedArtifact(
                f"leaf {_cid_text(want.cid)} is {len(data)} bytes, its parent says "
                f"{want.expected_size}"
            )
        good.append((want.cid, data))
        out.append(node)
    if good:
        store.put_many(good, verified=True)
    return out


def store_verifier(cid: bytes, data: bytes) -> bool:
    """A ``BlobStore`` verifier for artifact blocks: ``data`` hashes to ``cid``."""
    try:
        unixfs.verify_block(check_block_cid(cid), data)
    except (unixfs.BlockMismatch, InvalidBlockCid):
        return False
    return True

"""The storage agent: a node's side of storage deals (DESIGN §9; docs/storage-deals.md).

One trio service, signing with the node's **operator account**, with two roles:

* **Provider.** When the operator holds a storage offer on chain, peers may negotiate deals over
  ``/neuroseed/deal/1`` (``PROTOCOL_DEAL``): the owner proposes ``DealTerms`` (no signature),
  then streams the replica in frames of at most ``UPLOAD_CHUNK_BYTES`` over several requests (an
  upload session per (peer, deal id), written at explicit offsets, so an interrupted upload
  resumes where it stopped), then asks for the signature. The agent writes the upload into
  ``<data_dir>/replicas/uploads/`` and, at the end, into the ``ReplicaStore``
  (``<data_dir>/replicas/deals/<deal id>``, temp + rename), recomputing the segment Merkle root
  off the event loop; it signs the terms only if the root equals ``terms.replica_root`` and the
  terms fit its offer, its free capacity and its balance (each refusal a specific error, sent
  back to the owner with its code). After the ``DealCreate`` is on chain, every new block it
  reads the status of its deals through the chain's read view (at most ``deals_per_block`` per
  block, round-robin) and answers each open challenge with a ``DealProof`` built from the stored
  replica well within the window; it deletes the replicas of ended deals, and of signed deals
  that never reached the chain before their signature expired.
* **Owner.** ``propose_deal`` builds the per-deal replica of an artifact from the local blob store
  (streamed through ``replica.build_replica`` with the mask key
  ``deal_mask_key(operator secret, deal nonce)``, so only this account can unmask it), sends it
  to the provider, checks the signature it returns, and submits the ``DealCreate``.
  ``start_deal`` runs the same as a background job that RPC can poll (``job_status``).

Every request and response is a canonical ``node.encoding`` record, size-checked and strictly
decoded; a refusal travels as ``DealResponse(code, message)`` and is raised on the owner's side
as the same error class (``DealRefused`` when the code is unknown).
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, cast

import trio

from node import crypto
from node.api import ViewState
from node.consensus import fees
from node.consensus.state import StateView
from node.consensus.txs import make_transaction, verify_transaction
from node.economy import deals as dl
from node.economy.api import economy_params
from node.encoding import Record, limit
from node.errors import DecodeError, NeuroSeedError, NotFound
from node.p2p.api import (
    MAX_REQUEST_BYTES,
    Network,
    P2PError,
    PeerId,
    PeerUnreachable,
    RequestFailed,
)
from node.storage import replica as rp
from node.storage.blobstore import BlobStore, BlockNotFound
from node.storage.importer import export_file, file_size, missing_blocks
from node.storage.unixfs import parse_cid
from node.types import Address, Amount, Hash32, Signature

log = logging.getLogger(__name__)

PROTOCOL_DEAL = "/neuroseed/deal/1"
# Replica bytes per upload request: the request (envelope + chunk record) stays under the
# network's 1 MiB request limit.
UPLOAD_CHUNK_BYTES = (1 << 20) - (4 << 10)
MAX_DEAL_MESSAGE = MAX_REQUEST_BYTES
MAX_ERROR_MESSAGE = 400
REPLICAS_DIR = "replicas"
UPLOADS_SUBDIR = "uploads"  # upload sessions in progress (part files)
OUTGOING_SUBDIR = "outgoing"  # replicas this node builds as an owner, until sent
TERMS_SUBDIR = "terms"  # the signed terms of each stored replica


# --- errors (codes 2290–2299) ------------------------------------------------------------------


class StorageAgentError(NeuroSeedError):
    """Base of the storage agent's errors."""

    code = 2290
    reason = "storage agent error"


class DealRefused(StorageAgentError):
    """The provider refused the proposal with an error this node does not know by its code."""

    code = 2291
    reason = "the provider refused the deal"


class StorageAgentDisabled(StorageAgentError):
    """The node runs no storage agent (no operator account), or it lacks what a call needs."""

    code = 2292
    reason = "the storage agent is not available"


class UploadSessionError(StorageAgentError):
    """An upload request for no open session, at the wrong offset, or past the replica's end.
    ``data["received"]`` is the offset the provider expects next, when a session exists."""

    code = 2293
    reason = "upload session error"


class ProviderBusy(StorageAgentError):
    code = 2294
    reason = "the provider has too many uploads in progress"


class ProviderPeerNotFound(StorageAgentError):
    code = 2295
    reason = "no connected peer is this storage provider"


class ArtifactNotLocal(StorageAgentError):
    code = 2296
    reason = "the artifact is not complete in the local blob store"


class SignatureWindowRefused(StorageAgentError):
    """The terms' ``sig_expiry_height`` leaves too little time to upload, or is too far away."""

    code = 2297
    reason = "the signature expiry height is outside what the provider accepts"


class ReplicaBudgetExceeded(StorageAgentError):
    """The replica does not fit the disk space this node gives to replicas."""

    code = 2298
    reason = "the replica does not fit the provider's local replica budget"


class MalformedDealMessage(StorageAgentError):
    code = 2299
    reason = "malformed deal protocol message"


# Errors a provider may answer with, raised again by the owner under their own class.
_KNOWN_REFUSALS: dict[int, type[NeuroSeedError]] = {
    cls.code: cls
    for cls in (
        StorageAgentError,
        DealRefused,
        StorageAgentDisabled,
        UploadSessionError,
        ProviderBusy,
        ProviderPeerNotFound,
        ArtifactNotLocal,
        SignatureWindowRefused,
        ReplicaBudgetExceeded,
        MalformedDealMessage,
        rp.ReplicaError,
        rp.InvalidReplicaInput,
        rp.ReplicaSizeMismatch,
        rp.ReplicaRootMismatch,
        rp.ReplicaExists,
        dl.InvalidDealTerms,
        dl.OfferNotFound,
        dl.DealPriceTooLow,
        dl.DealCollateralTooLow,
        dl.DealTooLong,
        dl.OfferCapacityExceeded,
        dl.DealExists,
        dl.ProviderCannotCoverCollateral,
        dl.DealSignatureExpired,
    )
}


# --- wire messages -----------------------------------------------------------------------------


class DealMessageKind(enum.IntEnum):
    INFO = 1  # () -> ProviderInfo
    PROPOSE = 2  # DealProposal -> UploadState
    UPLOAD = 3  # UploadChunk -> UploadState
    STATUS = 4  # UploadQuery -> UploadState
    FINISH = 5  # UploadQuery -> DealAccepted


@dataclass(frozen=True, slots=True)
class DealRequest(Record):
    """Envelope of every request on ``/neuroseed/deal/1``: a kind and its body's encoding."""

    kind: int
    body: bytes = field(metadata=limit(MAX_DEAL_MESSAGE))


@dataclass(frozen=True, slots=True)
class DealResponse(Record):
    """Envelope of every response: ``code`` 0 and the body, or an error's code and message."""

    code: int
    message: str = field(metadata=limit(MAX_ERROR_MESSAGE))
    body: bytes = field(metadata=limit(1 << 16))


@dataclass(frozen=True, slots=True)
class InfoQuery(Record):
    """Body of INFO: who is this peer as a storage provider?"""


@dataclass(frozen=True, slots=True)
class ProviderInfo(Record):
    provider: Address | None  # the operator account; None when the node has none
    has_offer: bool
    free_bytes: int  # replica bytes the provider can take now (offer and local budget)


@dataclass(frozen=True, slots=True)
class DealProposal(Record):
    terms: dl.DealTerms


@dataclass(frozen=True, slots=True)
class UploadQuery(Record):
    deal_id: Hash32


@dataclass(frozen=True, slots=True)
class UploadChunk(Record):
    deal_id: Hash32
    offset: int
    data: bytes = field(metadata=limit(UPLOAD_CHUNK_BYTES))


@dataclass(frozen=True, slots=True)
class UploadState(Record):
    deal_id: Hash32
    received: int  # bytes of the replica the provider holds (the next offset to send)
    total: int


@dataclass(frozen=True, slots=True)
class DealAccepted(Record):
    deal_id: Hash32
    signature: Signature


_REQUEST_BODIES: dict[int, type[Record]] = {
    DealMessageKind.INFO: InfoQuery,
    DealMessageKind.PROPOSE: DealProposal,
    DealMessageKind.UPLOAD: UploadChunk,
    DealMessageKind.STATUS: UploadQuery,
    DealMessageKind.FINISH: UploadQuery,
}


def encode_request(kind: DealMessageKind, body: Record) -> bytes:
    return DealRequest(int(kind), body.encode()).encode()


def decode_request(payload: bytes) -> tuple[DealMessageKind, Record]:
    """A request's kind and decoded body; ``MalformedDealMessage`` for anything else."""
    try:
        envelope = DealRequest.decode(payload, max_size=MAX_DEAL_MESSAGE)
        body_type = _REQUEST_BODIES.get(envelope.kind)
        if body_type is None:
            raise MalformedDealMessage(f"unknown deal message kind {envelope.kind}")
        return DealMessageKind(envelope.kind), body_type.decode(envelope.body)
    except DecodeError as exc:
        raise MalformedDealMessage(f"deal request: {exc.message}") from exc


_R = TypeVar("_R", bound=Record)


def _decode_response(payload: bytes, body_type: type[_R]) -> _R:
    try:
        response = DealResponse.decode(payload, max_size=1 << 17)
    except DecodeError as exc:
        raise MalformedDealMessage(f"deal response: {exc.message}") from exc
    if response.code != 0:
        cls = _KNOWN_REFUSALS.get(response.code, DealRefused)
        message = response.message or cls.reason
        if cls is DealRefused:
            message = f"provider error {response.code}: {message}"
        raise cls(message, data={"remote_code": response.code})
    try:
        return body_type.decode(response.body)
    except DecodeError as exc:
        raise MalformedDealMessage(f"{body_type.__name__}: {exc.message}") from exc


def _ok(body: Record) -> bytes:
    return DealResponse(0, "", body.encode()).encode()


def _error(exc: NeuroSeedError) -> bytes:
    message = exc.message.encode("utf-8")[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore")
    return DealResponse(exc.code, message, b"").encode()


# --- settings and collaborators ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Node-local settings of the agent (none of them is a consensus rule)."""

    max_replica_bytes: int = 64 << 30  # disk given to replicas (stored + being uploaded)
    max_sessions: int = 8  # upload sessions open at once
    max_sessions_per_peer: int = 2
    upload_idle_s: float = 300.0  # a session without traffic this long is dropped
    # As an owner: the provider's signature is asked to stay valid this many heights.
    sig_expiry_heights: int = 100
    # As a provider: refuse terms whose signature expires sooner than this many heights from the
    # head (no time left to upload and include the DealCreate), or later than max_sig_window.
    min_sig_margin_heights: int = 3
    max_sig_window_heights: int = 10_000
    request_timeout_s: float = 30.0
    upload_retries: int = 5  # consecutive failed requests before an upload gives up
    retry_backoff_s: float = 0.5
    deals_per_block: int = 256  # deal statuses read per new block (bounded work, DESIGN §4)
    # A proof sent but not yet on chain is sent again after this many blocks (it may have been
    # dropped), while the challenge is still open.
    resubmit_after_blocks: int = 2
    poll_interval_s: float = 0.2  # how often the head is checked without a notify_block()
    fee_tip_divisor: int = 10  # fee = cost + cost // divisor
    max_jobs: int = 64  # finished owner-side jobs kept for job_status


class ChainSource(Protocol):
    """Where the agent reads committed state: ``ChainService``, ``Node`` or anything with a
    thread-safe ``read_view()``."""

    def read_view(self) -> Any: ...


Submit = Callable[[bytes], Awaitable[Hash32]]
PendingNonce = Callable[[Address], Awaitable[int]]
Progress = Callable[[int, int], None]


def _head_height(view: Any) -> int:
    head = view.head
    return 0 if head is None else int(head.height)


class _ArtifactReader(io.RawIOBase):
    """The file under ``root`` in the blob store as a sequential stream (no whole-file copy):
    each read exports just the covering leaves."""

    def __init__(self, store: BlobStore, root: bytes, size: int) -> None:
        super().__init__()
        self._store = store
        self._root = root
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        out = io.BytesIO()
        export_file(self._store, self._root, out, start=self._pos, end=self._pos + n)
        data = out.getbuffer()
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


# --- provider-side state -----------------------------------------------------------------------


@dataclass(slots=True)
class _Upload:
    """One upload session: a replica arriving from ``peer`` for the deal ``terms`` describe."""

    peer: PeerId
    deal_id: Hash32
    terms: dl.DealTerms
    path: Path
    received: int
    last_active: float
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(slots=True)
class _LocalDeal:
    """A deal whose replica this node stores, and what it sent for its challenges."""

    terms: dl.DealTerms
    answered: dict[int, int] = field(default_factory=dict)  # epoch -> height the proof was sent


# --- owner-side jobs ---------------------------------------------------------------------------


class JobState(enum.StrEnum):
    BUILDING = "building"  # making the replica
    SENDING = "sending"  # uploading it to the provider
    SIGNING = "signing"  # waiting for the provider's check and signature
    SUBMITTED = "submitted"  # DealCreate sent to the mempool
    FAILED = "failed"


@dataclass(slots=True)
class DealJob:
    """An owner-side deal negotiation running in the background (``start_deal``)."""

    job_id: str
    root: bytes
    provider: Address
    epochs: int
    state: JobState = JobState.BUILDING
    sent_bytes: int = 0
    total_bytes: int = 0
    deal_id: Hash32 | None = None
    tx_id: Hash32 | None = None
    terms: dl.DealTerms | None = None
    error_code: int | None = None
    error_message: str | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True, slots=True)
class DealOutcome:
    deal_id: Hash32
    tx_id: Hash32
    terms: dl.DealTerms
    provider_signature: Signature


# --- the agent ---------------------------------------------------------------------------------


class StorageAgent:
    """See the module docstring. Call ``run`` in the node's nursery (``nursery.start``)."""

    def __init__(
        self,
        chain: ChainSource,
        network: Network | None,
        submit: Submit,
        operator_key: crypto.PrivateKey,
        data_dir: Path,
        settings: StorageSettings | None = None,
        *,
        blobs: BlobStore | None = None,
        pending_nonce: PendingNonce | None = None,
    ) -> None:
        self._chain = chain
        self._network = network
        self._submit = submit
        self._key = operator_key
        self.address: Address = operator_key.address
        self.settings = settings or StorageSettings()
        self._blobs = blobs
        self._pending_nonce = pending_nonce
        root = Path(data_dir) / REPLICAS_DIR
        self._root = root
        self._uploads_dir = root / UPLOADS_SUBDIR
        self._outgoing_dir = root / OUTGOING_SUBDIR
        self._terms_dir = root / TERMS_SUBDIR
        self.replicas: rp.ReplicaStore | None = None
        self._deals: dict[Hash32, _LocalDeal] = {}
        self._uploads: dict[tuple[PeerId, Hash32], _Upload] = {}
        self._cursor = 0  # round-robin position over self._deals
        self._next_nonce = 0  # without pending_nonce: the next nonce this agent uses
        self._tx_lock = trio.Lock()
        self._head_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._jobs: dict[str, DealJob] = {}
        self.last_head = -1

    # --- life cycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Open the replica store and load the deals whose replicas are kept (``run`` calls it;
        tests may call it to use the agent without running it)."""
        if self.replicas is not None:
            return
        for d in (self._uploads_dir, self._outgoing_dir, self._terms_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.replicas = rp.ReplicaStore(self._root)
        for leftover in self._outgoing_dir.iterdir():  # half-built replicas of a crashed run
            leftover.unlink(missing_ok=True)
        for deal_id in self.replicas.deal_ids():
            terms = self._read_terms(Hash32(deal_id))
            if terms is None:
                # Stored but never signed (crash between the two writes): nobody has a
                # signature for it, so it can never become a deal.
                log.warning("dropping replica %s without signed terms", deal_id.hex())
                self.replicas.remove_replica(deal_id)
                continue
            self._deals[Hash32(deal_id)] = _LocalDeal(terms)
        for path in self._terms_dir.iterdir():  # terms whose replica is gone, temp files
            try:
                kept = Hash32(bytes.fromhex(path.name)) in self._deals
            except ValueError:
                kept = False
            if not kept:
                path.unlink(missing_ok=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the deal protocol, watch new blocks for challenges, run owner jobs."""
        self.open()
        if self._network is not None:
            self._network.set_handler(PROTOCOL_DEAL, self._on_request)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_uploads_loop)
            task_status.started()
            try:
                while True:
                    view = self._chain.read_view()
                    if _head_height(view) != self.last_head:
                        await self.on_head(view)
                    with trio.move_on_after(self.settings.poll_interval_s):
                        await self._head_changed.wait()
                    self._head_changed = trio.Event()
            finally:
                self._nursery = None

    def notify_block(self) -> None:
        """A block was committed (e.g. from ``ConsensusService.on_commit``): look at it now
        rather than at the next poll."""
        self._head_changed.set()

    # --- provider: the protocol handler ------------------------------------------------------

    async def _on_request(self, peer: PeerId, payload: bytes) -> bytes:
        try:
            kind, body = decode_request(payload)
            if kind == DealMessageKind.INFO:
                return _ok(self.provider_info())
            if kind == DealMessageKind.PROPOSE:
                assert isinstance(body, DealProposal)
                return _ok(await self._on_propose(peer, body.terms))
            if kind == DealMessageKind.UPLOAD:
                assert isinstance(body, UploadChunk)
                return _ok(await self._on_chunk(peer, body))
            assert isinstance(body, UploadQuery)
            if kind == DealMessageKind.STATUS:
                return _ok(self._on_status(peer, body.deal_id))
            return _ok(await self._on_finish(peer, body.deal_id))
        except NeuroSeedError as exc:
            log.info("deal request from %s refused: %s", _peer_name(peer), exc.message)
            return _error(exc)

    def provider_info(self) -> ProviderInfo:
        state = ViewState(self._chain.read_view())
        offer = dl.get_offer(state, self.address)
        free = 0
        if offer is not None:
            load = dl.get_provider_load(state, self.address)
            free = max(
                0,
                min(
                    offer.capacity_bytes - load.bytes_in_use - self._pending_bytes(state),
                    self.settings.max_replica_bytes - self._local_bytes(),
                ),
            )
        return ProviderInfo(self.address, offer is not None, free)

    def _local_bytes(self) -> int:
        """Replica bytes on disk or promised to uploads in progress."""
        stored = sum(d.terms.replica_size for d in self._deals.values())
        return stored + sum(u.terms.replica_size for u in self._uploads.values())

    def _pending_bytes(self, state: StateView) -> int:
        """Replica bytes promised but not yet counted in the chain's provider load: uploads in
        progress and signed deals whose DealCreate is not on chain yet."""
        signed = sum(
            d.terms.replica_size
            for deal_id, d in self._deals.items()
            if dl.get_deal(state, deal_id) is None
        )
        return signed + sum(u.terms.replica_size for u in self._uploads.values())

    def _pending_collateral(self, state: StateView) -> int:
        return sum(
            d.terms.collateral
            for deal_id, d in self._deals.items()
            if dl.get_deal(state, deal_id) is None
        ) + sum(u.terms.collateral for u in self._uploads.values())

    def check_proposal(self, terms: dl.DealTerms) -> None:
        """Raise the specific error for terms this provider would not sign now (before any
        replica byte is accepted; the root is checked at the end of the upload)."""
        view = self._chain.read_view()
        state = ViewState(view)
        head = _head_height(view)
        if terms.provider != self.address:
            raise dl.InvalidDealTerms(
                f"the terms name provider 0x{terms.provider.hex()}, this node is "
                f"0x{self.address.hex()}"
            )
        dl.check_deal_terms(terms)
        offer = dl.get_offer(state, self.address)
        if offer is None:
            raise dl.OfferNotFound("this node has no storage offer on chain")
        deal_id = dl.compute_deal_id(terms)
        if dl.get_deal(state, deal_id) is not None:
            raise dl.DealExists(f"deal 0x{deal_id.hex()} exists on chain")
        if terms.sig_expiry_height < head + self.settings.min_sig_margin_heights:
            raise SignatureWindowRefused(
                f"the signature would expire at height {terms.sig_expiry_height}; the head is "
                f"{head} and at least {self.settings.min_sig_margin_heights} heights are needed"
            )
        if terms.sig_expiry_height > head + self.settings.max_sig_window_heights:
            raise SignatureWindowRefused(
                f"the signature would stay valid until height {terms.sig_expiry_height}, more "
                f"than {self.settings.max_sig_window_heights} heights past the head {head}"
            )
        params = economy_params(state)
        max_epochs = min(offer.max_epochs, params.max_deal_epochs)
        if terms.epochs > max_epochs:
            raise dl.DealTooLong(f"{terms.epochs} epochs exceed the offer's {max_epochs}")
        min_price = dl.compute_min_price_per_epoch(offer, terms.replica_size)
        if terms.price_per_epoch < min_price:
            raise dl.DealPriceTooLow(
                f"price_per_epoch {terms.price_per_epoch} is below the offer's {min_price}"
            )
        min_collateral = dl.compute_min_collateral(offer, terms, params.min_collateral_percent)
        if terms.collateral < min_collateral:
            raise dl.DealCollateralTooLow(
                f"collateral {terms.collateral} is below the least {min_collateral}"
            )
        in_progress = self._uploads_of(deal_id)
        load = dl.get_provider_load(state, self.address)
        promised = self._pending_bytes(state) - sum(u.terms.replica_size for u in in_progress)
        if load.bytes_in_use + promised + terms.replica_size > offer.capacity_bytes:
            raise dl.OfferCapacityExceeded(
                f"{terms.replica_size} replica bytes do not fit the offer's free capacity "
                f"({offer.capacity_bytes - load.bytes_in_use - promised} bytes)"
            )
        local = self._local_bytes() - sum(u.terms.replica_size for u in in_progress)
        if local + terms.replica_size > self.settings.max_replica_bytes:
            raise ReplicaBudgetExceeded(
                f"{terms.replica_size} replica bytes do not fit the local budget "
                f"({self.settings.max_replica_bytes - local} bytes free)"
            )
        collateral = self._pending_collateral(state) - sum(u.terms.collateral for u in in_progress)
        balance = view.get_account(self.address).balance
        if balance < collateral + terms.collateral:
            raise dl.ProviderCannotCoverCollateral(
                f"this provider holds {balance}, which cannot cover the collateral "
                f"{terms.collateral} on top of {collateral} promised to pending deals"
            )

    def _uploads_of(self, deal_id: Hash32) -> list[_Upload]:
        return [u for u in self._uploads.values() if u.deal_id == deal_id]

    async def _on_propose(self, peer: PeerId, terms: dl.DealTerms) -> UploadState:
        deal_id = dl.compute_deal_id(terms)
        total = terms.replica_size
        local = self._deals.get(deal_id)
        if local is not None and local.terms == terms:
            # Already stored and signed (a retry after a lost response): nothing to send.
            return UploadState(deal_id, total, total)
        session = self._uploads.get((peer, deal_id))
        if session is not None:
            session.last_active = trio.current_time()
            return UploadState(deal_id, session.received, total)
        if self.replicas is None:
            raise StorageAgentDisabled("the storage agent is not running")
        if len(self._uploads) >= self.settings.max_sessions:
            raise ProviderBusy(f"{len(self._uploads)} uploads are in progress; retry later")
        if sum(1 for p, _ in self._uploads if p == peer) >= self.settings.max_sessions_per_peer:
            raise ProviderBusy("too many uploads in progress from this peer")
        self.check_proposal(terms)
        path = self._uploads_dir / f"{deal_id.hex()}-{crypto.sha256(peer)[:8].hex()}.part"
        # A part file left by an earlier session of the same peer and terms resumes.
        received = 0
        with contextlib.suppress(FileNotFoundError):
            received = min(path.stat().st_size, total)
        self._uploads[(peer, deal_id)] = _Upload(
            peer, deal_id, terms, path, received, trio.current_time()
        )
        log.info(
            "deal 0x%s: upload of %d replica bytes from %s (at %d)",
            deal_id.hex()[:16],
            total,
            _peer_name(peer),
            received,
        )
        return UploadState(deal_id, received, total)

    def _session(self, peer: PeerId, deal_id: Hash32) -> _Upload:
        session = self._uploads.get((peer, deal_id))
        if session is None:
            raise UploadSessionError(
                f"no upload in progress for deal 0x{deal_id.hex()} from this peer; propose first"
            )
        return session

    async def _on_chunk(self, peer: PeerId, chunk: UploadChunk) -> UploadState:
        session = self._session(peer, chunk.deal_id)
        total = session.terms.replica_size
        async with session.lock:
            session.last_active = trio.current_time()
            if chunk.offset != session.received:
                raise UploadSessionError(
                    f"chunk at offset {chunk.offset}, the provider expects {session.received}",
                    data={"received": session.received},
                )
            end = chunk.offset + len(chunk.data)
            if end > total or not chunk.data:
                raise UploadSessionError(
                    f"chunk [{chunk.offset}, {end}) is empty or past the replica's {total} bytes",
                    data={"received": session.received},
                )
            await trio.to_thread.run_sync(_write_at, session.path, chunk.offset, chunk.data)
            session.received = end
            return UploadState(chunk.deal_id, end, total)

    def _on_status(self, peer: PeerId, deal_id: Hash32) -> UploadState:
        local = self._deals.get(deal_id)
        if local is not None and (peer, deal_id) not in self._uploads:
            return UploadState(deal_id, local.terms.replica_size, local.terms.replica_size)
        session = self._session(peer, deal_id)
        session.last_active = trio.current_time()
        return UploadState(deal_id, session.received, session.terms.replica_size)

    async def _on_finish(self, peer: PeerId, deal_id: Hash32) -> DealAccepted:
        local = self._deals.get(deal_id)
        if local is not None and (peer, deal_id) not in self._uploads:
            # Stored and signed already: the signature again (the first answer was lost).
            return DealAccepted(deal_id, self._sign(local.terms))
        session = self._session(peer, deal_id)
        async with session.lock:
            terms = session.terms
            if session.received != terms.replica_size:
                raise UploadSessionError(
                    f"{session.received} of {terms.replica_size} replica bytes received",
                    data={"received": session.received},
                )
            # The chain may have moved while the replica arrived: check the terms again.
            self.check_proposal(terms)
            store = self.replicas
            assert store is not None
            try:
                with session.path.open("rb") as src:
                    await store.put_replica_async(
                        deal_id, cast(BinaryIO, src), terms.replica_size, terms.replica_root
                    )
            except rp.ReplicaError:  # the root does not match, a size mismatch, ...
                self._drop_upload(session)
                raise
            try:
                await trio.to_thread.run_sync(self._write_terms, deal_id, terms)
            except BaseException:
                store.remove_replica(deal_id)
                raise
            self._deals[deal_id] = _LocalDeal(terms)
            self._drop_upload(session)
        log.info("deal 0x%s: replica verified and stored; terms signed", deal_id.hex()[:16])
        return DealAccepted(deal_id, self._sign(terms))

    def _sign(self, terms: dl.DealTerms) -> Signature:
        chain_id = self._chain.read_view().chain.chain_id
        return dl.sign_deal_terms(self._key, chain_id, terms)

    def _drop_upload(self, session: _Upload) -> None:
        self._uploads.pop((session.peer, session.deal_id), None)
        session.path.unlink(missing_ok=True)

    async def _expire_uploads_loop(self) -> None:
        while True:
            await trio.sleep(max(1.0, self.settings.upload_idle_s / 4))
            self.expire_uploads()

    def expire_uploads(self) -> int:
        """Drop sessions idle for ``upload_idle_s`` (their part files too); how many."""
        now = trio.current_time()
        stale = [
            u
            for u in self._uploads.values()
            if now - u.last_active > self.settings.upload_idle_s and not u.lock.locked()
        ]
        for session in stale:
            log.info("deal 0x%s: upload idle, dropped", session.deal_id.hex()[:16])
            self._drop_upload(session)
        return len(stale)

    def _terms_path(self, deal_id: Hash32) -> Path:
        return self._terms_dir / deal_id.hex()

    def _write_terms(self, deal_id: Hash32, terms: dl.DealTerms) -> None:
        path = self._terms_path(deal_id)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(terms.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _read_terms(self, deal_id: Hash32) -> dl.DealTerms | None:
        try:
            terms = dl.DealTerms.decode(self._terms_path(deal_id).read_bytes())
        except (FileNotFoundError, DecodeError):
            return None
        return terms if dl.compute_deal_id(terms) == deal_id else None

    def _forget(self, deal_id: Hash32, why: str) -> None:
        self._deals.pop(deal_id, None)
        store = self.replicas
        if store is not None and store.has_replica(deal_id):
            store.remove_replica(deal_id)
        self._terms_path(deal_id).unlink(missing_ok=True)
        log.info("deal 0x%s: replica deleted (%s)", deal_id.hex()[:16], why)

    # --- provider: challenges ----------------------------------------------------------------

    async def on_head(self, view: Any) -> list[Hash32]:
        """Look at up to ``deals_per_block`` local deals in the committed ``view``: answer open
        challenges, delete replicas of ended or never-created deals. Returns the ids of the
        DealProof transactions sent."""
        head = _head_height(view)
        self.last_head = head
        ids = sorted(self._deals)
        if not ids:
            return []
        count = min(len(ids), max(1, self.settings.deals_per_block))
        start = self._cursor % len(ids)
        batch = [ids[(start + i) % len(ids)] for i in range(count)]
        self._cursor = (start + count) % len(ids)
        state = ViewState(view)
        sent: list[Hash32] = []
        for deal_id in batch:
            local = self._deals.get(deal_id)
            if local is None:
                continue
            try:
                tx_id = await self._check_deal(view, state, head, deal_id, local)
            except NeuroSeedError as exc:
                log.error("deal 0x%s: %s", deal_id.hex()[:16], exc.message)
                continue
            except OSError as exc:  # an unreadable replica: this deal cannot be answered
                log.error("deal 0x%s: cannot read the replica: %s", deal_id.hex()[:16], exc)
                continue
            if tx_id is not None:
                sent.append(tx_id)
        return sent

    async def _check_deal(
        self, view: Any, state: StateView, head: int, deal_id: Hash32, local: _LocalDeal
    ) -> Hash32 | None:
        status = dl.deal_status(state, deal_id)
        if status is None:
            if head > local.terms.sig_expiry_height:
                self._forget(deal_id, "the DealCreate never reached the chain")
            return None
        if status.state != dl.DealState.ACTIVE:
            self._forget(deal_id, f"deal {status.state.name.lower()}")
            return None
        epoch = status.challenge_epoch
        due = status.challenge_due_height
        if epoch is None or due is None or head >= due:
            # Nothing open, or only the due height's block is left: a proof sent now lands in
            # the block after it at the earliest, too late.
            return None
        sent_at = local.answered.get(epoch)
        if sent_at is not None and head < sent_at + self.settings.resubmit_after_blocks:
            return None
        store = self.replicas
        assert store is not None

        def prove() -> tuple[rp.SegmentProof, ...]:
            with store.get_proof_tree(deal_id) as tree:
                return tree.prove_many(status.challenge_indexes)

        proofs = await trio.to_thread.run_sync(prove)
        tx_id = await self.send_transaction(dl.DealProof(deal_id, epoch, proofs), view)
        local.answered = {e: h for e, h in local.answered.items() if e >= epoch}
        local.answered[epoch] = head
        log.info(
            "deal 0x%s: answered the challenge of epoch %d (due %d)",
            deal_id.hex()[:16],
            epoch,
            due,
        )
        return tx_id

    def upload_count(self) -> int:
        """Upload sessions in progress."""
        return len(self._uploads)

    def local_deals(self) -> dict[Hash32, dl.DealTerms]:
        """The deals whose replicas this node keeps (signed; on chain or not yet)."""
        return {deal_id: d.terms for deal_id, d in self._deals.items()}

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
            # The size does not depend on the fee (a fixed-width uint256): price a draft.
            draft = make_transaction(self._key, chain_id, nonce, 0, body).encode()
            vtx = await trio.to_thread.run_sync(verify_transaction, draft)
            cost = fees.cost_of(view.params, ViewState(view), vtx)
            fee = cost + cost // max(1, self.settings.fee_tip_divisor)
            signed = make_transaction(self._key, chain_id, nonce, fee, body)
            tx_id = await self._submit(signed.encode())
            self._next_nonce = nonce + 1
            return tx_id

    # --- owner -------------------------------------------------------------------------------

    async def find_provider_peer(self, provider: Address) -> PeerId:
        """The connected peer whose agent answers INFO as ``provider``."""
        if self._network is None:
            raise StorageAgentDisabled("this node has no p2p network")
        for info in self._network.peers():
            if not info.connected:
                continue
            try:
                answer = await self._request(info.peer_id, DealMessageKind.INFO, InfoQuery())
                found = _decode_response(answer, ProviderInfo)
            except (P2PError, StorageAgentError):
                continue
            if found.provider == provider:
                return info.peer_id
        raise ProviderPeerNotFound(
            f"none of the connected peers is provider 0x{provider.hex()}; connect to it first "
            "or name its peer id"
        )

    async def _request(self, peer: PeerId, kind: DealMessageKind, body: Record) -> bytes:
        assert self._network is not None
        return await self._network.request(
            peer,
            PROTOCOL_DEAL,
            encode_request(kind, body),
            timeout_s=self.settings.request_timeout_s,
        )

    async def propose_deal(
        self,
        root: bytes,
        provider: Address,
        epochs: int,
        *,
        provider_peer: PeerId | None = None,
        price_per_epoch: int | None = None,
        collateral: int | None = None,
        progress: Progress | None = None,
        job: DealJob | None = None,
    ) -> DealOutcome:
        """Make a deal with ``provider`` for the artifact ``root`` (in the local blob store):
        build the replica, send it, get the provider's signature, submit the DealCreate.

        Price and collateral default to the least the provider's offer accepts. Raises the
        specific error of whatever stops it (the provider's refusals under their own class).
        """
        if self._blobs is None:
            raise StorageAgentDisabled("this node has no blob store")
        if self._network is None:
            raise StorageAgentDisabled("this node has no p2p network")
        self.open()
        blobs = self._blobs
        try:
            parse_cid(root)
        except DecodeError as exc:
            raise ArtifactNotLocal(f"not a CID: {exc.message}") from exc
        try:
            size = await trio.to_thread.run_sync(file_size, blobs, root)
            missing = await trio.to_thread.run_sync(missing_blocks, blobs, root)
        except BlockNotFound as exc:
            raise ArtifactNotLocal("the artifact's root block is not in the local store") from exc
        if missing:
            raise ArtifactNotLocal(
                f"{len(missing)} blocks of the artifact are missing locally; fetch it first"
            )
        view = self._chain.read_view()
        state = ViewState(view)
        offer = dl.get_offer(state, provider)
        if offer is None:
            raise dl.OfferNotFound(f"provider 0x{provider.hex()} has no storage offer")
        params = economy_params(state)
        if epochs <= 0 or epochs > min(offer.max_epochs, params.max_deal_epochs):
            raise dl.DealTooLong(
                f"{epochs} epochs: the offer accepts 1..{min(offer.max_epochs, params.max_deal_epochs)}"
            )
        rsize = rp.replica_size(size)
        price = (
            dl.compute_min_price_per_epoch(offer, rsize)
            if price_per_epoch is None
            else price_per_epoch
        )
        price = max(price, 1)
        escrow = epochs * price
        balance = view.get_account(self.address).balance
        if balance < escrow:
            raise dl.OwnerCannotPay(
                f"0x{self.address.hex()} holds {balance}, the deal's escrow is {escrow}"
            )
        deal_nonce = Hash32(secrets.token_bytes(32))
        mask_key = rp.deal_mask_key(self._key.secret, deal_nonce)
        if job is not None:
            job.state = JobState.BUILDING
        peer = provider_peer or await self.find_provider_peer(provider)
        out_path = self._outgoing_dir / f"{deal_nonce.hex()}.replica"
        try:
            src = _ArtifactReader(blobs, root, size)
            info = await trio.to_thread.run_sync(
                rp.build_replica_file, cast(BinaryIO, src), size, mask_key, out_path
            )
            draft = dl.DealTerms(
                root=root,
                owner=self.address,
                provider=provider,
                replica_root=info.root,
                replica_size=info.replica_size,
                segment_count=info.segments,
                file_size=size,
                epochs=epochs,
                price_per_epoch=Amount(price),
                collateral=Amount(0),
                deal_nonce=deal_nonce,
                sig_expiry_height=_head_height(view) + self.settings.sig_expiry_heights,
            )
            least = dl.compute_min_collateral(offer, draft, params.min_collateral_percent)
            terms = replace(draft, collateral=Amount(least if collateral is None else collateral))
            deal_id = dl.compute_deal_id(terms)
            if job is not None:
                job.deal_id, job.terms, job.total_bytes = deal_id, terms, terms.replica_size
                job.state = JobState.SENDING
            signature = await self._send_replica(peer, terms, out_path, progress, job)
        finally:
            out_path.unlink(missing_ok=True)
        signer = dl.deal_terms_signer(view.chain.chain_id, terms, signature)
        if signer != provider:
            raise dl.DealSignatureInvalid(
                f"the peer signed as 0x{signer.hex()}, not as the provider 0x{provider.hex()}"
            )
        tx_id = await self.send_transaction(dl.DealCreate(terms, signature))
        if job is not None:
            job.tx_id, job.state = tx_id, JobState.SUBMITTED
        log.info("deal 0x%s: signed by the provider; DealCreate sent", deal_id.hex()[:16])
        return DealOutcome(deal_id, tx_id, terms, signature)

    async def _send_replica(
        self,
        peer: PeerId,
        terms: dl.DealTerms,
        path: Path,
        progress: Progress | None,
        job: DealJob | None,
    ) -> Signature:
        """Propose, upload from wherever the provider is, finish; retry transient failures
        (a timeout, a reset connection) up to ``upload_retries`` times in a row, resuming from
        the offset the provider reports."""
        deal_id = dl.compute_deal_id(terms)
        total = terms.replica_size
        failures = 0
        received: int | None = None
        with path.open("rb") as replica:
            while True:
                try:
                    if received is None:
                        answer = await self._request(
                            peer, DealMessageKind.PROPOSE, DealProposal(terms)
                        )
                        received = _decode_response(answer, UploadState).received
                    while received < total:
                        if progress is not None:
                            progress(received, total)
                        if job is not None:
                            job.sent_bytes = received
                        n = min(UPLOAD_CHUNK_BYTES, total - received)
                        data = await trio.to_thread.run_sync(_read_at, replica, received, n)
                        answer = await self._request(
                            peer, DealMessageKind.UPLOAD, UploadChunk(deal_id, received, data)
                        )
                        received = _decode_response(answer, UploadState).received
                        failures = 0
                    if progress is not None:
                        progress(total, total)
                    if job is not None:
                        job.sent_bytes, job.state = total, JobState.SIGNING
                    answer = await self._request(peer, DealMessageKind.FINISH, UploadQuery(deal_id))
                    accepted = _decode_response(answer, DealAccepted)
                    return accepted.signature
                except (PeerUnreachable, RequestFailed, UploadSessionError) as exc:
                    failures += 1
                    if failures > self.settings.upload_retries:
                        raise
                    log.info(
                        "deal 0x%s: upload interrupted (%s); resuming",
                        deal_id.hex()[:16],
                        exc.message,
                    )
                    await trio.sleep(self.settings.retry_backoff_s * failures)
                    received = None  # ask again where the provider is (PROPOSE resumes)

    # --- owner: background jobs (RPC) --------------------------------------------------------

    def start_deal(
        self,
        root: bytes,
        provider: Address,
        epochs: int,
        *,
        provider_peer: PeerId | None = None,
        price_per_epoch: int | None = None,
        collateral: int | None = None,
    ) -> DealJob:
        """Run ``propose_deal`` in the agent's nursery; poll it with ``job_status``."""
        if self._nursery is None:
            raise StorageAgentDisabled("the storage agent is not running")
        job = DealJob(secrets.token_hex(8), root, provider, epochs)
        self._jobs[job.job_id] = job
        self._trim_jobs()

        async def work() -> None:
            try:
                await self.propose_deal(
                    root,
                    provider,
                    epochs,
                    provider_peer=provider_peer,
                    price_per_epoch=price_per_epoch,
                    collateral=collateral,
                    job=job,
                )
            except NeuroSeedError as exc:
                job.state = JobState.FAILED
                job.error_code, job.error_message = exc.code, exc.message
                log.warning("deal job %s failed: %s", job.job_id, exc.message)
            except OSError as exc:  # disk full, unreadable blob: the job fails, not the node
                job.state = JobState.FAILED
                job.error_code = StorageAgentError.code
                job.error_message = f"I/O error: {exc.strerror or exc}"
                log.warning("deal job %s failed: %s", job.job_id, exc)
            finally:
                job.done.set()

        self._nursery.start_soon(work)
        return job

    def job_status(self, job_id: str) -> DealJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no deal job {job_id!r} on this node")
        return job

    def _trim_jobs(self) -> None:
        finished = [j for j in self._jobs.values() if j.done.is_set()]
        excess = len(self._jobs) - self.settings.max_jobs
        for job in finished[: max(0, excess)]:
            del self._jobs[job.job_id]


# --- helpers -----------------------------------------------------------------------------------


def _write_at(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of ``path`` (created if missing), flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, offset)  # a resumed session drops whatever followed the last ack
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise rp.ReplicaSizeMismatch(f"replica file ended at {offset + len(data)}")
    return data


def _peer_name(peer: PeerId) -> str:
    return peer.hex()[:16] if not peer.isascii() else peer.decode("ascii", "replace")

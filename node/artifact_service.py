"""The node's side of artifacts (DESIGN §7, §8): its blob store, uploads, fetch jobs, the chunk
server's policy from chain state, and the owner key agent.

``ArtifactService`` runs in the node's nursery (``run_node``):

* the **blob store** at ``<datadir>/blobs`` (a separate LevelDB index and block files, never the
  chain DB), with the configured quota;
* a ``ChunkServer`` on ``/neuroseed/chunks/1`` whose ``ChainPolicy`` reads chain state: dag-pb
  nodes and leaf 0 of every artifact are public; so are all blocks of free artifacts; blocks of a
  priced dataset are served only against a valid ``AccessRequest`` whose grant is an on-chain
  purchase covering that root (``purchases.purchase_grants``) or a storage deal for it;
* DHT ``provide`` of every pinned root at start and after each import or complete fetch;
* **uploads** (``import_upload``): an uploaded safetensors file is converted to format v1, encrypted
  with a fresh content key when it will be priced, imported, pinned and provided — nothing is left
  half-written (temp files removed, no pin) on any failure;
* **fetch jobs** (``start_fetch``/``fetch_status``): ``ChunkFetcher`` downloads from the providers
  the DHT names; a job is resumable because blocks already stored are never fetched again;
* the **owner key agent** (``node.key_agent``) when the node has an operator account.

Content keys of priced datasets this node uploaded live in ``<datadir>/artifact-keys/`` (directory
0700, files 0600) and are never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio

from node.api import ViewState
from node.economy.datasets import get_dataset_by_root
from node.economy.models import get_model_by_root
from node.encoding import Record, limit
from node.errors import MempoolRejected, NeuroSeedError, NotFound
from node.models.safetensors_header import SafetensorsHeader
from node.p2p.chunks import BlockUnavailable, ChunkFetcher, ChunkServer, FetchProgress
from node.storage.blobstore import BlobStore, BlockNotFound
from node.storage.encryption import (
    KEY_BYTES,
    SALT_BYTES,
    encrypt_stream,
    generate_content_key,
    generate_salt,
    key_check,
)
from node.storage.format_v1 import (
    LEAF0_BYTES,
    ArtifactProof,
    InvalidDataset,
    convert_to_v1,
    dataset_rows,
    make_leaf0,
    make_proof,
)
from node.storage.importer import file_size, import_file, missing_blocks, verify_cid_block
from node.storage.unixfs import DAG_PB_CODEC, RAW_CODEC, decode_node, parse_cid
from node.types import Address, Hash32

log = logging.getLogger(__name__)

COPY_BYTES = 1 << 20
KEY_FILE_SUFFIX = ".key"
MAX_FETCH_JOBS = 256  # finished jobs beyond this are forgotten, oldest first
PROVIDERS_WANTED = 20
POLICY_CACHE = 4096  # roots whose leaf 0 / pricing the chunk policy remembers

# --- errors (codes 2270–2289) ----------------------------------------------------------------------


class ArtifactError(NeuroSeedError):
    """Base of the node's artifact service errors (their messages are safe to show callers)."""

    code = 2270
    reason = "artifact service error"


class UploadTooLarge(ArtifactError):
    code = 2271
    reason = "upload exceeds the node's size limit"


class ArtifactsDisabled(ArtifactError):
    code = 2272
    reason = "this node serves no artifacts"


class LocalCallersOnly(ArtifactError):
    code = 2273
    reason = "only served to callers on this machine"


class ArtifactUnavailable(MempoolRejected):
    """Mempool admission of a dataset registration: its blocks are neither all stored here nor
    provided by any peer (DESIGN §8: availability is checked at admission, never in consensus)."""

    code = 2274
    reason = "the artifact's blocks are not available"


class UnknownArtifact(NotFound):
    code = 2275
    reason = "artifact not stored on this node"


class FetchJobNotFound(NotFound):
    code = 2276
    reason = "no such fetch job"


class NoProviders(ArtifactError):
    code = 2277
    reason = "no peer provides this artifact"


class FetchFailed(ArtifactError):
    code = 2278
    reason = "artifact fetch failed"


class ContentKeyError(ArtifactError):
    code = 2279
    reason = "content key store error"


class NoOperatorAccount(ArtifactError):
    code = 2280
    reason = "this node has no operator account"


class RangeNotSatisfiable(ArtifactError):
    code = 2281
    reason = "byte range outside the artifact"


class UploadFailed(ArtifactError):
    code = 2282
    reason = "upload could not be stored"


# --- content keys ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContentKey(Record):
    """The secret of one priced artifact this node uploaded (``<datadir>/artifact-keys/``)."""

    root: bytes = field(metadata=limit(128))
    key: bytes = field(metadata=limit(KEY_BYTES))
    salt: bytes = field(metadata=limit(SALT_BYTES))
    data_size: int
    plain_sha256: bytes = field(metadata=limit(32))

    def __repr__(self) -> str:  # never print the key
        return f"ContentKey(root={self.root.hex()}, key=<secret>)"


class ContentKeyStore:
    """Content keys by root CID, one file each (mode 0600) in a 0700 directory; written temp +
    fsync + rename, so a crash leaves the old file or the new one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise ContentKeyError(
                f"cannot create the content key directory: {exc.strerror}"
            ) from None

    def _path(self, root: bytes) -> Path:
        return self.directory / (root.hex() + KEY_FILE_SUFFIX)

    def has(self, root: bytes) -> bool:
        return self._path(root).is_file()

    def get(self, root: bytes) -> ContentKey | None:
        try:
            raw = self._path(root).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ContentKeyError(f"cannot read a content key: {exc.strerror}") from None
        record = ContentKey.decode(raw)
        if record.root != root:
            raise ContentKeyError("a content key file names another root")
        return record

    def put(self, record: ContentKey) -> None:
        path = self._path(record.root)
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
        data = record.encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ContentKeyError(f"cannot write a content key: {exc.strerror}") from None

    def delete(self, root: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(root).unlink()

    def roots(self) -> list[bytes]:
        out = []
        for p in self.directory.glob("*" + KEY_FILE_SUFFIX):
            with contextlib.suppress(ValueError):
                out.append(bytes.fromhex(p.name[: -len(KEY_FILE_SUFFIX)]))
        return sorted(out)


# --- uploads -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What an upload produced: everything a ``DatasetRegister`` needs besides the text fields."""

    root: bytes  # binary CID
    size: int  # bytes of the stored v1 file
    blocks: int
    proof: ArtifactProof
    header: SafetensorsHeader
    header_json: bytes  # unpadded
    data_size: int  # plaintext tensor data bytes
    rows: int | None  # None when the file is not a dataset (tensors without a shared first dim)
    encrypted: bool
    salt: bytes | None
    key_check: bytes | None
    plain_data_hash: bytes  # sha-256 of the plaintext tensor data


class _HashingReader:
    """Reads a file, hashing the bytes past ``skip`` (the plaintext data after leaf 0)."""

    def __init__(self, inner: BinaryIO, skip: int) -> None:
        self._inner = inner
        self._skip = skip
        self._pos = 0
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        if data:
            start = max(0, self._skip - self._pos)
            if start < len(data):
                self.digest.update(memoryview(data)[start:])
            self._pos += len(data)
        return data


def _temp_path(directory: Path, what: str) -> Path:
    return directory / f".{what}-{secrets.token_hex(8)}.tmp"


def import_upload(
    store: BlobStore,
    keys: ContentKeyStore,
    src_path: Path,
    work_dir: Path,
    *,
    encrypted: bool,
    rng: Callable[[int], bytes] | None = None,
) -> UploadResult:
    """Convert ``src_path`` (a safetensors file) to format v1, encrypt its data with a fresh key
    and salt when ``encrypted``, import it into ``store`` and pin it. Blocking: run it in a worker
    thread. On any failure nothing stays behind: temp files are removed, the pin (if this call
    made it) is dropped and no content key is kept."""
    work_dir.mkdir(parents=True, exist_ok=True)
    v1_path = _temp_path(work_dir, "v1")
    enc_path = _temp_path(work_dir, "enc")
    pinned_here: bytes | None = None
    try:
        with open(src_path, "rb") as src, open(v1_path, "wb") as dst:
            conv = convert_to_v1(src, dst)
        try:
            rows: int | None = dataset_rows(conv.header)
        except InvalidDataset:
            rows = None
        content: ContentKey | None = None
        if encrypted:
            key = generate_content_key(rng)
            salt = generate_salt(rng)
            with open(v1_path, "rb") as plain, open(enc_path, "wb") as out:
                out.write(make_leaf0(conv.header_json))
                plain.seek(LEAF0_BYTES)
                enc = encrypt_stream(key, salt, plain, out, conv.data_size)
            v1_path.unlink()
            stored_path = enc_path
            plain_hash = enc.plain_sha256
            content = ContentKey(b"", key, salt, conv.data_size, plain_hash)
        else:
            stored_path = v1_path
            plain_hash = b""
        with open(stored_path, "rb") as fh:
            reader = _HashingReader(fh, LEAF0_BYTES)
            # Pins the root with every block; QuotaExceeded (nothing pinned) if it cannot fit.
            result = import_file(store, reader, pin=True)  # type: ignore[arg-type]
        root = result.root
        if encrypted:
            pinned_here = root  # a fresh key and salt: nobody else pinned this root
        else:
            plain_hash = reader.digest.digest()
        proof = make_proof(lambda cid: _block(store, cid), root)
        if content is not None:
            keys.put(ContentKey(root, content.key, content.salt, content.data_size, plain_hash))
        return UploadResult(
            root=root,
            size=result.size,
            blocks=result.blocks,
            proof=proof,
            header=conv.header,
            header_json=conv.header_json,
            data_size=conv.data_size,
            rows=rows,
            encrypted=encrypted,
            salt=None if content is None else content.salt,
            key_check=None if content is None else key_check(content.salt, content.key),
            plain_data_hash=plain_hash,
        )
    except BaseException:
        if pinned_here is not None:
            with contextlib.suppress(Exception):
                store.unpin(pinned_here)
        raise
    finally:
        for p in (v1_path, enc_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _block(store: BlobStore, cid: bytes) -> bytes:
    data = store.get(cid)
    if data is None:
        raise BlockNotFound(f"block {cid.hex()} is not in the local store")
    return data


def _all_blocks(store: BlobStore, root: bytes) -> Iterator[bytes]:
    """Every block CID of the file under ``root`` (walks the stored dag-pb nodes)."""
    stack = [root]
    seen: set[bytes] = set()
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        yield cid
        if cid_codec(cid) == DAG_PB_CODEC:
            data = store.get(cid)
            if data is not None:
                stack.extend(bytes(link.cid) for link in decode_node(data).links)


def cid_codec(cid: bytes) -> int:
    code: int = parse_cid(cid).codec.code
    return code


def leaf0_cid(store: BlobStore, root: bytes) -> bytes | None:
    """The CID of leaf 0 of the file under ``root``, following first links through the locally
    stored dag-pb nodes; None when a node on the way is not stored here."""
    cid = root
    for _ in range(8):
        if cid_codec(cid) == RAW_CODEC:
            return cid
        data = store.get(cid)
        if data is None:
            return None
        node = decode_node(data)
        if not node.links:
            return None
        cid = bytes(node.links[0].cid)
    return None


# --- the chunk server's policy from chain state -----------------------------------------------------

StateGetter = Callable[[bytes], "bytes | None"]


@dataclass(frozen=True, slots=True)
class _RootInfo:
    leaf0: bytes | None
    priced: bool | None  # None: not registered as a dataset (yet)


class ChainPolicy:
    """Which blocks the chunk server hands out (DESIGN §8 "Access to priced artifacts"); an
    ``node.p2p.chunks.AccessPolicy``.

    Public: every dag-pb node (they name leaves, nothing more), leaf 0 of every artifact, all
    blocks of a free dataset or model and of artifacts not registered as priced. A priced
    dataset's or model's other
    blocks — and those of a priced upload this node holds the key of but has not registered yet —
    need a valid access request (the chunk server verified its signature, peer binding and
    expiry) whose grant is an on-chain purchase covering the root, by that address, or a live
    storage deal of that provider for it.
    """

    def __init__(
        self,
        read_view: Callable[[], Any],
        keys: ContentKeyStore | None = None,
    ) -> None:
        self._read_view = read_view
        self._keys = keys
        self._priced: OrderedDict[bytes, bool] = OrderedDict()

    def is_restricted(self, root: bytes) -> bool:
        """True when the data leaves of ``root`` need an access request."""
        known = self._priced.get(root)
        if known is not None:
            self._priced.move_to_end(root)
            return known
        state = ViewState(self._read_view())
        record: Any = get_dataset_by_root(state, root)
        if record is None:
            record = get_model_by_root(state, root)  # priced models are encrypted the same way
        if record is None:
            # Not registered (yet): restricted only if it is a priced upload of ours.
            return self._keys is not None and self._keys.has(root)
        # A registration never changes: remember it.
        restricted = bool(record.is_encrypted)
        self._priced[root] = restricted
        while len(self._priced) > POLICY_CACHE:
            self._priced.popitem(last=False)
        return restricted

    async def authorize(
        self,
        peer: Any,
        root: bytes,
        block_cid: bytes,
        access: Any,
        *,
        leaf_index: int | None,
    ) -> bool:
        if leaf_index is None or leaf_index == 0:
            return True  # dag-pb nodes and the header leaf are public (format v1)
        if not self.is_restricted(root):
            return True
        if access is None:
            return False
        return self.grant_covers(bytes(access.grant_id), bytes(access.address), root)

    def grant_covers(self, grant: bytes, address: bytes, root: bytes) -> bool:
        return _grant_covers(ViewState(self._read_view()), grant, address, root)


def _grant_covers(state: ViewState, grant: bytes, address: bytes, root: bytes) -> bool:
    """Does the on-chain grant ``grant`` give ``address`` the blocks of ``root``: a purchase by
    that buyer covering the root, or a live storage deal of that provider for it."""
    from node.economy.deals import DealState, get_deal
    from node.economy.purchases import purchase_grants

    if len(grant) != 32:
        return False
    if purchase_grants(state, Hash32(grant), Address(address), root):
        return True
    deal = get_deal(state, grant)  # type: ignore[arg-type]
    return (
        deal is not None
        and deal.state == DealState.ACTIVE
        and bytes(deal.terms.provider) == address
        and bytes(deal.terms.root) == root
    )


# --- fetch jobs ------------------------------------------------------------------------------------


@dataclass
class FetchJob:
    """One download into the local blob store, as ``ns_fetchStatus`` reports it."""

    id: str
    root: bytes
    leaves: tuple[int, ...] | None
    state: str = "running"  # running | done | failed
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    providers: int = 0
    blocks_present: int = 0  # found in the store already (a resumed job)
    blocks_known: int = 0  # blocks of the DAG walked so far
    missing: int | None = None  # blocks still missing when known
    error: str | None = None
    error_code: int | None = None
    started_ms: int = 0
    finished_ms: int | None = None
    done: trio.Event = field(default_factory=trio.Event)


# --- local presence --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    root: bytes
    size: int | None  # None: the root block is not stored here
    pinned: bool
    blocks_present: int
    blocks_missing: int
    complete: bool
    providers: tuple[str, ...]
    priced_key_held: bool


def artifact_presence(store: BlobStore, root: bytes) -> tuple[int | None, int, int]:
    """(file size or None, blocks present, blocks missing as far as the stored nodes tell)."""
    if not store.has(root):
        return None, 0, 1
    size = file_size(store, root)
    present = 0
    for cid in _all_blocks(store, root):
        if store.has(cid):
            present += 1
    missing = len(missing_blocks(store, root))
    return size, present, missing


# --- the service -----------------------------------------------------------------------------------


class ArtifactService:
    """The node's artifacts: blob store, chunk server and fetcher, uploads, fetch jobs."""

    def __init__(
        self,
        store: BlobStore,
        network: Any,
        read_view: Callable[[], Any],
        *,
        keys: ContentKeyStore,
        uploads_dir: Path,
        policy: ChainPolicy | None = None,
        rng: Callable[[int], bytes] | None = None,
    ) -> None:
        self.store = store
        self.network = network
        self.keys = keys
        self.uploads_dir = uploads_dir
        self._read_view = read_view
        self.policy = policy or ChainPolicy(read_view, keys)
        self._rng = rng
        self._jobs: OrderedDict[str, FetchJob] = OrderedDict()
        self._job_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.server: Any = None
        self.fetcher: Any = None

    @classmethod
    def open(
        cls,
        layout: Any,
        network: Any,
        read_view: Callable[[], Any],
        *,
        quota_bytes: int,
    ) -> ArtifactService:
        """The service over a data directory's ``layout`` (``node.config.DataDirLayout``): the
        blob store at ``layout.blobs`` (opened here; ``close`` closes it), content keys at
        ``layout.artifact_keys``, upload temp files in ``layout.uploads``."""
        store = BlobStore.open(layout.blobs, verify=verify_cid_block, quota_bytes=quota_bytes)
        try:
            keys = ContentKeyStore(layout.artifact_keys)
        except BaseException:
            store.close()
            raise
        return cls(store, network, read_view, keys=keys, uploads_dir=layout.uploads)

    def close(self) -> None:
        self.store.close()

    @property
    def peer_id(self) -> Any:
        return None if self.network is None else self.network.peer_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve chunks, provide every pinned root, and own the fetch jobs until cancelled."""
        self._clear_uploads()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.network is not None:
                self.server = ChunkServer(
                    self.store, self.network, self.policy, chain_id=self._chain_id()
                )
                self.fetcher = ChunkFetcher(self.store, self.network)
                self.server.install()
                nursery.start_soon(self._provide_all)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _chain_id(self) -> int | None:
        view = self._read_view()
        chain = getattr(view, "chain", None)
        return None if chain is None else int(chain.chain_id)

    def _clear_uploads(self) -> None:
        """Temp files of uploads interrupted by a crash are garbage: remove them."""
        with contextlib.suppress(FileNotFoundError):
            for p in self.uploads_dir.iterdir():
                if p.name.endswith(".tmp") or p.name.startswith(".upload-"):
                    with contextlib.suppress(OSError):
                        p.unlink()

    async def _provide_all(self) -> None:
        for root in await trio.to_thread.run_sync(self.store.pins):
            await self.provide(root)

    async def provide(self, root: bytes) -> None:
        """Announce ``root`` in the DHT (best effort: a failure is logged, never raised)."""
        if self.network is None or not hasattr(self.network, "provide"):
            return
        try:
            await self.network.provide(root)
        except Exception as exc:
            log.warning("could not announce artifact %s: %s", _show(root), exc)

    # --- uploads ---

    def new_upload_path(self) -> Path:
        """A fresh temp path in the uploads directory for an upload being received."""
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        return self.uploads_dir / f".upload-{secrets.token_hex(8)}.tmp"

    async def import_upload(self, src_path: Path, *, encrypted: bool) -> UploadResult:
        """Import a received upload (removes ``src_path`` whatever happens) and provide it."""
        try:
            result = await trio.to_thread.run_sync(
                lambda: import_upload(
                    self.store,
                    self.keys,
                    src_path,
                    self.uploads_dir,
                    encrypted=encrypted,
                    rng=self._rng,
                )
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                src_path.unlink()
        await self.provide(result.root)
        return result

    # --- presence and availability ---

    async def artifact_info(self, root: bytes) -> ArtifactInfo:
        size, present, missing = await trio.to_thread.run_sync(artifact_presence, self.store, root)
        providers: tuple[str, ...] = ()
        if self.network is not None and hasattr(self.network, "find_providers"):
            with trio.move_on_after(5):
                found = await self.network.find_providers(root, PROVIDERS_WANTED)
                providers = tuple("0x" + bytes(p).hex() for p in found)
        return ArtifactInfo(
            root=root,
            size=size,
            pinned=self.store.is_pinned(root),
            blocks_present=present,
            blocks_missing=missing,
            complete=size is not None and missing == 0,
            providers=providers,
            priced_key_held=self.keys.has(root),
        )

    async def check_available(self, root: bytes) -> None:
        """Raise ``ArtifactUnavailable`` unless every block of ``root`` is stored here or some
        peer provides it (mempool admission of a dataset registration)."""
        if self.store.has(root):
            missing = await trio.to_thread.run_sync(missing_blocks, self.store, root)
            if not missing:
                return
        providers: list[Any] = []
        if self.network is not None and hasattr(self.network, "find_providers"):
            with trio.move_on_after(10):
                providers = list(await self.network.find_providers(root, 1))
        if not providers:
            raise ArtifactUnavailable(
                f"artifact {_show(root)} is neither stored on this node nor provided by any "
                "peer; upload it first (neuroseed dataset add does)",
                data={"root": "0x" + root.hex()},
            )

    # --- fetch jobs ---

    def start_fetch(
        self,
        root: bytes,
        *,
        leaves: Collection[int] | None = None,
        access: Any = None,
    ) -> FetchJob:
        """Start (or join) a download of ``root`` (only ``leaves`` and the nodes above them when
        given) into the blob store; returns its job. The same running request returns the same
        job; a new job after an interruption resumes (stored blocks are not fetched again)."""
        if self._nursery is None:
            raise ArtifactsDisabled("the artifact service is not running")
        if self.fetcher is None:
            raise ArtifactsDisabled("this node has no peer-to-peer network to fetch from")
        wanted = None if leaves is None else tuple(sorted(set(leaves)))
        for job in self._jobs.values():
            if job.state == "running" and job.root == root and job.leaves == wanted:
                return job
        job = FetchJob(
            id=f"{next(self._job_ids)}-{secrets.token_hex(4)}",
            root=root,
            leaves=wanted,
            started_ms=int(time.time() * 1000),
        )
        self._jobs[job.id] = job
        self._forget_old_jobs()
        self._nursery.start_soon(self._run_fetch, job, access)
        return job

    def fetch_status(self, job_id: str) -> FetchJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise FetchJobNotFound(
                f"no fetch job {job_id[:40]!r} on this node (jobs are kept in "
                "memory: start it again to resume)"
            )
        return job

    def _forget_old_jobs(self) -> None:
        while len(self._jobs) > MAX_FETCH_JOBS:
            oldest = next((k for k, j in self._jobs.items() if j.state != "running"), None)
            if oldest is None:
                return
            del self._jobs[oldest]

    async def _run_fetch(self, job: FetchJob, access: Any) -> None:
        try:
            await self._fetch(job, access)
            job.state = "done"
        except NeuroSeedError as exc:
            job.state, job.error, job.error_code = "failed", exc.message, exc.code
            log.info("fetch of %s failed: %s", _show(job.root), exc.message)
        except Exception as exc:
            job.state, job.error, job.error_code = "failed", str(exc) or type(exc).__name__, None
            log.warning("fetch of %s failed", _show(job.root), exc_info=True)
        finally:
            job.finished_ms = int(time.time() * 1000)
            job.done.set()

    async def _fetch(self, job: FetchJob, access: Any) -> None:
        root = job.root
        if job.leaves is None and self.store.has(root):
            missing = await trio.to_thread.run_sync(missing_blocks, self.store, root)
            if not missing:
                job.missing = 0
                return
        providers = [
            p
            for p in await self.network.find_providers(root, PROVIDERS_WANTED)
            if p != self.network.peer_id
        ]
        job.providers = len(providers)
        if not providers:
            raise NoProviders(f"no peer provides artifact {_show(root)} (yet); try again later")

        def on_progress(p: FetchProgress) -> None:
            job.blocks_fetched = p.blocks_fetched
            job.bytes_fetched = p.bytes_fetched
            job.blocks_present = p.blocks_present
            job.blocks_known = p.blocks_known

        try:
            report = await self.fetcher.fetch(
                root, providers, leaves=job.leaves, access=access, progress=on_progress
            )
        except BlockUnavailable as exc:
            raise FetchFailed(
                f"{exc.message} (a priced dataset needs a purchase: neuroseed dataset buy)",
                data={"root": "0x" + root.hex()},
            ) from exc
        job.blocks_fetched = report.blocks_fetched
        job.bytes_fetched = report.bytes_fetched
        job.blocks_present = report.blocks_present
        if job.leaves is None:
            missing = await trio.to_thread.run_sync(missing_blocks, self.store, root)
            job.missing = len(missing)
            if missing:
                raise FetchFailed(f"{len(missing)} blocks of {_show(root)} are still missing")
            await self.provide(root)


def _show(cid: bytes) -> str:
    try:
        return str(parse_cid(cid))
    except Exception:
        return cid.hex()

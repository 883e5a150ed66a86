"""The buyer's side of a key-delivery dispute (docs/adr/0006-fair-exchange-key-delivery.md).

Given a purchase, the source dataset's record, the buyer's one-off private key and read access to
the stored ciphertext (its UnixFS leaves and the dag-pb nodes above them), ``plan_dispute``
decides whether the owner is at fault and builds the transaction bodies that prove it on chain:

* the posted key does not unwrap, or unwraps to a key that fails the registered key check → one
  ``KeyDispute`` without a leaf (judged from the key alone);
* otherwise the data leaves (all, or one) are decrypted and the first that fails is disputed: in
  one ``KeyDispute`` carrying the leaf and its dag-pb path when the signed transaction fits the
  chain's ``max_tx_bytes`` (a short final leaf), else ``LeafDisputeOpen`` followed by the
  ``LeafDisputePart`` sequence (a full 1 MiB leaf in 32 KiB parts);
* every leaf decrypts → ``NoFaultFound``: the chain would reject the dispute (or, by parts, pay
  the owner and charge the buyer every fee).

Each plan is checked here with the chain's own rules (``verify_leaf_path``, ``check_dispute``)
before it is returned, so what is sent is judged as predicted. ``plan_resume`` finishes a leaf
dispute whose parts were cut short (a crash, a timeout): the chain keeps how many bytes it holds.

Nothing here talks to the network. Stored data comes through a ``StoredArtifact``:
``BlockArtifact`` reads blocks by CID (a ``BlobStore``, a dict), ``RangeArtifact`` reads byte
ranges of the file (the node's ``GET /artifacts/<cid>``) and rebuilds the dag-pb nodes by
re-chunking the file in one streaming pass. Both block on I/O and hashing: trio callers run these
functions with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from multiformats import CID

from node import crypto
from node.consensus.txs import MAX_BODY_BYTES, make_transaction
from node.economy.datasets import DatasetRecord
from node.economy.purchases import (
    DISPUTE_PART_BYTES,
    MAX_DISPUTE_PATH,
    DisputeChunk,
    DisputeProofMismatch,
    KeyDispute,
    LeafDispute,
    LeafDisputeOpen,
    LeafDisputePart,
    PurchaseRecord,
    Share,
    ShareState,
    key_wrap_context,
    verify_leaf_path,
)
from node.encoding import Record
from node.errors import DecodeError, NeuroSeedError
from node.storage.encryption import (
    TAG_BYTES,
    DecryptionFailed,
    DisputeVerdict,
    EncryptionError,
    check_dispute,
    chunk_count,
    decrypt_chunk,
    is_last_chunk,
    plain_chunk_size,
    unwrap_key,
)
from node.storage.unixfs import (
    CHUNK_SIZE,
    DAG_PB_CODEC,
    RAW_CODEC,
    BlockMismatch,
    UnixfsBuilder,
    decode_node,
    parse_cid,
    raw_cid,
    verify_block,
)
from node.types import Amount, Hash32

DisputeBody = KeyDispute | LeafDisputeOpen | LeafDisputePart
BlockGetter = Callable[[bytes], bytes | None]
"""``get(cid)``: the stored block named by the binary CID ``cid``, or None when absent."""
RangeReader = Callable[[int, int], bytes]
"""``read(start, end)``: bytes ``[start, end)`` of the stored file."""

_UINT64_MAX = (1 << 64) - 1
# Signs throwaway drafts to measure a transaction: the encoding's size does not depend on the key
# (a 65-byte signature) or the fee (a fixed-width uint256); the largest nonce and chain id bound
# their variable-width integers.
_SIZING_KEY = crypto.PrivateKey(b"\x01" * 32)
_DISPUTABLE = (ShareState.KEY_POSTED, ShareState.LEAF_DISPUTE)


# --- errors (2283–2289) --------------------------------------------------------------------------


class DisputeClientError(NeuroSeedError):
    """Base of the errors of preparing a buyer's dispute."""

    code = 2283
    reason = "cannot prepare the dispute"


class NoFaultFound(DisputeClientError):
    """The posted key unwraps, matches the key check and decrypts every leaf checked."""

    code = 2284
    reason = "the owner delivered a correct key: nothing to dispute"


class NotDisputable(DisputeClientError):
    """No share to dispute: no key posted yet, already settled, window over, or ambiguous."""

    code = 2285
    reason = "the share cannot be disputed now"


class StoredDataMismatch(DisputeClientError):
    """The stored copy of the artifact is incomplete or does not match the dataset's root CID."""

    code = 2286
    reason = "the stored artifact does not match the dataset's root CID"


class LeafOutOfRange(DisputeClientError):
    code = 2287
    reason = "no such data leaf"


class DisputeTooLarge(DisputeClientError):
    """A dispute transaction that cannot fit the chain's ``max_tx_bytes``."""

    code = 2288
    reason = "the dispute does not fit the chain's transaction size limit"


class WrongPrivateKey(DisputeClientError):
    """The kept one-off private key is not the purchase's public key."""

    code = 2289
    reason = "the private key is not the purchase's"


# --- reading the stored artifact -------------------------------------------------------------------


class StoredArtifact(Protocol):
    """Read access to one stored artifact."""

    def leaf(self, index: int) -> bytes:
        """UnixFS leaf ``index`` (0 is the public header; data chunk ``i`` is leaf ``i + 1``)."""
        ...

    def path(self, index: int) -> tuple[bytes, ...]:
        """The dag-pb nodes from the root down to leaf ``index``'s parent."""
        ...


def _walk(
    root: bytes, index: int, get: Callable[[bytes], bytes]
) -> tuple[bytes, tuple[bytes, ...]]:
    """Leaf ``index`` (the one holding byte ``index`` × 1 MiB) and the nodes above it, read by
    ``get`` from ``root`` down, following the blocksizes as ``leaf_link`` does on chain."""
    path: list[bytes] = []
    cid = root
    offset = index * CHUNK_SIZE
    for _ in range(MAX_DISPUTE_PATH + 1):
        block = get(cid)
        if parse_cid(cid).codec.code == RAW_CODEC:
            if offset != 0:
                raise StoredDataMismatch(f"leaf {index} does not start on a leaf boundary")
            return block, tuple(path)
        path.append(block)
        try:
            node = decode_node(block)
        except DecodeError as exc:
            raise StoredDataMismatch(f"a dag-pb node of the artifact: {exc.message}") from exc
        start = 0
        for i, size in enumerate(node.blocksizes):
            if offset < start + size:
                offset -= start
                cid = bytes(node.links[i].cid)
                break
            start += size
        else:
            raise LeafOutOfRange(f"the artifact has no leaf {index}")
    raise StoredDataMismatch(f"the artifact's DAG is deeper than {MAX_DISPUTE_PATH} nodes")


class BlockArtifact:
    """An artifact read block by block (``get(cid)``, e.g. ``BlobStore.get``); every block is
    checked against its CID."""

    def __init__(self, root: bytes, get: BlockGetter) -> None:
        self._root = bytes(root)
        self._get = get
        self._last: tuple[int, bytes, tuple[bytes, ...]] | None = None  # leaf and path read last

    def _block(self, cid: bytes) -> bytes:
        data = self._get(cid)
        if data is None:
            raise StoredDataMismatch(
                f"block {parse_cid(cid)} of the artifact is not stored; fetch the artifact first"
            )
        try:
            verify_block(parse_cid(cid), data)
        except BlockMismatch as exc:
            raise StoredDataMismatch(f"a stored block is damaged: {exc.message}") from exc
        return data

    def _leaf_and_path(self, index: int) -> tuple[bytes, tuple[bytes, ...]]:
        if self._last is None or self._last[0] != index:
            self._last = (index, *_walk(self._root, index, self._block))
        return self._last[1], self._last[2]

    def leaf(self, index: int) -> bytes:
        return self._leaf_and_path(index)[0]

    def path(self, index: int) -> tuple[bytes, ...]:
        return self._leaf_and_path(index)[1]


class RangeArtifact:
    """An artifact read as byte ranges of its file (``read(start, end)``), e.g. the node's
    ``GET /artifacts/<cid>``, which serves the file but not its dag-pb nodes.

    Leaf ``i`` is bytes ``[i MiB, (i + 1) MiB)``: every leaf but the last is full in the layout
    every node builds (``UnixfsBuilder``), the one ``leaf_link`` assumes. The dag-pb nodes are
    rebuilt by feeding the file to a ``UnixfsBuilder`` in one streaming pass (leaves read in order
    by a scan are fed as they go, so a scan and a path cost one pass), and the rebuilt root must
    be the registered one. Only the dag-pb nodes are kept (a few KiB per 174 MiB).
    """

    def __init__(self, root: bytes, size: int, read: RangeReader) -> None:
        if size < 0:
            raise StoredDataMismatch(f"the artifact's size {size} is negative")
        self._root = bytes(root)
        self._size = size
        self._read = read
        self._builder = UnixfsBuilder()
        self._fed = 0  # leaves fed to the builder
        self._nodes: dict[bytes, bytes] | None = {}
        self._rebuilt = False

    @property
    def leaves(self) -> int:
        return max(1, -(-self._size // CHUNK_SIZE))

    def _read_leaf(self, index: int) -> bytes:
        start = index * CHUNK_SIZE
        if not 0 <= index < self.leaves:
            raise LeafOutOfRange(f"the artifact has leaves 0 to {self.leaves - 1}, not {index}")
        end = min(self._size, start + CHUNK_SIZE)
        data = self._read(start, end)
        if len(data) != end - start:
            raise StoredDataMismatch(
                f"read {len(data)} bytes of leaf {index}, expected {end - start}"
            )
        return data

    def _feed_next(self) -> bytes:
        data = self._read_leaf(self._fed)
        assert self._nodes is not None  # feeding stops once rebuilt
        for block in self._builder.feed(data):
            if block.cid.codec.code == DAG_PB_CODEC:
                self._nodes[bytes(block.cid)] = block.data
        self._fed += 1
        return data

    def leaf(self, index: int) -> bytes:
        if not self._rebuilt and self._fed <= index <= self._fed + 1:
            data = b""
            while self._fed <= index:
                data = self._feed_next()
            return data
        return self._read_leaf(index)

    def _rebuild(self) -> dict[bytes, bytes]:
        if not self._rebuilt:
            while self._fed < self.leaves:
                self._feed_next()
            root, rest = self._builder.finish_blocks()
            assert self._nodes is not None
            for block in rest:
                if block.cid.codec.code == DAG_PB_CODEC:
                    self._nodes[bytes(block.cid)] = block.data
            self._rebuilt = True
            if bytes(root) != self._root:
                self._nodes = None
        if self._nodes is None:
            raise StoredDataMismatch(
                f"the stored file does not rebuild to its root CID {parse_cid(self._root)} "
                "(a damaged copy, or a DAG in another layout): its dag-pb nodes cannot be "
                "rebuilt from the file; read them as blocks (BlockArtifact)"
            )
        return self._nodes

    def path(self, index: int) -> tuple[bytes, ...]:
        nodes = self._rebuild()

        def get(cid: bytes) -> bytes:
            if parse_cid(cid).codec.code == RAW_CODEC:
                return b""  # the leaf itself is not needed for the path
            node = nodes.get(cid)
            if node is None:  # pragma: no cover - the rebuilt DAG holds every node it links
                raise StoredDataMismatch(f"node {parse_cid(cid)} is not in the rebuilt DAG")
            return node

        return _walk(self._root, index, get)[1]


# --- plans ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DisputePlan:
    """What to send, in order (consecutive nonces), and what the chain will find."""

    purchase: Hash32
    source: Hash32
    share_index: int
    refund: Amount  # the share, back to the buyer when the chain finds the owner at fault
    verdict: DisputeVerdict  # the owner fault the chain will find
    leaf_index: int | None  # the disputed leaf; None when the key alone is at fault
    bodies: tuple[DisputeBody, ...]
    reason: str  # one line for people
    resumed: bool = False  # the remaining parts of a leaf dispute already open on chain


def signed_size_bound(body: DisputeBody) -> int:
    """An upper bound on the encoded size of ``body`` signed as a transaction (the limit
    ``max_tx_bytes`` applies to)."""
    encoded = body.encode()
    if len(encoded) > MAX_BODY_BYTES:
        return len(encoded) + 256  # over MAX_TX_BYTES_HARD: fits no chain
    draft = make_transaction(_SIZING_KEY, _UINT64_MAX, _UINT64_MAX, 0, body)
    return len(draft.encode())


def _fits(body: DisputeBody, max_tx_bytes: int) -> bool:
    return signed_size_bound(body) <= max_tx_bytes


def _require_fits(body: DisputeBody, max_tx_bytes: int, what: str) -> None:
    size = signed_size_bound(body)
    if size > max_tx_bytes:
        raise DisputeTooLarge(
            f"{what} is a {size}-byte transaction; the chain's max_tx_bytes is {max_tx_bytes}"
        )


def _state_name(state: int) -> str:
    try:
        return ShareState(state).name.lower()
    except ValueError:
        return str(state)


def select_share(purchase: PurchaseRecord, source: bytes | None = None) -> int:
    """The index of the share to dispute: the one of ``source``, or else the purchase's only
    share, or its only share with a posted key (or an open leaf dispute). ``NotDisputable``
    names the choices when there are several."""
    if source is not None:
        for i, share in enumerate(purchase.shares):
            if share.source == bytes(source):
                return i
        raise NotDisputable(
            f"purchase 0x{purchase.id.hex()} pays no source 0x{bytes(source).hex()}; it pays "
            + ", ".join(f"0x{s.source.hex()}" for s in purchase.shares)
        )
    if len(purchase.shares) == 1:
        return 0  # ``require_disputable`` says why it cannot be disputed, if it cannot
    open_ = [i for i, s in enumerate(purchase.shares) if s.state in _DISPUTABLE]
    if len(open_) == 1:
        return open_[0]
    if not open_:
        states = ", ".join(
            f"0x{s.source.hex()[:16]}…: {_state_name(s.state)}" for s in purchase.shares
        )
        raise NotDisputable(f"no share of the purchase has a posted key to dispute ({states})")
    raise NotDisputable(
        f"the purchase has {len(open_)} sources with posted keys; choose one with --source: "
        + ", ".join(f"0x{purchase.shares[i].source.hex()}" for i in open_)
    )


def require_disputable(share: Share, next_height: int) -> None:
    """Refuse what the chain would refuse for a dispute included at ``next_height`` or later."""
    try:
        state: ShareState | None = ShareState(share.state)
    except ValueError:
        state = None
    if state == ShareState.AWAITING_KEY:
        raise NotDisputable(
            f"the owner has not posted the key yet; if none comes by height {share.deadline} "
            "the price is refunded to you without a dispute"
        )
    if state not in _DISPUTABLE:
        raise NotDisputable(
            f"the share is settled ({_state_name(share.state)}): nothing to dispute"
        )
    if next_height > share.deadline:
        what = "leaf dispute's parts were" if state == ShareState.LEAF_DISPUTE else "dispute was"
        raise NotDisputable(
            f"too late: the {what} due by height {share.deadline}, the next block is {next_height}"
        )


def _check_source(share: Share, source: DatasetRecord) -> tuple[bytes, bytes]:
    if source.id != share.source or source.salt is None or source.key_check is None:
        raise NotDisputable(f"dataset 0x{source.id.hex()} is not the share's encrypted source")
    return source.salt, source.key_check


def _judge(
    purchase: PurchaseRecord,
    share: Share,
    source: DatasetRecord,
    privkey: bytes,
    chunk: tuple[int, bool, bytes] | None,
) -> DisputeVerdict:
    """``check_dispute`` with what the chain passes it."""
    salt, check = _check_source(share, source)
    try:
        verdict = check_dispute(
            wrapped=share.wrapped_key,
            buyer_privkey=privkey,
            buyer_pubkey=purchase.buyer_pubkey,
            context=key_wrap_context(purchase.id, share.source),
            salt=salt,
            key_check_value=check,
            chunk=chunk,
        )
    except EncryptionError as exc:  # pragma: no cover - registered salts and indexes are valid
        raise StoredDataMismatch(exc.message) from exc
    if verdict == DisputeVerdict.BAD_PRIVATE_KEY:
        raise WrongPrivateKey(
            f"the kept private key is not the one-off key of purchase 0x{purchase.id.hex()}"
        )
    return verdict


def _is_bad_leaf(key: bytes, salt: bytes, data_size: int, index: int, leaf: bytes) -> bool:
    """Whether data leaf ``index`` (≥ 1) fails to decrypt (a wrong size included)."""
    chunk = index - 1
    if len(leaf) != plain_chunk_size(data_size, chunk) + TAG_BYTES:
        return True
    try:
        decrypt_chunk(key, salt, chunk, is_last_chunk(data_size, chunk), leaf)
    except DecryptionFailed:
        return True
    return False


def _leaf_bodies(
    purchase: PurchaseRecord,
    share: Share,
    privkey: bytes,
    index: int,
    leaf: bytes,
    path: tuple[bytes, ...],
    expected_size: int,
    max_tx_bytes: int,
) -> tuple[DisputeBody, ...]:
    whole = KeyDispute(purchase.id, share.source, privkey, DisputeChunk(index, leaf, path))
    if _fits(whole, max_tx_bytes):
        return (whole,)
    opening = LeafDisputeOpen(purchase.id, share.source, privkey, index, path)
    _require_fits(opening, max_tx_bytes, f"the opening of a dispute over leaf {index}")
    if len(leaf) != expected_size:
        return (opening,)  # the path proves a size no chunk there can have: judged at the open
    return (opening, *_parts(purchase.id, share.source, leaf, 0, max_tx_bytes))


def _parts(
    purchase: Hash32, source: Hash32, leaf: bytes, start: int, max_tx_bytes: int
) -> list[LeafDisputePart]:
    parts = [
        LeafDisputePart(purchase, source, off, leaf[off : off + DISPUTE_PART_BYTES])
        for off in range(start, len(leaf), DISPUTE_PART_BYTES)
    ]
    if parts:
        _require_fits(parts[0], max_tx_bytes, "a leaf dispute part")  # the first is the largest
    return parts


def plan_dispute(
    purchase: PurchaseRecord,
    share_index: int,
    source: DatasetRecord,
    buyer_privkey: bytes,
    artifact: StoredArtifact,
    *,
    max_tx_bytes: int,
    leaf: int | None = None,
) -> DisputePlan:
    """Decide the dispute of share ``share_index`` of ``purchase`` (a posted key, see
    ``require_disputable``) over its encrypted ``source``, reading the stored ciphertext from
    ``artifact`` only when the key itself is sound. ``leaf`` checks that data leaf alone (≥ 1);
    by default every leaf is checked in order and the first that fails is disputed.

    Raises ``NoFaultFound`` when the key is correct for every leaf checked, ``WrongPrivateKey``,
    ``LeafOutOfRange``, ``StoredDataMismatch`` (the stored copy cannot prove the leaf) or
    ``DisputeTooLarge``.
    """
    share = purchase.shares[share_index]
    if share.state != ShareState.KEY_POSTED:
        raise NotDisputable(f"the share is {_state_name(share.state)}, not awaiting disputes")
    salt, _ = _check_source(share, source)
    verdict = _judge(purchase, share, source, buyer_privkey, None)

    def plan(
        verdict: DisputeVerdict, index: int | None, bodies: tuple[DisputeBody, ...], reason: str
    ) -> DisputePlan:
        return DisputePlan(
            purchase.id, share.source, share_index, share.amount, verdict, index, bodies, reason
        )

    if verdict.owner_at_fault:
        body = KeyDispute(purchase.id, share.source, buyer_privkey, None)
        _require_fits(body, max_tx_bytes, "the key dispute")
        reason = (
            "the posted key does not open with the purchase's one-off key"
            if verdict == DisputeVerdict.OWNER_FAULT_UNWRAP
            else "the posted key is not the one committed at registration (key check)"
        )
        return plan(verdict, None, (body,), reason)
    key = unwrap_key(share.wrapped_key, buyer_privkey, key_wrap_context(purchase.id, share.source))
    count = chunk_count(source.data_size)
    if leaf is not None and not 1 <= leaf <= count:
        raise LeafOutOfRange(
            f"--leaf {leaf}: the dataset has data leaves 1 to {count}"
            if count
            else "the dataset has no data leaves"
        )
    for index in [leaf] if leaf is not None else range(1, count + 1):
        data = artifact.leaf(index)
        if not _is_bad_leaf(key, salt, source.data_size, index, data):
            continue
        path = artifact.path(index)
        try:
            verify_leaf_path(source.root, index, data, path)
        except DisputeProofMismatch as exc:
            raise StoredDataMismatch(
                f"the stored leaf {index} and its path do not prove it against the dataset's "
                f"root CID ({exc.message}); fetch the artifact again"
            ) from exc
        expected = plain_chunk_size(source.data_size, index - 1) + TAG_BYTES
        last = is_last_chunk(source.data_size, index - 1)
        verdict = _judge(purchase, share, source, buyer_privkey, (index - 1, last, data))
        if not verdict.owner_at_fault:  # pragma: no cover - decrypt_chunk failed just above
            raise StoredDataMismatch(f"leaf {index} failed to decrypt here but not on replay")
        bodies = _leaf_bodies(
            purchase, share, buyer_privkey, index, data, path, expected, max_tx_bytes
        )
        what = (
            f"is {len(data)} bytes where its position needs {expected}"
            if len(data) != expected
            else "does not decrypt with the posted key"
        )
        return plan(verdict, index, bodies, f"leaf {index} of the stored ciphertext {what}")
    checked = f"leaf {leaf}" if leaf is not None else f"all {count} data leaves"
    raise NoFaultFound(
        f"the posted key opens, matches the registered key check and decrypts {checked}: the "
        "owner delivered, and the chain would reject a dispute"
    )


def plan_resume(
    purchase: PurchaseRecord,
    share_index: int,
    source: DatasetRecord,
    dispute: LeafDispute,
    artifact: StoredArtifact,
    *,
    max_tx_bytes: int,
) -> DisputePlan:
    """The remaining parts of the leaf dispute ``dispute`` open on share ``share_index`` (the
    chain holds ``dispute.received`` bytes of the leaf). ``NoFaultFound`` if that leaf decrypts:
    the last part would pay the owner and cost the buyer the fees, while an abandoned dispute
    expires with the same outcome for free."""
    share = purchase.shares[share_index]
    if share.state != ShareState.LEAF_DISPUTE:
        raise NotDisputable(f"the share is {_state_name(share.state)}: no leaf dispute is open")
    index = dispute.leaf_index
    data = artifact.leaf(index)
    try:
        cid: CID | None = parse_cid(dispute.leaf_cid)
    except DecodeError:  # pragma: no cover - the chain took it from a verified path
        cid = None
    if len(data) != dispute.leaf_size or raw_cid(data) != cid:
        raise StoredDataMismatch(
            f"the stored leaf {index} is not the one the open dispute names ({cid}); fetch the "
            "artifact again"
        )
    last = is_last_chunk(source.data_size, index - 1)
    verdict = _judge(purchase, share, source, dispute.buyer_privkey, (index - 1, last, data))
    if not verdict.owner_at_fault:
        raise NoFaultFound(
            f"leaf {index}, under dispute, decrypts with the posted key: posting its last part "
            f"would pay the owner and cost you the fees; the dispute expires at height "
            f"{share.deadline} with the same outcome"
        )
    parts = _parts(purchase.id, share.source, data, dispute.received, max_tx_bytes)
    return DisputePlan(
        purchase.id,
        share.source,
        share_index,
        share.amount,
        verdict,
        index,
        tuple(parts),
        f"leaf {index} does not decrypt; {len(parts)} of its parts remain to be posted",
        resumed=True,
    )


def body_kind(body: Record) -> str:
    """A short name of a dispute transaction for people and JSON."""
    if isinstance(body, KeyDispute):
        return "key_dispute" if body.chunk is None else "key_dispute_with_leaf"
    if isinstance(body, LeafDisputeOpen):
        return "leaf_dispute_open"
    return "leaf_dispute_part"


def total_leaf_bytes(bodies: Sequence[DisputeBody]) -> int:
    """The leaf bytes the bodies carry (what the per-byte fees pay for)."""
    total = 0
    for body in bodies:
        if isinstance(body, LeafDisputePart):
            total += len(body.data)
        elif isinstance(body, KeyDispute) and body.chunk is not None:
            total += len(body.chunk.leaf)
    return total


__all__ = [
    "BlockArtifact",
    "BlockGetter",
    "DisputeBody",
    "DisputeClientError",
    "DisputePlan",
    "DisputeTooLarge",
    "LeafOutOfRange",
    "NoFaultFound",
    "NotDisputable",
    "RangeArtifact",
    "RangeReader",
    "StoredArtifact",
    "StoredDataMismatch",
    "WrongPrivateKey",
    "body_kind",
    "plan_dispute",
    "plan_resume",
    "require_disputable",
    "select_share",
    "signed_size_bound",
    "total_leaf_bytes",
]

"""Purchases of datasets with fair-exchange key delivery (DESIGN §8 "Access to priced artifacts";
docs/adr/0006-fair-exchange-key-delivery.md).

* ``Purchase(dataset_id, buyer_pubkey, max_price)`` — sent by a CUSTOMER with a one-off compressed
  secp256k1 public key. The dataset's (or composite's) price is taken from the buyer and split
  into **shares**, one per source: a plain dataset is one share for its owner; a composite pays
  its flattened leaf sources pro rata to their rows (floor; the remainder to the first source).
  Shares of free (unencrypted) sources are paid at once. Shares of priced sources stay in escrow
  and open an obligation of their owner's DATA_SUPPLIER role.
* ``KeyPost(purchase_id, source_id, wrapped_key)`` — the source's owner posts its content key
  wrapped to the buyer's key (``encryption.wrap_key`` with ``key_wrap_context``) at a height
  ≤ purchase height + ``key_post_heights``; otherwise the share is refunded to the buyer by the
  purchase queue at that deadline.
* ``KeyDispute(purchase_id, source_id, buyer_privkey, chunk)`` — within
  ``dispute_window_heights`` after the post the buyer may reveal the one-off private key and,
  optionally, one ciphertext leaf of the source with its dag-pb path from the root CID. The
  transition checks the leaf against the root (``verify_leaf_path``) and runs
  ``encryption.check_dispute``: an owner fault refunds the share to the buyer, burns
  ``key_dispute_slash`` of the owner's supplier bond and closes the share; an honest key or a
  private key that is not the purchase's makes the dispute invalid (``DisputeRejected``,
  ``DisputeBadPrivateKey``). After the window the queue pays the share to the owner.
* ``LeafDisputeOpen(purchase_id, source_id, buyer_privkey, leaf_index, path)`` and
  ``LeafDisputePart(purchase_id, source_id, offset, data)`` — the same dispute over a full 1 MiB
  leaf, which fits in no transaction: the open reveals the key and the path (the chain learns the
  leaf's CID and size from it) and runs the key-level checks at once (an owner fault settles as
  above); the buyer then posts the leaf in ``DISPUTE_PART_BYTES`` parts at sequential offsets,
  kept in state, by the window's end + ``leaf_dispute_heights``. The last part has the leaf
  checked against its CID and decrypted: an owner fault refunds and slashes, a leaf that
  decrypts pays the share to the owner (the buyer loses its fees). An unfinished dispute expires
  at its deadline and the share is paid as if undisputed. Its state is deleted when it ends.

Deadlines are checked by height, so a queue entry the per-block cap delays changes nothing: a key
or dispute past its height is refused, and the queue settles the share when it gets to it.
``purchase_grants`` tells the node's chunk server whether a purchase lets its buyer fetch an
artifact's blocks. ``OpenPurchases`` lists each buyer's purchases of a dataset that no compute
task has used yet (the compute market's priced inputs, docs/compute-market.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import TYPE_CHECKING

from multiformats import CID

from node import crypto
from node.consensus.params import AuthorityParams
from node.consensus.receipts import Attribute, Event
from node.consensus.state import AUTHORITY_PARAMS_KEY, HeightQueue, Overlay, StateView
from node.economy.api import (
    MAX_COMPOSITE_RANGES_HARD,
    NS_LEAF_DISPUTE,
    NS_OPEN_PURCHASES,
    NS_PURCHASE,
    QUEUE_PURCHASE,
    EconomyError,
    EconomyKind,
    KindHandler,
    Role,
    charge,
    credit,
    economy_params,
    u64,
    u256,
)
from node.economy.composite import rows_by_source
from node.economy.datasets import (
    DatasetRecord,
    UnknownDataset,
    dataset_id,
    get_dataset,
    require_dataset,
)
from node.economy.roles import (
    MissingRole,
    RoleBondDepleted,
    adjust_obligations,
    require_role,
    slash_role_bond,
)
from node.encoding import Record, limit
from node.errors import DecodeError, InvalidBody
from node.storage.encryption import (
    PRIVATE_KEY_BYTES,
    PUBLIC_KEY_BYTES,
    TAG_BYTES,
    WRAPPED_KEY_BYTES,
    DisputeVerdict,
    EncryptionError,
    check_dispute,
    chunk_count,
    is_last_chunk,
    is_valid_public_key,
    plain_chunk_size,
)
from node.storage.unixfs import (
    CHUNK_SIZE,
    DAG_PB_CODEC,
    RAW_CODEC,
    SHA2_256,
    dag_pb_cid,
    decode_node,
    parse_cid,
    raw_cid,
)
from node.types import Address, Amount, Hash32

if TYPE_CHECKING:
    from node.consensus.transition import BlockContext
    from node.consensus.txs import VerifiedTransaction

PURCHASE_ID_TAG = b"NeuroSeed/purchase/v1"
MAX_DISPUTE_PATH = 8  # dag-pb nodes from the root to a leaf (174**8 MiB: any file)
MAX_DISPUTE_NODE_BYTES = 64 << 10
PURCHASE_QUEUE = HeightQueue(QUEUE_PURCHASE)
DISPUTE_PART_BYTES = 32 << 10
"""Leaf bytes in one ``LeafDisputePart``: with its envelope it stays well within the devnet's
``max_tx_bytes`` (64 KiB) and a transaction gossip batch (256 KiB). Every part but the last of a
leaf is exactly this long, so a 1 MiB leaf is 32 parts, and an open dispute holds at most 32
records (itself and the 31 parts before the last, which is judged, never stored)."""
MAX_DISPUTE_PARTS = -(-CHUNK_SIZE // DISPUTE_PART_BYTES)
MAX_CID_BYTES = 64  # a binary CIDv1 of a sha2-256 raw leaf is 36 bytes
MAX_OPEN_PURCHASES = 8
"""Purchases of one dataset by one buyer kept open for compute tasks (``OpenPurchases``); a newer
purchase pushes the oldest out."""
_DEFAULT_QUEUE_WORK = 64  # without authority parameters in state (bare test states)


# --- errors (2235–2249) --------------------------------------------------------------------------


class PurchaseError(EconomyError):
    code = 2235
    reason = "invalid purchase transaction"


class InvalidPurchaseBody(InvalidBody):
    """A key, wrapped key or dispute chunk of the wrong shape."""

    code = 2236
    reason = "invalid purchase, key post or dispute body"


class PurchaseNotNeeded(PurchaseError):
    code = 2237
    reason = "the dataset is free: nothing to purchase"


class PriceAboveMax(PurchaseError):
    code = 2238
    reason = "the price is above the buyer's max_price"


class SupplierInactive(PurchaseError):
    """A priced source's owner no longer holds a DATA_SUPPLIER role with its full bond."""

    code = 2239
    reason = "a priced source's owner cannot take new purchases"


class UnknownPurchase(PurchaseError):
    code = 2240
    reason = "unknown purchase"


class UnknownShare(PurchaseError):
    code = 2241
    reason = "the purchase pays no such source"


class NotShareOwner(PurchaseError):
    code = 2242
    reason = "only the source's owner posts its key"


class NotTheBuyer(PurchaseError):
    code = 2243
    reason = "only the buyer disputes a key"


class KeyPostNotOpen(PurchaseError):
    """The share's key was posted already, the share is settled, or its deadline passed."""

    code = 2244
    reason = "the share takes no key now"


class DisputeNotOpen(PurchaseError):
    """No key was posted, the share is settled, or the dispute window is over."""

    code = 2245
    reason = "the share cannot be disputed now"


class DisputeProofMismatch(PurchaseError):
    """The dispute's leaf and path are not that leaf of the source's root CID."""

    code = 2246
    reason = "the leaf and path do not match the source's root CID"


class DisputeBadPrivateKey(PurchaseError):
    code = 2247
    reason = "the revealed private key is not the purchase's public key"


class DisputeRejected(PurchaseError):
    """The posted key unwraps, matches the key check and decrypts the leaf: no fault."""

    code = 2248
    reason = "the posted key is correct"


class DisputePartTooLarge(InvalidPurchaseBody):
    """A leaf dispute part above ``DISPUTE_PART_BYTES`` (it would not fit the transaction and
    gossip limits the parts exist for)."""

    code = 2249
    reason = "a leaf dispute part is too large"


class NoLeafDispute(PurchaseError):
    """A part for a share that has no open leaf dispute."""

    code = 2206
    reason = "the share has no open leaf dispute"


class DisputePartOutOfOrder(PurchaseError):
    """A part whose offset is not the number of leaf bytes the dispute holds so far."""

    code = 2207
    reason = "leaf dispute parts must come at sequential offsets"


class DisputePartSizeMismatch(PurchaseError):
    """A part shorter than ``DISPUTE_PART_BYTES`` before the leaf's end, or one that runs past
    the leaf's size."""

    code = 2208
    reason = "the part's size does not fit the leaf"


# --- records -------------------------------------------------------------------------------------


class ShareState(IntEnum):
    AWAITING_KEY = 1  # in escrow until the key is posted or the deadline refunds it
    KEY_POSTED = 2  # in escrow until the dispute window ends (paid) or a dispute wins
    PAID = 3  # to the owner (free sources at once)
    REFUNDED = 4  # no key by the deadline
    OWNER_FAULT = 5  # a dispute showed the key wrong: refunded, owner slashed
    LEAF_DISPUTE = 6  # in escrow while a leaf dispute takes its parts (deadline: the last height)


_GRANTING = frozenset(
    {ShareState.AWAITING_KEY, ShareState.KEY_POSTED, ShareState.LEAF_DISPUTE, ShareState.PAID}
)


@dataclass(frozen=True, slots=True)
class Share(Record):
    source: Hash32  # a plain (leaf) dataset
    owner: Address
    amount: Amount
    state: int  # ShareState
    # AWAITING_KEY: the last height to post the key; KEY_POSTED: the last height to dispute;
    # LEAF_DISPUTE: the last height to post a part of the disputed leaf.
    deadline: int
    wrapped_key: bytes = field(metadata=limit(WRAPPED_KEY_BYTES))  # empty until posted


@dataclass(frozen=True, slots=True)
class PurchaseRecord(Record):
    id: Hash32
    buyer: Address
    dataset: Hash32  # what was bought: a dataset or a composite
    buyer_pubkey: bytes = field(metadata=limit(PUBLIC_KEY_BYTES))
    price: Amount
    height: int
    shares: tuple[Share, ...] = field(metadata=limit(MAX_COMPOSITE_RANGES_HARD))


@dataclass(frozen=True, slots=True)
class Purchase(Record):
    dataset_id: Hash32
    buyer_pubkey: bytes = field(metadata=limit(PUBLIC_KEY_BYTES))
    max_price: Amount


@dataclass(frozen=True, slots=True)
class KeyPost(Record):
    purchase_id: Hash32
    source_id: Hash32
    wrapped_key: bytes = field(metadata=limit(WRAPPED_KEY_BYTES))


@dataclass(frozen=True, slots=True)
class DisputeChunk(Record):
    """UnixFS leaf ``leaf_index`` (≥ 1: data chunk ``leaf_index - 1``) of the source, with the
    dag-pb nodes from the root down to the leaf's parent. The last-chunk flag is not carried: the
    chain derives it from the registered data size."""

    leaf_index: int
    leaf: bytes = field(metadata=limit(CHUNK_SIZE))
    path: tuple[bytes, ...] = field(metadata=limit(MAX_DISPUTE_PATH))


@dataclass(frozen=True, slots=True)
class KeyDispute(Record):
    purchase_id: Hash32
    source_id: Hash32
    buyer_privkey: bytes = field(metadata=limit(PRIVATE_KEY_BYTES))
    chunk: DisputeChunk | None


@dataclass(frozen=True, slots=True)
class LeafDisputeOpen(Record):
    """Open a dispute over data leaf ``leaf_index`` (≥ 1) of the source: the one-off private key
    and the dag-pb nodes from the root down to the leaf's parent (which give the leaf's CID and
    size); the leaf itself follows in ``LeafDisputePart`` transactions."""

    purchase_id: Hash32
    source_id: Hash32
    buyer_privkey: bytes = field(metadata=limit(PRIVATE_KEY_BYTES))
    leaf_index: int
    path: tuple[bytes, ...] = field(metadata=limit(MAX_DISPUTE_PATH))


@dataclass(frozen=True, slots=True)
class LeafDisputePart(Record):
    """Leaf bytes ``offset`` … ``offset + len(data)`` of an open leaf dispute (1 to
    ``DISPUTE_PART_BYTES`` bytes; the decode limit is the leaf's, the body check the part's)."""

    purchase_id: Hash32
    source_id: Hash32
    offset: int
    data: bytes = field(metadata=limit(CHUNK_SIZE))


@dataclass(frozen=True, slots=True)
class LeafDispute(Record):
    """An open leaf dispute (state, under ``leaf_dispute_key``); its parts are stored apart."""

    buyer_privkey: bytes = field(metadata=limit(PRIVATE_KEY_BYTES))
    leaf_index: int
    leaf_cid: bytes = field(metadata=limit(MAX_CID_BYTES))  # binary, from the path
    leaf_size: int  # from the path: the bytes the parts must add up to
    received: int  # leaf bytes posted so far (a multiple of DISPUTE_PART_BYTES)


@dataclass(frozen=True, slots=True)
class OpenPurchases(Record):
    """The purchases of one dataset by one buyer that no compute task has used yet, oldest first
    (state, under ``open_purchases_key``). A task's provider, verifiers and referee each use one
    per priced input (``node.economy.tasks``), so one purchase pays for one read."""

    ids: tuple[Hash32, ...] = field(metadata=limit(MAX_OPEN_PURCHASES))


# --- reads ---------------------------------------------------------------------------------------


def purchase_id(buyer: Address, nonce: int) -> Hash32:
    return crypto.sha256(PURCHASE_ID_TAG + bytes(buyer) + nonce.to_bytes(8, "big"))


def purchase_key(id_: bytes) -> bytes:
    return NS_PURCHASE + id_


def get_purchase(view: StateView, id_: bytes) -> PurchaseRecord | None:
    raw = view.get(purchase_key(id_))
    return None if raw is None else PurchaseRecord.decode(raw)


def open_purchases_key(buyer: bytes, dataset: bytes) -> bytes:
    return NS_OPEN_PURCHASES + bytes(buyer) + bytes(dataset)


def open_purchases(view: StateView, buyer: bytes, dataset: bytes) -> tuple[Hash32, ...]:
    """The ids of ``buyer``'s purchases of ``dataset`` no compute task has used, oldest first."""
    raw = view.get(open_purchases_key(buyer, dataset))
    return () if raw is None else OpenPurchases.decode(raw).ids


def put_open_purchases(
    view: Overlay, buyer: bytes, dataset: bytes, ids: Sequence[Hash32]
) -> None:
    """Keep the newest ``MAX_OPEN_PURCHASES`` of ``ids`` (none: the record is deleted)."""
    kept = tuple(ids)[-MAX_OPEN_PURCHASES:]
    if kept:
        view.put(open_purchases_key(buyer, dataset), OpenPurchases(kept).encode())
    else:
        view.delete(open_purchases_key(buyer, dataset))


def leaf_dispute_key(purchase: bytes, index: int) -> bytes:
    """The state key of the open leaf dispute of share ``index`` of ``purchase``."""
    return NS_LEAF_DISPUTE + _queue_entry(purchase, index) + b"\x00"


def leaf_dispute_part_key(purchase: bytes, index: int, part: int) -> bytes:
    """The state key of part ``part`` (its offset / ``DISPUTE_PART_BYTES``) of that dispute."""
    return NS_LEAF_DISPUTE + _queue_entry(purchase, index) + b"\x01" + part.to_bytes(2, "big")


def get_leaf_dispute(view: StateView, purchase: bytes, source: bytes) -> LeafDispute | None:
    """The open leaf dispute of the share of ``source`` in ``purchase``, if any (a client reads
    ``received`` to know which part comes next)."""
    record = get_purchase(view, purchase)
    if record is None:
        return None
    for i, share in enumerate(record.shares):
        if share.source == source:
            raw = view.get(leaf_dispute_key(record.id, i))
            return None if raw is None else LeafDispute.decode(raw)
    return None


def key_wrap_context(purchase: bytes, source: bytes) -> bytes:
    """The ``context`` of ``encryption.wrap_key`` for one share: purchase id ‖ source id."""
    return bytes(purchase) + bytes(source)


def purchase_grants(view: StateView, purchase: bytes, address: bytes, root: bytes) -> bool:
    """Whether purchase ``purchase``, made by ``address``, lets it fetch the artifact ``root``.

    True while the share of the dataset registered under ``root`` awaits its key, has it, or was
    paid; False once refunded (no key, or the owner lost a dispute) and for anything else.
    """
    record = get_purchase(view, purchase)
    if record is None or record.buyer != bytes(address):
        return False
    source = dataset_id(root)
    return any(s.source == source and s.state in _GRANTING for s in record.shares)


def compute_shares(record: DatasetRecord, leaves: dict[bytes, DatasetRecord]) -> list[
    tuple[DatasetRecord, int]
]:
    """(leaf dataset, amount) per source of a purchase of ``record`` at its price: one share for
    a plain dataset; pro rata to rows over a composite's flattened sources, floor, the remainder
    to the first source. ``leaves`` holds the composite's leaf datasets by id."""
    if not record.is_composite:
        return [(record, record.price)]
    rows = rows_by_source(record.composite)
    total = sum(rows.values())
    out = [(leaves[s], record.price * r // total) for s, r in rows.items()]
    remainder = record.price - sum(a for _, a in out)
    out[0] = (out[0][0], out[0][1] + remainder)
    return out


def _leaves_of(view: StateView, record: DatasetRecord) -> dict[bytes, DatasetRecord]:
    leaves: dict[bytes, DatasetRecord] = {}
    for e in record.composite:
        if e.source not in leaves:
            leaves[e.source] = require_dataset(view, e.source)
    return leaves


# --- Purchase ------------------------------------------------------------------------------------


def _check_purchase_body(body: object) -> None:
    assert isinstance(body, Purchase)  # the handler's body type
    if not is_valid_public_key(body.buyer_pubkey):
        raise InvalidPurchaseBody(
            f"buyer_pubkey: expected a {PUBLIC_KEY_BYTES}-byte compressed secp256k1 public key"
        )


def _event(name: str, *attributes: tuple[str, bytes]) -> Event:
    return Event(name, tuple(Attribute(k, v) for k, v in attributes))


def apply_purchase(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, Purchase)  # kind dispatch guarantees it
    buyer = vtx.sender
    require_role(view, buyer, Role.CUSTOMER, "buying a dataset")
    record = require_dataset(view, body.dataset_id)
    if record.price == 0:
        raise PurchaseNotNeeded(f"dataset 0x{record.id.hex()} is free: fetch it without a purchase")
    if body.max_price < record.price:
        raise PriceAboveMax(f"the price {record.price} is above max_price {body.max_price}")
    shares = compute_shares(record, _leaves_of(view, record))
    for leaf, _ in shares:
        if leaf.is_priced:
            try:
                require_role(view, leaf.owner, Role.DATA_SUPPLIER, "selling a priced dataset")
            except (MissingRole, RoleBondDepleted) as exc:
                raise SupplierInactive(
                    f"the owner of source 0x{leaf.id.hex()} cannot take purchases: {exc.message}"
                ) from exc
    params = economy_params(view)
    id_ = purchase_id(buyer, vtx.tx.nonce)
    deadline = ctx.height + params.key_post_heights
    charge(view, vtx, record.price)
    out: list[Share] = []
    events = [
        _event(
            "purchase",
            ("id", id_),
            ("buyer", buyer),
            ("dataset", record.id),
            ("price", u256(record.price)),
        )
    ]
    for leaf, amount in shares:
        if leaf.is_priced:
            out.append(
                Share(leaf.id, leaf.owner, Amount(amount), ShareState.AWAITING_KEY, deadline, b"")
            )
            adjust_obligations(view, leaf.owner, Role.DATA_SUPPLIER, 1)
            PURCHASE_QUEUE.push(view, deadline, _queue_entry(id_, len(out) - 1))
            events.append(
                _event(
                    "share_escrowed",
                    ("source", leaf.id),
                    ("owner", leaf.owner),
                    ("amount", u256(amount)),
                    ("key_deadline", u64(deadline)),
                )
            )
        else:
            out.append(Share(leaf.id, leaf.owner, Amount(amount), ShareState.PAID, ctx.height, b""))
            credit(view, leaf.owner, amount)
            events.append(
                _event(
                    "share_paid", ("source", leaf.id), ("owner", leaf.owner), ("amount", u256(amount))
                )
            )
    view.put(
        purchase_key(id_),
        PurchaseRecord(
            id_, buyer, record.id, body.buyer_pubkey, record.price, ctx.height, tuple(out)
        ).encode(),
    )
    put_open_purchases(view, buyer, record.id, (*open_purchases(view, buyer, record.id), id_))
    return tuple(events)


def _purchase_records(view: StateView, vtx: VerifiedTransaction) -> int:
    """The purchase record and one unit per share (each priced share also queues an entry)."""
    body = vtx.body
    assert isinstance(body, Purchase)  # kind dispatch guarantees it
    record = get_dataset(view, body.dataset_id)
    if record is None:
        return 1
    index = int(view.get(open_purchases_key(vtx.sender, body.dataset_id)) is None)
    return 1 + index + (len(rows_by_source(record.composite)) if record.is_composite else 1)


# --- shares --------------------------------------------------------------------------------------


def _queue_entry(purchase: bytes, index: int) -> bytes:
    return bytes(purchase) + index.to_bytes(4, "big")


def _find_share(view: StateView, purchase: bytes, source: bytes) -> tuple[PurchaseRecord, int]:
    record = get_purchase(view, purchase)
    if record is None:
        raise UnknownPurchase(f"no purchase 0x{bytes(purchase).hex()}")
    for i, share in enumerate(record.shares):
        if share.source == source:
            return record, i
    raise UnknownShare(
        f"purchase 0x{bytes(purchase).hex()} pays no source 0x{bytes(source).hex()}"
    )


def _put_share(view: Overlay, record: PurchaseRecord, index: int, share: Share) -> None:
    shares = list(record.shares)
    shares[index] = share
    view.put(purchase_key(record.id), replace(record, shares=tuple(shares)).encode())


def _state_name(state: int) -> str:
    return ShareState(state).name.lower()


# --- KeyPost -------------------------------------------------------------------------------------


def _check_key_post_body(body: object) -> None:
    assert isinstance(body, KeyPost)  # the handler's body type
    if len(body.wrapped_key) != WRAPPED_KEY_BYTES:
        raise InvalidPurchaseBody(
            f"wrapped_key: expected {WRAPPED_KEY_BYTES} bytes, got {len(body.wrapped_key)}"
        )


def apply_key_post(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, KeyPost)  # kind dispatch guarantees it
    record, index = _find_share(view, body.purchase_id, body.source_id)
    share = record.shares[index]
    if share.owner != vtx.sender:
        raise NotShareOwner(
            f"0x{vtx.sender.hex()} does not own source 0x{share.source.hex()}; "
            f"0x{share.owner.hex()} does"
        )
    if share.state != ShareState.AWAITING_KEY:
        raise KeyPostNotOpen(f"the share is {_state_name(share.state)}: it takes no key")
    if ctx.height > share.deadline:
        raise KeyPostNotOpen(
            f"the key was due by height {share.deadline}; the share is refunded to the buyer"
        )
    window_end = ctx.height + economy_params(view).dispute_window_heights
    charge(view, vtx)
    _put_share(
        view,
        record,
        index,
        replace(share, state=int(ShareState.KEY_POSTED), deadline=window_end,
                wrapped_key=body.wrapped_key),
    )
    PURCHASE_QUEUE.push(view, window_end, _queue_entry(record.id, index))
    return (
        _event(
            "key_post",
            ("purchase", record.id),
            ("source", share.source),
            ("dispute_until", u64(window_end)),
        ),
    )


# --- KeyDispute ----------------------------------------------------------------------------------


def _check_privkey(privkey: bytes) -> None:
    if len(privkey) != PRIVATE_KEY_BYTES:
        raise InvalidPurchaseBody(
            f"buyer_privkey: expected {PRIVATE_KEY_BYTES} bytes, got {len(privkey)}"
        )


def _check_leaf_position(leaf_index: int, path: Sequence[bytes], where: str) -> None:
    if leaf_index < 1:
        raise InvalidPurchaseBody(
            f"{where}leaf_index: leaf 0 is the public header; data leaves start at 1"
        )
    if not path:
        raise InvalidPurchaseBody(f"{where}path: a data leaf sits under at least one node")
    for node in path:
        if len(node) > MAX_DISPUTE_NODE_BYTES:
            raise InvalidPurchaseBody(f"{where}path: a node exceeds {MAX_DISPUTE_NODE_BYTES} bytes")


def _check_dispute_body(body: object) -> None:
    assert isinstance(body, KeyDispute)  # the handler's body type
    _check_privkey(body.buyer_privkey)
    chunk = body.chunk
    if chunk is not None:
        _check_leaf_position(chunk.leaf_index, chunk.path, "chunk.")
        if not chunk.leaf:
            raise InvalidPurchaseBody("chunk.leaf: empty")


def leaf_link(root: bytes, leaf_index: int, path: Sequence[bytes]) -> tuple[CID, int]:
    """The CID and size of UnixFS leaf ``leaf_index`` of the file ``root`` (binary CID), proved
    by ``path``: the dag-pb nodes from the root down to the leaf's parent.

    Each node must hash to the link its parent holds at the position of the leaf's byte offset
    (``leaf_index`` × 1 MiB: every leaf but the last is full), found from the node's blocksizes;
    the offset must fall on the first byte of the final link, a raw leaf, whose CID and blocksize
    are returned. Raises ``DisputeProofMismatch``.
    """
    try:
        expected: CID = parse_cid(root)
    except DecodeError as exc:  # pragma: no cover - registered roots are valid CIDs
        raise DisputeProofMismatch(f"root: {exc.message}") from exc
    if expected.codec.code != DAG_PB_CODEC:
        raise DisputeProofMismatch("the file is its leaf 0 alone: it has no data leaves")
    offset = leaf_index * CHUNK_SIZE
    for depth, node_bytes in enumerate(path):
        if dag_pb_cid(node_bytes) != expected:
            raise DisputeProofMismatch(f"path node {depth} does not hash to {expected}")
        try:
            node = decode_node(node_bytes)
        except DecodeError as exc:  # pragma: no cover - it hashes to a node of a valid DAG
            raise DisputeProofMismatch(f"path node {depth}: {exc.message}") from exc
        start = 0
        child = -1
        for i, size in enumerate(node.blocksizes):
            if offset < start + size:
                child = i
                break
            start += size
        if child < 0:
            raise DisputeProofMismatch(f"the file has no leaf {leaf_index}")
        offset -= start
        link = node.links[child]
        if depth < len(path) - 1:
            if link.cid.codec.code != DAG_PB_CODEC:
                raise DisputeProofMismatch(f"path node {depth} links a leaf: the path is too long")
            expected = link.cid
            continue
        if link.cid.codec.code != RAW_CODEC or offset != 0:
            raise DisputeProofMismatch("the path stops above the leaf's parent")
        return link.cid, node.blocksizes[child]
    raise DisputeProofMismatch("empty path")  # pragma: no cover - the body check refuses it


def verify_leaf_path(root: bytes, leaf_index: int, leaf: bytes, path: Sequence[bytes]) -> None:
    """Check that ``leaf`` is UnixFS leaf ``leaf_index`` of the file ``root`` (binary CID), with
    ``path`` the dag-pb nodes from the root down to the leaf's parent (see ``leaf_link``): the
    leaf must have the size and raw CID of the final link. Raises ``DisputeProofMismatch``."""
    cid, size = leaf_link(root, leaf_index, path)
    if size != len(leaf) or raw_cid(leaf) != cid:
        raise DisputeProofMismatch(f"the leaf is not leaf {leaf_index} of the file")


def _require_disputable(
    record: PurchaseRecord, share: Share, vtx: VerifiedTransaction, ctx: BlockContext
) -> None:
    """A key or leaf dispute is opened by the buyer, on a posted key, within the window."""
    if record.buyer != vtx.sender:
        raise NotTheBuyer(f"only the buyer 0x{record.buyer.hex()} disputes this purchase's keys")
    if share.state == ShareState.LEAF_DISPUTE:
        raise DisputeNotOpen("a leaf dispute is open on the share: post its parts")
    if share.state != ShareState.KEY_POSTED:
        raise DisputeNotOpen(f"the share is {_state_name(share.state)}: nothing to dispute")
    if ctx.height > share.deadline:
        raise DisputeNotOpen(f"the dispute window ended at height {share.deadline}")


def _encrypted_source(view: StateView, share: Share) -> DatasetRecord:
    source = get_dataset(view, share.source)
    if source is None or source.salt is None or source.key_check is None:
        raise UnknownDataset(  # pragma: no cover - shares in escrow are of priced datasets
            f"source 0x{share.source.hex()} is not an encrypted dataset"
        )
    return source


def _data_leaves(source: DatasetRecord, leaf_index: int) -> int:
    """The source's data leaf count; ``DisputeProofMismatch`` if ``leaf_index`` is past it."""
    try:
        data_chunks = chunk_count(source.data_size)
    except EncryptionError as exc:  # pragma: no cover - registered sizes fit
        raise DisputeProofMismatch(exc.message) from exc
    if leaf_index > data_chunks:
        raise DisputeProofMismatch(
            f"leaf {leaf_index}: the source has data leaves 1 to {data_chunks}"
        )
    return data_chunks


def _judge(
    record: PurchaseRecord,
    share: Share,
    source: DatasetRecord,
    privkey: bytes,
    chunk: tuple[int, bool, bytes] | None,
) -> DisputeVerdict:
    """``check_dispute`` for a share; a private key that is not the purchase's is an invalid
    dispute (``DisputeBadPrivateKey``)."""
    assert source.salt is not None and source.key_check is not None  # _encrypted_source
    try:
        verdict = check_dispute(
            wrapped=share.wrapped_key,
            buyer_privkey=privkey,
            buyer_pubkey=record.buyer_pubkey,
            context=key_wrap_context(record.id, share.source),
            salt=source.salt,
            key_check_value=source.key_check,
            chunk=chunk,
        )
    except EncryptionError as exc:  # pragma: no cover - the record and chunk are checked
        raise DisputeProofMismatch(exc.message) from exc
    if verdict == DisputeVerdict.BAD_PRIVATE_KEY:
        raise DisputeBadPrivateKey(
            "buyer_privkey is not the private key of the purchase's buyer_pubkey"
        )
    return verdict


def _owner_fault(
    view: Overlay,
    record: PurchaseRecord,
    index: int,
    verdict: DisputeVerdict,
    name: str,
) -> tuple[Event, ...]:
    """A won dispute: the share back to the buyer, ``key_dispute_slash`` burned from the
    owner's supplier bond, the share closed."""
    share = record.shares[index]
    _put_share(view, record, index, replace(share, state=int(ShareState.OWNER_FAULT)))
    credit(view, record.buyer, share.amount)
    adjust_obligations(view, share.owner, Role.DATA_SUPPLIER, -1)
    slashed = slash_role_bond(
        view, share.owner, Role.DATA_SUPPLIER, economy_params(view).key_dispute_slash
    )
    return (
        _event(
            name,
            ("purchase", record.id),
            ("source", share.source),
            ("verdict", verdict.name.lower().encode()),
            ("refunded", u256(share.amount)),
            ("slashed", u256(slashed)),
        ),
    )


def _pay_owner(view: Overlay, record: PurchaseRecord, index: int) -> None:
    share = record.shares[index]
    credit(view, share.owner, share.amount)
    _put_share(view, record, index, replace(share, state=int(ShareState.PAID)))
    adjust_obligations(view, share.owner, Role.DATA_SUPPLIER, -1)


def apply_key_dispute(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, KeyDispute)  # kind dispatch guarantees it
    record, index = _find_share(view, body.purchase_id, body.source_id)
    share = record.shares[index]
    _require_disputable(record, share, vtx, ctx)
    source = _encrypted_source(view, share)
    chunk: tuple[int, bool, bytes] | None = None
    if body.chunk is not None:
        c = body.chunk
        _data_leaves(source, c.leaf_index)
        verify_leaf_path(source.root, c.leaf_index, c.leaf, c.path)
        chunk = (c.leaf_index - 1, is_last_chunk(source.data_size, c.leaf_index - 1), c.leaf)
    verdict = _judge(record, share, source, body.buyer_privkey, chunk)
    if verdict == DisputeVerdict.KEY_OK:
        raise DisputeRejected(
            "the posted key unwraps, matches the key check"
            + (" and decrypts the leaf" if chunk is not None else "")
            + ": the owner is not at fault"
        )
    charge(view, vtx)
    return _owner_fault(view, record, index, verdict, "key_dispute")


def _post_records(view: StateView, vtx: VerifiedTransaction) -> int:
    return 1  # the queue entry of the dispute window


def _dispute_records(view: StateView, vtx: VerifiedTransaction) -> int:
    """One unit for the key check, and one per proof segment (the leaf and each path node)."""
    body = vtx.body
    assert isinstance(body, KeyDispute)  # kind dispatch guarantees it
    return 1 + (0 if body.chunk is None else 1 + len(body.chunk.path))


# --- leaf disputes in parts ----------------------------------------------------------------------


def _check_leaf_open_body(body: object) -> None:
    assert isinstance(body, LeafDisputeOpen)  # the handler's body type
    _check_privkey(body.buyer_privkey)
    _check_leaf_position(body.leaf_index, body.path, "")


def _check_leaf_part_body(body: object) -> None:
    assert isinstance(body, LeafDisputePart)  # the handler's body type
    if not body.data:
        raise InvalidPurchaseBody("data: a part carries at least one leaf byte")
    if len(body.data) > DISPUTE_PART_BYTES:
        raise DisputePartTooLarge(
            f"data: {len(body.data)} bytes; a part carries at most {DISPUTE_PART_BYTES}"
        )


def apply_leaf_dispute_open(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    """Open a leaf dispute: the key-level checks now (an owner fault settles at once, as a
    ``KeyDispute``); otherwise the share waits for the leaf's parts until the window's end +
    ``leaf_dispute_heights``."""
    body = vtx.body
    assert isinstance(body, LeafDisputeOpen)  # kind dispatch guarantees it
    record, index = _find_share(view, body.purchase_id, body.source_id)
    share = record.shares[index]
    _require_disputable(record, share, vtx, ctx)
    source = _encrypted_source(view, share)
    _data_leaves(source, body.leaf_index)
    cid, size = leaf_link(source.root, body.leaf_index, body.path)
    if cid.version != 1 or cid.hashfun.code != SHA2_256:
        raise DisputeProofMismatch(
            f"leaf {body.leaf_index} is linked as {cid}: not a sha2-256 CIDv1, no block matches it"
        )
    verdict = _judge(record, share, source, body.buyer_privkey, None)
    expected = plain_chunk_size(source.data_size, body.leaf_index - 1) + TAG_BYTES
    if verdict == DisputeVerdict.KEY_OK and size != expected:
        # The path proves the leaf's size: one no chunk at this position can have never
        # decrypts (decrypt_chunk refuses it), whatever its bytes.
        verdict = DisputeVerdict.OWNER_FAULT_DECRYPT
    charge(view, vtx)
    if verdict.owner_at_fault:
        return _owner_fault(view, record, index, verdict, "leaf_dispute")
    deadline = share.deadline + economy_params(view).leaf_dispute_heights
    view.put(
        leaf_dispute_key(record.id, index),
        LeafDispute(body.buyer_privkey, body.leaf_index, bytes(cid), size, 0).encode(),
    )
    _put_share(
        view, record, index, replace(share, state=int(ShareState.LEAF_DISPUTE), deadline=deadline)
    )
    # The window's queue entry goes stale (the share's deadline moved); this one ends the dispute
    # if its parts do not come in time.
    PURCHASE_QUEUE.push(view, deadline, _queue_entry(record.id, index))
    return (
        _event(
            "leaf_dispute_open",
            ("purchase", record.id),
            ("source", share.source),
            ("leaf", u64(body.leaf_index)),
            ("leaf_size", u64(size)),
            ("parts_until", u64(deadline)),
        ),
    )


def _delete_leaf_dispute(view: Overlay, purchase: bytes, index: int, dispute: LeafDispute) -> None:
    for part in range(dispute.received // DISPUTE_PART_BYTES):
        view.delete(leaf_dispute_part_key(purchase, index, part))
    view.delete(leaf_dispute_key(purchase, index))


def _open_leaf_dispute(view: StateView, record: PurchaseRecord, index: int) -> LeafDispute:
    raw = view.get(leaf_dispute_key(record.id, index))
    if raw is None:  # pragma: no cover - written with the LEAF_DISPUTE state, deleted with it
        raise NoLeafDispute("the share's leaf dispute record is missing")
    return LeafDispute.decode(raw)


def apply_leaf_dispute_part(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    """Store the next part of the disputed leaf; the last one has the whole leaf checked against
    its CID and judged, and ends the dispute either way."""
    body = vtx.body
    assert isinstance(body, LeafDisputePart)  # kind dispatch guarantees it
    record, index = _find_share(view, body.purchase_id, body.source_id)
    share = record.shares[index]
    if record.buyer != vtx.sender:
        raise NotTheBuyer(f"only the buyer 0x{record.buyer.hex()} posts the disputed leaf")
    if share.state != ShareState.LEAF_DISPUTE:
        raise NoLeafDispute(f"the share is {_state_name(share.state)}: no leaf dispute is open")
    if ctx.height > share.deadline:
        raise DisputeNotOpen(f"the leaf dispute's parts were due by height {share.deadline}")
    dispute = _open_leaf_dispute(view, record, index)
    if body.offset != dispute.received:
        raise DisputePartOutOfOrder(
            f"offset {body.offset}: the dispute holds {dispute.received} of the leaf's "
            f"{dispute.leaf_size} bytes; the next part starts there"
        )
    want = min(DISPUTE_PART_BYTES, dispute.leaf_size - dispute.received)
    if len(body.data) != want:
        raise DisputePartSizeMismatch(
            f"a part of {len(body.data)} bytes at offset {body.offset}: expected {want} "
            f"(every part is {DISPUTE_PART_BYTES} bytes but the last; the leaf is "
            f"{dispute.leaf_size})"
        )
    received = dispute.received + len(body.data)
    if received < dispute.leaf_size:
        charge(view, vtx)
        view.put(
            leaf_dispute_part_key(record.id, index, dispute.received // DISPUTE_PART_BYTES),
            body.data,
        )
        view.put(leaf_dispute_key(record.id, index), replace(dispute, received=received).encode())
        return (
            _event(
                "leaf_dispute_part",
                ("purchase", record.id),
                ("source", share.source),
                ("received", u64(received)),
                ("leaf_size", u64(dispute.leaf_size)),
            ),
        )
    return _close_leaf_dispute(view, vtx, record, index, dispute, body.data)


def _close_leaf_dispute(
    view: Overlay,
    vtx: VerifiedTransaction,
    record: PurchaseRecord,
    index: int,
    dispute: LeafDispute,
    last: bytes,
) -> tuple[Event, ...]:
    share = record.shares[index]
    parts = []
    for part in range(dispute.received // DISPUTE_PART_BYTES):
        raw = view.get(leaf_dispute_part_key(record.id, index, part))
        if raw is None:  # pragma: no cover - parts are written in order and deleted together
            raise NoLeafDispute(f"part {part} of the leaf dispute is missing")
        parts.append(raw)
    parts.append(last)
    leaf = b"".join(parts)
    if raw_cid(leaf) != parse_cid(dispute.leaf_cid):
        # Nothing is written: the buyer may post a correct last part before the deadline.
        raise DisputeProofMismatch(
            f"the posted parts are not leaf {dispute.leaf_index} of the source "
            f"(they do not hash to {parse_cid(dispute.leaf_cid)})"
        )
    source = _encrypted_source(view, share)
    chunk_index = dispute.leaf_index - 1
    verdict = _judge(
        record,
        share,
        source,
        dispute.buyer_privkey,
        (chunk_index, is_last_chunk(source.data_size, chunk_index), leaf),
    )
    charge(view, vtx)
    _delete_leaf_dispute(view, record.id, index, dispute)
    if verdict.owner_at_fault:
        return _owner_fault(view, record, index, verdict, "leaf_dispute")
    # The leaf decrypts: the dispute ends against the buyer, who paid its fees; the owner is
    # paid now rather than at the deadline.
    _pay_owner(view, record, index)
    return (
        _event(
            "leaf_dispute",
            ("purchase", record.id),
            ("source", share.source),
            ("verdict", verdict.name.lower().encode()),
            ("paid", u256(share.amount)),
        ),
    )


def _leaf_open_records(view: StateView, vtx: VerifiedTransaction) -> int:
    """The key check, one per path node verified, the dispute record and its queue entry."""
    body = vtx.body
    assert isinstance(body, LeafDisputeOpen)  # kind dispatch guarantees it
    return 3 + len(body.path)


def _leaf_part_records(view: StateView, vtx: VerifiedTransaction) -> int:
    return 1  # the stored part, or (the last) the leaf's check and decryption


# --- end of block --------------------------------------------------------------------------------


def _queue_work(view: StateView, ctx: BlockContext) -> int:
    if ctx.authority is not None:
        return ctx.authority.max_queue_work_per_block
    raw = view.get(AUTHORITY_PARAMS_KEY)
    if raw is None:
        return _DEFAULT_QUEUE_WORK
    return AuthorityParams.decode(raw).max_queue_work_per_block


def _settle(view: Overlay, due: int, entry: bytes) -> None:
    """One queue entry: refund a share still awaiting its key at its deadline, pay the owner a
    share whose dispute window ended, or end a leaf dispute whose parts did not all come (its
    state deleted, the share paid as if undisputed: at most ``MAX_DISPUTE_PARTS`` deletes);
    an entry for a share that moved on is stale."""
    record = get_purchase(view, entry[:32])
    if record is None:  # pragma: no cover - purchases are never deleted
        return
    index = int.from_bytes(entry[32:], "big")
    share = record.shares[index]
    if share.deadline != due:
        return
    if share.state == ShareState.AWAITING_KEY:
        credit(view, record.buyer, share.amount)
        new_state = ShareState.REFUNDED
    elif share.state == ShareState.KEY_POSTED:
        credit(view, share.owner, share.amount)
        new_state = ShareState.PAID
    elif share.state == ShareState.LEAF_DISPUTE:
        _delete_leaf_dispute(view, record.id, index, _open_leaf_dispute(view, record, index))
        credit(view, share.owner, share.amount)
        new_state = ShareState.PAID
    else:
        return  # settled by a dispute
    _put_share(view, record, index, replace(share, state=int(new_state)))
    adjust_obligations(view, share.owner, Role.DATA_SUPPLIER, -1)


def end_block(view: Overlay, ctx: BlockContext) -> None:
    """Settle the shares whose key deadline, dispute window or leaf dispute is due (capped per
    block)."""
    for due, entry in PURCHASE_QUEUE.pop_due(view, ctx.height, _queue_work(view, ctx)):
        _settle(view, due, entry)


HANDLERS: tuple[KindHandler, ...] = (
    KindHandler(
        EconomyKind.PURCHASE, Purchase, apply_purchase, _purchase_records, _check_purchase_body
    ),
    KindHandler(EconomyKind.KEY_POST, KeyPost, apply_key_post, _post_records, _check_key_post_body),
    KindHandler(
        EconomyKind.KEY_DISPUTE, KeyDispute, apply_key_dispute, _dispute_records,
        _check_dispute_body,
    ),
    KindHandler(
        EconomyKind.LEAF_DISPUTE_OPEN, LeafDisputeOpen, apply_leaf_dispute_open,
        _leaf_open_records, _check_leaf_open_body,
    ),
    KindHandler(
        EconomyKind.LEAF_DISPUTE_PART, LeafDisputePart, apply_leaf_dispute_part,
        _leaf_part_records, _check_leaf_part_body,
    ),
)

__all__ = [
    "DISPUTE_PART_BYTES",
    "HANDLERS",
    "MAX_DISPUTE_PARTS",
    "DisputeBadPrivateKey",
    "DisputeChunk",
    "DisputeNotOpen",
    "DisputePartOutOfOrder",
    "DisputePartSizeMismatch",
    "DisputePartTooLarge",
    "DisputeProofMismatch",
    "DisputeRejected",
    "InvalidPurchaseBody",
    "KeyDispute",
    "KeyPost",
    "KeyPostNotOpen",
    "LeafDispute",
    "LeafDisputeOpen",
    "LeafDisputePart",
    "NoLeafDispute",
    "NotShareOwner",
    "NotTheBuyer",
    "PriceAboveMax",
    "Purchase",
    "PurchaseError",
    "PurchaseNotNeeded",
    "PurchaseRecord",
    "Share",
    "ShareState",
    "SupplierInactive",
    "UnknownPurchase",
    "UnknownShare",
    "compute_shares",
    "end_block",
    "get_leaf_dispute",
    "get_purchase",
    "key_wrap_context",
    "leaf_dispute_key",
    "leaf_dispute_part_key",
    "leaf_link",
    "purchase_grants",
    "purchase_id",
    "verify_leaf_path",
]

"""Dataset registration, verified on chain (DESIGN §8 "Registration is verified on chain").

``DatasetRegister`` carries the artifact's root CID and an ``ArtifactProof`` (the unpadded
safetensors header and the dag-pb nodes from the root to leaf 0). The transition rebuilds leaf 0,
checks the path up to the root CID and the UnixFS file size (``format_v1.verify_registration``),
derives the row count (every tensor shares its first dimension, byte-sized dtypes only) and the
schema, and stores a ``DatasetRecord`` under ``NS_DATASET + id`` with
``id = sha256(b"NeuroSeed/dataset/v1" ‖ root)`` — so one artifact is registered at most once.
Validity depends on the transaction alone; whether the blocks are available is checked at mempool
admission, never here.

A priced dataset (``price > 0``) is stored encrypted per chunk (``node.storage.encryption``): its
registration must carry the salt, the key check and the plaintext data hash, and its file size is
checked for the ciphertext layout; a free one carries none of them. Composite datasets
(``node.economy.composite``) are ``DatasetRecord``s too, with no root and their flattened parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from node import crypto
from node.consensus.receipts import Attribute, Event
from node.consensus.state import Overlay, StateView
from node.economy.api import (
    MAX_COMPOSITE_RANGES_HARD,
    NS_DATASET,
    EconomyError,
    EconomyKind,
    KindHandler,
    Role,
    charge,
    u64,
    u256,
)
from node.economy.roles import require_role
from node.encoding import Record, limit
from node.errors import DecodeError, InvalidBody, NeuroSeedError
from node.models.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    ArtifactFormatError,
    SafetensorsHeader,
    SubByteDtype,
)
from node.storage.format_v1 import (
    ArtifactProof,
    ArtifactProofError,
    FileSizeMismatch,
    HeaderMismatch,
    InvalidDataset,
    dataset_rows,
    verify_registration,
)
from node.storage.unixfs import DAG_PB_CODEC, RAW_CODEC, SHA2_256, parse_cid
from node.types import Address, Amount, Hash32

if TYPE_CHECKING:
    from node.consensus.transition import BlockContext
    from node.consensus.txs import VerifiedTransaction

DATASET_ID_TAG = b"NeuroSeed/dataset/v1"
MAX_CID_BYTES = 64
MAX_NAME = 128  # UTF-8 bytes, also the license
MAX_DESCRIPTION = 4096
MAX_TENSOR_NAME = 1024  # UTF-8 bytes of one tensor name kept in a schema
MAX_DTYPE = 16
MAX_DIMS = 64  # dimensions of one tensor kept in a schema
MAX_SCHEMA_TENSORS = 100_000
SALT_BYTES = 7  # node.storage.encryption.SALT_BYTES


# --- errors (2210–2224) --------------------------------------------------------------------------


class DatasetError(EconomyError):
    """A dataset registration the chain refuses (the reason is in the message)."""

    code = 2210
    reason = "invalid dataset registration"


class InvalidRootCid(InvalidBody):
    code = 2211
    reason = "the root is not a canonical binary CIDv1 (sha2-256, raw or dag-pb)"


class PriceTermsMismatch(InvalidBody):
    """A priced dataset lacks salt / key check / plaintext hash, or a free one carries them."""

    code = 2212
    reason = "salt, key check and plaintext hash go with a price, and only with one"


class DatasetExists(DatasetError):
    code = 2213
    reason = "a dataset with this id is already registered"


class UnknownDataset(DatasetError):
    code = 2214
    reason = "unknown dataset"


class NotSafetensorsArtifact(DatasetError):
    """The header of the registration is not a valid safetensors header."""

    code = 2215
    reason = "the header is not a valid safetensors header"


class SubByteDtypeRejected(DatasetError):
    code = 2216
    reason = "datasets take byte-sized dtypes only"


class ArtifactHeaderMismatch(DatasetError):
    code = 2217
    reason = "the header is not leaf 0 of the root CID"


class ArtifactPathMismatch(DatasetError):
    code = 2218
    reason = "the proof path does not lead from the root CID to leaf 0"


class ArtifactSizeMismatch(DatasetError):
    code = 2219
    reason = "the file size under the root CID does not match the header"


class NotADataset(DatasetError):
    """A valid safetensors file whose tensors do not share a row dimension."""

    code = 2220
    reason = "the tensors do not form a dataset (no shared first dimension)"


class EmptyName(InvalidBody):
    code = 2221
    reason = "a dataset needs a name"


class SchemaTooLarge(DatasetError):
    code = 2222
    reason = "a tensor name or shape is too large to record"


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SchemaEntry(Record):
    """One tensor of a dataset: name, dtype and the shape of one row (``shape[1:]``)."""

    name: str = field(metadata=limit(MAX_TENSOR_NAME))
    dtype: str = field(metadata=limit(MAX_DTYPE))
    row_shape: tuple[int, ...] = field(metadata=limit(MAX_DIMS))


@dataclass(frozen=True, slots=True)
class CompositeEntry(Record):
    """Rows ``[start, end)`` of a plain (leaf) dataset, one entry of a flattened composite; the
    tensors are the composite's schema."""

    source: Hash32
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class DatasetRecord(Record):
    """A registered dataset, or a composite (``composite`` non-empty, no root or header)."""

    id: Hash32
    root: bytes = field(metadata=limit(MAX_CID_BYTES))  # binary CID; empty for a composite
    header: bytes = field(metadata=limit(MAX_HEADER_BYTES))  # unpadded; empty for a composite
    owner: Address
    name: str = field(metadata=limit(MAX_NAME))
    description: str = field(metadata=limit(MAX_DESCRIPTION))
    license: str = field(metadata=limit(MAX_NAME))
    schema: tuple[SchemaEntry, ...] = field(metadata=limit(MAX_SCHEMA_TENSORS))
    rows: int
    data_size: int  # plaintext bytes of the data (after leaf 0)
    price: Amount  # per purchase; 0 = free
    salt: bytes | None = field(metadata=limit(SALT_BYTES))
    key_check: Hash32 | None
    plain_data_hash: Hash32 | None
    height: int  # registered at
    depth: int  # 0 for a dataset, 1 + the deepest source for a composite
    composite: tuple[CompositeEntry, ...] = field(metadata=limit(MAX_COMPOSITE_RANGES_HARD))

    @property
    def is_composite(self) -> bool:
        return bool(self.composite)

    @property
    def is_priced(self) -> bool:
        return self.price > 0

    @property
    def is_encrypted(self) -> bool:
        """A plain dataset stored encrypted (it has a salt): priced ones."""
        return self.salt is not None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.schema)


@dataclass(frozen=True, slots=True)
class DatasetRegister(Record):
    root: bytes = field(metadata=limit(MAX_CID_BYTES))
    proof: ArtifactProof
    name: str = field(metadata=limit(MAX_NAME))
    description: str = field(metadata=limit(MAX_DESCRIPTION))
    license: str = field(metadata=limit(MAX_NAME))
    price: Amount
    salt: bytes | None = field(default=None, metadata=limit(SALT_BYTES))
    key_check: Hash32 | None = None
    plain_data_hash: Hash32 | None = None


# --- reads ---------------------------------------------------------------------------------------


def dataset_id(root: bytes) -> Hash32:
    return crypto.sha256(DATASET_ID_TAG + bytes(root))


def dataset_key(id_: bytes) -> bytes:
    return NS_DATASET + id_


def get_dataset(view: StateView, id_: bytes) -> DatasetRecord | None:
    raw = view.get(dataset_key(id_))
    return None if raw is None else DatasetRecord.decode(raw)


def require_dataset(view: StateView, id_: bytes) -> DatasetRecord:
    record = get_dataset(view, id_)
    if record is None:
        raise UnknownDataset(f"no dataset 0x{bytes(id_).hex()}")
    return record


def get_dataset_by_root(view: StateView, root: bytes) -> DatasetRecord | None:
    return get_dataset(view, dataset_id(root))


def put_dataset(view: Overlay, record: DatasetRecord) -> None:
    view.put(dataset_key(record.id), record.encode())


def schema_row_bytes(entry: SchemaEntry) -> int:
    n = DTYPE_SIZES[entry.dtype]
    for d in entry.row_shape:
        n *= d
    return n


# --- the transaction -----------------------------------------------------------------------------


def check_root_cid(root: bytes) -> None:
    """A canonical binary CIDv1 with sha2-256 and the raw or dag-pb codec (``InvalidRootCid``)."""
    try:
        cid = parse_cid(root)
    except DecodeError as exc:
        raise InvalidRootCid(f"root: {exc.message}") from exc
    if bytes(cid) != root:
        raise InvalidRootCid("root: not the canonical binary form of its CID")
    if cid.version != 1 or cid.hashfun.code != SHA2_256:
        raise InvalidRootCid("root: not a CIDv1 with sha2-256")
    if cid.codec.code not in (RAW_CODEC, DAG_PB_CODEC):
        raise InvalidRootCid("root: neither a raw leaf nor a dag-pb node")


def check_price_terms(
    price: int, salt: bytes | None, key_check: bytes | None, plain_data_hash: bytes | None
) -> None:
    terms = (salt, key_check, plain_data_hash)
    if price > 0:
        if any(t is None for t in terms):
            raise PriceTermsMismatch(
                "a priced dataset is encrypted: it must carry salt, key_check and plain_data_hash"
            )
        if salt is not None and len(salt) != SALT_BYTES:
            raise PriceTermsMismatch(f"salt: expected {SALT_BYTES} bytes, got {len(salt)}")
    elif any(t is not None for t in terms):
        raise PriceTermsMismatch("a free dataset is not encrypted: leave salt, key_check and "
                                 "plain_data_hash out")


def _check_register_body(body: object) -> None:
    assert isinstance(body, DatasetRegister)  # the handler's body type
    check_root_cid(body.root)
    if not body.name.strip():
        raise EmptyName("name: a dataset needs a non-blank name")
    check_price_terms(body.price, body.salt, body.key_check, body.plain_data_hash)


def _format_error(exc: NeuroSeedError) -> DatasetError:
    """The transaction error for a format / proof error of ``format_v1`` (reason kept)."""
    message = f"{exc.reason}: {exc.message}" if exc.message != exc.reason else exc.message
    data = {"format_code": exc.code}
    cls: type[DatasetError]
    if isinstance(exc, SubByteDtype):
        cls = SubByteDtypeRejected
    elif isinstance(exc, HeaderMismatch):
        cls = ArtifactHeaderMismatch
    elif isinstance(exc, FileSizeMismatch):
        cls = ArtifactSizeMismatch
    elif isinstance(exc, InvalidDataset):
        cls = NotADataset
    elif isinstance(exc, ArtifactFormatError):
        cls = NotSafetensorsArtifact
    else:  # ArtifactProofError (path, layout), a malformed dag-pb node (DecodeError)
        cls = ArtifactPathMismatch
    return cls(message, data=data)


def verify_dataset_artifact(
    root: bytes, proof: ArtifactProof, *, encrypted: bool
) -> tuple[SafetensorsHeader, int]:
    """The header and row count a registration proves, or the specific ``DatasetError``."""
    try:
        verified = verify_registration(root, proof, encrypted=encrypted)
        return verified.header, dataset_rows(verified.header)
    except (ArtifactFormatError, ArtifactProofError, DecodeError) as exc:
        raise _format_error(exc) from exc


def schema_of(header: SafetensorsHeader) -> tuple[SchemaEntry, ...]:
    """Per tensor, in header (offset) order: name, dtype, shape of one row."""
    out = []
    for t in header.tensors:
        if len(t.name.encode("utf-8")) > MAX_TENSOR_NAME:
            raise SchemaTooLarge(f"tensor name {t.name[:64]!r}… exceeds {MAX_TENSOR_NAME} bytes")
        if len(t.shape) > MAX_DIMS:
            raise SchemaTooLarge(f"tensor {t.name!r} has more than {MAX_DIMS} dimensions")
        out.append(SchemaEntry(t.name, t.dtype, t.shape[1:]))
    return tuple(out)


def apply_dataset_register(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, DatasetRegister)  # kind dispatch guarantees it
    sender = vtx.sender
    require_role(view, sender, Role.DATA_SUPPLIER, "registering a dataset")
    id_ = dataset_id(body.root)
    if view.get(dataset_key(id_)) is not None:
        raise DatasetExists(f"the artifact {parse_cid(body.root)} is already dataset 0x{id_.hex()}")
    header, rows = verify_dataset_artifact(body.root, body.proof, encrypted=body.price > 0)
    record = DatasetRecord(
        id=id_,
        root=body.root,
        header=body.proof.header,
        owner=sender,
        name=body.name,
        description=body.description,
        license=body.license,
        schema=schema_of(header),
        rows=rows,
        data_size=header.data_size,
        price=body.price,
        salt=body.salt,
        key_check=body.key_check,
        plain_data_hash=body.plain_data_hash,
        height=ctx.height,
        depth=0,
        composite=(),
    )
    charge(view, vtx)
    put_dataset(view, record)
    return (
        Event(
            "dataset_register",
            (
                Attribute("id", id_),
                Attribute("owner", sender),
                Attribute("root", body.root),
                Attribute("rows", u64(rows)),
                Attribute("price", u256(body.price)),
            ),
        ),
    )


def _register_records(view: StateView, vtx: VerifiedTransaction) -> int:
    return 1  # the dataset record


HANDLERS: tuple[KindHandler, ...] = (
    KindHandler(
        EconomyKind.DATASET_REGISTER,
        DatasetRegister,
        apply_dataset_register,
        _register_records,
        _check_register_body,
    ),
)

__all__ = [
    "HANDLERS",
    "ArtifactHeaderMismatch",
    "ArtifactPathMismatch",
    "ArtifactSizeMismatch",
    "CompositeEntry",
    "DatasetError",
    "DatasetExists",
    "DatasetRecord",
    "DatasetRegister",
    "EmptyName",
    "InvalidRootCid",
    "NotADataset",
    "NotSafetensorsArtifact",
    "PriceTermsMismatch",
    "SchemaEntry",
    "SchemaTooLarge",
    "SubByteDtypeRejected",
    "UnknownDataset",
    "dataset_id",
    "get_dataset",
    "get_dataset_by_root",
    "require_dataset",
]

"""Composite datasets (DESIGN §8): virtual datasets made of row ranges of other datasets.

``CompositeDefine`` lists ordered parts (source dataset, rows ``[start, end)``, a tensor subset or
all). Sources may be composites themselves; the record keeps the **flattened** resolution — rows of
plain (leaf) datasets only, consecutive ranges of one source merged — so purchases and readers never
recurse. Nesting depth (``max_composite_depth``) and flattened ranges (``max_composite_ranges``)
are capped at genesis, and the fee counts the ranges resolved (one record unit each).

Every part must select the same tensor names with the same dtype and per-row shape (from the
sources' stored schemas); the composite's schema is the first part's selection, in its order, and
every flattened entry reads exactly those tensors. A purchase pays the sources' owners pro rata to
rows (``node.economy.purchases``). Because a purchase of a composite delivers each priced source's
whole content key, the price must give each priced source at least its own price
(``CompositeUnderpriced`` names the minimum). ``id = sha256(b"NeuroSeed/composite/v1" ‖ sender ‖
nonce)``, under the same namespace as datasets (the tags keep the two kinds of ids apart).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from node import crypto
from node.consensus.receipts import Attribute, Event
from node.consensus.state import Overlay, StateView
from node.economy.api import (
    MAX_COMPOSITE_RANGES_HARD,
    EconomyError,
    EconomyKind,
    KindHandler,
    Role,
    charge,
    economy_params,
    u64,
    u256,
)
from node.economy.datasets import (
    MAX_DESCRIPTION,
    MAX_NAME,
    MAX_TENSOR_NAME,
    CompositeEntry,
    DatasetExists,
    DatasetRecord,
    EmptyName,
    SchemaEntry,
    dataset_key,
    put_dataset,
    require_dataset,
    schema_row_bytes,
)
from node.economy.roles import require_any_role
from node.encoding import Record, limit
from node.errors import InvalidBody
from node.types import Address, Amount, Hash32

if TYPE_CHECKING:
    from node.consensus.transition import BlockContext
    from node.consensus.txs import VerifiedTransaction

COMPOSITE_ID_TAG = b"NeuroSeed/composite/v1"
MAX_SELECTED_TENSORS = 4096


# --- errors (2225–2234) --------------------------------------------------------------------------


class CompositeError(EconomyError):
    code = 2225
    reason = "invalid composite dataset"


class InvalidCompositeBody(InvalidBody):
    """No parts, an empty or reversed row range, a tensor named twice."""

    code = 2226
    reason = "invalid composite definition"


class RowRangeOutOfBounds(CompositeError):
    code = 2227
    reason = "row range past the end of the source"


class UnknownTensor(CompositeError):
    code = 2228
    reason = "the source has no such tensor"


class CompositeIncompatible(CompositeError):
    code = 2229
    reason = "the parts select different tensors, dtypes or row shapes"


class CompositeTooDeep(CompositeError):
    code = 2230
    reason = "composite nesting too deep"


class CompositeTooManyRanges(CompositeError):
    code = 2231
    reason = "too many row ranges after flattening"


class CompositeUnderpriced(CompositeError):
    code = 2232
    reason = "the price gives a priced source less than its own price"


# --- records -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompositePartSpec(Record):
    """Rows ``[start_row, end_row)`` of ``source``; ``tensors`` empty = all of its tensors."""

    source: Hash32
    start_row: int
    end_row: int
    tensors: tuple[str, ...] = field(default=(), metadata=limit(MAX_SELECTED_TENSORS))


@dataclass(frozen=True, slots=True)
class CompositeDefine(Record):
    name: str = field(metadata=limit(MAX_NAME))
    description: str = field(metadata=limit(MAX_DESCRIPTION))
    license: str = field(metadata=limit(MAX_NAME))
    price: Amount
    parts: tuple[CompositePartSpec, ...] = field(metadata=limit(MAX_COMPOSITE_RANGES_HARD))


class PlanEntry(NamedTuple):
    """One range a reader fetches: rows ``[start, end)`` of the leaf dataset, these tensors."""

    dataset: DatasetRecord
    start: int
    end: int
    tensors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Resolution:
    """A composite definition resolved against the state."""

    schema: tuple[SchemaEntry, ...]
    entries: tuple[CompositeEntry, ...]
    depth: int
    rows: int
    leaves: dict[bytes, DatasetRecord]  # the leaf datasets of ``entries`` by id


# --- reads ---------------------------------------------------------------------------------------


def composite_id(sender: Address, nonce: int) -> Hash32:
    return crypto.sha256(COMPOSITE_ID_TAG + bytes(sender) + nonce.to_bytes(8, "big"))


def composite_plan(view: StateView, id_: bytes) -> list[PlanEntry]:
    """What reading dataset ``id_`` fetches: (leaf dataset, start, end, tensors) in row order.

    A plain dataset is one entry over all its rows and tensors; a composite lists its flattened
    entries, each reading the composite's schema. Raises ``UnknownDataset``.
    """
    record = require_dataset(view, id_)
    if not record.is_composite:
        return [PlanEntry(record, 0, record.rows, record.tensor_names)]
    names = record.tensor_names
    leaves: dict[bytes, DatasetRecord] = {}
    out = []
    for e in record.composite:
        leaf = leaves.get(e.source)
        if leaf is None:
            leaf = leaves[e.source] = require_dataset(view, e.source)
        out.append(PlanEntry(leaf, e.start, e.end, names))
    return out


# --- resolution ----------------------------------------------------------------------------------


def _selection(source: DatasetRecord, tensors: tuple[str, ...], i: int) -> tuple[SchemaEntry, ...]:
    by_name = {s.name: s for s in source.schema}
    if not tensors:
        return source.schema
    out = []
    for name in tensors:
        entry = by_name.get(name)
        if entry is None:
            raise UnknownTensor(f"part {i}: dataset 0x{source.id.hex()} has no tensor {name!r}")
        out.append(entry)
    return tuple(out)


class _Flattener:
    """Appends leaf ranges, merging a range that continues the previous one, within a cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.entries: list[CompositeEntry] = []

    def add(self, source: Hash32, start: int, end: int) -> None:
        if self.entries:
            last = self.entries[-1]
            if last.source == source and last.end == start:
                self.entries[-1] = CompositeEntry(source, last.start, end)
                return
        if len(self.entries) == self.cap:
            raise CompositeTooManyRanges(
                f"the parts resolve to more than max_composite_ranges = {self.cap} row ranges"
            )
        self.entries.append(CompositeEntry(source, start, end))


def resolve_parts(view: StateView, parts: tuple[CompositePartSpec, ...]) -> Resolution:
    """Check ``parts`` against the state and flatten them (the rules of the module docstring)."""
    params = economy_params(view)
    flat = _Flattener(params.max_composite_ranges)
    schema: tuple[SchemaEntry, ...] = ()
    layout: dict[str, SchemaEntry] = {}
    depth = 0
    rows = 0
    sources: dict[bytes, DatasetRecord] = {}
    offsets: dict[bytes, list[int]] = {}  # per composite source: first row of each entry
    for i, part in enumerate(parts):
        source = sources.get(part.source)
        if source is None:
            source = sources[part.source] = require_dataset(view, part.source)
        if part.end_row > source.rows:
            raise RowRangeOutOfBounds(
                f"part {i}: rows [{part.start_row}, {part.end_row}) run past the {source.rows} "
                f"rows of 0x{source.id.hex()}"
            )
        selected = _selection(source, part.tensors, i)
        if i == 0:
            schema = selected
            layout = {s.name: s for s in selected}
        elif {s.name for s in selected} != layout.keys():
            raise CompositeIncompatible(
                f"part {i} selects {sorted(s.name for s in selected)}, part 0 selects "
                f"{sorted(layout)}"
            )
        else:
            for s in selected:
                want = layout[s.name]
                if (s.dtype, s.row_shape) != (want.dtype, want.row_shape):
                    raise CompositeIncompatible(
                        f"part {i}: tensor {s.name!r} is {s.dtype} {list(s.row_shape)} per row, "
                        f"part 0 has {want.dtype} {list(want.row_shape)}"
                    )
        depth = max(depth, source.depth + 1)
        if depth > params.max_composite_depth:
            raise CompositeTooDeep(
                f"part {i}: nesting depth {depth} exceeds max_composite_depth "
                f"{params.max_composite_depth}"
            )
        rows += part.end_row - part.start_row
        if not source.is_composite:
            flat.add(source.id, part.start_row, part.end_row)
            continue
        starts = offsets.get(source.id)
        if starts is None:
            starts = offsets[source.id] = []
            pos = 0
            for e in source.composite:
                starts.append(pos)
                pos += e.end - e.start
        j = bisect.bisect_right(starts, part.start_row) - 1
        while j < len(starts) and starts[j] < part.end_row:
            e = source.composite[j]
            lo = max(part.start_row, starts[j])
            hi = min(part.end_row, starts[j] + e.end - e.start)
            flat.add(e.source, e.start + lo - starts[j], e.start + hi - starts[j])
            j += 1
    leaves: dict[bytes, DatasetRecord] = {}
    for e in flat.entries:
        if e.source not in leaves:
            leaf = sources.get(e.source)
            leaves[e.source] = leaf if leaf is not None else require_dataset(view, e.source)
    return Resolution(schema, tuple(flat.entries), depth, rows, leaves)


def rows_by_source(entries: tuple[CompositeEntry, ...]) -> dict[bytes, int]:
    """Rows per leaf source, in order of first appearance."""
    out: dict[bytes, int] = {}
    for e in entries:
        out[e.source] = out.get(e.source, 0) + e.end - e.start
    return out


def minimum_price(resolution: Resolution) -> int:
    """The least composite price whose pro-rata share gives every priced source its own price."""
    need = 0
    for source, rows in rows_by_source(resolution.entries).items():
        price = resolution.leaves[source].price
        if price:
            need = max(need, -(-price * resolution.rows // rows))
    return need


# --- the transaction -----------------------------------------------------------------------------


def _check_define_body(body: object) -> None:
    assert isinstance(body, CompositeDefine)  # the handler's body type
    if not body.name.strip():
        raise EmptyName("name: a composite dataset needs a non-blank name")
    if not body.parts:
        raise InvalidCompositeBody("parts: a composite dataset has at least one part")
    for i, part in enumerate(body.parts):
        if not part.start_row < part.end_row:
            raise InvalidCompositeBody(
                f"parts[{i}]: rows [{part.start_row}, {part.end_row}) are not a non-empty range"
            )
        if len(set(part.tensors)) != len(part.tensors):
            raise InvalidCompositeBody(f"parts[{i}]: a tensor is named twice")
        for name in part.tensors:
            if len(name.encode("utf-8")) > MAX_TENSOR_NAME:
                raise InvalidCompositeBody(f"parts[{i}]: a tensor name exceeds {MAX_TENSOR_NAME}")


def apply_composite_define(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, CompositeDefine)  # kind dispatch guarantees it
    sender = vtx.sender
    require_any_role(
        view, sender, (Role.DATA_SUPPLIER, Role.DISTRIBUTOR), "defining a composite dataset"
    )
    id_ = composite_id(sender, vtx.tx.nonce)
    if view.get(dataset_key(id_)) is not None:  # pragma: no cover - a sha-256 collision
        raise DatasetExists(f"dataset 0x{id_.hex()} exists")
    resolution = resolve_parts(view, body.parts)
    least = minimum_price(resolution)
    if body.price < least:
        raise CompositeUnderpriced(
            f"price {body.price} gives a priced source less than its own price: a purchase hands "
            f"over each priced source's key; the least price here is {least}"
        )
    row_bytes = sum(schema_row_bytes(s) for s in resolution.schema)
    record = DatasetRecord(
        id=id_,
        root=b"",
        header=b"",
        owner=sender,
        name=body.name,
        description=body.description,
        license=body.license,
        schema=resolution.schema,
        rows=resolution.rows,
        data_size=resolution.rows * row_bytes,
        price=body.price,
        salt=None,
        key_check=None,
        plain_data_hash=None,
        height=ctx.height,
        depth=resolution.depth,
        composite=resolution.entries,
    )
    charge(view, vtx)
    put_dataset(view, record)
    return (
        Event(
            "composite_define",
            (
                Attribute("id", id_),
                Attribute("owner", sender),
                Attribute("rows", u64(resolution.rows)),
                Attribute("ranges", u64(len(resolution.entries))),
                Attribute("price", u256(body.price)),
            ),
        ),
    )


def _define_records(view: StateView, vtx: VerifiedTransaction) -> int:
    """The record plus one unit per flattened range (1 if the parts do not resolve: the
    transaction is then invalid anyway)."""
    body = vtx.body
    assert isinstance(body, CompositeDefine)  # kind dispatch guarantees it
    try:
        return 1 + len(resolve_parts(view, body.parts).entries)
    except EconomyError:
        return 1


HANDLERS: tuple[KindHandler, ...] = (
    KindHandler(
        EconomyKind.COMPOSITE_DEFINE,
        CompositeDefine,
        apply_composite_define,
        _define_records,
        _check_define_body,
    ),
)

__all__ = [
    "HANDLERS",
    "CompositeDefine",
    "CompositeError",
    "CompositeIncompatible",
    "CompositePartSpec",
    "CompositeTooDeep",
    "CompositeTooManyRanges",
    "CompositeUnderpriced",
    "InvalidCompositeBody",
    "PlanEntry",
    "Resolution",
    "RowRangeOutOfBounds",
    "UnknownTensor",
    "composite_id",
    "composite_plan",
    "minimum_price",
    "resolve_parts",
    "rows_by_source",
]

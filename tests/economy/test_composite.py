"""Composite datasets (node/economy/composite.py, DESIGN §8): flattening of nested composites,
merging of contiguous ranges, schema compatibility, depth and range caps, the minimum price, the
reader's plan, and each rejection with its error."""

from __future__ import annotations

import pytest

from node.consensus.fees import compute_cost
from node.consensus.txs import verify_transaction
from node.economy.api import EconomyKind, Role
from node.economy.composite import (
    CompositeDefine,
    CompositeIncompatible,
    CompositePartSpec,
    CompositeTooDeep,
    CompositeTooManyRanges,
    CompositeUnderpriced,
    InvalidCompositeBody,
    PlanEntry,
    RowRangeOutOfBounds,
    UnknownTensor,
    composite_id,
    composite_plan,
)
from node.economy.datasets import (
    CompositeEntry,
    EmptyName,
    SchemaEntry,
    UnknownDataset,
    get_dataset,
)
from node.economy.roles import MissingRole
from node.models.safetensors_header import parse_header
from node.storage.format_v1 import CompositePart, composite_header
from node.types import Amount, Hash32
from tests.economy.econ import (
    DISTRIBUTOR,
    SUPPLIER,
    SUPPLIER2,
    Artifact,
    EconomyChain,
    addr,
    build_artifact,
    data_size_of,
    header_json,
    priced_dataset,
    register_body,
    rows_dataset,
    tx,
)


def part(source: bytes, start: int, end: int, *tensors: str) -> CompositePartSpec:
    return CompositePartSpec(Hash32(source), start, end, tuple(tensors))


def define(parts: list[CompositePartSpec], price: int = 0, name: str = "mix") -> CompositeDefine:
    return CompositeDefine(name, "rows of others", "CC0", Amount(price), tuple(parts))


class World:
    """A chain with datasets A (10 rows, x+y), B (20 rows, x+y) by SUPPLIER, P (8 rows, priced
    800) by SUPPLIER2, and W (5 rows; x is 6 wide) by SUPPLIER."""

    def __init__(self) -> None:
        self.c = EconomyChain()
        self.c.register_roles(
            (SUPPLIER, Role.DATA_SUPPLIER), (SUPPLIER2, Role.DATA_SUPPLIER),
            (DISTRIBUTOR, Role.DISTRIBUTOR),
        )
        self.a = rows_dataset(10, seed=1)
        self.b = rows_dataset(20, seed=2)
        self.p = priced_dataset(8, seed=3)
        self.w = rows_dataset(5, width=6, seed=4)
        self.c.run(
            self.c.tx(SUPPLIER, register_body(self.a, name="A")),
            self.c.tx(SUPPLIER, register_body(self.b, name="B")),
            self.c.tx(SUPPLIER2, register_body(self.p, name="P", price=800)),
            self.c.tx(SUPPLIER, register_body(self.w, name="W")),
        )

    def define(self, who: int, parts: list[CompositePartSpec], price: int = 0) -> bytes:
        nonce = self.c.nonce(who)
        self.c.run(self.c.tx(who, define(parts, price)))
        return composite_id(addr(who), nonce)


def test_a_composite_of_plain_datasets() -> None:
    w = World()
    cid = composite_id(addr(DISTRIBUTOR), w.c.nonce(DISTRIBUTOR))
    raw = w.c.tx(DISTRIBUTOR, define([part(w.a.id, 2, 8), part(w.b.id, 0, 5)]))
    built = w.c.run(raw)
    record = get_dataset(w.c.view(), cid)
    assert record is not None and record.is_composite and not record.is_encrypted
    assert record.composite == (CompositeEntry(w.a.id, 2, 8), CompositeEntry(w.b.id, 0, 5))
    assert (record.rows, record.depth, record.root, record.header) == (11, 1, b"", b"")
    assert record.schema == (SchemaEntry("x", "U8", (4,)), SchemaEntry("y", "I16", ()))
    assert record.data_size == 11 * (4 + 2)
    assert [e.name for e in built.result.receipts[0].events] == ["composite_define", "fee"]
    # the fee counts the record and each resolved range
    assert built.result.receipts[0].burned == compute_cost(
        w.c.params, EconomyKind.COMPOSITE_DEFINE, len(raw), new_accounts=3
    )


def test_nested_composites_are_flattened_and_merged() -> None:
    w = World()
    c1 = w.define(DISTRIBUTOR, [part(w.a.id, 2, 8), part(w.b.id, 0, 5)])  # 11 rows
    # rows 3..9 of c1 are A[5..8] + B[0..3]; then A[8..10]
    c2 = w.define(SUPPLIER, [part(c1, 3, 9), part(w.a.id, 8, 10)])
    r2 = get_dataset(w.c.view(), c2)
    assert r2 is not None and r2.depth == 2 and r2.rows == 8
    assert r2.composite == (
        CompositeEntry(w.a.id, 5, 8),
        CompositeEntry(w.b.id, 0, 3),
        CompositeEntry(w.a.id, 8, 10),
    )
    # c1 rows 0..6 are A[2..8], continued by A[8..10]: one merged range
    c3 = w.define(SUPPLIER, [part(c1, 0, 6), part(w.a.id, 8, 10)])
    r3 = get_dataset(w.c.view(), c3)
    assert r3 is not None and r3.composite == (CompositeEntry(w.a.id, 2, 10),)
    # The reader's plan never recurses: leaf datasets with the composite's tensors.
    plan = composite_plan(w.c.view(), c2)
    a_rec, b_rec = get_dataset(w.c.view(), w.a.id), get_dataset(w.c.view(), w.b.id)
    assert a_rec is not None and b_rec is not None
    assert plan == [
        PlanEntry(a_rec, 5, 8, ("x", "y")),
        PlanEntry(b_rec, 0, 3, ("x", "y")),
        PlanEntry(a_rec, 8, 10, ("x", "y")),
    ]
    assert composite_plan(w.c.view(), w.a.id) == [PlanEntry(a_rec, 0, 10, ("x", "y"))]
    with pytest.raises(UnknownDataset):
        composite_plan(w.c.view(), b"\x00" * 32)


def test_plan_feeds_the_composite_writer_header() -> None:
    """The plan's tensors (the composite's schema order) give helper 1's composite header."""
    w = World()
    cid = w.define(DISTRIBUTOR, [part(w.b.id, 0, 4, "y", "x"), part(w.a.id, 1, 3)])
    plan = composite_plan(w.c.view(), cid)
    parts = [
        CompositePart(parse_header(e.dataset.header), e.start, e.end, e.tensors) for e in plan
    ]
    header = composite_header(parts)
    assert header.names == ("y", "x")
    assert [t.shape for t in header.tensors] == [(6,), (6, 4)]


def test_tensor_subsets_and_compatibility() -> None:
    w = World()
    # x alone from A, and from W whose x is wider: incompatible row shapes
    cid = w.define(DISTRIBUTOR, [part(w.a.id, 0, 2, "x"), part(w.b.id, 0, 2, "x")])
    record = get_dataset(w.c.view(), cid)
    assert record is not None and record.tensor_names == ("x",)
    err = w.c.reject(
        w.c.tx(DISTRIBUTOR, define([part(w.a.id, 0, 2, "x"), part(w.w.id, 0, 2, "x")])),
        CompositeIncompatible,
    )
    assert "U8 [6] per row, part 0 has U8 [4]" in err.message
    # different selections
    w.c.reject(
        w.c.tx(DISTRIBUTOR, define([part(w.a.id, 0, 2, "x"), part(w.b.id, 0, 2)])),
        CompositeIncompatible,
    )
    # a tensor the source lacks
    w.c.reject(w.c.tx(DISTRIBUTOR, define([part(w.a.id, 0, 2, "nope")])), UnknownTensor)
    # a composite of a composite selecting a subset of its schema
    inner = w.define(DISTRIBUTOR, [part(w.a.id, 0, 4)])
    outer = w.define(DISTRIBUTOR, [part(inner, 1, 3, "y")])
    record = get_dataset(w.c.view(), outer)
    assert record is not None and record.tensor_names == ("y",)
    assert record.composite == (CompositeEntry(w.a.id, 1, 3),)


def test_ranges_sources_and_roles() -> None:
    w = World()
    w.c.reject(w.c.tx(DISTRIBUTOR, define([part(w.a.id, 5, 11)])), RowRangeOutOfBounds)
    w.c.reject(w.c.tx(DISTRIBUTOR, define([part(b"\x07" * 32, 0, 1)])), UnknownDataset)
    err = w.c.reject(w.c.tx(5, define([part(w.a.id, 0, 1)])), MissingRole)
    assert "DATA_SUPPLIER or DISTRIBUTOR" in err.message
    for parts, error in (
        ([], InvalidCompositeBody),
        ([part(w.a.id, 3, 3)], InvalidCompositeBody),
        ([part(w.a.id, 4, 2)], InvalidCompositeBody),
        ([part(w.a.id, 0, 2, "x", "x")], InvalidCompositeBody),
    ):
        with pytest.raises(error):
            verify_transaction(tx(DISTRIBUTOR, define(parts), nonce=0))
    with pytest.raises(EmptyName):
        verify_transaction(tx(DISTRIBUTOR, define([part(w.a.id, 0, 1)], name=""), nonce=0))


def test_depth_cap() -> None:
    w = World()  # max_composite_depth = 3
    c1 = w.define(DISTRIBUTOR, [part(w.a.id, 0, 4)])
    c2 = w.define(DISTRIBUTOR, [part(c1, 0, 4)])
    c3 = w.define(DISTRIBUTOR, [part(c2, 0, 4)])
    record = get_dataset(w.c.view(), c3)
    assert record is not None and record.depth == 3
    err = w.c.reject(w.c.tx(DISTRIBUTOR, define([part(c3, 0, 4)])), CompositeTooDeep)
    assert "max_composite_depth 3" in err.message


def test_range_cap_counts_flattened_ranges() -> None:
    w = World()  # max_composite_ranges = 6
    alternating = [part(w.a.id if i % 2 == 0 else w.b.id, i, i + 1) for i in range(6)]
    c1 = w.define(DISTRIBUTOR, alternating)
    w.c.reject(
        w.c.tx(DISTRIBUTOR, define([*alternating, part(w.a.id, 9, 10)])), CompositeTooManyRanges
    )
    # a composite of c1 resolves to c1's six ranges: one more is too many
    w.c.reject(
        w.c.tx(DISTRIBUTOR, define([part(c1, 0, 6), part(w.b.id, 9, 10)])), CompositeTooManyRanges
    )
    # contiguous parts of one source merge, so they count once
    merged = [part(w.a.id, i, i + 1) for i in range(8)]
    cm = w.define(DISTRIBUTOR, merged)
    record = get_dataset(w.c.view(), cm)
    assert record is not None and record.composite == (CompositeEntry(w.a.id, 0, 8),)


def test_price_must_cover_priced_sources() -> None:
    w = World()
    # P: 8 rows at 800. 4 rows of P in a 12-row composite: P's share is price * 4 // 12 >= 800
    parts = [part(w.p.id, 0, 4), part(w.b.id, 0, 8)]
    err = w.c.reject(w.c.tx(DISTRIBUTOR, define(parts, price=2399)), CompositeUnderpriced)
    assert "least price here is 2400" in err.message
    w.c.reject(w.c.tx(DISTRIBUTOR, define(parts, price=0)), CompositeUnderpriced)
    cid = w.define(DISTRIBUTOR, parts, price=2400)
    record = get_dataset(w.c.view(), cid)
    assert record is not None and record.price == 2400
    # free sources only: any price, zero included
    w.define(DISTRIBUTOR, [part(w.a.id, 0, 1)], price=0)


def _wide(rows: int) -> Artifact:
    header = header_json({"x": ("F32", (rows, 2))})
    return build_artifact(header, bytes(data_size_of(header)))


def test_dtype_mismatch_is_incompatible() -> None:
    w = World()
    f = _wide(3)
    w.c.run(w.c.tx(SUPPLIER, register_body(f, name="F")))
    w.c.reject(
        w.c.tx(DISTRIBUTOR, define([part(w.a.id, 0, 2, "x"), part(f.id, 0, 2)])),
        CompositeIncompatible,
    )

"""Dataset registration verified on chain (node/economy/datasets.py, DESIGN §8): the record the
transition derives from a valid registration, and every rejection with its specific error —
nothing written."""

from __future__ import annotations

import dataclasses

import pytest

from node.consensus.fees import compute_cost
from node.consensus.txs import verify_transaction
from node.economy.api import EconomyKind, Role
from node.economy.datasets import (
    ArtifactHeaderMismatch,
    ArtifactPathMismatch,
    ArtifactSizeMismatch,
    DatasetExists,
    DatasetRecord,
    EmptyName,
    InvalidRootCid,
    NotADataset,
    NotSafetensorsArtifact,
    PriceTermsMismatch,
    SchemaEntry,
    SubByteDtypeRejected,
    dataset_id,
    get_dataset,
    get_dataset_by_root,
)
from node.economy.roles import MissingRole
from node.storage.format_v1 import ArtifactProof, make_leaf0
from node.storage.unixfs import raw_cid
from tests.economy.econ import (
    SUPPLIER,
    EconomyChain,
    addr,
    build_artifact,
    data_size_of,
    header_json,
    priced_dataset,
    raw_header,
    register_body,
    rows_dataset,
    tx,
)


@pytest.fixture
def chain() -> EconomyChain:
    c = EconomyChain()
    c.register_roles((SUPPLIER, Role.DATA_SUPPLIER))
    return c


def test_free_dataset_record(chain: EconomyChain) -> None:
    a = rows_dataset(10, width=3)
    raw = chain.tx(SUPPLIER, register_body(a, name="digits"))
    built = chain.run(raw)
    record = get_dataset(chain.view(), a.id)
    assert record == DatasetRecord(
        id=a.id,
        root=a.root,
        header=a.header,
        owner=addr(SUPPLIER),
        name="digits",
        description="test data",
        license="CC0",
        schema=(SchemaEntry("x", "U8", (3,)), SchemaEntry("y", "I16", ())),
        rows=10,
        data_size=10 * 3 + 10 * 2,
        price=0,  # type: ignore[arg-type]
        salt=None,
        key_check=None,
        plain_data_hash=None,
        height=2,
        depth=0,
        composite=(),
    )
    assert a.id == dataset_id(a.root) and get_dataset_by_root(chain.view(), a.root) == record
    receipt = built.result.receipts[0]
    assert [e.name for e in receipt.events] == ["dataset_register", "fee"]
    assert receipt.burned == compute_cost(
        chain.params, EconomyKind.DATASET_REGISTER, len(raw), new_accounts=1
    )


def test_priced_dataset_over_one_mib_is_verified_encrypted(chain: EconomyChain) -> None:
    """Data of 1.5 MiB: leaf 0 + two ciphertext leaves under a dag-pb root; checked with the
    ciphertext sizes."""
    big = build_artifact(
        header_json({"x": ("U8", (1536, 1024))}),
        bytes(i % 256 for i in range(1536 * 1024)),
        key=b"\x03" * 32,
        salt=b"\x04" * 7,
    )
    assert len(big.proof.path) == 1  # the root is a dag-pb node over three leaves
    chain.run(chain.tx(SUPPLIER, register_body(big, price=500)))
    record = get_dataset(chain.view(), big.id)
    assert record is not None
    assert (record.rows, record.data_size, record.price) == (1536, 1536 * 1024, 500)
    assert record.salt == big.salt and record.key_check == big.key_check
    assert record.plain_data_hash == big.plain_hash and record.is_encrypted
    # The same file registered as free: its size is that of the ciphertext, not of the data.
    other = EconomyChain()
    other.register_roles((SUPPLIER, Role.DATA_SUPPLIER))
    other.reject(other.tx(SUPPLIER, register_body(big, price=0)), ArtifactSizeMismatch)


def test_single_leaf_dataset(chain: EconomyChain) -> None:
    a = build_artifact(header_json({"x": ("U8", (0, 5))}), b"")
    assert a.proof.path == () and a.root == bytes(raw_cid(make_leaf0(a.header)))
    chain.run(chain.tx(SUPPLIER, register_body(a)))
    record = get_dataset(chain.view(), a.id)
    assert record is not None and record.rows == 0


def test_duplicate_root_and_missing_role(chain: EconomyChain) -> None:
    a = rows_dataset(4)
    chain.run(chain.tx(SUPPLIER, register_body(a)))
    chain.reject(chain.tx(SUPPLIER, register_body(a, name="again")), DatasetExists)
    err = chain.reject(chain.tx(2, register_body(rows_dataset(5))), MissingRole)
    assert "registering a dataset needs the DATA_SUPPLIER role" in err.message


def _with_header(a_header: bytes, proof: ArtifactProof) -> ArtifactProof:
    return dataclasses.replace(proof, header=a_header)


def test_header_rejections(chain: EconomyChain) -> None:
    a = rows_dataset(6)
    size = data_size_of(a.header)
    cases = [
        # not a safetensors header at all (leaf 0 cannot even be built)
        (b"not json", NotSafetensorsArtifact),
        (b"{not json", NotSafetensorsArtifact),
        (raw_header({"x": {"dtype": "Q9", "shape": [6, 4], "data_offsets": [0, 24]}}),
         NotSafetensorsArtifact),
        # a sub-byte dtype
        (raw_header({"x": {"dtype": "F4", "shape": [6, 4], "data_offsets": [0, 12]}}),
         SubByteDtypeRejected),
        # a valid header of the same data size, but another file's
        (header_json({"z": ("U8", (size,))}), ArtifactHeaderMismatch),
    ]
    for header, error in cases:
        body = register_body(a, proof=_with_header(header, a.proof))
        err = chain.reject(chain.tx(SUPPLIER, body), error)
        assert err.data is not None and "format_code" in err.data  # type: ignore[operator]


def test_tensors_without_a_shared_row_dimension(chain: EconomyChain) -> None:
    for tensors in (
        {"x": ("U8", (6, 4)), "y": ("U8", (5,))},  # rows differ
        {"s": ("U8", ())},  # a scalar has no rows
    ):
        header = header_json(tensors)
        a = build_artifact(header, bytes(data_size_of(header)))
        chain.reject(chain.tx(SUPPLIER, register_body(a)), NotADataset)


def test_truncated_and_padded_files(chain: EconomyChain) -> None:
    a = rows_dataset(6)
    short = build_artifact(a.header, a.data[:-3])
    long = build_artifact(a.header, a.data + b"\x00")
    chain.reject(chain.tx(SUPPLIER, register_body(short)), ArtifactSizeMismatch)
    chain.reject(chain.tx(SUPPLIER, register_body(long)), ArtifactSizeMismatch)


def test_path_not_matching_the_root(chain: EconomyChain) -> None:
    a = rows_dataset(6)
    b = rows_dataset(7)
    # a's header with b's path, a's root: the path does not hash to the root
    body = register_body(a, proof=ArtifactProof(a.header, b.proof.path))
    chain.reject(chain.tx(SUPPLIER, body), ArtifactPathMismatch)
    # no path for a dag-pb root; a flipped byte in the path node
    chain.reject(
        chain.tx(SUPPLIER, register_body(a, proof=ArtifactProof(a.header, ()))),
        ArtifactPathMismatch,
    )
    node = bytearray(a.proof.path[0])
    node[-1] ^= 1
    body = register_body(a, proof=ArtifactProof(a.header, (bytes(node),)))
    chain.reject(chain.tx(SUPPLIER, body), ArtifactPathMismatch)
    # an unknown root CID (of nothing registered or stored): the header is not its leaf 0
    fake_root = bytes(raw_cid(b"some other leaf"))
    body = register_body(a, root=fake_root, proof=ArtifactProof(a.header, ()))
    chain.reject(chain.tx(SUPPLIER, body), ArtifactHeaderMismatch)


def test_stateless_body_rules() -> None:
    a = rows_dataset(4)
    p = priced_dataset(4)
    for body, error in (
        (register_body(a, root=b"\x01\x55garbage"), InvalidRootCid),
        (register_body(a, root=bytes(raw_cid(b"x"))[:-1]), InvalidRootCid),
        (register_body(a, name="  "), EmptyName),
        # priced without the encryption terms, free with them
        (register_body(p, price=0, salt=p.salt), PriceTermsMismatch),
        (
            register_body(p, price=5, salt=None, key_check=None, plain_data_hash=None),
            PriceTermsMismatch,
        ),
        (register_body(p, price=5, salt=b"\x01" * 6), PriceTermsMismatch),
    ):
        with pytest.raises(error):
            verify_transaction(tx(SUPPLIER, body, nonce=0))

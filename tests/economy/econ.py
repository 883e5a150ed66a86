"""Shared builders of the economy tests: format-v1 artifacts (free and encrypted), signed economy
transactions, and ``EconomyChain`` — an ``AuthorityChain`` (blocks built with ``build_block``
and re-checked with ``apply_block``) with the economy's parameters and a supply check that
counts role bonds and purchase escrow.

Artifacts are real: leaf 0 from ``format_v1.make_leaf0``, the data (or its per-chunk ciphertext
from ``encryption.encrypt_stream``) chunked by ``unixfs.UnixfsBuilder``, the registration proof
from ``format_v1.make_proof``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from node import crypto
from node.consensus.state import Overlay, get_account
from node.consensus.transition import BlockContext, apply_transaction
from node.consensus.txs import VerifiedTransaction, make_transaction
from node.consensus.txs import verify_transaction as verify
from node.economy.api import DEFAULT_ECONOMY_PARAMS, NS_PURCHASE, NS_ROLES, EconomyParams, Role
from node.economy.datasets import DatasetRegister, dataset_id
from node.economy.purchases import (
    DisputeChunk,
    KeyDispute,
    KeyPost,
    Purchase,
    PurchaseRecord,
    ShareState,
    get_purchase,
    key_wrap_context,
    purchase_id,
)
from node.economy.roles import RoleRegister, RoleSet, get_role
from node.encoding import Record
from node.errors import InvalidTransaction
from node.genesis import Genesis
from node.models.safetensors_header import DTYPE_SIZES, TensorInfo, encode_header
from node.storage import encryption
from node.storage.format_v1 import ArtifactProof, make_leaf0, make_proof
from node.storage.unixfs import (
    DAG_PB_CODEC,
    UnixfsBuilder,
    children_for_range,
    decode_node,
)
from node.types import Amount, Hash32
from tests.consensus.authority_chain import EVERY_KIND_FEES, AuthorityChain
from tests.helpers import addr, key, make_authority, make_genesis, total_balances, total_bonds

FEE = 10**8  # covers any economy transaction of these tests (the test fee table is tiny)
SUPPLIER_BOND = 1_000_000
PROVIDER_BOND = 2_000_000
SLASH = 400_000
KEY_POST_HEIGHTS = 4
DISPUTE_WINDOW = 3
LEAF_DISPUTE_HEIGHTS = 4

ECONOMY = replace(
    DEFAULT_ECONOMY_PARAMS,
    supplier_bond=Amount(SUPPLIER_BOND),
    provider_bond=Amount(PROVIDER_BOND),
    key_dispute_slash=Amount(SLASH),
    max_composite_depth=3,
    max_composite_ranges=6,
    key_post_heights=KEY_POST_HEIGHTS,
    dispute_window_heights=DISPUTE_WINDOW,
    leaf_dispute_heights=LEAF_DISPUTE_HEIGHTS,
)

# Dev keys: 0 the validator; suppliers, a distributor and customers.
SUPPLIER = 1
SUPPLIER2 = 2
DISTRIBUTOR = 3
BUYER = 4
BUYER2 = 5
NOBODY = 6


def economy_genesis(
    economy: EconomyParams = ECONOMY, queue_work: int = 64, max_tx_bytes: int = 1 << 20
) -> Genesis:
    genesis = make_genesis(
        funded=8,
        validators=(0,),
        fees=EVERY_KIND_FEES,
        max_tx_bytes=max_tx_bytes,  # by default 1 MiB: a KeyDispute carries a ciphertext leaf
        max_block_bytes=8 << 20,
        authority=make_authority(max_queue_work_per_block=queue_work),
    )
    return replace(genesis, economy_params=economy)


def tx(sender: int, body: Record, *, nonce: int, fee: int = FEE) -> bytes:
    return make_transaction(key(sender), 4242, nonce, fee, body).encode()


# --- artifacts -------------------------------------------------------------------------------------


def header_json(tensors: Mapping[str, tuple[str, Sequence[int]]]) -> bytes:
    """A canonical safetensors header for ``name -> (dtype, shape)``, data laid out in order."""
    infos = []
    pos = 0
    for name, (dtype, shape) in tensors.items():
        n = DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        infos.append(TensorInfo(name, dtype, tuple(shape), pos, pos + n))
        pos += n
    return encode_header(infos, None)


def raw_header(tree: dict[str, Any]) -> bytes:
    """Header bytes written by hand (for headers ``encode_header`` refuses)."""
    return json.dumps(tree, separators=(",", ":")).encode()


def data_size_of(header: bytes) -> int:
    tree = json.loads(header)
    return max((t["data_offsets"][1] for k, t in tree.items() if k != "__metadata__"), default=0)


@dataclass(frozen=True)
class Artifact:
    root: bytes
    header: bytes
    proof: ArtifactProof
    blocks: dict[bytes, bytes]  # every block by binary CID
    data: bytes  # plaintext data
    key: bytes | None = None
    salt: bytes | None = None

    @property
    def id(self) -> Hash32:
        return dataset_id(self.root)

    @property
    def priced(self) -> bool:
        return self.key is not None

    @property
    def key_check(self) -> Hash32 | None:
        if self.key is None or self.salt is None:
            return None
        return Hash32(encryption.key_check(self.salt, self.key))

    @property
    def plain_hash(self) -> Hash32 | None:
        return None if self.key is None else crypto.sha256(self.data)

    def leaf(self, index: int) -> tuple[bytes, tuple[bytes, ...]]:
        """UnixFS leaf ``index`` and the dag-pb nodes from the root down to its parent."""
        return leaf_with_path(self.blocks, self.root, index)


def leaf_with_path(
    blocks: Mapping[bytes, bytes], root: bytes, index: int
) -> tuple[bytes, tuple[bytes, ...]]:
    """Walk from ``root`` to the leaf holding byte ``index`` × 1 MiB (unixfs helpers)."""
    path: list[bytes] = []
    cid = root
    offset = index * (1 << 20)
    while True:
        block = blocks[cid]
        if cid[1] != DAG_PB_CODEC:  # CIDv1 byte 0 is the version, byte 1 the codec (< 0x80)
            return block, tuple(path)
        path.append(block)
        node = decode_node(block)
        ((child, start),) = children_for_range(node.blocksizes, offset, offset + 1)
        offset -= start
        cid = bytes(node.links[child].cid)


def build_artifact(
    header: bytes,
    data: bytes,
    *,
    key: bytes | None = None,
    salt: bytes | None = None,
    encrypt_with: bytes | None = None,
) -> Artifact:
    """A format-v1 file of ``header`` + ``data`` (encrypted per chunk with ``encrypt_with`` or
    ``key`` when a key is given), chunked into blocks, with its registration proof."""
    stored = data
    if key is not None:
        assert salt is not None
        out = io.BytesIO()
        encryption.encrypt_stream(encrypt_with or key, salt, io.BytesIO(data), out, len(data))
        stored = out.getvalue()
    builder = UnixfsBuilder()
    blocks: dict[bytes, bytes] = {}
    for piece in (make_leaf0(header), stored):
        for b in builder.feed(piece):
            blocks[bytes(b.cid)] = b.data
    root_cid, rest = builder.finish_blocks()
    for b in rest:
        blocks[bytes(b.cid)] = b.data
    root = bytes(root_cid)
    proof = make_proof(lambda c: blocks[c], root)
    return Artifact(root, header, proof, blocks, data, key, salt)


def rows_dataset(
    rows: int, *, width: int = 4, seed: int = 0, extra: bool = True, **kw: Any
) -> Artifact:
    """A dataset of ``rows`` rows: "x" U8 [rows, width] and (``extra``) "y" I16 [rows]."""
    tensors: dict[str, tuple[str, Sequence[int]]] = {"x": ("U8", (rows, width))}
    if extra:
        tensors["y"] = ("I16", (rows,))
    header = header_json(tensors)
    size = data_size_of(header)
    data = bytes((seed + i * 7) % 251 for i in range(size))
    return build_artifact(header, data, **kw)


def priced_dataset(rows: int, *, seed: int = 1, **kw: Any) -> Artifact:
    k = bytes([seed]) * 32
    s = bytes([seed + 1]) * 7
    return rows_dataset(rows, seed=seed, key=k, salt=s, **kw)


def register_body(a: Artifact, *, price: int = 0, name: str = "data", **kw: Any) -> DatasetRegister:
    fields: dict[str, Any] = {
        "root": a.root,
        "proof": a.proof,
        "name": name,
        "description": "test data",
        "license": "CC0",
        "price": Amount(price),
        "salt": a.salt if price else None,
        "key_check": a.key_check if price else None,
        "plain_data_hash": a.plain_hash if price else None,
    }
    fields.update(kw)
    return DatasetRegister(**fields)


# --- the chain -------------------------------------------------------------------------------------


class EconomyChain(AuthorityChain):
    """An ``AuthorityChain`` that tracks nonces and checks the economy's supply invariant."""

    def __init__(self, genesis: Genesis | None = None) -> None:
        super().__init__(genesis or economy_genesis())
        self._nonces: dict[int, int] = {}

    def next_nonce(self, who: int) -> int:
        n = self._nonces.get(who, 0)
        self._nonces[who] = n + 1
        return n

    def tx(self, who: int, body: Record, *, fee: int = FEE) -> bytes:
        return tx(who, body, nonce=self.next_nonce(who), fee=fee)

    def run(self, *txs: bytes) -> Any:
        """Commit a block holding ``txs`` (all must be valid); returns the built block."""
        built = self.step(list(txs))
        self.check_economy_supply()
        return built

    def run_signed(self, who: int, *bodies: Record) -> Any:
        return self.run(*(self.tx(who, b) for b in bodies))

    def reject(self, raw: bytes, error: type[InvalidTransaction]) -> InvalidTransaction:
        """``raw`` fails in the next block with ``error`` and writes nothing; its nonce is
        given back so the next transaction reuses it."""
        vtx = verify(raw)
        overlay = Overlay(self.view())
        ctx = self.ctx()
        with pytest.raises(error) as info:
            apply_transaction(overlay, vtx, ctx)
        assert not overlay.changes, "a rejected transaction wrote state"
        built = self.build([vtx])
        assert [type(e) for _, e in built.rejected] == [type(info.value)]
        who = next(i for i in range(64) if key(i).address == vtx.sender)
        if self._nonces.get(who, 0) > get_account(self.view(), vtx.sender).nonce:
            self._nonces[who] -= 1
        return info.value

    def ctx(self) -> BlockContext:
        vctx = self.vctx()
        return BlockContext(
            self.chain,
            self.params,
            self.height,
            self.chain.genesis_time + self.height,
            vctx.current.proposer(self.height, 0),
        )

    def register_roles(self, *pairs: tuple[int, Role]) -> None:
        self.run(*(self.tx(who, RoleRegister(int(role))) for who, role in pairs))

    def locked(self) -> int:
        """NSD held outside balances and validator bonds: role bonds and purchase escrow."""
        total = 0
        for k, v in self.state.items():
            if k.startswith(NS_ROLES):
                total += sum(e.bond for e in RoleSet.decode(v).entries)
            elif k.startswith(NS_PURCHASE):
                total += sum(
                    s.amount
                    for s in PurchaseRecord.decode(v).shares
                    if s.state
                    in (ShareState.AWAITING_KEY, ShareState.KEY_POSTED, ShareState.LEAF_DISPUTE)
                )
        return total

    def check_economy_supply(self) -> None:
        """balances + validator bonds + role bonds + escrow + burned == issued."""
        supply = self.supply()
        assert supply.issued == self.genesis.total_supply
        assert (
            total_balances(self.state) + total_bonds(self.state) + self.locked() + supply.burned
            == supply.issued
        )


# --- a market -------------------------------------------------------------------------------------

PRICE = 1_000


def fixed_rng(seed: int) -> encryption.Rng:
    """A deterministic ``Rng``: ``n`` bytes of ``seed``."""

    def draw(n: int) -> bytes:
        return bytes([seed]) * n

    return draw


BUYER_PRIV, BUYER_PUB = encryption.generate_wrap_keypair(fixed_rng(7))


class Market:
    """SUPPLIER sells P (priced, 8 rows) and gives A (free, 10 rows); BUYER and BUYER2 are
    customers; SUPPLIER2 is a supplier too."""

    def __init__(
        self, queue_work: int = 64, p: Artifact | None = None, max_tx_bytes: int = 1 << 20
    ) -> None:
        self.c = EconomyChain(economy_genesis(queue_work=queue_work, max_tx_bytes=max_tx_bytes))
        self.c.register_roles(
            (SUPPLIER, Role.DATA_SUPPLIER),
            (SUPPLIER2, Role.DATA_SUPPLIER),
            (DISTRIBUTOR, Role.DISTRIBUTOR),
            (BUYER, Role.CUSTOMER),
            (BUYER2, Role.CUSTOMER),
        )
        self.p = p or priced_dataset(8, seed=3)
        self.a = rows_dataset(10, seed=1)
        self.c.run(
            self.c.tx(SUPPLIER, register_body(self.p, name="P", price=PRICE)),
            self.c.tx(SUPPLIER, register_body(self.a, name="A")),
        )

    def buy(
        self, who: int, dataset: bytes, max_price: int = 10**6, pub: bytes = BUYER_PUB
    ) -> Hash32:
        pid = purchase_id(addr(who), self.c.nonce(who))
        self.c.run(self.c.tx(who, Purchase(Hash32(dataset), pub, Amount(max_price))))
        return pid

    def wrapped(self, pid: bytes, source: Artifact, key: bytes | None = None) -> bytes:
        content = key if key is not None else source.key
        assert content is not None
        return encryption.wrap_key(
            content, BUYER_PUB, key_wrap_context(pid, source.id), rng=fixed_rng(9)
        )

    def post(
        self, pid: bytes, source: Artifact, wrapped: bytes | None = None, who: int = SUPPLIER
    ) -> None:
        body = KeyPost(Hash32(pid), source.id, wrapped or self.wrapped(pid, source))
        self.c.run(self.c.tx(who, body))

    def dispute(
        self, pid: bytes, source: Artifact, leaf: int | None = None, priv: bytes = BUYER_PRIV
    ) -> KeyDispute:
        chunk = None
        if leaf is not None:
            data, path = source.leaf(leaf)
            chunk = DisputeChunk(leaf, data, path)
        return KeyDispute(Hash32(pid), source.id, priv, chunk)

    def share(self, pid: bytes, index: int = 0) -> tuple[int, int]:
        record = get_purchase(self.c.view(), pid)
        assert record is not None
        s = record.shares[index]
        return s.state, s.amount

    def obligations(self, who: int) -> int:
        entry = get_role(self.c.view(), addr(who), Role.DATA_SUPPLIER)
        assert entry is not None
        return entry.obligations

    def bond(self, who: int) -> int:
        entry = get_role(self.c.view(), addr(who), Role.DATA_SUPPLIER)
        assert entry is not None
        return entry.bond


def verified(raw: bytes) -> VerifiedTransaction:
    return verify(raw)


__all__ = [
    "BUYER",
    "BUYER2",
    "BUYER_PRIV",
    "BUYER_PUB",
    "DISTRIBUTOR",
    "ECONOMY",
    "FEE",
    "LEAF_DISPUTE_HEIGHTS",
    "NOBODY",
    "PRICE",
    "SUPPLIER",
    "SUPPLIER2",
    "Artifact",
    "EconomyChain",
    "Market",
    "addr",
    "build_artifact",
    "economy_genesis",
    "fixed_rng",
    "header_json",
    "priced_dataset",
    "raw_header",
    "register_body",
    "rows_dataset",
    "tx",
]

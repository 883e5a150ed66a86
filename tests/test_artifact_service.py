"""``ArtifactService`` on a ``MemoryNetwork`` with chain state from the real economy transition
(``tests/economy/econ.EconomyChain``): uploads (conversion, encryption, pins, nothing left behind on
failure), the chunk policy from chain state (leaf 0 and dag-pb nodes public, priced blocks refused
without a purchase and served after it), fetch jobs, availability at admission, and the owner key
agent posting a key the buyer can open."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from node import crypto
from node.artifact_service import (
    ArtifactService,
    ArtifactUnavailable,
    ChainPolicy,
    ContentKeyStore,
    FetchJobNotFound,
    import_upload,
    leaf0_cid,
)
from node.economy.api import Role
from node.economy.datasets import DatasetRegister, dataset_id
from node.economy.purchases import (
    KeyPost,
    Purchase,
    ShareState,
    get_purchase,
    key_wrap_context,
    purchase_id,
)
from node.encoding import Record
from node.key_agent import KeyAgent
from node.models.safetensors_header import NotSafetensors, TensorInfo, encode_header
from node.p2p.chunks import AccessTerms, sign_access
from node.p2p.memory import MemoryNetwork
from node.storage import MemoryKV
from node.storage.blobstore import BlobStore
from node.storage.encryption import (
    decrypt_stream,
    generate_wrap_keypair,
    key_check,
    unwrap_key,
)
from node.storage.format_v1 import LEAF0_BYTES, TruncatedArtifact
from node.storage.importer import export_file, missing_blocks, verify_cid_block
from node.storage.unixfs import CHUNK_SIZE, cid_of_file
from node.types import Amount, ChainId, Hash32, TimestampMs
from tests.economy.econ import BUYER, SUPPLIER, EconomyChain
from tests.helpers import key
from tests.threads import InlineThreads

PRICE = 5_000
ROWS = 700
ROW_BYTES = 4 * 1024  # F32 x 1024: 2.8 MB of data, three encrypted leaves


def write_safetensors(path: Path, rows: int = ROWS, *, seed: int = 1) -> bytes:
    """A hand-written safetensors file (compact header, not v1) with one F32 tensor; returns
    its tensor data."""
    data = b"".join(
        hashlib.sha256(f"{seed}/{i}".encode()).digest() * (ROW_BYTES // 32) for i in range(rows)
    )
    header = encode_header([TensorInfo("x", "F32", (rows, 1024), 0, len(data))], None)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + data)
    return data


class ChainView:
    """An ``EconomyChain``'s state as the read view the node's services use."""

    def __init__(self, econ: EconomyChain) -> None:
        self._econ = econ
        self.chain = econ.chain

    @property
    def head(self) -> Any:
        return self._econ.head

    def get_state(self, k: bytes) -> bytes | None:
        return self._econ.state.get(k)


def open_store(path: Path, quota: int = 1 << 30) -> BlobStore:
    return BlobStore(path, MemoryKV(), verify=verify_cid_block, quota_bytes=quota)


def make_service(net: MemoryNetwork, name: str, tmp_path: Path, econ: EconomyChain) -> ArtifactService:
    host = net.add_host(name)
    view = ChainView(econ)
    keys = ContentKeyStore(tmp_path / name / "artifact-keys")
    return ArtifactService(
        open_store(tmp_path / name / "blobs"),
        host,
        lambda: view,
        keys=keys,
        uploads_dir=tmp_path / name / "uploads",
    )


@pytest.fixture
def econ() -> EconomyChain:
    chain = EconomyChain()
    chain.register_roles((SUPPLIER, Role.DATA_SUPPLIER), (BUYER, Role.CUSTOMER))
    return chain


def register_upload(econ: EconomyChain, up: Any, *, price: int) -> None:
    body = DatasetRegister(
        root=up.root,
        proof=up.proof,
        name="images",
        description="",
        license="",
        price=Amount(price),
        salt=up.salt,
        key_check=None if up.key_check is None else Hash32(up.key_check),
        plain_data_hash=Hash32(up.plain_data_hash) if price else None,
    )
    econ.run_signed(SUPPLIER, body)


# --- uploads ---------------------------------------------------------------------------------------


def test_free_upload_is_v1_pinned_and_ipfs_addressed(tmp_path: Path) -> None:
    src = tmp_path / "data.safetensors"
    data = write_safetensors(src)
    store = open_store(tmp_path / "blobs")
    keys = ContentKeyStore(tmp_path / "keys")
    up = import_upload(store, keys, src, tmp_path / "uploads", encrypted=False)
    assert up.rows == ROWS and up.data_size == len(data) and not up.encrypted
    assert up.size == LEAF0_BYTES + len(data)
    assert up.plain_data_hash == hashlib.sha256(data).digest()
    assert store.is_pinned(up.root) and missing_blocks(store, up.root) == []
    out = io.BytesIO()
    export_file(store, up.root, out)
    stored = out.getvalue()
    assert stored[LEAF0_BYTES:] == data
    # The root CID is the IPFS one of the stored (v1) bytes.
    assert bytes(cid_of_file(io.BytesIO(stored))) == up.root
    assert keys.roots() == [] and list((tmp_path / "uploads").iterdir()) == []


def test_priced_upload_is_encrypted_with_a_kept_key(tmp_path: Path) -> None:
    src = tmp_path / "data.safetensors"
    data = write_safetensors(src)
    store = open_store(tmp_path / "blobs")
    keys = ContentKeyStore(tmp_path / "keys")
    up = import_upload(store, keys, src, tmp_path / "uploads", encrypted=True)
    content = keys.get(up.root)
    assert content is not None and up.salt == content.salt
    assert up.key_check == key_check(content.salt, content.key)
    assert up.plain_data_hash == hashlib.sha256(data).digest()
    key_file = keys.directory / (up.root.hex() + ".key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert keys.directory.stat().st_mode & 0o777 == 0o700
    assert content.key.hex() not in repr(content)
    out = io.BytesIO()
    export_file(store, up.root, out)
    stored = out.getvalue()
    assert data[:4096] not in stored  # ciphertext
    plain = io.BytesIO()
    decrypt_stream(content.key, content.salt, io.BytesIO(stored[LEAF0_BYTES:]), plain, len(data))
    assert plain.getvalue() == data


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\x05\x00", NotSafetensors),
        (struct.pack("<Q", 100) + b"{\"x\":{}", TruncatedArtifact),
    ],
)
def test_bad_upload_leaves_nothing(tmp_path: Path, payload: bytes, error: type[Exception]) -> None:
    src = tmp_path / "bad.safetensors"
    src.write_bytes(payload)
    store = open_store(tmp_path / "blobs")
    keys = ContentKeyStore(tmp_path / "keys")
    with pytest.raises(error):
        import_upload(store, keys, src, tmp_path / "uploads", encrypted=True)
    assert store.pins() == [] and keys.roots() == []
    assert list((tmp_path / "uploads").iterdir()) == []


def test_truncated_data_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "short.safetensors"
    write_safetensors(src)
    with open(src, "r+b") as fh:
        fh.truncate(os.path.getsize(src) - 1)
    store = open_store(tmp_path / "blobs")
    keys = ContentKeyStore(tmp_path / "keys")
    with pytest.raises(TruncatedArtifact):
        import_upload(store, keys, src, tmp_path / "uploads", encrypted=False)
    assert store.pins() == [] and store.usage().blocks == 0
    assert list((tmp_path / "uploads").iterdir()) == []


def test_upload_over_quota_pins_nothing(tmp_path: Path) -> None:
    from node.storage.blobstore import QuotaExceeded

    src = tmp_path / "data.safetensors"
    write_safetensors(src)
    store = open_store(tmp_path / "blobs", quota=2 * CHUNK_SIZE)
    keys = ContentKeyStore(tmp_path / "keys")
    with pytest.raises(QuotaExceeded):
        import_upload(store, keys, src, tmp_path / "uploads", encrypted=True)
    assert store.pins() == [] and keys.roots() == []
    assert list((tmp_path / "uploads").iterdir()) == []


# --- the chunk policy from chain state ------------------------------------------------------------


@pytest.fixture
async def network(
    autojump_clock: trio.testing.MockClock, threads: InlineThreads
) -> AsyncIterator[MemoryNetwork]:
    net = MemoryNetwork(seed=61)
    async with net:
        yield net


def access_for(
    econ: EconomyChain, buyer: crypto.PrivateKey, peer: bytes, root: bytes, grant: bytes
) -> Any:
    import time

    terms = AccessTerms(
        chain_id=ChainId(econ.chain.chain_id),
        root=root,
        address=buyer.address,
        peer_id=bytes(peer),
        grant_id=Hash32(grant),
        expires_ms=TimestampMs(int(time.time() * 1000) + 600_000),
        nonce=7,
    )
    return sign_access(buyer, terms)


async def wait_job(service: ArtifactService, job_id: str) -> Any:
    job = service.fetch_status(job_id)
    await job.done.wait()
    return job


async def test_priced_blocks_refused_without_purchase_and_served_after(
    network: MemoryNetwork, tmp_path: Path, econ: EconomyChain
) -> None:
    owner = make_service(network, "owner", tmp_path, econ)
    buyer = make_service(network, "buyer", tmp_path, econ)
    src = tmp_path / "data.safetensors"
    data = write_safetensors(src)
    async with trio.open_nursery() as nursery:
        await nursery.start(owner.run)
        await nursery.start(buyer.run)
        # The upload is a priced one, not registered yet: already restricted.
        up = await owner.import_upload(src, encrypted=True)
        assert not src.exists()  # the received upload file is consumed
        assert owner.policy.is_restricted(up.root)
        register_upload(econ, up, price=PRICE)
        assert owner.policy.is_restricted(up.root)

        # Without a purchase: the public part (dag-pb root, leaf 0) arrives, the data does not.
        job = buyer.start_fetch(up.root)
        job = await wait_job(buyer, job.id)
        assert job.state == "failed" and "dataset buy" in (job.error or "")
        leaf0 = leaf0_cid(owner.store, up.root)
        assert leaf0 is not None and buyer.store.has(leaf0) and buyer.store.has(up.root)
        missing = missing_blocks(buyer.store, up.root)
        assert len(missing) == 3 and not buyer.store.is_pinned(up.root)

        # An access request with a grant that is not a purchase of it: still refused.
        bogus = access_for(econ, key(BUYER), buyer.network.peer_id, up.root, b"\x42" * 32)
        job = await wait_job(buyer, buyer.start_fetch(up.root, access=bogus).id)
        assert job.state == "failed"

        # The buyer purchases it on chain; the same node, the same kind of request: served.
        nonce = econ.next_nonce(BUYER)
        _, pubkey = generate_wrap_keypair()
        econ.run(
            econ_tx(econ, BUYER, Purchase(dataset_id(up.root), pubkey, Amount(PRICE)), nonce)
        )
        pid = purchase_id(key(BUYER).address, nonce)
        # Someone else presenting the buyer's purchase gets nothing.
        stranger = access_for(econ, key(SUPPLIER + 5), buyer.network.peer_id, up.root, pid)
        job = await wait_job(buyer, buyer.start_fetch(up.root, access=stranger).id)
        assert job.state == "failed"
        good = access_for(econ, key(BUYER), buyer.network.peer_id, up.root, pid)
        job = await wait_job(buyer, buyer.start_fetch(up.root, access=good).id)
        assert job.state == "done", job.error
        assert job.blocks_fetched == 3 and job.missing == 0
        assert buyer.store.is_pinned(up.root)
        content = owner.keys.get(up.root)
        assert content is not None
        out = io.BytesIO()
        export_file(buyer.store, up.root, out)
        plain = io.BytesIO()
        cipher = io.BytesIO(out.getvalue()[LEAF0_BYTES:])
        decrypt_stream(content.key, content.salt, cipher, plain, len(data))
        assert plain.getvalue() == data
        # The buyer's node now provides it too.
        providers = await owner.network.find_providers(up.root, 5)
        assert buyer.network.peer_id in providers
        nursery.cancel_scope.cancel()


def econ_tx(econ: EconomyChain, who: int, body: Record, nonce: int) -> bytes:
    from tests.economy.econ import tx

    return tx(who, body, nonce=nonce)


async def test_free_dataset_is_public_and_fetch_jobs_resume(
    network: MemoryNetwork, tmp_path: Path, econ: EconomyChain
) -> None:
    owner = make_service(network, "owner", tmp_path, econ)
    reader = make_service(network, "reader", tmp_path, econ)
    src = tmp_path / "data.safetensors"
    write_safetensors(src)
    async with trio.open_nursery() as nursery:
        await nursery.start(owner.run)
        await nursery.start(reader.run)
        up = await owner.import_upload(src, encrypted=False)
        register_upload(econ, up, price=0)
        assert not owner.policy.is_restricted(up.root)
        # Only leaf 2 first (a partial fetch), then the whole: the second job fetches the rest.
        job = await wait_job(reader, reader.start_fetch(up.root, leaves=[2]).id)
        assert job.state == "done" and job.blocks_fetched == 2  # root node + leaf 2
        job = await wait_job(reader, reader.start_fetch(up.root).id)
        assert job.state == "done" and job.blocks_fetched == 3 and job.blocks_present == 2
        info = await reader.artifact_info(up.root)
        assert info.complete and info.pinned and info.blocks_missing == 0
        assert info.blocks_present == 5 and info.size == up.size
        # A complete local copy: a new job is done at once.
        job = await wait_job(reader, reader.start_fetch(up.root).id)
        assert job.state == "done" and job.blocks_fetched == 0
        with pytest.raises(FetchJobNotFound):
            reader.fetch_status("nope")
        nursery.cancel_scope.cancel()


async def test_availability_at_admission(
    network: MemoryNetwork, tmp_path: Path, econ: EconomyChain
) -> None:
    owner = make_service(network, "owner", tmp_path, econ)
    other = make_service(network, "other", tmp_path, econ)
    src = tmp_path / "data.safetensors"
    write_safetensors(src, rows=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(other.run)
        # Imported but nobody runs a service for it yet: not local to `other`, no provider.
        store_only = open_store(tmp_path / "elsewhere")
        up = import_upload(
            store_only, ContentKeyStore(tmp_path / "k"), src, tmp_path / "u", encrypted=False
        )
        with pytest.raises(ArtifactUnavailable):
            await other.check_available(up.root)
        write_safetensors(src, rows=10)
        await nursery.start(owner.run)
        up2 = await owner.import_upload(src, encrypted=False)
        assert up2.root == up.root  # same bytes, same CID
        await owner.check_available(up.root)  # all blocks local
        await other.check_available(up.root)  # a provider is known
        nursery.cancel_scope.cancel()


# --- the owner key agent --------------------------------------------------------------------------


async def test_key_agent_posts_a_key_the_buyer_opens(
    network: MemoryNetwork, tmp_path: Path, econ: EconomyChain
) -> None:
    owner = make_service(network, "owner", tmp_path, econ)
    src = tmp_path / "data.safetensors"
    write_safetensors(src, rows=20)
    up = await owner.import_upload(src, encrypted=True)
    register_upload(econ, up, price=PRICE)
    secret, pubkey = generate_wrap_keypair()
    nonce = econ.next_nonce(BUYER)
    econ.run(econ_tx(econ, BUYER, Purchase(dataset_id(up.root), pubkey, Amount(PRICE)), nonce))
    pid = purchase_id(key(BUYER).address, nonce)

    sent: list[Record] = []

    async def send(body: Record) -> Hash32:
        sent.append(body)
        return Hash32(b"\x01" * 32)

    view = ChainView(econ)

    class Source:
        def read_view(self) -> Any:
            return view

    agent = KeyAgent(Source(), send, key(SUPPLIER).address, owner.keys)
    assert await agent.serve_purchase(view, pid, econ.height) == 1
    assert await agent.serve_purchase(view, pid, econ.height) == 0  # not twice
    (post,) = sent
    assert isinstance(post, KeyPost) and post.purchase_id == pid
    econ.run_signed(SUPPLIER, post)
    record = get_purchase(econ.view(), pid)
    assert record is not None and record.shares[0].state == ShareState.KEY_POSTED
    opened = unwrap_key(
        record.shares[0].wrapped_key, secret, key_wrap_context(pid, dataset_id(up.root))
    )
    content = owner.keys.get(up.root)
    assert content is not None and opened == content.key
    # Once posted, the agent has nothing more to do for it.
    assert await agent.serve_purchase(view, pid, econ.height) == 0


def test_policy_caches_registered_roots_only(tmp_path: Path, econ: EconomyChain) -> None:
    keys = ContentKeyStore(tmp_path / "keys")
    view = ChainView(econ)
    policy = ChainPolicy(lambda: view, keys)
    root = bytes.fromhex("01551220") + b"\x07" * 32
    assert not policy.is_restricted(root)  # unknown: public (not a priced upload of ours)
    from node.artifact_service import ContentKey

    keys.put(ContentKey(root, b"\x01" * 32, b"\x02" * 7, 10, b"\x03" * 32))
    assert policy.is_restricted(root)  # our priced upload awaiting registration


def test_header_json_of_upload(tmp_path: Path) -> None:
    src = tmp_path / "data.safetensors"
    write_safetensors(src, rows=3)
    up = import_upload(
        open_store(tmp_path / "b"), ContentKeyStore(tmp_path / "k"), src, tmp_path / "u",
        encrypted=False,
    )
    assert json.loads(up.header_json)["x"]["shape"] == [3, 1024]


# --- mempool admission -----------------------------------------------------------------------------


class _Chain:
    """What ``Node.submit_transaction`` reads of the chain service."""

    def __init__(self, econ: EconomyChain) -> None:
        self._econ = econ
        self.params = econ.params

    def state_view(self) -> Any:
        return self._econ.view()

    def check_admission(self, vtx: Any) -> None:
        """The real state rules on a discardable overlay, as ``ChainService`` runs them."""
        from node.consensus.state import Overlay
        from node.consensus.transition import apply_transaction

        apply_transaction(Overlay(self._econ.view()), vtx, self._econ.ctx())


async def test_admission_of_a_registration_needs_the_artifact(
    network: MemoryNetwork, tmp_path: Path, econ: EconomyChain
) -> None:
    from node.consensus.mempool import Mempool, MempoolLimits
    from node.service import Node
    from tests.economy.econ import tx

    service = make_service(network, "node", tmp_path, econ)
    mempool = Mempool(econ.chain.chain_id, MempoolLimits(max_txs=10, max_bytes=1 << 24))
    node = Node(_Chain(econ), mempool, None, None, artifacts=service)  # type: ignore[arg-type]
    src = tmp_path / "data.safetensors"
    write_safetensors(src, rows=10)
    elsewhere = import_upload(
        open_store(tmp_path / "elsewhere"), ContentKeyStore(tmp_path / "k"), src,
        tmp_path / "u", encrypted=False,
    )
    body = DatasetRegister(elsewhere.root, elsewhere.proof, "d", "", "", Amount(0))
    raw = tx(SUPPLIER, body, nonce=econ.next_nonce(SUPPLIER))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        with pytest.raises(ArtifactUnavailable):
            await node.submit_transaction(raw)
        assert len(mempool) == 0
        write_safetensors(src, rows=10)
        await service.import_upload(src, encrypted=False)  # now stored (and provided) here
        await node.submit_transaction(raw)
        assert len(mempool) == 1
        nursery.cancel_scope.cancel()


def test_policy_restricts_a_priced_model_like_a_priced_dataset() -> None:
    from tests.economy.test_models import DEV, model_artifact, model_body, priced_model
    from tests.economy.test_models import models_genesis as genesis_with_models

    econ = EconomyChain(genesis_with_models())
    econ.register_roles((DEV, Role.MODEL_DEVELOPER))
    free, paid = model_artifact(seed=3), priced_model()
    econ.run_signed(DEV, model_body(free))
    econ.run_signed(DEV, model_body(paid, price=Amount(700)))
    policy = ChainPolicy(lambda: ChainView(econ))
    assert not policy.is_restricted(free.root)
    assert policy.is_restricted(paid.root)

    async def leaf(root: bytes, index: int) -> bool:
        return await policy.authorize(b"peer", root, b"cid", None, leaf_index=index)

    # Leaf 0 (the header) is public; a data leaf of the priced model needs a grant.
    assert trio.run(leaf, paid.root, 0) and not trio.run(leaf, paid.root, 1)
    assert trio.run(leaf, free.root, 1)

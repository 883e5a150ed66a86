"""Artifact endpoints and ``ns_*`` artifact/dataset methods on a real ``RpcServer`` whose node has
a real ``ArtifactService`` (blob store, MemoryNetwork) and chain state from the economy
transition (``tests/economy/econ.EconomyChain``): uploads, downloads with ranges, the size limit
(413 and nothing pinned), remote callers refused, dataset queries with filters and pagination,
and fetch jobs through RPC."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from node.artifact_service import (
    ArtifactService,
    ContentKeyStore,
    LocalCallersOnly,
    UnknownArtifact,
    UploadTooLarge,
)
from node.economy.api import Role
from node.economy.datasets import DatasetRegister, dataset_id
from node.economy.purchases import Purchase, purchase_id
from node.p2p.memory import MemoryNetwork
from node.storage import MemoryKV
from node.storage.blobstore import BlobStore
from node.storage.encryption import generate_wrap_keypair
from node.storage.format_v1 import LEAF0_BYTES
from node.storage.importer import verify_cid_block
from node.types import Amount, Hash32
from rpc import server as rpc_server
from rpc.client import Client
from rpc.errors import InvalidParams
from rpc.server import ArtifactHttpSettings, RpcServer
from tests.economy.econ import BUYER, SUPPLIER, SUPPLIER2, EconomyChain, tx
from tests.helpers import key
from tests.rpc.conftest import http_request
from tests.test_artifact_service import write_safetensors

T = TypeVar("T")
LIMIT = 4 << 20  # uploads above 4 MiB are refused


class EconView:
    """An ``EconomyChain``'s state as a ``ChainReadView``."""

    def __init__(self, econ: EconomyChain) -> None:
        self._econ = econ
        self.chain = econ.chain
        self.params = econ.params
        self.head = econ.head

    def get_state(self, k: bytes) -> bytes | None:
        return self._econ.state.get(k)

    def iter_state(
        self, prefix: bytes, *, after: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        for k in sorted(self._econ.state):
            if k.startswith(prefix) and (after is None or k > after):
                yield k, self._econ.state[k]


class ArtifactNode:
    """The parts of ``node.service.Node`` the artifact methods use."""

    def __init__(self, econ: EconomyChain, service: ArtifactService) -> None:
        self.econ = econ
        self.artifacts = service
        self.network = service.network
        self.operator = key(SUPPLIER)

    def read_view(self) -> EconView:
        return EconView(self.econ)


@dataclass
class Served:
    url: str
    node: ArtifactNode
    service: ArtifactService
    peer: ArtifactService
    tmp: Path

    def client(self) -> Client:
        return Client(self.url, timeout=30)

    async def sync(self, fn: Callable[[Client], T]) -> T:
        def run() -> T:
            with self.client() as c:
                return fn(c)

        return await trio.to_thread.run_sync(run)


def make_service(net: MemoryNetwork, name: str, tmp: Path, econ: EconomyChain) -> ArtifactService:
    return ArtifactService(
        BlobStore(tmp / name / "blobs", MemoryKV(), verify=verify_cid_block, quota_bytes=1 << 30),
        net.add_host(name),
        lambda: EconView(econ),
        keys=ContentKeyStore(tmp / name / "keys"),
        uploads_dir=tmp / name / "uploads",
    )


@pytest.fixture
def econ() -> EconomyChain:
    chain = EconomyChain()
    chain.register_roles(
        (SUPPLIER, Role.DATA_SUPPLIER), (SUPPLIER2, Role.DATA_SUPPLIER), (BUYER, Role.CUSTOMER)
    )
    return chain


async def serve(
    nursery: trio.Nursery, tmp: Path, econ: EconomyChain, settings: ArtifactHttpSettings
) -> Served:
    net = MemoryNetwork(seed=5)
    await nursery.start(_run_network, net)
    service = make_service(net, "node", tmp, econ)
    peer = make_service(net, "peer", tmp, econ)
    await nursery.start(service.run)
    await nursery.start(peer.run)
    node = ArtifactNode(econ, service)
    server = RpcServer(node, "127.0.0.1", 0, artifacts=settings)  # type: ignore[arg-type]
    url = await nursery.start(server.serve)
    return Served(url, node, service, peer, tmp)


async def _run_network(
    net: MemoryNetwork, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with net:
        task_status.started()
        await trio.sleep_forever()


@pytest.fixture
async def served(
    nursery: trio.Nursery, tmp_path: Path, econ: EconomyChain
) -> AsyncIterator[Served]:
    yield await serve(nursery, tmp_path, econ, ArtifactHttpSettings(max_upload_bytes=LIMIT))
    nursery.cancel_scope.cancel()


def stored_bytes(store: BlobStore, root: bytes) -> bytes:
    from node.storage.importer import export_file

    out = io.BytesIO()
    export_file(store, root, out)
    return out.getvalue()


# --- upload and download -------------------------------------------------------------------------


async def test_upload_then_download_with_ranges(served: Served) -> None:
    src = served.tmp / "d.safetensors"
    data = write_safetensors(src, rows=300)
    up = await served.sync(lambda c: c.upload_artifact(src, price=0))
    root = bytes.fromhex(up["rootHex"][2:])
    assert up["root"].startswith("baf") and up["rows"] == 300 and not up["encrypted"]
    assert up["size"] == LEAF0_BYTES + len(data) and up["salt"] is None
    assert up["header"]["x"]["shape"] == [300, 1024]
    assert served.service.store.is_pinned(root)
    whole = stored_bytes(served.service.store, root)

    def download(c: Client, **kw: Any) -> bytes:
        out = io.BytesIO()
        c.download_artifact(up["root"], out, **kw)
        return out.getvalue()

    assert await served.sync(download) == whole
    part = await served.sync(lambda c: download(c, start=LEAF0_BYTES - 5, end=LEAF0_BYTES + 7))
    assert part == whole[LEAF0_BYTES - 5 : LEAF0_BYTES + 7]
    tail = await served.sync(lambda c: download(c, start=len(whole) - 3))
    assert tail == whole[-3:]
    url = served.url + "artifacts/" + up["root"]
    answer = await trio.to_thread.run_sync(
        lambda: _get(url, {"Range": f"bytes={len(whole)}-"})
    )
    assert answer.status == 416 and answer.json()["error"]["code"] == 2281
    assert answer.headers["Content-Range"] == f"bytes */{len(whole)}"
    # Unknown artifact: a typed error, also through the SDK.
    other = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    with pytest.raises(UnknownArtifact):
        await served.sync(lambda c: c.download_artifact(other, io.BytesIO()))


def _get(url: str, headers: dict[str, str]) -> Any:
    import http.client
    import urllib.parse

    from tests.rpc.conftest import HttpAnswer

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path, headers=headers)
        r = conn.getresponse()
        return HttpAnswer(r.status, dict(r.getheaders()), r.read())
    finally:
        conn.close()


async def test_priced_upload_is_encrypted(served: Served) -> None:
    src = served.tmp / "p.safetensors"
    data = write_safetensors(src, rows=50)
    up = await served.sync(lambda c: c.upload_artifact(src, price=10**18))
    assert up["encrypted"] and len(bytes.fromhex(up["salt"][2:])) == 7
    assert len(bytes.fromhex(up["keyCheck"][2:])) == 32
    root = bytes.fromhex(up["rootHex"][2:])
    assert served.service.keys.has(root)
    assert data[:64] not in stored_bytes(served.service.store, root)


async def test_oversize_upload_is_refused_and_nothing_is_kept(served: Served) -> None:
    src = served.tmp / "big.safetensors"
    write_safetensors(src, rows=(LIMIT // 4096) + 10)
    with pytest.raises(UploadTooLarge) as info:
        await served.sync(lambda c: c.upload_artifact(src, price=0))
    assert isinstance(info.value.data, dict) and info.value.data["limit"] == LIMIT
    # Without a Content-Length (chunked), the limit is enforced while receiving.
    body = src.read_bytes()
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    answer = await trio.to_thread.run_sync(
        lambda: http_request(
            served.url + "artifacts",
            iter(pieces),
            content_type="application/octet-stream",
            chunked=True,
        )
    )
    assert answer.status == 413 and answer.json()["error"]["code"] == UploadTooLarge.code
    assert served.service.store.pins() == []
    assert served.service.store.usage().blocks == 0
    assert [p for p in served.service.uploads_dir.iterdir()] == []
    # A bad file: a typed format error, nothing kept.
    bad = served.tmp / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    from node.errors import DecodeError

    with pytest.raises(DecodeError):
        await served.sync(lambda c: c.upload_artifact(bad, price=0))
    assert served.service.store.pins() == []
    assert list(served.service.uploads_dir.iterdir()) == []


async def test_remote_callers_are_refused(
    served: Served, monkeypatch: pytest.MonkeyPatch, econ: EconomyChain
) -> None:
    src = served.tmp / "d.safetensors"
    write_safetensors(src, rows=10)
    up = await served.sync(lambda c: c.upload_artifact(src, price=0))
    monkeypatch.setattr(rpc_server, "is_loopback_caller", lambda request: False)
    with pytest.raises(LocalCallersOnly):
        await served.sync(lambda c: c.upload_artifact(src, price=0))
    with pytest.raises(LocalCallersOnly):
        await served.sync(lambda c: c.download_artifact(up["root"], io.BytesIO()))
    with pytest.raises(LocalCallersOnly):
        await served.sync(lambda c: c.fetch_artifact(up["root"]))
    with pytest.raises(LocalCallersOnly):
        await served.sync(lambda c: c.fetch_status("1-x"))
    # Public reads still work for them.
    info = await served.sync(lambda c: c.node_info())
    assert info["local"] is False and info["artifacts"] is True
    assert (await served.sync(lambda c: c.get_artifact(up["root"])))["complete"]


async def test_remote_callers_allowed_when_configured(
    nursery: trio.Nursery, tmp_path: Path, econ: EconomyChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await serve(
        nursery, tmp_path, econ, ArtifactHttpSettings(max_upload_bytes=LIMIT, allow_remote=True)
    )
    monkeypatch.setattr(rpc_server, "is_loopback_caller", lambda request: False)
    src = tmp_path / "d.safetensors"
    write_safetensors(src, rows=10)
    up = await s.sync(lambda c: c.upload_artifact(src, price=0))
    assert up["rows"] == 10
    nursery.cancel_scope.cancel()


# --- dataset queries -------------------------------------------------------------------------------


def register(econ: EconomyChain, who: int, up: dict[str, Any], name: str, price: int = 0) -> bytes:
    from node.storage.format_v1 import ArtifactProof

    root = bytes.fromhex(up["rootHex"][2:])
    body = DatasetRegister(
        root=root,
        proof=ArtifactProof.decode(bytes.fromhex(up["proof"][2:])),
        name=name,
        description=f"about {name}",
        license="CC-BY-4.0",
        price=Amount(price),
        salt=None if up["salt"] is None else bytes.fromhex(up["salt"][2:]),
        key_check=None if up["keyCheck"] is None else Hash32(bytes.fromhex(up["keyCheck"][2:])),
        plain_data_hash=Hash32(bytes.fromhex(up["plainDataHash"][2:])) if price else None,
    )
    econ.run_signed(who, body)
    return root


async def test_dataset_queries(served: Served, econ: EconomyChain) -> None:
    roots = []
    for i, (who, name, price) in enumerate(
        [(SUPPLIER, "cats", 0), (SUPPLIER2, "dogs", 0), (SUPPLIER, "birds", 10**18)]
    ):
        src = served.tmp / f"{name}.safetensors"
        write_safetensors(src, rows=20 + i, seed=i)
        up = await served.sync(partial(_upload, src=src, price=price))
        roots.append(register(econ, who, up, name, price))
    cats = await served.sync(lambda c: c.get_dataset(roots[0]))
    assert cats is not None and cats["name"] == "cats" and cats["rows"] == 20
    assert cats["id"] == "0x" + dataset_id(roots[0]).hex()
    assert cats["headerJson"]["x"]["shape"] == [20, 1024]
    by_id = await served.sync(lambda c: c.get_dataset(cats["id"]))
    assert by_id == cats
    by_cid = await served.sync(lambda c: c.get_dataset(cats["rootCid"]))
    assert by_cid == cats
    assert await served.sync(lambda c: c.get_dataset("0x" + "00" * 32)) is None

    everything = await served.sync(lambda c: c.list_datasets())
    assert sorted(d["name"] for d in everything["datasets"]) == ["birds", "cats", "dogs"]
    assert everything["nextCursor"] is None
    priced = await served.sync(lambda c: c.list_datasets(priced=True))
    assert [d["name"] for d in priced["datasets"]] == ["birds"]
    mine = await served.sync(lambda c: c.list_datasets(owner=key(SUPPLIER).address))
    assert sorted(d["name"] for d in mine["datasets"]) == ["birds", "cats"]
    text = await served.sync(lambda c: c.list_datasets(text="DOG"))
    assert [d["name"] for d in text["datasets"]] == ["dogs"]
    # Pagination: one at a time, in id order, the cursor goes on.
    seen = []
    cursor = None
    for _ in range(4):
        page = await served.sync(partial(_page, cursor=cursor))
        seen += [d["id"] for d in page["datasets"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == sorted(d["id"] for d in everything["datasets"])
    with pytest.raises(InvalidParams):
        await served.sync(lambda c: c.list_datasets(limit=101))
    with pytest.raises(InvalidParams):
        await served.sync(lambda c: c.call("ns_listDatasets", [{"bogus": 1}]))

    roles = await served.sync(lambda c: c.get_roles(key(SUPPLIER).address))
    assert [r["name"] for r in roles["roles"]] == ["data_supplier"]

    _, pubkey = generate_wrap_keypair()
    nonce = econ.next_nonce(BUYER)
    econ.run(tx(BUYER, Purchase(dataset_id(roots[2]), pubkey, Amount(10**18)), nonce=nonce))
    pid = purchase_id(key(BUYER).address, nonce)
    purchase = await served.sync(lambda c: c.get_purchase(pid))
    assert purchase is not None and purchase["buyer"] == "0x" + key(BUYER).address.hex()
    assert purchase["shares"][0]["state"] == 1 and purchase["shares"][0]["wrappedKey"] == "0x"


async def test_fetch_jobs_through_rpc(served: Served, econ: EconomyChain) -> None:
    src = served.tmp / "d.safetensors"
    write_safetensors(src, rows=600)
    up = await served.peer.import_upload(_copy(src, served.tmp / "peer.safetensors"), encrypted=False)
    root = up.root
    info = await served.sync(lambda c: c.get_artifact(root))
    assert info["size"] is None and not info["complete"]
    assert info["providers"] == ["0x" + bytes(served.peer.network.peer_id).hex()]
    job = await served.sync(lambda c: c.fetch_artifact(root, leaves=[1]))
    assert job["state"] in ("running", "done") and job["leaves"] == [1]
    for _ in range(200):
        job = await served.sync(partial(_status, job=job["job"]))
        if job["state"] != "running":
            break
        await trio.sleep(0.05)
    assert job["state"] == "done", job
    info = await served.sync(lambda c: c.get_artifact(root))
    assert not info["complete"] and info["blocksMissing"] >= 1
    job = await served.sync(lambda c: c.fetch_artifact(up.root))
    for _ in range(200):
        job = await served.sync(partial(_status, job=job["job"]))
        if job["state"] != "running":
            break
        await trio.sleep(0.05)
    assert job["state"] == "done", job
    info = await served.sync(lambda c: c.get_artifact(root))
    assert info["complete"] and info["pinned"]
    with pytest.raises(InvalidParams):
        await served.sync(lambda c: c.fetch_artifact("not-a-cid"))


def _upload(c: Client, *, src: Path, price: int) -> dict[str, Any]:
    return c.upload_artifact(src, price=price)


def _page(c: Client, *, cursor: str | None) -> dict[str, Any]:
    return c.list_datasets(limit=1, cursor=cursor)


def _status(c: Client, *, job: str) -> dict[str, Any]:
    return c.fetch_status(job)


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


async def test_raw_blocks_are_served_by_cid(served: Served) -> None:
    from node.storage import unixfs

    src = served.tmp / "b.safetensors"
    write_safetensors(src, rows=600)  # > 1 MiB of data: a dag-pb root over several leaves
    up = await served.sync(lambda c: c.upload_artifact(src, price=0))
    root = bytes.fromhex(up["rootHex"][2:])
    raw_root = await served.sync(lambda c: c.get_block_bytes(up["root"]))
    unixfs.verify_block(unixfs.parse_cid(root), raw_root)
    node = unixfs.decode_node(raw_root)
    assert len(node.links) >= 2
    leaf_cid = node.links[1].cid
    leaf = await served.sync(lambda c: c.get_block_bytes(bytes(leaf_cid)))
    unixfs.verify_block(leaf_cid, leaf)
    assert leaf == served.service.store.get(bytes(leaf_cid))
    other = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    with pytest.raises(UnknownArtifact):
        await served.sync(lambda c: c.get_block_bytes(other))

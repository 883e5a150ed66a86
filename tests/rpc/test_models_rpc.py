"""The model registry over JSON-RPC (rpc/methods/models.py) on a real ``RpcServer`` whose node is a
``ChainService`` that committed the inverted tree of ``tests/economy/test_models.Tree``: models
by id and by root CID, listings filtered by owner / signature / family with pagination, lineage
in both directions with every edge's proof checked by ``node.lightclient`` against the answered
state root, and the typed errors of bad params and unknown models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from node import lightclient
from node.chain import ReadView
from node.economy.models import get_model, signature_prefix
from node.storage.unixfs import parse_cid
from rpc.server import RpcServer
from tests.economy.test_models import DEV, DEV2, Tree
from tests.helpers import addr
from tests.rpc.conftest import LIMITS, call


class TreeNode:
    """The part of ``node.service.Node`` the read methods use."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def read_view(self) -> ReadView:
        return self.tree.chain.read_view()


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree()


@pytest.fixture
async def url(nursery: trio.Nursery, tree: Tree) -> AsyncIterator[str]:
    server = RpcServer(TreeNode(tree), "127.0.0.1", 0, LIMITS)  # type: ignore[arg-type]
    yield await nursery.start(server.serve)
    nursery.cancel_scope.cancel()


async def ok(url: str, method: str, *params: Any) -> Any:
    answer = await call(url, method, list(params))
    assert "error" not in answer, answer
    return answer["result"]


async def error(url: str, method: str, *params: Any) -> dict[str, Any]:
    answer = await call(url, method, list(params))
    assert "error" in answer, answer
    err: dict[str, Any] = answer["error"]
    return err


def hx(b: bytes) -> str:
    return "0x" + b.hex()


async def test_get_model_by_id_and_by_root(url: str, tree: Tree) -> None:
    e = tree.ids["E"]
    record = get_model(tree, e)
    assert record is not None
    by_id = await ok(url, "ns_getModel", hx(e))
    assert by_id["id"] == hx(e) and by_id["name"] == "E" and by_id["depth"] == 2
    assert by_id["parents"] == [hx(tree.ids["C"]), hx(tree.ids["D"])] and by_id["base"] is None
    assert by_id["owner"] == hx(addr(DEV2)) and by_id["family"] == "mlp"
    assert by_id["specJson"] == {
        "activation": "relu",
        "dtype": "F32",
        "family": "mlp",
        "hidden": [3],
        "input_dim": 4,
        "num_classes": 2,
    }
    assert sorted(by_id["headerJson"]) == [
        "head.bias",
        "head.weight",
        "layers.0.bias",
        "layers.0.weight",
    ]
    assert by_id["recipe"]["method"] == "linear" and by_id["recipe"]["weights"] == [0.5, 0.5]
    assert by_id["signature"] == hx(record.signature) and by_id["parameters"] == 23
    assert by_id["price"] == "0" and not by_id["isPriced"]
    cid = str(parse_cid(record.root))
    assert by_id["rootCid"] == cid
    assert await ok(url, "ns_getModel", cid) == by_id
    assert await ok(url, "ns_getModel", hx(record.root)) == by_id
    c = await ok(url, "ns_getModel", hx(tree.ids["C"]))
    assert c["datasets"] == [hx(tree.data.id)]
    assert await ok(url, "ns_getModel", hx(b"\x00" * 32)) is None
    assert (await error(url, "ns_getModel", "not-a-cid"))["code"] == -32602


async def test_list_models_filters_and_pages(url: str, tree: Tree) -> None:
    everything = await ok(url, "ns_listModels", {"limit": 100})
    assert {m["name"] for m in everything["models"]} == set("ABCDEF")
    assert everything["nextCursor"] is None
    assert all("header" not in m and "headerJson" not in m for m in everything["models"])
    ids = [m["id"] for m in everything["models"]]
    assert ids == sorted(ids)
    # Pages of 4 then 2, continuing from the cursor.
    first = await ok(url, "ns_listModels", {"limit": 4})
    assert [m["id"] for m in first["models"]] == ids[:4] and first["nextCursor"] == ids[3]
    rest = await ok(url, "ns_listModels", {"limit": 4, "cursor": first["nextCursor"]})
    assert [m["id"] for m in rest["models"]] == ids[4:] and rest["nextCursor"] is None
    mine = await ok(url, "ns_listModels", {"owner": hx(addr(DEV))})
    assert {m["name"] for m in mine["models"]} == {"A", "C", "F"}
    # By signature (the index): all six share one; paging works inside the signature too.
    sig = everything["models"][0]["signature"]
    same = await ok(url, "ns_listModels", {"signature": sig, "limit": 5})
    assert [m["id"] for m in same["models"]] == ids[:5] and same["nextCursor"] == ids[4]
    tail = await ok(url, "ns_listModels", {"signature": sig, "cursor": same["nextCursor"]})
    assert [m["id"] for m in tail["models"]] == ids[5:]
    indexed = list(tree.scan(signature_prefix(bytes.fromhex(sig[2:]))))
    assert len(indexed) == 6
    other = await ok(url, "ns_listModels", {"signature": hx(b"\x01" * 32)})
    assert other == {"models": [], "nextCursor": None, "scanned": 0}
    assert (await ok(url, "ns_listModels", {"family": "cnn"}))["models"] == []
    assert len((await ok(url, "ns_listModels", {"family": "mlp"}))["models"]) == 6
    assert len((await ok(url, "ns_listModels"))["models"]) == 6
    for bad in ({"limit": 0}, {"limit": 101}, {"colour": "red"}, {"owner": "0x12"}):
        assert (await error(url, "ns_listModels", bad))["code"] == -32602


async def test_lineage_with_proofs_verified_by_the_light_client(url: str, tree: Tree) -> None:
    head = tree.chain.read_view().head
    assert head is not None
    answer = await ok(
        url,
        "ns_getLineage",
        {"model": hx(tree.ids["F"]), "direction": "ancestors", "proofs": True},
    )
    assert answer["height"] == head.height and answer["stateRoot"] == hx(head.state_root)
    assert not answer["truncated"] and answer["depth"] == 16
    names = {hx(i): n for n, i in tree.ids.items()}
    got = [
        (names[e["ancestor"]], names[e["child"]], e["relation"], e["distance"])
        for e in answer["edges"]
    ]
    assert got == [
        ("E", "F", ["base"], 1),
        ("C", "E", ["parent"], 2),
        ("D", "E", ["parent"], 2),
        ("A", "C", ["parent"], 3),
        ("B", "C", ["parent"], 3),
    ]
    assert {m["name"] for m in answer["models"].values()} == set("ABCDEF")
    root = bytes.fromhex(answer["stateRoot"][2:])
    for e in answer["edges"]:
        proof = e["proof"]
        assert proof["height"] == head.height and proof["stateRoot"] == answer["stateRoot"]
        key, value = bytes.fromhex(e["key"][2:]), bytes.fromhex(e["value"][2:])
        assert proof["key"] == e["key"] and proof["value"] == e["value"]
        lightclient.verify_inclusion(root, key, value, bytes.fromhex(proof["proof"][2:]))
    down = await ok(
        url,
        "ns_getLineage",
        {"model": hx(tree.ids["B"]), "direction": "descendants", "depth": 2, "proofs": True},
    )
    assert [(names[e["ancestor"]], names[e["child"]]) for e in down["edges"]] == [
        ("B", "C"),
        ("C", "E"),
    ]
    for e in down["edges"]:
        lightclient.verify_inclusion(
            root,
            bytes.fromhex(e["key"][2:]),
            bytes.fromhex(e["value"][2:]),
            bytes.fromhex(e["proof"]["proof"][2:]),
        )
    # Without proofs: the same edges, no proof objects; by root CID as well.
    record = get_model(tree, tree.ids["B"])
    assert record is not None
    plain = await ok(
        url,
        "ns_getLineage",
        {"model": str(parse_cid(record.root)), "direction": "descendants", "depth": 2},
    )
    assert [e["child"] for e in plain["edges"]] == [e["child"] for e in down["edges"]]
    assert all("proof" not in e for e in plain["edges"])


async def test_lineage_errors(url: str, tree: Tree) -> None:
    model = hx(tree.ids["A"])
    for bad in (
        {"model": model, "direction": "sideways"},
        {"model": model, "direction": "ancestors", "depth": 17},
        {"model": model, "direction": "ancestors", "depth": 0},
        {"model": model, "direction": "ancestors", "proofs": "yes"},
        {"model": model, "direction": "ancestors", "extra": 1},
        {"direction": "ancestors"},
        "not an object",
    ):
        assert (await error(url, "ns_getLineage", bad))["code"] == -32602
    unknown = await error(
        url, "ns_getLineage", {"model": hx(b"\x00" * 32), "direction": "descendants"}
    )
    assert unknown["code"] == 3052

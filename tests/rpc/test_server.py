"""The JSON-RPC server over real HTTP on 127.0.0.1: protocol errors, limits, batches,
notifications, application errors and every method's answer shape."""

from __future__ import annotations

import inspect
import json
import socket
import threading

import pytest
import trio

from node import crypto
from node import errors as node_errors
from node.consensus.fees import compute_cost
from node.consensus.state import account_key
from node.consensus.txs import SignedTransaction, TxKind
from node.errors import ConfigError, NeuroSeedError
from node.types import NSD, Signature
from rpc.errors import ServerBusy
from rpc.server import RpcLimits, RpcServer
from tests.rpc.conftest import LIMITS, Served, call, http_request, post
from tests.rpc.fakes import ALICE, BOB, CHAIN_ID, UNKNOWN, FakeNode, transfer

pytestmark = pytest.mark.timeout(30)


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


async def assert_still_serving(url: str) -> None:
    answer = await call(url, "ns_blockNumber", [], req_id="alive")
    assert answer == {"jsonrpc": "2.0", "id": "alive", "result": 5}


# --- protocol ------------------------------------------------------------------------------------


async def test_single_call(served: Served) -> None:
    assert await call(served.url, "ns_blockNumber") == {"jsonrpc": "2.0", "id": 1, "result": 5}
    assert (await call(served.url, "eth_blockNumber", [], "x"))["result"] == "0x5"
    assert (await call(served.url, "eth_chainId"))["result"] == hex(CHAIN_ID)
    assert (await call(served.url, "net_version"))["result"] == str(CHAIN_ID)
    assert (await call(served.url, "ns_chainId", {}))["result"] == CHAIN_ID


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"jsonrpc": "2.0", "id": 1, "method": "ns_chainId"',
        b"\xff\xfe\xfd",
        b"NaN",
        b'{"jsonrpc": "2.0", "id": 1, "method": "ns_chainId", "params": [Infinity]}',
        b"[" * 50_000,
        b"",
        b'{"jsonrpc": "2.0", "method": "ns_chainId", "id": ' + b"9" * 5000 + b"}",
    ],
)
async def test_malformed_json_is_parse_error(served: Served, body: bytes) -> None:
    answer = await post(served.url, body)
    assert answer.status == 200
    reply = answer.json()
    assert reply["id"] is None
    assert reply["error"]["code"] == -32700
    await assert_still_serving(served.url)


@pytest.mark.parametrize(
    ("request_obj", "reply_id", "fragment"),
    [
        (42, None, "JSON object"),
        ("ns_chainId", None, "JSON object"),
        ({"jsonrpc": "1.0", "id": 7, "method": "ns_chainId"}, 7, "jsonrpc"),
        ({"id": 7, "method": "ns_chainId"}, 7, "jsonrpc"),
        ({"jsonrpc": "2.0", "id": True, "method": "ns_chainId"}, None, "id"),
        ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "ns_chainId"}, None, "id"),
        ({"jsonrpc": "2.0", "id": [1], "method": "ns_chainId"}, None, "id"),
        ({"jsonrpc": "2.0", "id": 7, "method": 5}, 7, "method"),
        ({"jsonrpc": "2.0", "id": 7}, 7, "method"),
        ({"jsonrpc": "2.0", "id": 7, "method": "ns_chainId", "params": "x"}, 7, "params"),
        ({"jsonrpc": "2.0", "id": 7, "method": "ns_chainId", "params": 3}, 7, "params"),
    ],
)
async def test_invalid_request(
    served: Served, request_obj: object, reply_id: object, fragment: str
) -> None:
    answer = await post(served.url, request_obj)
    assert answer.status == 200
    reply = answer.json()
    assert reply["jsonrpc"] == "2.0"
    assert reply["id"] == reply_id
    assert reply["error"]["code"] == -32600
    assert fragment in reply["error"]["message"]


async def test_string_null_and_float_ids_are_echoed(served: Served) -> None:
    for req_id in ("abc", None, 3.5, 0, -1):
        reply = await call(served.url, "ns_chainId", [], req_id=req_id)
        assert reply["id"] == req_id
        assert reply["result"] == CHAIN_ID


async def test_unknown_method(served: Served) -> None:
    reply = await call(served.url, "eth_sendTransaction", [], req_id=9)
    assert reply["id"] == 9
    assert reply["error"]["code"] == -32601
    assert "eth_sendTransaction" in reply["error"]["message"]
    reserved = await call(served.url, "rpc.discover")
    assert reserved["error"]["code"] == -32601


@pytest.mark.parametrize(
    ("method", "params", "param_name"),
    [
        ("ns_getAccount", [5], "address"),
        ("ns_getAccount", ["0x1234"], "address"),
        ("ns_getAccount", ["1234" * 10], "address"),
        ("ns_getAccount", ["0x" + "zz" * 20], "address"),
        ("ns_getAccount", [], "address"),
        ("ns_getAccount", {"addr": "0x" + "00" * 20}, "addr"),
        ("ns_getBlockByNumber", ["soon"], "number"),
        ("ns_getBlockByNumber", ["0x01"], "number"),
        ("ns_getBlockByNumber", [-1], "number"),
        ("ns_getBlockByNumber", [1.5], "number"),
        ("ns_getBlockByNumber", [True], "number"),
        ("ns_getBlockByNumber", [1, "yes"], "fullTransactions"),
        ("ns_getBlockByNumber", ["0x" + "f" * 17], "number"),
        ("ns_getBlockByHash", ["0x" + "00" * 31], "hash"),
        ("ns_getTransaction", [None], "txId"),
        ("ns_getProof", ["0x"], "key"),
        ("ns_getProof", ["0x01", "later"], "height"),
        ("ns_sendRawTransaction", ["0x123"], "raw"),
        ("ns_sendRawTransaction", [b"x".hex()], "raw"),
        ("ns_estimateFee", [{"kind": 1}], "tx.size"),
        ("ns_estimateFee", [{"kind": "one", "size": 100}], "tx.kind"),
        ("ns_estimateFee", [{"kind": 1, "size": 100, "extra": 1}], "tx"),
        ("ns_estimateFee", [7], "tx"),
        ("eth_getBalance", ["0x" + "00" * 20, "tomorrow"], "block"),
        ("ns_chainId", [1], "at most 0"),
    ],
)
async def test_bad_params_name_the_param(
    served: Served, method: str, params: object, param_name: str
) -> None:
    reply = await call(served.url, method, params)
    error = reply["error"]
    assert error["code"] == -32602, error
    assert param_name in error["message"]
    assert error["message"].startswith("invalid params")


async def test_content_type_must_be_json(served: Served) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ns_chainId"}).encode()
    for content_type in ("text/plain", None, "application/x-www-form-urlencoded"):
        answer = await post(served.url, body, content_type=content_type)
        assert answer.status == 415
        assert answer.json()["error"]["code"] == -32600
    ok = await post(served.url, body, content_type="application/json; charset=utf-8")
    assert ok.json()["result"] == CHAIN_ID


async def test_oversize_body_is_413(served: Served) -> None:
    big = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "ns_sendRawTransaction",
            "params": ["0x" + "00" * LIMITS.max_body_bytes],
        }
    ).encode()
    answer = await post(served.url, big)
    assert answer.status == 413
    error = answer.json()["error"]
    assert error["code"] == -32600
    assert str(LIMITS.max_body_bytes) in error["message"]
    # Without a Content-Length (chunked), the limit is enforced while reading.
    chunks = [big[i : i + 8192] for i in range(0, len(big), 8192)]
    chunked = await trio.to_thread.run_sync(
        lambda: http_request(served.url, iter(chunks), chunked=True)
    )
    assert chunked.status == 413
    assert chunked.json()["error"]["code"] == -32600
    await assert_still_serving(served.url)
    assert served.node.entered == 0


async def test_empty_and_too_large_batches(served: Served) -> None:
    empty = (await post(served.url, [])).json()
    assert empty == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "empty batch"},
    }
    n = LIMITS.max_batch_size + 1
    batch = [{"jsonrpc": "2.0", "id": i, "method": "ns_chainId"} for i in range(n)]
    too_large = (await post(served.url, batch)).json()
    assert too_large["error"]["code"] == -32600
    assert f"batch of {n}" in too_large["error"]["message"]
    assert too_large["error"]["data"] == {"limit": LIMITS.max_batch_size}
    full = await post(served.url, batch[:-1])
    assert [r["result"] for r in full.json()] == [CHAIN_ID] * LIMITS.max_batch_size


async def test_batch_mixing_good_and_bad_calls(served: Served) -> None:
    raw = transfer(ALICE, 5, BOB.address, 1)
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "ns_blockNumber"},
        {"jsonrpc": "2.0", "id": "b", "method": "nope"},
        {"jsonrpc": "2.0", "id": "c", "method": "ns_getAccount", "params": [1]},
        42,
        {"jsonrpc": "2.0", "method": "ns_blockNumber"},  # notification: no entry
        {"jsonrpc": "2.0", "id": "d", "method": "ns_sendRawTransaction", "params": [_hex(raw)]},
        {"jsonrpc": "2.0", "id": "e", "method": "ns_sendRawTransaction", "params": [_hex(raw)]},
        {"jsonrpc": "2.0", "id": "f", "method": "eth_chainId"},
    ]
    replies = (await post(served.url, batch)).json()
    assert len(replies) == 7
    by_id = {r["id"]: r for r in replies}
    assert by_id["a"]["result"] == 5
    assert by_id["b"]["error"]["code"] == -32601
    assert by_id["c"]["error"]["code"] == -32602
    assert by_id[None]["error"]["code"] == -32600
    assert by_id["f"]["result"] == hex(CHAIN_ID)
    # the two identical submissions ran concurrently: one admitted, one rejected as known
    outcomes = sorted("result" in by_id[k] for k in "de")
    assert outcomes == [False, True]
    rejected = by_id["d"] if "error" in by_id["d"] else by_id["e"]
    assert rejected["error"]["code"] == node_errors.AlreadyKnown.code
    assert served.node.submitted == [raw]


async def test_notifications_get_no_answer_but_run(served: Served) -> None:
    raw = transfer(ALICE, 5, BOB.address, 1)
    single = await post(
        served.url, {"jsonrpc": "2.0", "method": "ns_sendRawTransaction", "params": [_hex(raw)]}
    )
    assert single.status == 204
    assert single.body == b""
    assert served.node.submitted == [raw]
    only_notifications = await post(
        served.url,
        [
            {"jsonrpc": "2.0", "method": "ns_blockNumber"},
            {"jsonrpc": "2.0", "method": "no_such_method"},
            {"jsonrpc": "2.0", "method": "ns_getAccount", "params": ["bad"]},
        ],
    )
    assert only_notifications.status == 204
    # a notification that is not a valid request is still answered (id null)
    invalid = (await post(served.url, {"jsonrpc": "2.0", "method": 12})).json()
    assert invalid["error"]["code"] == -32600
    assert invalid["id"] is None


async def test_get_returns_info_and_other_verbs_are_refused(served: Served) -> None:
    info = await trio.to_thread.run_sync(lambda: http_request(served.url, method="GET"))
    assert info.status == 200
    body = info.json()
    assert body["jsonrpc"] == "2.0"
    assert "ns_getAccount" in body["methods"]
    assert body["maxBatchSize"] == LIMITS.max_batch_size
    put = await trio.to_thread.run_sync(lambda: http_request(served.url, b"{}", method="PUT"))
    assert put.status == 405
    elsewhere = await trio.to_thread.run_sync(lambda: http_request(served.url + "other", b"{}"))
    assert elsewhere.status == 404


# --- application and internal errors -------------------------------------------------------------


def _all_node_errors() -> list[type[NeuroSeedError]]:
    return [
        cls
        for _, cls in inspect.getmembers(node_errors, inspect.isclass)
        if issubclass(cls, NeuroSeedError)
    ] + [ServerBusy]


@pytest.mark.parametrize("error_cls", _all_node_errors(), ids=lambda c: c.__name__)
async def test_each_application_error_has_its_code(
    served: Served, error_cls: type[NeuroSeedError]
) -> None:
    served.node.submit_error = error_cls("what went wrong at /var/lib/neuroseed/chain")
    raw = transfer(ALICE, 5, BOB.address, 1)
    reply = await call(served.url, "ns_sendRawTransaction", [_hex(raw)], req_id=3)
    error = reply["error"]
    assert reply["id"] == 3
    assert error["code"] == error_cls.code > 0
    assert error["data"]["reason"] == error_cls.reason
    if issubclass(
        error_cls, node_errors.StorageError | node_errors.ConfigError | node_errors.KeystoreError
    ):
        assert error["message"] == error_cls.reason  # host details stay in the log
        assert "/var/lib" not in json.dumps(reply)
    else:
        assert error["message"] == "what went wrong at /var/lib/neuroseed/chain"
    served.node.submit_error = None
    await assert_still_serving(served.url)


async def test_application_error_codes_are_unique() -> None:
    codes = [cls.code for cls in _all_node_errors()]
    assert len(codes) == len(set(codes))


async def test_real_validation_errors(served: Served) -> None:
    wrong_chain = transfer(ALICE, 5, BOB.address, 1, chain_id=CHAIN_ID + 1)
    reply = await call(served.url, "ns_sendRawTransaction", [_hex(wrong_chain)])
    assert reply["error"]["code"] == node_errors.WrongChain.code
    garbage = await call(served.url, "ns_sendRawTransaction", ["0xc0ffee"])
    assert garbage["error"]["code"] == node_errors.MalformedTransaction.code
    old = transfer(ALICE, 0, BOB.address, 1)
    low = await call(served.url, "ns_sendRawTransaction", [_hex(old)])
    assert low["error"] == {
        "code": 1202,
        "message": "nonce 0 is below the next nonce 5",
        "data": {"reason": "nonce too low"},
    }


async def test_internal_error_is_generic_and_logged(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.node.view.account_error = RuntimeError("boom in /home/secret/file.py")
    reply = await call(served.url, "ns_getAccount", [_hex(ALICE.address)])
    assert reply["error"] == {"code": -32603, "message": "internal error"}
    assert "secret" not in json.dumps(reply)
    assert any("ns_getAccount" in r.getMessage() and r.exc_info for r in caplog.records)
    served.node.view.account_error = None
    await assert_still_serving(served.url)


async def test_read_path_application_error(served: Served) -> None:
    served.node.view.account_error = node_errors.CorruptDatabase("bad block at /data/000123.ldb")
    reply = await call(served.url, "ns_getAccount", [_hex(ALICE.address)])
    assert reply["error"]["code"] == 1601
    assert "/data" not in json.dumps(reply)


# --- methods -------------------------------------------------------------------------------------


async def test_get_block(served: Served) -> None:
    view = served.node.view
    latest = (await call(served.url, "ns_getBlockByNumber", ["latest"]))["result"]
    block5 = view.blocks[5]
    assert latest["height"] == 5
    assert latest["hash"] == _hex(block5.hash())
    assert latest["parentHash"] == _hex(view.blocks[4].hash())
    assert latest["stateRoot"] == _hex(block5.header.state_root)
    assert latest["time"] == block5.header.time
    assert latest["chainId"] == CHAIN_ID
    assert latest["proposer"] == _hex(block5.header.proposer)
    assert latest["transactions"] == [_hex(crypto.sha256(block5.txs[0]))]
    assert latest["size"] == len(block5.encode())
    assert latest["lastCommit"]["height"] == 4
    assert latest["lastCommit"]["signers"] == [_hex(block5.header.proposer)]
    assert latest["evidenceCount"] == 0
    for spelling in (3, "0x3"):
        by_number = (await call(served.url, "ns_getBlockByNumber", [spelling]))["result"]
        assert by_number["height"] == 3
    assert (await call(served.url, "ns_getBlockByNumber", []))["result"]["height"] == 5
    assert (await call(served.url, "ns_getBlockByNumber", [99]))["result"] is None
    assert (await call(served.url, "ns_getBlockByNumber", ["earliest"]))["result"] is None
    first = (await call(served.url, "ns_getBlockByNumber", {"number": 1}))["result"]
    assert first["lastCommit"] is None
    full = (await call(served.url, "ns_getBlockByNumber", [5, True]))["result"]
    (tx,) = full["transactions"]
    assert tx["from"] == _hex(ALICE.address)
    assert tx["height"] == 5 and tx["index"] == 0 and tx["blockHash"] == latest["hash"]
    by_hash = (await call(served.url, "ns_getBlockByHash", [latest["hash"], True]))["result"]
    assert by_hash == full
    missing = await call(served.url, "ns_getBlockByHash", ["0x" + "ab" * 32])
    assert missing["result"] is None


async def test_get_transaction_and_receipt(served: Served) -> None:
    raw = served.node.view.blocks[2].txs[0]
    tx_id = _hex(crypto.sha256(raw))
    tx = (await call(served.url, "ns_getTransaction", [tx_id]))["result"]
    assert tx == {
        "id": tx_id,
        "from": _hex(ALICE.address),
        "chainId": CHAIN_ID,
        "nonce": 1,
        "fee": str(10**15),
        "kind": 1,
        "kindName": "transfer",
        "body": {"to": _hex(BOB.address), "amount": str(NSD // 2), "memo": "0x6869"},
        "signature": tx["signature"],
        "size": len(raw),
        "raw": _hex(raw),
        "blockHash": _hex(served.node.view.blocks[2].hash()),
        "height": 2,
        "index": 0,
    }
    assert len(tx["signature"]) == 2 + 130
    receipt = (await call(served.url, "ns_getReceipt", {"txId": tx_id}))["result"]
    assert receipt == {
        "txId": tx_id,
        "status": 0,
        "success": True,
        "feePaid": str(10**15),
        "burned": "2000",
        "events": [{"name": "transfer", "attributes": [{"key": "to", "value": _hex(BOB.address)}]}],
        "error": "",
        "blockHash": _hex(served.node.view.blocks[2].hash()),
        "height": 2,
        "index": 0,
    }
    unknown = "0x" + "00" * 32
    assert (await call(served.url, "ns_getTransaction", [unknown]))["result"] is None
    assert (await call(served.url, "ns_getReceipt", [unknown]))["result"] is None


async def test_get_account(served: Served) -> None:
    reply = (await call(served.url, "ns_getAccount", [_hex(BOB.address)]))["result"]
    assert reply == {
        "address": _hex(BOB.address),
        "nonce": 0,
        "balance": str(5 * NSD // 2),
        "balanceNSD": "2.500000000000000000",
    }
    upper = "0x" + UNKNOWN.hex().upper()
    empty = (await call(served.url, "ns_getAccount", [upper]))["result"]
    assert empty == {
        "address": _hex(UNKNOWN),
        "nonce": 0,
        "balance": "0",
        "balanceNSD": "0.000000000000000000",
    }


async def test_get_proof(served: Served) -> None:
    key = account_key(ALICE.address)
    latest = (await call(served.url, "ns_getProof", [_hex(key)]))["result"]
    assert latest["key"] == _hex(key)
    assert latest["height"] == 5
    assert latest["value"] == _hex(served.node.view.states[5][key])
    assert latest["stateRoot"] == _hex(crypto.sha256(b"root/5"))
    assert latest["proof"].startswith("0x93")
    at_3 = (await call(served.url, "ns_getProof", [_hex(key), 3]))["result"]
    assert at_3["height"] == 3
    absent = await call(served.url, "ns_getProof", [_hex(account_key(UNKNOWN)), "0x4"])
    assert absent["result"]["value"] is None
    pruned = await call(served.url, "ns_getProof", [_hex(key), 1])
    assert pruned["error"]["code"] == node_errors.HistoryPruned.code == 1501
    assert pruned["error"]["data"] == {"reason": node_errors.HistoryPruned.reason}
    future = await call(served.url, "ns_getProof", [_hex(key), 6])
    assert future["error"]["code"] == node_errors.NotFound.code


async def test_estimate_fee(served: Served) -> None:
    params = served.node.view.params
    raw = transfer(ALICE, 5, BOB.address, 1, fee=0)
    existing = (await call(served.url, "ns_estimateFee", [_hex(raw)]))["result"]
    assert existing == str(compute_cost(params, TxKind.TRANSFER, len(raw)))
    new = transfer(ALICE, 5, UNKNOWN, 1, fee=0)
    to_new = (await call(served.url, "ns_estimateFee", [_hex(new)]))["result"]
    assert int(to_new) == compute_cost(params, TxKind.TRANSFER, len(new), new_accounts=1)
    by_size = await call(served.url, "ns_estimateFee", [{"kind": 1, "size": 200, "newAccounts": 2}])
    assert by_size["result"] == str(compute_cost(params, 1, 200, new_accounts=2))
    unknown_kind = await call(served.url, "ns_estimateFee", [{"kind": 99, "size": 200}])
    assert unknown_kind["error"]["code"] == node_errors.UnknownKind.code
    signed = SignedTransaction.decode(raw)
    high_s = SignedTransaction(signed.tx, Signature(crypto.malleate(signed.signature))).encode()
    bad = await call(served.url, "ns_estimateFee", [_hex(high_s)])
    assert bad["error"]["code"] == node_errors.MalleableTransactionSignature.code


async def test_status_and_pending_nonce(served: Served) -> None:
    status = (await call(served.url, "ns_status"))["result"]
    head = served.node.view.head
    assert head is not None
    assert status == {
        "chainId": CHAIN_ID,
        "nodeVersion": "0.1.0-test",
        "headHeight": 5,
        "headHash": _hex(head.hash()),
        "headTime": head.time,
        "validatorAddress": status["validatorAddress"],
        "isValidator": True,
        "mempoolSize": 0,
        "mempoolBytes": 0,
        "peers": 3,
        "syncing": False,
        "finalizedHeight": 5,
        "consensusHeight": 6,
        "round": 2,
        "validators": [{"address": status["validatorAddress"], "power": 1}],
    }
    address = _hex(ALICE.address)
    assert (await call(served.url, "ns_pendingNonce", [address]))["result"] == 5
    await call(served.url, "ns_sendRawTransaction", [_hex(transfer(ALICE, 5, BOB.address, 1))])
    assert (await call(served.url, "ns_pendingNonce", [address]))["result"] == 6
    assert (await call(served.url, "eth_getTransactionCount", [address]))["result"] == "0x5"
    pending = await call(served.url, "eth_getTransactionCount", [address, "pending"])
    assert pending["result"] == "0x6"
    at_2 = await call(served.url, "eth_getTransactionCount", [address, "0x2"])
    assert at_2["result"] == "0x2"


async def test_eth_get_balance(served: Served) -> None:
    bob = _hex(BOB.address)
    assert (await call(served.url, "eth_getBalance", [bob, "latest"]))["result"] == hex(
        5 * NSD // 2
    )
    assert (await call(served.url, "eth_getBalance", [bob]))["result"] == hex(5 * NSD // 2)
    assert (await call(served.url, "eth_getBalance", [bob, "finalized"]))["result"] == hex(
        5 * NSD // 2
    )
    assert (await call(served.url, "eth_getBalance", [bob, "0x3"]))["result"] == hex(3 * NSD // 2)
    unknown = await call(served.url, "eth_getBalance", [_hex(UNKNOWN), 4])
    assert unknown["result"] == "0x0"
    pruned = await call(served.url, "eth_getBalance", [bob, "earliest"])
    assert pruned["error"]["code"] == node_errors.HistoryPruned.code


# --- limits and lifecycle ------------------------------------------------------------------------


async def test_in_flight_limit_answers_server_busy(served: Served) -> None:
    node = served.node
    node.gate = trio.Event()
    raws = [transfer(ALICE, 5 + i, BOB.address, 1) for i in range(LIMITS.max_in_flight + 1)]
    replies: dict[int, dict[str, object]] = {}

    async def send(i: int) -> None:
        replies[i] = await call(served.url, "ns_sendRawTransaction", [_hex(raws[i])], req_id=i)

    async with trio.open_nursery() as nursery:
        for i in range(LIMITS.max_in_flight):
            nursery.start_soon(send, i)
        while node.entered < LIMITS.max_in_flight:
            await trio.sleep(0.005)
        await send(LIMITS.max_in_flight)  # one too many: refused at once
        busy = replies[LIMITS.max_in_flight]["error"]
        assert isinstance(busy, dict)
        assert busy["code"] == ServerBusy.code == 2001
        assert "limit 4" in busy["message"]
        node.gate.set()
    assert all("result" in replies[i] for i in range(LIMITS.max_in_flight))
    assert len(node.submitted) == LIMITS.max_in_flight


async def test_shutdown_answers_in_flight_calls_and_frees_the_port(served: Served) -> None:
    node = served.node
    node.gate = trio.Event()  # never set: the call is in flight when the server stops
    raw = transfer(ALICE, 5, BOB.address, 1)
    answers = []

    async def send() -> None:
        answers.append(await call(served.url, "ns_sendRawTransaction", [_hex(raw)]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while node.entered < 1:
            await trio.sleep(0.005)
        served.cancel_scope.cancel()
    await served.stopped.wait()
    assert answers[0]["error"]["code"] == node_errors.NodeUnavailable.code
    assert node.cancelled == 1
    assert served.server.url is None
    assert not [t for t in threading.enumerate() if t.name == "rpc-server"]
    port = int(served.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass


async def test_port_in_use_is_a_config_error(nursery: trio.Nursery) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = RpcServer(FakeNode(), "127.0.0.1", port)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: address already in use"):
            await nursery.start(server.serve)
    assert not [t for t in threading.enumerate() if t.name == "rpc-server"]


async def test_serving_twice_is_refused(served: Served) -> None:
    with pytest.raises(RuntimeError, match="already serving"):
        await served.server.serve()


async def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        RpcLimits(max_batch_size=0)
    with pytest.raises(ConfigError):
        RpcLimits(max_body_bytes=10)

"""The SDK (``Client`` and ``AsyncClient``) against a real server over HTTP: typed results,
typed errors, batches, transport failures and ``wait_for_receipt``."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from node import crypto
from node import errors as node_errors
from node.api import NodeStatus, StateProof
from node.consensus.fees import compute_cost
from node.consensus.state import account_key
from node.types import NSD, Amount
from rpc.client import AccountInfo, AsyncClient, Client
from rpc.errors import (
    ApplicationError,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ReceiptTimeout,
    RequestTimeout,
    RpcError,
    ServerBusy,
    TransportError,
    error_from_json,
)
from tests.rpc.conftest import LIMITS, Served, in_asyncio
from tests.rpc.fakes import ALICE, BOB, CHAIN_ID, transfer

pytestmark = pytest.mark.timeout(30)


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args))


# --- sync client ---------------------------------------------------------------------------------


async def test_sync_client_typed_methods(served: Served) -> None:
    view = served.node.view

    def scenario() -> dict[str, Any]:
        with Client(served.url, timeout=5) as node:
            raw = transfer(ALICE, 5, BOB.address, 1)
            return {
                "chain_id": node.chain_id(),
                "height": node.block_number(),
                "block": node.get_block(),
                "block3": node.get_block(3, full_transactions=True),
                "by_hash": node.get_block_by_hash(view.blocks[2].hash()),
                "tx": node.get_transaction(crypto.sha256(view.blocks[1].txs[0])),
                "receipt": node.get_receipt(crypto.sha256(view.blocks[1].txs[0]).hex()),
                "account": node.get_account(BOB.address),
                "proof": node.get_proof(account_key(ALICE.address), 4),
                "fee": node.estimate_fee(kind=1, size=150),
                "fee_raw": node.estimate_fee(raw),
                "status": node.status(),
                "sent": node.send_raw_transaction(raw),
                "pending": node.pending_nonce(ALICE.address),
                "generic": node.call("eth_blockNumber"),
                "raw": raw,
            }

    r = await in_thread(scenario)
    assert r["chain_id"] == CHAIN_ID
    assert r["height"] == 5
    assert r["block"]["height"] == 5
    assert r["block3"]["transactions"][0]["nonce"] == 2
    assert r["by_hash"]["height"] == 2
    assert r["tx"]["height"] == 1
    assert r["receipt"]["success"] is True
    assert r["account"] == AccountInfo(BOB.address, 0, Amount(5 * NSD // 2))
    assert isinstance(r["proof"], StateProof)
    assert r["proof"].height == 4
    assert r["proof"].value == view.states[4][account_key(ALICE.address)]
    assert r["fee"] == compute_cost(view.params, 1, 150)
    assert r["fee_raw"] == compute_cost(view.params, 1, len(r["raw"]))
    assert isinstance(r["status"], NodeStatus)
    assert r["status"].head_hash == view.blocks[5].hash()
    assert r["status"].validator_address is not None
    assert r["sent"] == crypto.sha256(r["raw"])
    assert r["pending"] == 6
    assert r["generic"] == "0x5"


async def test_sync_client_typed_errors(served: Served) -> None:
    def scenario() -> list[BaseException]:
        caught: list[BaseException] = []
        with Client(served.url) as node:
            for action in (
                lambda: node.send_raw_transaction(transfer(ALICE, 0, BOB.address, 1)),
                lambda: node.call("ns_getAccount", ["0x12"]),
                lambda: node.call("no_such_method"),
                lambda: node.get_proof(b"\x01\x01", 1),
            ):
                try:
                    action()
                except RpcError as exc:
                    caught.append(exc)
        return caught

    too_low, bad_params, unknown, pruned = await in_thread(scenario)
    assert isinstance(too_low, node_errors.NonceTooLow)
    assert isinstance(too_low, node_errors.InvalidTransaction)
    assert isinstance(too_low, ApplicationError)
    assert too_low.code == 1202
    assert too_low.reason == "nonce too low"
    assert too_low.data == {"reason": "nonce too low"}
    assert "below the next nonce 5" in too_low.message
    assert type(too_low).__name__ == "NonceTooLow"
    assert isinstance(bad_params, InvalidParams)
    assert bad_params.data == {"param": "address"}
    assert isinstance(unknown, MethodNotFound)
    assert isinstance(pruned, node_errors.HistoryPruned)
    assert isinstance(pruned, node_errors.NotFound)


async def test_sync_batch(served: Served) -> None:
    def scenario() -> tuple[list[Any], BaseException]:
        with Client(served.url) as node:
            with node.batch() as batch:
                height = batch.call("ns_blockNumber")
                account = batch.call("ns_getAccount", [f"0x{BOB.address.hex()}"])
                missing = batch.call("nope", [])
            assert len(batch) == 3
            values = [height.result(), account.result()["nonce"]]
            try:
                missing.result()
            except MethodNotFound as exc:
                values.append(exc.code)
            too_big = node.batch()
            for _ in range(LIMITS.max_batch_size + 1):
                too_big.call("ns_chainId")
            try:
                too_big.send()
            except InvalidRequest as exc:
                return values, exc
        raise AssertionError("the oversize batch was accepted")

    values, refused = await in_thread(scenario)
    assert values == [5, 0, -32601]
    assert "exceeds the limit" in refused.message


async def test_wait_for_receipt_sync(served: Served) -> None:
    raw = transfer(ALICE, 5, BOB.address, 1)

    async def mine_later() -> None:
        while not served.node.submitted:
            await trio.sleep(0.01)
        await trio.sleep(0.1)
        served.node.mine(served.node.submitted[0])

    def scenario() -> dict[str, Any]:
        with Client(served.url) as node:
            tx_id = node.send_raw_transaction(raw)
            return node.wait_for_receipt(tx_id, timeout=5, poll_interval=0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mine_later)
        receipt = await in_thread(scenario)
    assert receipt["txId"] == "0x" + crypto.sha256(raw).hex()
    assert receipt["success"] is True

    def never() -> None:
        with Client(served.url) as node:
            node.wait_for_receipt(b"\x00" * 32, timeout=0.1, poll_interval=0.02)

    with pytest.raises(ReceiptTimeout, match=r"no receipt after 0\.1 s"):
        await in_thread(never)


# --- async client --------------------------------------------------------------------------------


async def test_async_client(served: Served) -> None:
    raw = transfer(ALICE, 5, BOB.address, 1)

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(served.url) as node:
            batch = node.batch()
            a = batch.call("ns_chainId")
            b = batch.call("eth_getBalance", [f"0x{BOB.address.hex()}", "latest"])
            c = batch.call("ns_getAccount", [1])
            await batch.send()
            with pytest.raises(RuntimeError, match="already sent"):
                batch.call("ns_chainId")
            try:
                c.result()
            except InvalidParams as exc:
                c_error: BaseException = exc
            async with node.batch() as second:
                d = second.call("ns_blockNumber")
            return {
                "height": await node.block_number(),
                "account": await node.get_account(f"0x{ALICE.address.hex()}"),
                "tx_id": await node.send_raw_transaction(raw),
                "again": await _error_of(node.send_raw_transaction(raw)),
                "batch": [a.result(), b.result(), d.result()],
                "c_error": c_error,
                "receipt": await node.get_receipt(crypto.sha256(raw)),
            }

    r = await in_asyncio(scenario)
    assert r["height"] == 5
    assert r["account"].nonce == 5
    assert r["tx_id"] == crypto.sha256(raw)
    assert isinstance(r["again"], node_errors.AlreadyKnown)
    assert isinstance(r["again"], node_errors.MempoolRejected)
    assert r["batch"] == [CHAIN_ID, hex(5 * NSD // 2), 5]
    assert isinstance(r["c_error"], InvalidParams)
    assert r["receipt"] is None


async def _error_of(awaitable: Any) -> BaseException | None:
    try:
        await awaitable
    except Exception as exc:
        return exc
    return None


async def test_async_wait_for_receipt(served: Served) -> None:
    raw = transfer(ALICE, 5, BOB.address, 1)

    async def mine_later() -> None:
        while not served.node.submitted:
            await trio.sleep(0.01)
        served.node.mine(served.node.submitted[0])

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(served.url) as node:
            tx_id = await node.send_raw_transaction(raw)
            return await node.wait_for_receipt(tx_id, timeout=5, poll_interval=0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mine_later)
        receipt = await in_asyncio(scenario)
    assert receipt["height"] == 5


# --- transport failures --------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_is_transport_error() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/"

    def sync_call() -> None:
        with Client(url, timeout=2) as node:
            node.block_number()

    with pytest.raises(TransportError, match="cannot reach the node"):
        await in_thread(sync_call)

    async def async_call() -> None:
        async with AsyncClient(url, timeout=2) as node:
            await node.status()

    with pytest.raises(TransportError, match="cannot reach the node"):
        await in_asyncio(async_call)


async def test_non_rpc_url_is_transport_error(served: Served) -> None:
    def wrong_path() -> None:
        with Client(served.url + "not-here") as node:
            node.chain_id()

    with pytest.raises(TransportError, match="not a JSON-RPC answer"):
        await in_thread(wrong_path)


async def test_timeout_is_request_timeout(served: Served) -> None:
    served.node.gate = trio.Event()
    raw = transfer(ALICE, 5, BOB.address, 1)

    def slow() -> None:
        with Client(served.url, timeout=0.2) as node:
            node.send_raw_transaction(raw)

    with pytest.raises(RequestTimeout, match=r"within 0\.2 s"):
        await in_thread(slow)
    served.node.gate.set()


async def test_estimate_fee_argument_checks() -> None:
    node = AsyncClient("http://127.0.0.1:1/")
    with pytest.raises(TypeError, match="not both"):
        await node.estimate_fee(b"\x01", kind=1, size=2)
    with pytest.raises(TypeError, match="both kind and size"):
        await node.estimate_fee(kind=1)
    await node.aclose()


# --- error objects -------------------------------------------------------------------------------


def test_error_from_json_families() -> None:
    known = error_from_json({"code": 1204, "message": "m", "data": {"reason": "r"}})
    assert isinstance(known, node_errors.InsufficientFunds)
    assert (known.code, known.message, known.data) == (1204, "m", {"reason": "r"})
    newer = error_from_json({"code": 1299, "message": "a newer tx error"})
    assert isinstance(newer, node_errors.InvalidTransaction)
    assert newer.code == 1299
    busy = error_from_json({"code": 2001, "message": "busy"})
    assert isinstance(busy, ServerBusy)
    assert isinstance(busy, node_errors.NodeUnavailable)
    other = error_from_json({"code": 7777, "message": "x"})
    assert type(other) is ApplicationError
    assert isinstance(other, node_errors.NeuroSeedError)
    server_defined = error_from_json({"code": -32001, "message": "x"})
    assert type(server_defined) is RpcError
    assert isinstance(error_from_json({"code": "x"}), InternalError)
    assert isinstance(error_from_json("nonsense"), InternalError)

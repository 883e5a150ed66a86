"""The Python SDK for a node's JSON-RPC API: ``AsyncClient`` (aiohttp) and its sync twin ``Client``.

::

    from rpc.client import Client

    with Client("http://127.0.0.1:8545/") as node:
        print(node.block_number())
        tx_id = node.send_raw_transaction(signed.encode())
        receipt = node.wait_for_receipt(tx_id, timeout=30)

Errors are typed (``rpc.errors``): ``TransportError`` (and ``RequestTimeout``) when no JSON-RPC
answer came back; ``RpcError`` subclasses for error answers — the standard ones
(``InvalidParams``, ``MethodNotFound``, ...) and, for application codes, an exception that is also
the matching ``node.errors`` class (``except node.errors.NonceTooLow`` works). Results keep the
JSON shapes of ``docs/rpc.md``, except where a small typed value is clearer (``AccountInfo``,
``node.api.StateProof``, ``node.api.NodeStatus``, ids as ``bytes``, amounts as ``int``).

``Client`` runs a private asyncio loop in one background thread and blocks the calling thread on
it: safe from any thread (including inside a trio or asyncio program) and fast enough for a CLI.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar
from urllib.parse import urljoin

import aiohttp

from node.api import NodeStatus, StateProof
from node.types import Address, Amount, Hash32, Height
from rpc.errors import (
    InternalError,
    ReceiptTimeout,
    RequestTimeout,
    RpcError,
    TransportError,
    error_from_json,
)

T = TypeVar("T")
Params = list[Any] | dict[str, Any] | None

DEFAULT_TIMEOUT = 10.0
# Uploads and downloads of artifacts: no total limit (a GiB takes a while), but a read that sees
# nothing for this long fails (the node converts and imports an upload before it answers).
TRANSFER_IDLE_TIMEOUT = 1800.0
TRANSFER_PIECE_BYTES = 1 << 20
Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class AccountInfo:
    address: Address
    nonce: int
    balance: Amount  # base units (1 NSD = 10**18)


# --- conversions between Python values and the wire ------------------------------------------------


def _hex(value: bytes | str, name: str) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, str):
        return value if value.startswith(("0x", "0X")) else "0x" + value
    raise TypeError(f"{name} must be bytes or a hex string, not {type(value).__name__}")


def _unhex(value: Any) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ValueError(f"expected 0x-hex, got {value!r:.80}")
    return bytes.fromhex(value[2:])


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r:.80}")
    return value


def _account(obj: Any) -> AccountInfo:
    return AccountInfo(
        Address(_unhex(obj["address"])), _int(obj["nonce"]), Amount(int(obj["balance"]))
    )


def _proof(obj: Any) -> StateProof:
    value = obj["value"]
    return StateProof(
        key=_unhex(obj["key"]),
        value=None if value is None else _unhex(value),
        height=Height(_int(obj["height"])),
        state_root=Hash32(_unhex(obj["stateRoot"])),
        proof=_unhex(obj["proof"]),
    )


def _status(obj: Any) -> NodeStatus:
    validator = obj["validatorAddress"]
    return NodeStatus(
        chain_id=_int(obj["chainId"]),
        node_version=str(obj["nodeVersion"]),
        head_height=_int(obj["headHeight"]),
        head_hash=Hash32(_unhex(obj["headHash"])),
        head_time_ms=_int(obj["headTime"]),
        validator_address=None if validator is None else Address(_unhex(validator)),
        is_validator=bool(obj["isValidator"]),
        mempool_size=_int(obj["mempoolSize"]),
        mempool_bytes=_int(obj["mempoolBytes"]),
        peers=_int(obj["peers"]),
        syncing=bool(obj["syncing"]),
        finalized_height=_int(obj.get("finalizedHeight", obj["headHeight"])),
        consensus_height=_int(obj.get("consensusHeight", 0)),
        round=_int(obj.get("round", 0)),
        validators=tuple(
            (Address(_unhex(v["address"])), _int(v["power"])) for v in obj.get("validators", ())
        ),
    )


def _convert(method: str, convert: Callable[[Any], T], value: Any) -> T:
    try:
        return convert(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise TransportError(f"malformed result of {method} from the server: {exc}") from exc


def _fee_params(
    tx: bytes | None, kind: int | None, size: int | None, new_accounts: int
) -> list[Any]:
    if tx is not None:
        if kind is not None or size is not None:
            raise TypeError("pass either a signed transaction or kind and size, not both")
        return [_hex(tx, "tx")]
    if kind is None or size is None:
        raise TypeError("estimate_fee needs a signed transaction or both kind and size")
    return [{"kind": kind, "size": size, "newAccounts": new_accounts}]


def _root_ref(root: bytes | str) -> str:
    """A root for the wire: a CID string as is, binary CID bytes as 0x hex."""
    if isinstance(root, bytes | bytearray):
        return "0x" + bytes(root).hex()
    if isinstance(root, str):
        return root
    raise TypeError(f"root must be bytes or a CID string, not {type(root).__name__}")


def _dataset_ref(dataset: bytes | str) -> str:
    return _root_ref(dataset)


def _transfer_timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=None, sock_connect=DEFAULT_TIMEOUT, sock_read=TRANSFER_IDLE_TIMEOUT
    )


def _transfer_answer(url: str, status: int, raw: bytes) -> Any:
    # (status 400 forces the error path: an answer that is not an error object is a transport
    # problem)
    """The JSON of a 200 answer of an artifact endpoint; its typed error otherwise."""
    try:
        answer = json.loads(raw)
    except ValueError:
        raise TransportError(f"HTTP {status} from {url} is not a JSON answer") from None
    if status == 200 and not (isinstance(answer, dict) and "error" in answer):
        return answer
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        raise error_from_json(answer["error"])
    raise TransportError(f"HTTP {status} from {url}")


# --- batches -------------------------------------------------------------------------------------


class BatchCall:
    """One call of a batch; ``result()`` returns its value or raises its error once sent."""

    __slots__ = ("_error", "_result", "_sent", "method", "params")

    def __init__(self, method: str, params: Params) -> None:
        self.method = method
        self.params = params
        self._sent = False
        self._result: Any = None
        self._error: RpcError | None = None

    def result(self) -> Any:
        if not self._sent:
            raise RuntimeError("the batch has not been sent yet")
        if self._error is not None:
            raise self._error
        return self._result

    def _set(self, result: Any, error: RpcError | None) -> None:
        self._sent = True
        self._result = result
        self._error = error


class _BatchBase:
    def __init__(self) -> None:
        self._calls: list[BatchCall] = []

    def call(self, method: str, params: Params = None) -> BatchCall:
        if self._calls and self._calls[0]._sent:
            raise RuntimeError("this batch was already sent")
        item = BatchCall(method, params)
        self._calls.append(item)
        return item

    def __len__(self) -> int:
        return len(self._calls)


class AsyncBatch(_BatchBase):
    """Calls sent together in one JSON-RPC batch: ``b.call(...)`` then ``await b.send()``."""

    def __init__(self, client: AsyncClient) -> None:
        super().__init__()
        self._client = client

    async def send(self) -> list[BatchCall]:
        await self._client._send_batch(self._calls)
        return self._calls

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._calls:
            await self.send()


class Batch(_BatchBase):
    """The sync client's batch: ``b.call(...)`` then ``b.send()`` (or use it as a context manager)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    def send(self) -> list[BatchCall]:
        self._client._run(self._client._async._send_batch(self._calls))
        return self._calls

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._calls:
            self.send()


# --- the async client ----------------------------------------------------------------------------


class AsyncClient:
    """A JSON-RPC client over aiohttp; use ``async with AsyncClient(url) as node: ...``."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), headers=self._headers
            )
        return self._session

    async def _post(self, payload: Any) -> Any:
        """POST one JSON body and return the decoded JSON answer (``None`` for 204)."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            async with self._get_session().post(self.url, data=body) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError as exc:
            raise RequestTimeout(f"no answer from {self.url} within {self.timeout} s") from exc
        except aiohttp.InvalidURL as exc:
            raise TransportError(f"invalid node URL {self.url!r}") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"cannot reach the node at {self.url}: {exc}") from exc
        if status == 204:
            return None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise TransportError(
                f"HTTP {status} from {self.url} is not a JSON-RPC answer (is this a node's RPC URL?)"
            ) from None
        if status != 200 and not (isinstance(answer, dict) and "error" in answer):
            raise TransportError(f"HTTP {status} from {self.url}")
        return answer

    async def call(self, method: str, params: Params = None) -> Any:
        """Call any method; returns its JSON result or raises its typed error."""
        req_id = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            request["params"] = params
        answer = await self._post(request)
        if not isinstance(answer, dict):
            raise TransportError(f"unexpected answer to {method} from {self.url}")
        if "error" in answer:
            raise error_from_json(answer["error"])
        if "result" not in answer:
            raise TransportError(f"answer to {method} from {self.url} has no result")
        return answer["result"]

    def batch(self) -> AsyncBatch:
        return AsyncBatch(self)

    async def _send_batch(self, calls: list[BatchCall]) -> None:
        if not calls:
            raise ValueError("an empty batch cannot be sent")
        if calls[0]._sent:
            raise RuntimeError("this batch was already sent")
        by_id: dict[Any, BatchCall] = {}
        requests = []
        for item in calls:
            req_id = next(self._ids)
            by_id[req_id] = item
            request: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": item.method}
            if item.params is not None:
                request["params"] = item.params
            requests.append(request)
        answer = await self._post(requests)
        if isinstance(answer, dict) and "error" in answer:
            raise error_from_json(answer["error"])  # the batch as a whole was refused
        if not isinstance(answer, list):
            raise TransportError(f"unexpected answer to a batch from {self.url}")
        for response in answer:
            answered = by_id.pop(response.get("id"), None) if isinstance(response, dict) else None
            if answered is None:
                continue
            if "error" in response:
                answered._set(None, error_from_json(response["error"]))
            else:
                answered._set(response.get("result"), None)
        for unanswered in by_id.values():
            unanswered._set(None, InternalError("the server sent no answer for this call"))

    # --- typed methods (mirroring ns_*) ----------------------------------------------------------

    async def chain_id(self) -> int:
        return _convert("ns_chainId", _int, await self.call("ns_chainId"))

    async def block_number(self) -> int:
        return _convert("ns_blockNumber", _int, await self.call("ns_blockNumber"))

    async def get_block(
        self, number: int | str = "latest", *, full_transactions: bool = False
    ) -> dict[str, Any] | None:
        """The block at a height (or ``"latest"``/``"earliest"``); ``None`` if there is none."""
        result = await self.call("ns_getBlockByNumber", [number, full_transactions])
        return result if result is None else dict(result)

    async def get_block_by_hash(
        self, block_hash: bytes | str, *, full_transactions: bool = False
    ) -> dict[str, Any] | None:
        params = [_hex(block_hash, "block_hash"), full_transactions]
        result = await self.call("ns_getBlockByHash", params)
        return result if result is None else dict(result)

    async def get_transaction(self, tx_id: bytes | str) -> dict[str, Any] | None:
        result = await self.call("ns_getTransaction", [_hex(tx_id, "tx_id")])
        return result if result is None else dict(result)

    async def get_receipt(self, tx_id: bytes | str) -> dict[str, Any] | None:
        """The receipt once the transaction is in a block; ``None`` before that."""
        result = await self.call("ns_getReceipt", [_hex(tx_id, "tx_id")])
        return result if result is None else dict(result)

    async def get_account(self, address: bytes | str) -> AccountInfo:
        result = await self.call("ns_getAccount", [_hex(address, "address")])
        return _convert("ns_getAccount", _account, result)

    async def get_proof(self, key: bytes | str, height: int | str = "latest") -> StateProof:
        result = await self.call("ns_getProof", [_hex(key, "key"), height])
        return _convert("ns_getProof", _proof, result)

    async def send_raw_transaction(self, raw: bytes) -> Hash32:
        """Submit an encoded ``SignedTransaction``; returns its id."""
        result = await self.call("ns_sendRawTransaction", [_hex(raw, "raw")])
        return Hash32(_convert("ns_sendRawTransaction", _unhex, result))

    async def estimate_fee(
        self,
        tx: bytes | None = None,
        *,
        kind: int | None = None,
        size: int | None = None,
        new_accounts: int = 0,
    ) -> Amount:
        """The minimum fee in base units, for a signed transaction or for (kind, size)."""
        result = await self.call("ns_estimateFee", _fee_params(tx, kind, size, new_accounts))
        return Amount(_convert("ns_estimateFee", int, result))

    async def status(self) -> NodeStatus:
        return _convert("ns_status", _status, await self.call("ns_status"))

    async def pending_nonce(self, address: bytes | str) -> int:
        result = await self.call("ns_pendingNonce", [_hex(address, "address")])
        return _convert("ns_pendingNonce", _int, result)

    # --- artifacts, datasets, roles, purchases (docs/rpc.md "Artifacts") ----------------------

    async def get_dataset(self, dataset: bytes | str) -> dict[str, Any] | None:
        """A dataset by id (32 bytes / 0x hex) or root CID (string, or binary CID bytes)."""
        result = await self.call("ns_getDataset", [_dataset_ref(dataset)])
        return result if result is None else dict(result)

    async def list_datasets(
        self,
        *,
        owner: bytes | str | None = None,
        priced: bool | None = None,
        composite: bool | None = None,
        text: str | None = None,
        cursor: bytes | str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """``{"datasets": [...], "nextCursor": hex | None}``; pass ``nextCursor`` to go on."""
        f: dict[str, Any] = {}
        if owner is not None:
            f["owner"] = _hex(owner, "owner")
        if priced is not None:
            f["priced"] = priced
        if composite is not None:
            f["composite"] = composite
        if text is not None:
            f["text"] = text
        if cursor is not None:
            f["cursor"] = _hex(cursor, "cursor")
        if limit is not None:
            f["limit"] = limit
        return dict(await self.call("ns_listDatasets", [f]))

    async def get_roles(self, address: bytes | str) -> dict[str, Any]:
        return dict(await self.call("ns_getRoles", [_hex(address, "address")]))

    async def get_purchase(self, purchase_id: bytes | str) -> dict[str, Any] | None:
        result = await self.call("ns_getPurchase", [_hex(purchase_id, "purchase_id")])
        return result if result is None else dict(result)

    # --- the compute market (docs/compute-market.md, docs/rpc.md "Compute") ----------------------

    async def get_task(self, task_id: bytes | str) -> dict[str, Any] | None:
        """A task by id (32 bytes / 0x hex), with this node's ``progress`` when it works on it."""
        result = await self.call("ns_getTask", [_hex(task_id, "task_id")])
        return result if result is None else dict(result)

    async def list_tasks(
        self,
        *,
        requester: bytes | str | None = None,
        provider: bytes | str | None = None,
        state: str | None = None,
        cursor: bytes | str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """``{"tasks": [...], "cursor": hex | None}``; pass ``cursor`` back to go on."""
        f: dict[str, Any] = {}
        if requester is not None:
            f["requester"] = _hex(requester, "requester")
        if provider is not None:
            f["provider"] = _hex(provider, "provider")
        if state is not None:
            f["state"] = state
        if cursor is not None:
            f["cursor"] = _hex(cursor, "cursor")
        if limit is not None:
            f["limit"] = limit
        return dict(await self.call("ns_listTasks", [f]))

    async def get_provider(self, provider: bytes | str) -> dict[str, Any] | None:
        """A compute provider's record (hardware, platform class, price, reputation)."""
        result = await self.call("ns_getProvider", [_hex(provider, "provider")])
        return result if result is None else dict(result)

    async def list_providers(
        self,
        *,
        platform_class: str | None = None,
        cursor: bytes | str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """Registered compute providers in address order (``{providers, cursor}``), optionally
        of one platform class."""
        f: dict[str, Any] = {}
        if platform_class is not None:
            f["platformClass"] = platform_class
        if cursor is not None:
            f["cursor"] = _hex(cursor, "cursor")
        if limit is not None:
            f["limit"] = limit
        return dict(await self.call("ns_listProviders", [f]))

    async def compute_status(self) -> dict[str, Any]:
        """The local node's compute agent: settings, offer on chain, tasks (local only)."""
        return dict(await self.call("ns_computeStatus", []))

    async def compute_offer(
        self,
        *,
        price_per_device_second: int | None = None,
        max_concurrent: int | None = None,
    ) -> Hash32:
        """Make the local node send its ``ProviderRegister`` (local only); its transaction id."""
        offer: dict[str, Any] = {}
        if price_per_device_second is not None:
            offer["pricePerDeviceSecond"] = hex(price_per_device_second)  # a 0x quantity
        if max_concurrent is not None:
            offer["maxConcurrent"] = max_concurrent
        result = await self.call("ns_computeOffer", [offer])
        return Hash32(_unhex(result["txId"]))

    # --- models and model search (docs/models.md, docs/rpc.md "Models") ------------------------

    async def get_model(self, model: bytes | str) -> dict[str, Any] | None:
        """A model by id (32 bytes / 0x hex) or root CID (string, or binary CID bytes)."""
        result = await self.call("ns_getModel", [_root_ref(model)])
        return result if result is None else dict(result)

    async def list_models(
        self,
        *,
        owner: bytes | str | None = None,
        signature: bytes | str | None = None,
        family: str | None = None,
        cursor: bytes | str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """``{"models": [...], "nextCursor": hex | None}``; pass ``nextCursor`` to go on."""
        f: dict[str, Any] = {}
        if owner is not None:
            f["owner"] = _hex(owner, "owner")
        if signature is not None:
            f["signature"] = _hex(signature, "signature")
        if family is not None:
            f["family"] = family
        if cursor is not None:
            f["cursor"] = _hex(cursor, "cursor")
        if limit is not None:
            f["limit"] = limit
        return dict(await self.call("ns_listModels", [f]))

    async def get_lineage(
        self,
        model: bytes | str,
        *,
        direction: str = "ancestors",
        depth: int | None = None,
        proofs: bool = False,
    ) -> dict[str, Any]:
        """Ancestors or descendants of a model, with each edge's state proof when ``proofs``."""
        q: dict[str, Any] = {"model": _root_ref(model), "direction": direction, "proofs": proofs}
        if depth is not None:
            q["depth"] = depth
        return dict(await self.call("ns_getLineage", [q]))

    async def search_models(
        self,
        *,
        signature: bytes | str | None = None,
        mergeable_with: bytes | str | None = None,
        text: str | None = None,
        family: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """``ns_searchModels``: exactly one of ``signature``, ``mergeable_with`` (a model id or
        root CID) or ``text``; ``{"models": [...], "nextCursor", "total", "indexedHeight"}``."""
        q: dict[str, Any] = {}
        if signature is not None:
            q["signature"] = _hex(signature, "signature")
        if mergeable_with is not None:
            q["mergeableWith"] = _root_ref(mergeable_with)
        if text is not None:
            q["text"] = text
        if family is not None:
            q["family"] = family
        if limit is not None:
            q["limit"] = limit
        if cursor is not None:
            q["cursor"] = cursor
        return dict(await self.call("ns_searchModels", [q]))

    async def get_artifact(self, root: bytes | str) -> dict[str, Any]:
        """The node's local copy of an artifact: size, blocks present/missing, providers."""
        return dict(await self.call("ns_getArtifact", [_root_ref(root)]))

    async def fetch_artifact(
        self,
        root: bytes | str,
        *,
        leaves: list[int] | None = None,
        access: bytes | None = None,
    ) -> dict[str, Any]:
        """Start (or join) a download into the node's blob store; returns the job."""
        request: dict[str, Any] = {"root": _root_ref(root)}
        if leaves is not None:
            request["leaves"] = list(leaves)
        if access is not None:
            request["access"] = _hex(access, "access")
        return dict(await self.call("ns_fetchArtifact", [request]))

    async def fetch_status(self, job: str) -> dict[str, Any]:
        return dict(await self.call("ns_fetchStatus", [job]))

    async def node_info(self) -> dict[str, Any]:
        return dict(await self.call("ns_nodeInfo"))

    def _artifacts_url(self, suffix: str = "") -> str:
        return urljoin(self.url, "artifacts" + suffix)

    async def upload_artifact(
        self, path: str | os.PathLike[str], *, price: int = 0, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Stream a safetensors file to the node (``POST /artifacts``); ``price`` > 0 makes the
        node encrypt it with a fresh content key. Returns the registration material."""
        size = Path(path).stat().st_size
        fh = open(path, "rb")  # noqa: SIM115 - closed by the body generator below

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            try:
                while piece := fh.read(TRANSFER_PIECE_BYTES):
                    sent += len(piece)
                    yield piece
                    if progress is not None:
                        progress(sent)
            finally:
                fh.close()

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        url = self._artifacts_url(f"?price={int(price)}")
        try:
            async with (
                aiohttp.ClientSession(timeout=_transfer_timeout()) as session,
                # Expect: 100-continue: a refusal (size, remote caller) comes before the body.
                session.post(url, data=body(), headers=headers, expect100=True) as response,
            ):
                raw = await response.read()
                status = response.status
        except TimeoutError as exc:
            raise RequestTimeout(f"the upload to {url} timed out") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"upload to {url} failed: {exc}") from exc
        finally:
            fh.close()
        return dict(_transfer_answer(url, status, raw))

    async def download_artifact(
        self,
        root: bytes | str,
        dst: BinaryIO,
        *,
        start: int = 0,
        end: int | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Stream bytes ``[start, end)`` of a stored artifact (``GET /artifacts/<cid>``, HTTP
        Range) into ``dst``; returns the bytes written. The node must hold those blocks."""
        url = self._artifacts_url("/" + _root_ref(root))
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        written = 0
        try:
            async with (
                aiohttp.ClientSession(timeout=_transfer_timeout()) as session,
                session.get(url, headers=headers) as response,
            ):
                if response.status not in (200, 206):
                    _transfer_answer(url, 400, await response.read())
                async for piece in response.content.iter_chunked(TRANSFER_PIECE_BYTES):
                    dst.write(piece)
                    written += len(piece)
                    if progress is not None:
                        progress(written)
        except TimeoutError as exc:
            raise RequestTimeout(f"the download from {url} timed out") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"download from {url} failed: {exc}") from exc
        return written

    async def get_block_bytes(self, cid: bytes | str) -> bytes:
        """One stored block's raw bytes (``GET /blocks/<cid>``): a raw leaf or a dag-pb node.
        The caller checks it against its CID (``node.storage.unixfs.verify_block``)."""
        url = urljoin(self.url, "blocks/" + _root_ref(cid))
        try:
            async with (
                aiohttp.ClientSession(timeout=_transfer_timeout()) as session,
                session.get(url) as response,
            ):
                raw = await response.read()
                if response.status != 200:
                    _transfer_answer(url, 400, raw)
                return raw
        except TimeoutError as exc:
            raise RequestTimeout(f"the block request to {url} timed out") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"block request to {url} failed: {exc}") from exc

    async def wait_for_receipt(
        self, tx_id: bytes | str, timeout: float = 30.0, *, poll_interval: float = 0.25
    ) -> dict[str, Any]:
        """Poll until the transaction has a receipt; ``ReceiptTimeout`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            receipt = await self.get_receipt(tx_id)
            if receipt is not None:
                return receipt
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReceiptTimeout(
                    f"transaction {_hex(tx_id, 'tx_id')} has no receipt after {timeout} s"
                )
            await asyncio.sleep(min(poll_interval, left))


# --- the sync client -------------------------------------------------------------------------------


class _LoopThread:
    """A private asyncio loop running in one daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="rpc-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Client:
    """The blocking client: the same methods as ``AsyncClient``, usable from any thread."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._async = AsyncClient(url, timeout=timeout, headers=headers)
        self._lock = threading.Lock()
        self._loop: _LoopThread | None = None

    @property
    def url(self) -> str:
        return self._async.url

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.run(self._async.aclose())
            finally:
                loop.stop()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread()
            loop = self._loop
        return loop.run(coro)

    def call(self, method: str, params: Params = None) -> Any:
        return self._run(self._async.call(method, params))

    def batch(self) -> Batch:
        return Batch(self)

    def chain_id(self) -> int:
        return self._run(self._async.chain_id())

    def block_number(self) -> int:
        return self._run(self._async.block_number())

    def get_block(
        self, number: int | str = "latest", *, full_transactions: bool = False
    ) -> dict[str, Any] | None:
        return self._run(self._async.get_block(number, full_transactions=full_transactions))

    def get_block_by_hash(
        self, block_hash: bytes | str, *, full_transactions: bool = False
    ) -> dict[str, Any] | None:
        return self._run(
            self._async.get_block_by_hash(block_hash, full_transactions=full_transactions)
        )

    def get_transaction(self, tx_id: bytes | str) -> dict[str, Any] | None:
        return self._run(self._async.get_transaction(tx_id))

    def get_receipt(self, tx_id: bytes | str) -> dict[str, Any] | None:
        return self._run(self._async.get_receipt(tx_id))

    def get_account(self, address: bytes | str) -> AccountInfo:
        return self._run(self._async.get_account(address))

    def get_proof(self, key: bytes | str, height: int | str = "latest") -> StateProof:
        return self._run(self._async.get_proof(key, height))

    def send_raw_transaction(self, raw: bytes) -> Hash32:
        return self._run(self._async.send_raw_transaction(raw))

    def estimate_fee(
        self,
        tx: bytes | None = None,
        *,
        kind: int | None = None,
        size: int | None = None,
        new_accounts: int = 0,
    ) -> Amount:
        return self._run(
            self._async.estimate_fee(tx, kind=kind, size=size, new_accounts=new_accounts)
        )

    def status(self) -> NodeStatus:
        return self._run(self._async.status())

    def pending_nonce(self, address: bytes | str) -> int:
        return self._run(self._async.pending_nonce(address))

    def wait_for_receipt(
        self, tx_id: bytes | str, timeout: float = 30.0, *, poll_interval: float = 0.25
    ) -> dict[str, Any]:
        return self._run(self._async.wait_for_receipt(tx_id, timeout, poll_interval=poll_interval))

    def get_dataset(self, dataset: bytes | str) -> dict[str, Any] | None:
        return self._run(self._async.get_dataset(dataset))

    def list_datasets(self, **filters: Any) -> dict[str, Any]:
        return self._run(self._async.list_datasets(**filters))

    def get_roles(self, address: bytes | str) -> dict[str, Any]:
        return self._run(self._async.get_roles(address))

    def get_purchase(self, purchase_id: bytes | str) -> dict[str, Any] | None:
        return self._run(self._async.get_purchase(purchase_id))

    def get_task(self, task_id: bytes | str) -> dict[str, Any] | None:
        return self._run(self._async.get_task(task_id))

    def list_tasks(self, **filters: Any) -> dict[str, Any]:
        return self._run(self._async.list_tasks(**filters))

    def get_provider(self, provider: bytes | str) -> dict[str, Any] | None:
        return self._run(self._async.get_provider(provider))

    def list_providers(self, **filters: Any) -> dict[str, Any]:
        return self._run(self._async.list_providers(**filters))

    def compute_status(self) -> dict[str, Any]:
        return self._run(self._async.compute_status())

    def compute_offer(
        self, *, price_per_device_second: int | None = None, max_concurrent: int | None = None
    ) -> Hash32:
        return self._run(
            self._async.compute_offer(
                price_per_device_second=price_per_device_second, max_concurrent=max_concurrent
            )
        )

    def get_model(self, model: bytes | str) -> dict[str, Any] | None:
        return self._run(self._async.get_model(model))

    def list_models(self, **filters: Any) -> dict[str, Any]:
        return self._run(self._async.list_models(**filters))

    def get_lineage(
        self,
        model: bytes | str,
        *,
        direction: str = "ancestors",
        depth: int | None = None,
        proofs: bool = False,
    ) -> dict[str, Any]:
        return self._run(
            self._async.get_lineage(model, direction=direction, depth=depth, proofs=proofs)
        )

    def search_models(self, **query: Any) -> dict[str, Any]:
        return self._run(self._async.search_models(**query))

    def get_artifact(self, root: bytes | str) -> dict[str, Any]:
        return self._run(self._async.get_artifact(root))

    def fetch_artifact(
        self, root: bytes | str, *, leaves: list[int] | None = None, access: bytes | None = None
    ) -> dict[str, Any]:
        return self._run(self._async.fetch_artifact(root, leaves=leaves, access=access))

    def fetch_status(self, job: str) -> dict[str, Any]:
        return self._run(self._async.fetch_status(job))

    def node_info(self) -> dict[str, Any]:
        return self._run(self._async.node_info())

    def upload_artifact(
        self, path: str | os.PathLike[str], *, price: int = 0, progress: Progress | None = None
    ) -> dict[str, Any]:
        return self._run(self._async.upload_artifact(path, price=price, progress=progress))

    def get_block_bytes(self, cid: bytes | str) -> bytes:
        return self._run(self._async.get_block_bytes(cid))

    def download_artifact(
        self,
        root: bytes | str,
        dst: BinaryIO,
        *,
        start: int = 0,
        end: int | None = None,
        progress: Progress | None = None,
    ) -> int:
        return self._run(
            self._async.download_artifact(root, dst, start=start, end=end, progress=progress)
        )

"""Fixtures for the RPC tests: a real ``RpcServer`` on 127.0.0.1 over a ``FakeNode``, and raw HTTP
helpers (stdlib ``http.client`` run in a worker thread, so the trio loop stays free to serve the
bridged calls)."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import trio

from rpc.server import RpcLimits, RpcServer
from tests.rpc.fakes import FakeNode

T = TypeVar("T")

LIMITS = RpcLimits(max_body_bytes=64 * 1024, max_batch_size=10, max_in_flight=4)


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    url: str,
    body: bytes | Iterable[bytes] | None = None,
    *,
    method: str = "POST",
    content_type: str | None = "application/json",
    chunked: bool = False,
) -> HttpAnswer:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    headers = {} if content_type is None else {"Content-Type": content_type}
    try:
        conn.request(method, parts.path or "/", body=body, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        return HttpAnswer(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


async def post(url: str, payload: Any, **kwargs: Any) -> HttpAnswer:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return await trio.to_thread.run_sync(lambda: http_request(url, body, **kwargs))


async def call(url: str, method: str, params: Any = None, req_id: Any = 1) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        request["params"] = params
    answer = await post(url, request)
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"].startswith("application/json")
    out: dict[str, Any] = answer.json()
    return out


async def in_asyncio(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` in a fresh asyncio loop in a worker thread, as the RPC thread does."""

    def run() -> T:
        async def wrapper() -> T:
            return await main()

        return asyncio.run(wrapper())

    return await trio.to_thread.run_sync(run)


@dataclass
class Served:
    url: str
    node: FakeNode
    server: RpcServer
    cancel_scope: trio.CancelScope
    stopped: trio.Event


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[Served]:
    node = FakeNode()
    server = RpcServer(node, "127.0.0.1", 0, LIMITS)
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await server.serve(task_status=task_status)
        finally:
            stopped.set()

    url = await nursery.start(run)
    yield Served(url, node, server, scope, stopped)
    scope.cancel()

"""The JSON-RPC 2.0 HTTP server: aiohttp in a dedicated thread with its own asyncio loop.

aiohttp is asyncio-only and must not run inside trio's loop (DESIGN §1). ``RpcServer.serve`` is a
trio task for the node's nursery: it opens a nursery for bridged calls, starts the server thread,
reports the bound URL through ``task_status``, and on cancellation closes the bridge, stops the
aiohttp loop and joins the thread in a worker thread (trio is never blocked).

Protocol (``docs/rpc.md``): ``POST /`` with ``Content-Type: application/json``; single requests
and batches; notifications (no ``id``) get no response entry (a request of notifications only is
answered ``204 No Content``); standard error codes plus the application codes of ``rpc.errors``.
``GET /`` returns a small JSON description. Read methods run in this thread on the node's read
view; writes cross ``rpc.bridge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Final

import trio
from aiohttp import web

from node.api import NodeAPI
from node.errors import ConfigError, NeuroSeedError
from rpc.bridge import TrioBridge
from rpc.errors import (
    PRIVATE_DETAIL_ERRORS,
    InternalError,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    RpcError,
    application_error_json,
)
from rpc.methods import Context, MethodTable, default_methods

log = logging.getLogger("rpc.server")

JSON_CONTENT_TYPE: Final = "application/json"
_ABSENT: Final = object()


@dataclass(frozen=True, slots=True)
class RpcLimits:
    """Bounds on what one client can make the server do."""

    max_body_bytes: int = 1 << 20  # larger bodies: HTTP 413 with a -32600 error
    max_batch_size: int = 100  # requests in one batch
    max_in_flight: int = 1024  # calls crossing into the node at once (ServerBusy beyond)
    shutdown_timeout_s: float = 2.0  # grace for open requests when the server stops
    backlog: int = 1024  # listen queue

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024 or self.max_batch_size < 1 or self.max_in_flight < 1:
            raise ConfigError("RPC limits must be positive (max_body_bytes at least 1024)")


# --- JSON-RPC processing (runs on the server thread's asyncio loop) -------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads/dumps with non-default options build a new decoder/encoder per call.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _is_valid_id(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return True
    return isinstance(value, int | float) and not isinstance(value, bool)


def _error_response(req_id: Any, error: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": error}


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


class JsonRpcProcessor:
    """Decodes a request body, runs each call and encodes the answer (transport-independent)."""

    def __init__(self, methods: MethodTable, context: Context, limits: RpcLimits) -> None:
        self._methods = methods
        self._context = context
        self._limits = limits

    async def process(self, body: bytes) -> bytes | None:
        """The response body for a request body, or ``None`` when nothing is to be returned."""
        try:
            payload = _DECODER.decode(body.decode())  # RFC 8259: JSON on the wire is UTF-8
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _dumps(_error_response(None, ParseError("parse error: invalid JSON").to_json()))
        if not isinstance(payload, list):
            response = await self._call(payload)
            return None if response is None else self._encode(response)
        if not payload:
            return _dumps(_error_response(None, InvalidRequest("empty batch").to_json()))
        if len(payload) > self._limits.max_batch_size:
            error = InvalidRequest(
                f"batch of {len(payload)} requests exceeds the limit of "
                f"{self._limits.max_batch_size}",
                {"limit": self._limits.max_batch_size},
            )
            return _dumps(_error_response(None, error.to_json()))
        if any(self._crosses_bridge(item) for item in payload):
            responses = await asyncio.gather(*(self._call(item) for item in payload))
        else:
            responses = [await self._call(item) for item in payload]
        parts = [self._encode(r) for r in responses if r is not None]
        return b"[" + b",".join(parts) + b"]" if parts else None

    def _crosses_bridge(self, item: Any) -> bool:
        if not isinstance(item, dict) or not isinstance(item.get("method"), str):
            return False
        method = self._methods.get(item["method"])
        return method is not None and method.is_async

    def _encode(self, response: dict[str, Any]) -> bytes:
        try:
            return _dumps(response)
        except (TypeError, ValueError):
            log.exception("result of an RPC call is not JSON-serializable")
            return _dumps(_error_response(response.get("id"), InternalError().to_json()))

    async def _call(self, item: Any) -> dict[str, Any] | None:
        """Run one request object; ``None`` for a (valid) notification."""
        if not isinstance(item, dict):
            return _error_response(
                None, InvalidRequest("a request must be a JSON object").to_json()
            )
        req_id = item.get("id", _ABSENT)
        notification = req_id is _ABSENT
        if not notification and not _is_valid_id(req_id):
            error = InvalidRequest('"id" must be a string, a number or null')
            return _error_response(None, error.to_json())
        reply_id = None if notification else req_id
        if item.get("jsonrpc") != "2.0":
            error = InvalidRequest('"jsonrpc" must be exactly "2.0"')
            return _error_response(reply_id, error.to_json())
        name = item.get("method")
        if not isinstance(name, str):
            return _error_response(reply_id, InvalidRequest('"method" must be a string').to_json())
        params = item.get("params")
        if params is not None and not isinstance(params, list | dict):
            error = InvalidRequest('"params" must be an array or an object')
            return _error_response(reply_id, error.to_json())

        method = self._methods.get(name)
        try:
            if method is None:
                raise MethodNotFound(f"method {name[:100]!r} does not exist")
            if method.is_async:
                result = await method.handler(self._context, params)
            else:
                result = method.handler(self._context, params)
        except RpcError as exc:
            error_obj = exc.to_json()
        except NeuroSeedError as exc:
            if isinstance(exc, PRIVATE_DETAIL_ERRORS):  # the client sees only the reason
                log.warning("RPC %s failed: %s: %s", name, type(exc).__name__, exc.message)
            error_obj = application_error_json(exc)
        except Exception:
            log.exception("RPC %s raised an unexpected error", name)
            error_obj = InternalError().to_json()
        else:
            return None if notification else {"jsonrpc": "2.0", "id": req_id, "result": result}
        return None if notification else _error_response(req_id, error_obj)


# --- the aiohttp app -----------------------------------------------------------------------------


def _http_error(status: int, error: RpcError) -> web.Response:
    return web.Response(
        status=status,
        body=_dumps(_error_response(None, error.to_json())),
        content_type=JSON_CONTENT_TYPE,
    )


def build_app(
    processor: JsonRpcProcessor, methods: MethodTable, limits: RpcLimits
) -> web.Application:
    """The aiohttp application: ``POST /`` JSON-RPC, ``GET /`` a description."""
    info = _dumps(
        {
            "service": "neuroseed-rpc",
            "jsonrpc": "2.0",
            "usage": "POST JSON-RPC 2.0 requests here with Content-Type: application/json",
            "maxBodyBytes": limits.max_body_bytes,
            "maxBatchSize": limits.max_batch_size,
            "methods": methods.names(),
        }
    )

    async def on_post(request: web.Request) -> web.StreamResponse:
        if request.content_type != JSON_CONTENT_TYPE:
            return _http_error(415, InvalidRequest("Content-Type must be application/json"))
        too_large = InvalidRequest(
            f"request body exceeds the limit of {limits.max_body_bytes} bytes",
            {"limit": limits.max_body_bytes},
        )
        length = request.content_length
        if length is not None and length > limits.max_body_bytes:
            return _http_error(413, too_large)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _http_error(413, too_large)
        response = await processor.process(body)
        if response is None:
            return web.Response(status=204)
        return web.Response(body=response, content_type=JSON_CONTENT_TYPE)

    async def on_get(request: web.Request) -> web.StreamResponse:
        return web.Response(body=info, content_type=JSON_CONTENT_TYPE)

    app = web.Application(client_max_size=limits.max_body_bytes)
    app.router.add_post("/", on_post)
    app.router.add_get("/", on_get)
    return app


class _ServerThread:
    """The OS thread that owns the asyncio loop and the aiohttp runner."""

    def __init__(self, app: web.Application, host: str, port: int, limits: RpcLimits) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._limits = limits
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.address: tuple[str, int] | None = None
        self._thread = threading.Thread(target=self._main, name="rpc-server", daemon=True)

    def start(self) -> tuple[str, int]:
        """Start the thread and block until the socket is bound (call via ``trio.to_thread``)."""
        self._thread.start()
        self._ready.wait()
        if self.address is None:
            self._thread.join()
            error = self._error
            if isinstance(error, OSError) and error.errno is not None:
                reason = os.strerror(error.errno).lower()
            else:
                reason = str(error)
            raise ConfigError(f"cannot serve JSON-RPC on {self._host}:{self._port}: {reason}")
        return self.address

    def stop(self) -> None:
        """Ask the loop to shut the server down and wait for the thread (blocking)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)
        self._thread.join()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            log.exception("the RPC server thread failed")
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._limits.shutdown_timeout_s,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, backlog=self._limits.backlog)
            try:
                await site.start()
            except OSError as exc:
                self._error = exc
                return
            host, port = runner.addresses[0][:2]
            self.address = (host, port)
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()


class RpcServer:
    """The node's JSON-RPC server; run ``serve`` in the node's trio nursery.

    ``await nursery.start(server.serve)`` returns the URL (e.g. ``"http://127.0.0.1:8545/"``).
    Cancelling the task stops the server and waits for its thread.
    """

    def __init__(
        self,
        node: NodeAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: RpcLimits | None = None,
        *,
        methods: MethodTable | None = None,
    ) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.limits = limits if limits is not None else RpcLimits()
        self.methods = methods if methods is not None else default_methods()
        self.url: str | None = None
        self._running = False

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        if self._running:
            raise RuntimeError("this RpcServer is already serving")
        self._running = True
        startup_error: ConfigError | None = None
        try:
            # Bridged calls run in this nursery, inside the node's: they end with the server.
            async with trio.open_nursery() as calls:
                bridge = TrioBridge.from_current(calls, max_in_flight=self.limits.max_in_flight)
                processor = JsonRpcProcessor(self.methods, Context(self.node, bridge), self.limits)
                thread = _ServerThread(
                    build_app(processor, self.methods, self.limits),
                    self.host,
                    self.port,
                    self.limits,
                )
                try:
                    host, port = await trio.to_thread.run_sync(thread.start)
                except ConfigError as exc:
                    startup_error = exc  # raised below, outside the nursery's exception group
                else:
                    try:
                        self.url = f"http://{_url_host(host)}:{port}/"
                        log.info("JSON-RPC listening on %s", self.url)
                        task_status.started(self.url)
                        await trio.sleep_forever()
                    finally:
                        bridge.close()
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(thread.stop)
                        calls.cancel_scope.cancel()
                        self.url = None
        finally:
            self._running = False
        if startup_error is not None:
            raise startup_error


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

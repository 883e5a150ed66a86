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

Artifacts (``docs/rpc.md`` "Artifact endpoints"), served to callers on this machine only unless
``ArtifactHttpSettings.allow_remote``: ``POST /artifacts[?price=N]`` streams a safetensors file
into a temp file (at most ``max_upload_bytes``: 413 beyond), then the node converts it to format
v1, encrypts it when ``price`` > 0, imports and pins it, and answers the registration material as
JSON; ``GET /artifacts/<cid>`` streams the stored bytes, with HTTP ``Range`` support. Errors are
JSON ``{"error": {code, message, data}}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

import trio
from aiohttp import HttpVersion11, web

from node.api import NodeAPI
from node.artifact_service import (
    ArtifactsDisabled,
    LocalCallersOnly,
    RangeNotSatisfiable,
    UnknownArtifact,
    UploadFailed,
    UploadTooLarge,
)
from node.errors import ConfigError, DecodeError, NeuroSeedError, NotFound
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
class ArtifactHttpSettings:
    """The artifact endpoints: upload size limit and whether remote callers are served."""

    max_upload_bytes: int = 4 << 30
    allow_remote: bool = False  # also opens the local-only JSON-RPC methods to remote callers

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ConfigError("the upload limit must be positive")


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

    async def process(self, body: bytes, *, local: bool = True) -> bytes | None:
        """The response body for a request body, or ``None`` when nothing is to be returned.

        ``local``: the caller may use local-only methods (see ``rpc.methods``)."""
        context = (
            self._context
            if local == self._context.local
            else dataclasses.replace(self._context, local=local)
        )
        try:
            payload = _DECODER.decode(body.decode())  # RFC 8259: JSON on the wire is UTF-8
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _dumps(_error_response(None, ParseError("parse error: invalid JSON").to_json()))
        if not isinstance(payload, list):
            response = await self._call(payload, context)
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
            responses = await asyncio.gather(*(self._call(item, context) for item in payload))
        else:
            responses = [await self._call(item, context) for item in payload]
        parts = [self._encode(r) for r in responses if r is not None]
        return b"[" + b",".join(parts) + b"]" if parts else None

    @property
    def context(self) -> Context:
        return self._context

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

    async def _call(self, item: Any, context: Context) -> dict[str, Any] | None:
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
            if method.local_only and not context.local:
                raise LocalCallersOnly(
                    f"{name} is served only to callers on the node's machine "
                    "(artifacts.upload_remote opens it)"
                )
            if method.is_async:
                result = await method.handler(context, params)
            else:
                result = method.handler(context, params)
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
    processor: JsonRpcProcessor,
    methods: MethodTable,
    limits: RpcLimits,
    artifacts: ArtifactHttpSettings | None = None,
) -> web.Application:
    """The aiohttp application: ``POST /`` JSON-RPC, ``GET /`` a description, and the artifact
    endpoints (``POST /artifacts``, ``GET /artifacts/<cid>``) unless ``artifacts`` is None."""
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
    allow_remote = artifacts is not None and artifacts.allow_remote

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
        local = allow_remote or is_loopback_caller(request)
        response = await processor.process(body, local=local)
        if response is None:
            return web.Response(status=204)
        return web.Response(body=response, content_type=JSON_CONTENT_TYPE)

    async def on_get(request: web.Request) -> web.StreamResponse:
        return web.Response(body=info, content_type=JSON_CONTENT_TYPE)

    app = web.Application(client_max_size=limits.max_body_bytes)
    app.router.add_post("/", on_post)
    app.router.add_get("/", on_get)
    if artifacts is not None:
        endpoints = _ArtifactEndpoints(processor.context, artifacts)
        app.router.add_post("/artifacts", endpoints.upload, expect_handler=endpoints.expect)
        app.router.add_get("/artifacts/{cid}", endpoints.download)
        app.router.add_get("/blocks/{cid}", endpoints.block)
    return app


def is_loopback_caller(request: web.Request) -> bool:
    """True when the HTTP peer is on this machine (a loopback address)."""
    remote = request.remote
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


# --- artifact endpoints ------------------------------------------------------------------------

UPLOAD_PIECE_BYTES = 1 << 20
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def _error_body(status: int, exc: NeuroSeedError | RpcError) -> web.Response:
    error = exc.to_json() if isinstance(exc, RpcError) else application_error_json(exc)
    return web.Response(
        status=status, body=_dumps({"error": error}), content_type=JSON_CONTENT_TYPE
    )


def _status_of(exc: NeuroSeedError) -> int:
    """The HTTP status for a node error on an artifact endpoint."""
    if isinstance(exc, UploadTooLarge):
        return 413
    if isinstance(exc, LocalCallersOnly):
        return 403
    if isinstance(exc, ArtifactsDisabled):
        return 503
    if isinstance(exc, RangeNotSatisfiable):
        return 416
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, DecodeError | UploadFailed):
        return 400
    if isinstance(exc, PRIVATE_DETAIL_ERRORS):
        return 507 if "quota" in exc.reason else 500
    return 400


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` (one range; ``a-``, ``-n`` too) as ``[start, end)``; None when the
    header is absent; ``RangeNotSatisfiable`` for anything else."""
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(f"unsupported Range {header[:60]!r}: use one bytes=a-b range")
    first, last = m.group(1), m.group(2)
    if not first:  # the last n bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable("an empty suffix range")
        return max(0, size - n), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise RangeNotSatisfiable(f"bytes {header[6:60]} are outside the {size}-byte artifact")
    return start, end


class _ResponseWriter:
    """A file-like ``write`` for a worker thread that streams into an aiohttp response on the
    server loop (backpressure: each write waits until the loop has sent it)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, request: web.Request, response: web.StreamResponse
    ) -> None:
        self._loop = loop
        self._request = request
        self._response = response
        self.prepared = False

    async def _write(self, data: bytes) -> None:
        if not self.prepared:
            await self._response.prepare(self._request)
            self.prepared = True
        await self._response.write(data)

    def write(self, data: bytes) -> int:
        asyncio.run_coroutine_threadsafe(self._write(bytes(data)), self._loop).result()
        return len(data)


class _ArtifactEndpoints:
    """``POST /artifacts`` and ``GET /artifacts/<cid>`` (run on the server thread's loop)."""

    def __init__(self, context: Context, settings: ArtifactHttpSettings) -> None:
        self._context = context
        self._settings = settings

    def _service(self, request: web.Request) -> Any:
        if not (self._settings.allow_remote or is_loopback_caller(request)):
            raise LocalCallersOnly(
                "the artifact endpoints are served only to callers on the node's machine "
                "(set artifacts.upload_remote = true to open them)"
            )
        service = getattr(self._context.node, "artifacts", None)
        if service is None:
            raise ArtifactsDisabled("this node has no artifact service")
        return service

    def _too_large(self) -> UploadTooLarge:
        limit = self._settings.max_upload_bytes
        return UploadTooLarge(
            f"the upload exceeds this node's limit of {limit} bytes (artifacts.upload_max_bytes)",
            data={"limit": limit},
        )

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The answer refusing an upload before its body is read, or None to go on."""
        try:
            self._service(request)
            _parse_price_flag(request.query.get("price", "0"))
        except NeuroSeedError as exc:
            return _error_body(_status_of(exc), exc)
        except RpcError as exc:
            return _error_body(400, exc)
        length = request.content_length
        if length is not None and length > self._settings.max_upload_bytes:
            return _error_body(413, self._too_large())
        return None

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse (413, 403, ...) before the client sends the body."""
        refusal = self._refusal(request)
        if refusal is not None:
            refusal.force_close()
            return refusal
        if request.version == HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    async def upload(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            refusal.force_close()
            return refusal
        service = self._service(request)
        encrypted = _parse_price_flag(request.query.get("price", "0"))
        limit = self._settings.max_upload_bytes
        too_large = self._too_large()
        loop = asyncio.get_running_loop()
        path = service.new_upload_path()
        try:
            received = await _receive(request, path, limit, loop)
        except UploadTooLarge:
            await _remove(loop, path)
            return _error_body(413, too_large)
        except (OSError, asyncio.CancelledError, ConnectionError) as exc:
            await _remove(loop, path)
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.info("upload interrupted: %s", exc)
            return _error_body(400, UploadFailed("the upload was interrupted"))
        except Exception as exc:
            await _remove(loop, path)
            log.info("upload failed while receiving: %s", exc)
            return _error_body(400, UploadFailed("the upload was interrupted"))
        if received == 0:
            await _remove(loop, path)
            return _error_body(400, UploadFailed("the upload is empty"))
        try:
            result = await self._context.bridge.call(
                functools.partial(service.import_upload, path, encrypted=encrypted)
            )
        except NeuroSeedError as exc:
            await _remove(loop, path)
            if isinstance(exc, PRIVATE_DETAIL_ERRORS):
                log.warning("upload failed: %s: %s", type(exc).__name__, exc.message)
            return _error_body(_status_of(exc), exc)
        from rpc.methods.artifacts import upload_to_json

        return web.Response(body=_dumps(upload_to_json(result)), content_type=JSON_CONTENT_TYPE)

    async def block(self, request: web.Request) -> web.Response:
        """``GET /blocks/<cid>``: one stored block's raw bytes (a raw leaf or a dag-pb node), for
        clients that must prove something about a block (disputes) or walk a DAG themselves."""
        from rpc.methods.artifacts import parse_root

        loop = asyncio.get_running_loop()
        try:
            service = self._service(request)
            cid = parse_root(request.match_info["cid"], "cid")
            data = await loop.run_in_executor(None, service.store.get, cid)
            if data is None:
                raise UnknownArtifact(
                    "this node does not store that block; fetch its artifact first "
                    "(ns_fetchArtifact)"
                )
        except NeuroSeedError as exc:
            return _error_body(_status_of(exc), exc)
        except RpcError as exc:
            return _error_body(400, exc)
        return web.Response(body=data, content_type="application/octet-stream")

    async def download(self, request: web.Request) -> web.StreamResponse:
        from node.storage.importer import export_file, file_size
        from rpc.methods.artifacts import parse_root

        loop = asyncio.get_running_loop()
        try:
            service = self._service(request)
            root = parse_root(request.match_info["cid"], "cid")
            store = service.store
            if not await loop.run_in_executor(None, store.has, root):
                raise UnknownArtifact(
                    "this node does not store that artifact; fetch it first (ns_fetchArtifact)"
                )
            size = await loop.run_in_executor(None, file_size, store, root)
            span = parse_range(request.headers.get("Range"), size)
        except RangeNotSatisfiable as exc:
            refused = _error_body(416, exc)
            refused.headers["Content-Range"] = f"bytes */{size}"
            return refused
        except NeuroSeedError as exc:
            return _error_body(_status_of(exc), exc)
        except RpcError as exc:
            return _error_body(400, exc)
        start, end = (0, size) if span is None else span
        response = web.StreamResponse(status=200 if span is None else 206)
        response.content_type = "application/octet-stream"
        response.content_length = end - start
        response.headers["Accept-Ranges"] = "bytes"
        if span is not None:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        writer = _ResponseWriter(loop, request, response)

        def export() -> None:
            export_file(store, root, writer, start=start, end=end)  # type: ignore[arg-type]

        try:
            if end > start:
                await loop.run_in_executor(None, export)
            elif not writer.prepared:
                await response.prepare(request)
                writer.prepared = True
        except NeuroSeedError as exc:
            if not writer.prepared:
                return _error_body(_status_of(exc), exc)
            log.info("download of %s cut short: %s", request.match_info["cid"][:80], exc.message)
            response.force_close()
            return response
        await response.write_eof()
        return response


def _parse_price_flag(value: str) -> bool:
    """``price`` query value: a decimal amount; > 0 means the data is encrypted."""
    if not value.isascii() or not value.isdigit() or len(value) > 78:
        raise InvalidRequest("price: expected a decimal amount in base units (0 = free)")
    return int(value) > 0


async def _receive(
    request: web.Request, path: Any, limit: int, loop: asyncio.AbstractEventLoop
) -> int:
    """Stream the request body into a new file at ``path`` (mode 0600); returns its size."""
    fd = await loop.run_in_executor(
        None, functools.partial(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    )
    fh: BinaryIO = os.fdopen(fd, "wb")
    total = 0
    try:
        async for piece in request.content.iter_chunked(UPLOAD_PIECE_BYTES):
            total += len(piece)
            if total > limit:
                raise UploadTooLarge("over the limit")
            await loop.run_in_executor(None, fh.write, piece)
        await loop.run_in_executor(None, fh.flush)
    finally:
        fh.close()
    return total


async def _remove(loop: asyncio.AbstractEventLoop, path: Any) -> None:
    def unlink() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    await loop.run_in_executor(None, unlink)


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
        artifacts: ArtifactHttpSettings | None = None,
    ) -> None:
        self.node = node
        self.artifacts = artifacts if artifacts is not None else ArtifactHttpSettings()
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
                    build_app(processor, self.methods, self.limits, self.artifacts),
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

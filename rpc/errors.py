"""JSON-RPC error codes, the exceptions that carry them, and the mapping from ``node.errors``.

One scheme, shared by the server and the SDK (documented in ``docs/rpc.md``):

* **Protocol errors** use the JSON-RPC 2.0 codes: -32700 parse error, -32600 invalid request,
  -32601 method not found, -32602 invalid params, -32603 internal error.
* **Application errors** use the error's own positive ``code`` from ``node.errors`` (1001 malformed
  encoding, 1202 nonce too low, 1501 history pruned, 2000 node unavailable, ...), with the error's
  message and ``data = {"reason": <the class's fixed reason>}``. Codes never change meaning.

On the client side every application code becomes an exception that is *both* an ``RpcError`` and
the matching ``node.errors`` class, so ``except node.errors.NonceTooLow`` works on either side of the
wire. Codes the SDK does not know become the nearest known ancestor (by thousand/hundred block),
or plain ``ApplicationError``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from node import errors as node_errors
from node.errors import NeuroSeedError, NodeUnavailable

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Errors whose messages may carry host details (file paths, engine messages): only their fixed
# ``reason`` goes on the wire; the full message is logged by the server.
PRIVATE_DETAIL_ERRORS: tuple[type[NeuroSeedError], ...] = (
    node_errors.StorageError,
    node_errors.ConfigError,
    node_errors.KeystoreError,
)


class ServerBusy(NodeUnavailable):
    """The RPC server has too many calls in flight into the node; retry shortly."""

    code = 2001
    reason = "too many requests in flight"


# --- exceptions carrying a JSON-RPC error object ------------------------------------------------


class RpcError(Exception):
    """A JSON-RPC error object as an exception: raised by handlers, received by the SDK."""

    code: int = INTERNAL_ERROR

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            obj["data"] = self.data
        return obj


class ParseError(RpcError):
    code = PARSE_ERROR

    def __init__(self, message: str = "parse error", data: Any = None) -> None:
        super().__init__(PARSE_ERROR, message, data)


class InvalidRequest(RpcError):
    code = INVALID_REQUEST

    def __init__(self, message: str = "invalid request", data: Any = None) -> None:
        super().__init__(INVALID_REQUEST, message, data)


class MethodNotFound(RpcError):
    code = METHOD_NOT_FOUND

    def __init__(self, message: str = "method not found", data: Any = None) -> None:
        super().__init__(METHOD_NOT_FOUND, message, data)


class InvalidParams(RpcError):
    """Bad params; the server's message names the parameter (``data.param``)."""

    code = INVALID_PARAMS

    def __init__(self, message: str = "invalid params", data: Any = None) -> None:
        super().__init__(INVALID_PARAMS, message, data)


class InternalError(RpcError):
    code = INTERNAL_ERROR

    def __init__(self, message: str = "internal error", data: Any = None) -> None:
        super().__init__(INTERNAL_ERROR, message, data)


class ApplicationError(RpcError, NeuroSeedError):
    """An application error received from a node (positive code, see ``node.errors``)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        RpcError.__init__(self, code, message, data)


_STANDARD: dict[int, Callable[[str, Any], RpcError]] = {
    PARSE_ERROR: ParseError,
    INVALID_REQUEST: InvalidRequest,
    METHOD_NOT_FOUND: MethodNotFound,
    INVALID_PARAMS: InvalidParams,
    INTERNAL_ERROR: InternalError,
}


# --- SDK side: JSON error object -> exception -----------------------------------------------------


# Modules that declare node errors of their own (beyond ``node.errors``): imported when the SDK
# first meets a code it does not know, so a plain CLI command does not pay for them.
ERROR_MODULES = (
    "node.artifact_service",
    "node.economy.api",
    "node.economy.roles",
    "node.economy.datasets",
    "node.economy.composite",
    "node.economy.purchases",
    "node.economy.deals",
    "node.storage_agent",
    "node.p2p.api",
    "node.p2p.chunks",
    "node.storage.blobstore",
    "node.storage.format_v1",
    "node.storage.encryption",
    "node.models.safetensors_header",
)


def _module_vars() -> list[dict[str, Any]]:
    import importlib

    out = [vars(node_errors), globals()]
    for name in ERROR_MODULES:
        try:
            out.append(vars(importlib.import_module(name)))
        except ImportError:  # an optional part (e.g. libp2p) is not installed
            continue
    return out


def _known_node_errors() -> dict[int, type[NeuroSeedError]]:
    """Every error class of ``node.errors``, this module and ``ERROR_MODULES``, by code (unique
    by construction)."""
    found: dict[int, type[NeuroSeedError]] = {}
    for module_vars in _module_vars():
        for value in list(module_vars.values()):
            if (
                isinstance(value, type)
                and issubclass(value, NeuroSeedError)
                and not issubclass(value, RpcError)
            ):
                found.setdefault(value.code, value)
    return found


_REMOTE_CLASSES: dict[int, type[ApplicationError]] = {}


def _remote_class(code: int) -> type[ApplicationError]:
    cls = _REMOTE_CLASSES.get(code)
    if cls is not None:
        return cls
    known = _known_node_errors()
    base = known.get(code)
    if base is None:
        # A newer server's code: fall back to its family (1204 -> 1200 -> 1000). 2000 is "node
        # unavailable" itself, not a family: a 2xxx code of another kind must not read as it.
        for family in (code // 100 * 100, code // 1000 * 1000):
            if family in known and not (family == NodeUnavailable.code and code != family):
                return _remote_class(family)
        return ApplicationError
    cls = type(
        base.__name__,
        (ApplicationError, base),
        {
            "__module__": __name__,
            "__doc__": base.__doc__,
            "code": base.code,
            "reason": base.reason,
            "__qualname__": base.__name__,
        },
    )
    _REMOTE_CLASSES[code] = cls
    return cls


def error_from_json(obj: Any) -> RpcError:
    """Build the typed exception for a JSON-RPC error object received from a server."""
    if not isinstance(obj, dict):
        return InternalError("malformed error object from server", data=obj)
    code = obj.get("code")
    message = obj.get("message")
    data = obj.get("data")
    if not isinstance(code, int) or isinstance(code, bool):
        return InternalError("malformed error object from server", data=obj)
    if not isinstance(message, str):
        message = json.dumps(message)
    standard = _STANDARD.get(code)
    if standard is not None:
        return standard(message, data)
    if code > 0:
        return _remote_class(code)(code, message, data)
    return RpcError(code, message, data)


# --- server side: exception -> JSON error object ---------------------------------------------------


def application_error_json(exc: NeuroSeedError) -> dict[str, Any]:
    """The JSON-RPC error object for a node error: its own code, message and reason."""
    message = exc.reason if isinstance(exc, PRIVATE_DETAIL_ERRORS) else exc.message
    data: dict[str, Any] = {"reason": exc.reason}
    if isinstance(exc.data, dict) and not isinstance(exc, PRIVATE_DETAIL_ERRORS):
        try:
            json.dumps(exc.data)
        except (TypeError, ValueError):
            pass  # not JSON-serializable: the reason alone still says what happened
        else:
            data.update({k: v for k, v in exc.data.items() if k != "reason"})
    return {"code": exc.code, "message": message, "data": data}


class ClientError(Exception):
    """Base of the SDK's own failures that are not JSON-RPC error objects."""


class TransportError(ClientError):
    """No JSON-RPC answer was obtained: connection refused or reset, bad HTTP, non-JSON body."""


class RequestTimeout(TransportError, TimeoutError):
    """The server did not answer within the client's timeout."""


class ReceiptTimeout(ClientError, TimeoutError):
    """``wait_for_receipt`` gave up before the transaction was included in a block."""

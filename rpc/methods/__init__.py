"""The JSON-RPC method table: method name -> handler, one module per namespace.

A handler takes the call's ``Context`` and the raw JSON params (parsed with ``rpc.schema``) and
returns a JSON-ready value or raises (``RpcError`` or a ``node.errors`` error). Plain functions
answer from ``node.read_view()`` in the RPC thread; ``async`` handlers may cross into the node with
``ctx.bridge.call`` (DESIGN §1: reads never cross the bridge, writes and live-node calls do).

Methods registered ``local_only`` (those that make this node do work or disclose its local jobs:
``ns_fetchArtifact``, ``ns_fetchStatus``, …) are refused to callers that are not on this machine
unless the node allows remote callers (``artifacts.upload_remote``); ``Context.local`` says which.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from node.api import NodeAPI
from rpc.bridge import TrioBridge

Handler = Callable[["Context", Any], Any] | Callable[["Context", Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler may use: the node facade and the bridge into its trio run."""

    node: NodeAPI
    bridge: TrioBridge
    # The caller is on this machine (loopback), or the node serves local-only methods to anyone.
    local: bool = True


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    handler: Handler
    is_async: bool
    local_only: bool = False


class MethodTable:
    """Registered methods by name."""

    __slots__ = ("_methods",)

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def add(self, name: str, handler: Handler, *, local_only: bool = False) -> None:
        if name in self._methods:
            raise ValueError(f"method {name} is already registered")
        if name.startswith("rpc."):
            raise ValueError("method names starting with 'rpc.' are reserved by JSON-RPC 2.0")
        self._methods[name] = Method(
            name, handler, inspect.iscoroutinefunction(handler), local_only
        )

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __iter__(self) -> Iterator[Method]:
        return iter(self._methods.values())

    def __len__(self) -> int:
        return len(self._methods)


def default_methods() -> MethodTable:
    """Every public method: ``ns_*`` and the read-only ``eth_*``/``net_*`` layer."""
    # Imported here: the namespace modules import Context from this one.
    from rpc.methods import artifacts, compute, eth, models, ns, search, storage

    table = MethodTable()
    ns.register(table)
    artifacts.register(table)
    storage.register(table)
    models.register(table)
    search.register(table)
    compute.register(table)
    eth.register(table)
    return table

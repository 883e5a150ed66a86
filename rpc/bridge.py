"""The non-blocking bridge from the RPC thread's asyncio loop into the node's trio run (DESIGN §1).

``TrioBridge`` is created on the trio side with the run's ``TrioToken`` and a nursery the node
owns. ``await bridge.call(async_fn, *args)`` from the asyncio thread:

1. schedules, with ``TrioToken.run_sync_soon``, a callback that starts a task running
   ``async_fn(*args)`` in that nursery (nothing on either side blocks);
2. the task resolves an asyncio future with ``loop.call_soon_threadsafe``; exceptions raised by
   ``async_fn`` come back as themselves.

When trio is gone (``RunFinishedError``), the nursery is closed, the call was cancelled by the node
shutting down, or the bridge was closed, the caller gets ``node.errors.NodeUnavailable``. At most
``max_in_flight`` calls may be in flight at once; beyond that ``call`` raises ``ServerBusy`` at
once rather than queueing without bound. Cancelling the awaiting asyncio task cancels the trio task.

Every exception a bridged function raises stays with its caller: the node's nursery never sees it,
so a failing RPC call cannot crash the node. Only trio's own ``Cancelled`` propagates there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from node.errors import NodeUnavailable
from rpc.errors import ServerBusy

T = TypeVar("T")

DEFAULT_MAX_IN_FLIGHT = 1024


class _Call:
    """One bridged call: its asyncio future and, once started, the trio task's cancel scope."""

    __slots__ = ("cancel_scope", "cancelled", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.loop = loop
        self.future = future
        self.cancel_scope: trio.CancelScope | None = None
        self.cancelled = False  # asyncio side gave up; touched only on the trio thread


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class TrioBridge:
    """Runs trio async functions on behalf of code in another thread's asyncio loop."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        nursery: trio.Nursery,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._token = token
        self._nursery = nursery
        self._max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._pending: set[_Call] = set()
        self._closed = False

    @classmethod
    def from_current(
        cls, nursery: trio.Nursery, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    ) -> TrioBridge:
        """A bridge into the current trio run (call it from trio)."""
        return cls(trio.lowlevel.current_trio_token(), nursery, max_in_flight=max_in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    async def call(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await async_fn(*args)`` in the node's trio nursery; call from an asyncio loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        call = _Call(loop, future)
        with self._lock:
            if self._closed:
                raise NodeUnavailable("the node is shutting down")
            if len(self._pending) >= self._max_in_flight:
                raise ServerBusy(
                    f"too many requests in flight into the node (limit {self._max_in_flight}); "
                    "retry shortly"
                )
            self._pending.add(call)
        try:
            try:
                self._token.run_sync_soon(self._start, call, async_fn, args)
            except trio.RunFinishedError:
                raise NodeUnavailable("the node is not running") from None
            try:
                return await future
            except asyncio.CancelledError:
                self._cancel_soon(call)
                raise
        finally:
            with self._lock:
                self._pending.discard(call)

    def close(self) -> None:
        """Refuse new calls and fail those still waiting with ``NodeUnavailable``.

        Safe from any thread; the node calls it when its RPC service stops.
        """
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        for call in pending:
            self._resolve(call, exc=NodeUnavailable("the node is shutting down"))

    # --- trio side ---------------------------------------------------------------------------

    def _start(
        self, call: _Call, async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        if call.cancelled or call.future.done():
            return
        try:
            self._nursery.start_soon(self._run, call, async_fn, args)
        except RuntimeError:  # the nursery is closed to new tasks: the node is stopping
            self._resolve(call, exc=NodeUnavailable("the node is shutting down"))

    async def _run(
        self, call: _Call, async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        with trio.CancelScope() as scope:
            call.cancel_scope = scope
            if call.cancelled:
                scope.cancel()
            try:
                result = await async_fn(*args)
            except trio.Cancelled:
                self._resolve(call, exc=NodeUnavailable("the call was cancelled by the node"))
                raise
            except Exception as exc:  # the caller's error, delivered to the caller
                self._resolve(call, exc=exc)
                return
            except BaseException:
                self._resolve(call, exc=NodeUnavailable("the node is shutting down"))
                raise
            self._resolve(call, value=result)

    def _cancel_soon(self, call: _Call) -> None:
        def cancel() -> None:
            call.cancelled = True
            if call.cancel_scope is not None:
                call.cancel_scope.cancel()

        with contextlib.suppress(trio.RunFinishedError):  # trio gone: nothing left to cancel
            self._token.run_sync_soon(cancel)

    # --- either side -------------------------------------------------------------------------

    @staticmethod
    def _resolve(call: _Call, *, value: Any = None, exc: BaseException | None = None) -> None:
        try:
            if exc is None:
                call.loop.call_soon_threadsafe(_set_result, call.future, value)
            else:
                call.loop.call_soon_threadsafe(_set_exception, call.future, exc)
        except RuntimeError:
            pass  # the asyncio loop is closed: nobody is waiting any more

"""The asyncio -> trio bridge: many concurrent calls, exceptions as themselves, the in-flight
limit, cancellation from the asyncio side, and node shutdown (nursery cancelled, bridge closed,
trio run finished)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import trio

from node.errors import NodeUnavailable, NonceTooLow
from rpc.bridge import TrioBridge
from rpc.errors import ServerBusy
from tests.rpc.conftest import in_asyncio

pytestmark = pytest.mark.timeout(30)


async def test_many_concurrent_calls(nursery: trio.Nursery) -> None:
    bridge = TrioBridge.from_current(nursery, max_in_flight=1000)
    running = 0
    peak = 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.05)
        running -= 1
        return i * i

    async def main() -> list[int]:
        return list(await asyncio.gather(*(bridge.call(work, i) for i in range(500))))

    started = time.monotonic()
    results = await in_asyncio(main)
    assert results == [i * i for i in range(500)]
    assert peak > 100  # they overlapped in trio, not one after another
    assert time.monotonic() - started < 5
    assert bridge.in_flight == 0


async def test_exceptions_come_back_as_themselves(nursery: trio.Nursery) -> None:
    bridge = TrioBridge.from_current(nursery)
    raised = NonceTooLow("nonce 1 is below 2")

    async def fail() -> None:
        await trio.lowlevel.checkpoint()
        raise raised

    async def broken() -> None:
        raise KeyError("x")

    async def main() -> list[BaseException | None]:
        return list(
            await asyncio.gather(bridge.call(fail), bridge.call(broken), return_exceptions=True)
        )

    first, second = await in_asyncio(main)
    assert first is raised
    assert isinstance(second, KeyError)

    # the node's nursery did not see them: it is still open and running
    async def ok() -> str:
        return "still here"

    assert await in_asyncio(lambda: bridge.call(ok)) == "still here"


async def test_in_flight_limit(nursery: trio.Nursery) -> None:
    bridge = TrioBridge.from_current(nursery, max_in_flight=3)
    release = trio.Event()
    entered = 0

    async def held() -> str:
        nonlocal entered
        entered += 1
        await release.wait()
        return "done"

    async def main() -> tuple[list[str], BaseException | None]:
        tasks = [asyncio.ensure_future(bridge.call(held)) for _ in range(3)]
        await asyncio.sleep(0)
        refused = None
        try:
            await bridge.call(held)
        except ServerBusy as exc:
            refused = exc
        return list(await asyncio.gather(*tasks)), refused

    async with trio.open_nursery() as inner:
        result: list[Any] = []

        async def run_main() -> None:
            result.append(await in_asyncio(main))

        inner.start_soon(run_main)
        while entered < 3:
            await trio.sleep(0.005)
        assert bridge.in_flight == 3
        release.set()
    done, refused = result[0]
    assert done == ["done"] * 3
    assert isinstance(refused, ServerBusy)
    assert isinstance(refused, NodeUnavailable)
    assert "limit 3" in str(refused)
    assert bridge.in_flight == 0


async def test_asyncio_cancellation_cancels_the_trio_task(nursery: trio.Nursery) -> None:
    bridge = TrioBridge.from_current(nursery)
    started = trio.Event()
    cancelled = trio.Event()

    async def slow() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async def main() -> bool:
        task = asyncio.ensure_future(bridge.call(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert await in_asyncio(main)
    with trio.fail_after(5):
        await cancelled.wait()
    assert started.is_set()
    assert bridge.in_flight == 0


async def test_node_shutdown_fails_pending_calls() -> None:
    waiting = trio.Event()

    async def forever() -> None:
        waiting.set()
        await trio.sleep_forever()

    outcome: list[BaseException] = []
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as node_nursery:
            bridge = TrioBridge.from_current(node_nursery)

            async def client() -> None:
                async def main() -> None:
                    try:
                        await bridge.call(forever)
                    except NodeUnavailable as exc:
                        outcome.append(exc)

                await in_asyncio(main)

            outer.start_soon(client)
            await waiting.wait()
            node_nursery.cancel_scope.cancel()  # the node stops
        # the nursery is closed now: new calls are refused, not lost
        late: list[BaseException] = []

        async def late_main() -> None:
            async def noop() -> None:
                return None

            try:
                await bridge.call(noop)
            except NodeUnavailable as exc:
                late.append(exc)

        await in_asyncio(late_main)
    assert len(outcome) == 1
    assert len(late) == 1


async def test_close_fails_pending_and_new_calls(nursery: trio.Nursery) -> None:
    bridge = TrioBridge.from_current(nursery)
    entered = trio.Event()

    async def forever() -> None:
        entered.set()
        await trio.sleep_forever()

    errors: list[BaseException] = []

    async def main() -> None:
        try:
            await bridge.call(forever)
        except NodeUnavailable as exc:
            errors.append(exc)
        try:
            await bridge.call(forever)
        except NodeUnavailable as exc:
            errors.append(exc)

    async with trio.open_nursery() as inner:
        inner.start_soon(in_asyncio, main)
        await entered.wait()
        bridge.close()
    assert [type(e) for e in errors] == [NodeUnavailable, NodeUnavailable]


def test_finished_trio_run_is_node_unavailable() -> None:
    async def make() -> TrioBridge:
        async with trio.open_nursery() as nursery:
            return TrioBridge.from_current(nursery)

    bridge = trio.run(make)

    async def noop() -> None:
        return None

    async def main() -> None:
        await bridge.call(noop)

    with pytest.raises(NodeUnavailable, match="not running"):
        asyncio.run(main())


async def test_max_in_flight_must_be_positive(nursery: trio.Nursery) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TrioBridge.from_current(nursery, max_in_flight=0)

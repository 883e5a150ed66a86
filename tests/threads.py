"""``trio.to_thread.run_sync`` run inline, for tests on trio's mock clock.

With an autojumping ``MockClock`` a real worker thread races the clock: the clock jumps to the
next timeout while the thread runs. ``InlineThreads`` runs the work on the event loop instead
(after an optional delay in mock time), so tests stay deterministic and can place a cancellation
(a crash) exactly inside it. The ``threads`` fixture (``tests/conftest.py``) installs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel


class InlineThreads:
    """Stands in for ``trio.to_thread.run_sync`` with trio's cancellation semantics for
    ``abandon_on_cancel=False``: a cancellation already pending raises before the work starts;
    once started, the work is not interrupted and the cancellation lands at the caller's next
    checkpoint.

    ``delays`` gives functions (by name: ``build``, ``validate``, ``commit``, ``append``, ...)
    a duration in mock time. A cancellation during that time is a crash while the work runs:
    it never completes, unless ``finish_on_cancel`` lets it finish first.
    """

    def __init__(self) -> None:
        self.delays: dict[str, float] = {}
        self.finish_on_cancel = False
        self.calls: list[str] = []

    async def run_sync(self, fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        name = getattr(fn, "__name__", repr(fn))
        delay = self.delays.get(name, 0.0)
        if delay:
            with trio.CancelScope(shield=self.finish_on_cancel):
                await trio.sleep(delay)
        self.calls.append(name)
        result = fn(*args)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

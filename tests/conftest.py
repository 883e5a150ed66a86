"""Test-wide settings: a bounded, derandomized hypothesis profile for CI, and the ``threads``
fixture (worker-thread work run inline, for tests on trio's mock clock: ``tests/threads.py``)."""

from __future__ import annotations

import os

import pytest
import trio
from hypothesis import HealthCheck, settings

from tests.threads import InlineThreads

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") or os.environ.get("CI_PROFILE") else "dev")


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> InlineThreads:
    """Run ``trio.to_thread.run_sync`` work inline (see ``tests/threads.py``)."""
    inline = InlineThreads()
    monkeypatch.setattr(trio.to_thread, "run_sync", inline.run_sync)
    return inline

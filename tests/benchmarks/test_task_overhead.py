"""``benchmarks/task_overhead.py``: the task's heights it reads from ``ns_getTask``, its
reference task's checkpoints (the CLI's default policy), how it decides that a task was
verified, the fixed-latency floor of a genesis, and (slow) its devnet run on a tiny task: three
node processes, providers registered with the CLI, a task submitted, claimed, run, verified and
settled paid, and every process stopped afterwards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import _devnet
import pytest
import task_overhead as to

from node.api import ViewState
from node.compute import recipes
from node.economy import tasks as tk
from rpc.methods.compute import task_to_json
from tests.rpc.test_compute_rpc import Market
from tests.rpc.test_compute_rpc import market as market


def test_task_heights_are_the_tasks_own(market: Market) -> None:
    """The heights come from ``ns_getTask`` (``task_to_json``); one missing is an error."""
    task = tk.get_task(ViewState(market.read_view()), market.tasks["a1"])
    assert task is not None
    shown = task_to_json(task)
    with pytest.raises(RuntimeError, match="no claim, result, end height"):
        to.task_heights(shown)
    shown.update(claimHeight=12, resultHeight=40, endHeight=77)
    assert to.task_heights(shown) == {
        "submit": task.submit_height, "claim": 12, "result": 40, "end": 77,
    }  # fmt: skip


def test_the_reference_task_uses_the_default_checkpoint_policy() -> None:
    params = to.FULL.params("00" * 32)
    assert recipes.checkpoint_count("train", recipes.validate_task_params(
        "train", recipes.canonical_params(params))) == 32  # fmt: skip
    assert to.FULL.every == 1280 and to.TINY.every == 10  # TINY names its own


def task(segment: int, reveals: list[tuple[bool, str | None]]) -> dict[str, Any]:
    return {
        "segment": segment,
        "result": {"checkpoints": [{"stateHash": "0xaa"}, {"stateHash": "0xbb"}]},
        "verifierSlots": [{"committed": c, "stateHash": h} for c, h in reveals],
    }


def test_verified_needs_every_verifier_to_reveal_the_providers_hash() -> None:
    assert to.verified(task(1, [(True, "0xbb")]))
    assert to.verified(task(0, [(True, "0xaa"), (True, "0xaa")]))
    assert not to.verified(task(1, [(True, "0xaa")]))  # another segment's hash
    assert not to.verified(task(1, [(True, "0xbb"), (True, None)]))  # one did not reveal
    assert not to.verified(task(1, [(False, None)]))
    assert not to.verified(task(1, []))  # nobody drawn: not verified


def test_fixed_floor_counts_claim_draw_and_the_windows() -> None:
    g = to.benchmark_genesis(verify_reveal_heights=4, task_challenge_heights=7)
    assert (
        g.economy_params.verify_commit_heights
        == to.benchmark_genesis().economy_params.verify_commit_heights
    )
    # claim + draw + commit (closing early) + reveal and its closing block + challenge
    assert to.fixed_floor(g) == 1 + 1 + 1 + 2 + 7
    assert (
        to.fixed_floor(to.benchmark_genesis(verify_reveal_heights=1, task_challenge_heights=7))
        == 1 + 1 + 1 + 1 + 7
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_tiny_task_on_a_devnet_is_settled_paid_and_verified(tmp_path: Path) -> None:
    data = _devnet.write_classification_data(
        tmp_path / "d.safetensors", rows=256, dim=64, classes=10
    )
    genesis = to.fast_genesis()
    run = to.market_run(tmp_path, data, to.TINY, genesis, timeout=150.0, log=lambda *_: None)
    assert run.task["state"] == "ended" and run.task["outcome"] == "paid"
    assert run.verified
    h = run.heights
    assert h["submit"] < h["claim"] < h["result"] < h["end"]
    assert run.blocks("submit", "claim") + run.blocks("result", "end") >= to.fixed_floor(genesis)
    assert run.seconds("claim", "result") > 0 and 0 < run.block_interval < 5
    assert run.e2e >= run.seconds("submit", "end") - 2 * run.block_interval
    for pid in run.pids:  # every node process was stopped and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

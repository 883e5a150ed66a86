"""``benchmarks/task_overhead.py``: how it finds the claim's block and decides that a task was
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

TID = "0x" + "ab" * 32
PROVIDER = "0x" + "01" * 20
OTHER = "0x" + "02" * 20


def tx(kind: str, sender: str, task_id: str) -> dict[str, Any]:
    return {"kindName": kind, "from": sender, "body": {"taskId": task_id}}


def test_claim_height_is_the_block_of_the_winning_providers_claim() -> None:
    blocks = {
        10: {"transactions": [tx("task_submit", OTHER, TID)]},
        11: {"transactions": [tx("task_claim", OTHER, TID), tx("task_claim", PROVIDER, "0x" + "cd" * 32)]},
        12: {"transactions": [tx("transfer", PROVIDER, TID), tx("task_claim", PROVIDER, TID.upper())]},
        13: {"transactions": [tx("task_claim", PROVIDER, TID)]},
    }  # fmt: skip
    assert to.claim_height(blocks, TID, PROVIDER) == 12
    with pytest.raises(RuntimeError):
        to.claim_height({10: blocks[10]}, TID, PROVIDER)


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
    assert g.economy_params.verify_commit_heights == 20
    assert to.fixed_floor(g) == 1 + 1 + 20 + 4 + 7


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

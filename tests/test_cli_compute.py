"""``neuroseed task …`` / ``compute …`` (node/cli_compute.py): parameters canonicalised and
checked locally before anything is sent (errors name the field, exit 1; an unknown recipe is a
usage error, exit 2), the payments shown by ``task watch``, the progress of ``task watch``, and
``task list`` / ``task show`` / ``compute status`` against a real ``RpcServer`` over a chain with
tasks (the fixture of tests/rpc/test_compute_rpc.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from node import cli
from node.cli_compute import canonical_task_params, task_payments, watch_progress
from node.compute import recipes
from rpc.server import RpcServer
from tests.helpers import addr
from tests.rpc.conftest import LIMITS
from tests.rpc.test_compute_rpc import REQ_A, Market, hx
from tests.rpc.test_compute_rpc import market as market

PARAMS = {
    "spec": {"family": "mlp", "input_dim": 4, "hidden": [3], "num_classes": 2},
    "dataset": "ab" * 32,
    "steps": 20,
    "lr": 0.01,
    "batch_size": 8,
    "optimizer": "adam",
    "seed": 1,
    "checkpoint_every": 10,
}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_params_are_canonicalised_and_checked_locally() -> None:
    raw, parsed = canonical_task_params("train", dict(reversed(list(PARAMS.items()))))
    assert raw == recipes.canonical_params(PARAMS) and parsed["devices"] == 1
    with pytest.raises(cli.CliError, match="field 'steps'"):
        canonical_task_params("train", {**PARAMS, "steps": -3})
    with pytest.raises(cli.CliError, match="field 'code'"):
        canonical_task_params("train", {**PARAMS, "code": "import os"})


def test_submit_refuses_bad_input_before_contacting_a_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "p.json"
    good.write_text(json.dumps(PARAMS))
    nowhere = ("--rpc", "http://127.0.0.1:9/", "--datadir", str(tmp_path))
    base = ("task", "submit", "--recipe", "train", "--max-price", "1", *nowhere)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**PARAMS, "optimizer": "lbfgs"}))
    code, _, err = _run(capsys, *base, "--params", str(bad))
    assert code == 1 and "optimizer" in err
    dup = tmp_path / "dup.json"
    dup.write_text('{"seed": 1, "seed": 2}')
    code, _, err = _run(capsys, *base, "--params", str(dup))
    assert code == 1 and "appears twice" in err
    code, _, err = _run(capsys, *base, "--params", str(good), "--verifiers", "9")
    assert code == 1 and "--verifiers" in err
    code, _, err = _run(capsys, *base, "--params", str(good), "--memory", "lots")
    assert code == 1 and "--memory" in err
    code, _, err = _run(capsys, *base, "--params", str(good), "--steps", "5")
    assert code == 1 and "--steps" in err
    code, _, err = _run(
        capsys, "task", "submit", "--recipe", "python", "--params", str(good), "--max-price", "1"
    )
    assert code == 2 and "python" in err
    code, _, err = _run(capsys, "task", "show", "0x1234", *nowhere)
    assert code == 1 and "task id" in err
    # A well-formed submission gets as far as the node, which is not there: exit 3.
    code, _, err = _run(capsys, *base, "--params", str(good), "--platform", "cpu-x")
    assert code == 3


def _ended(outcome: str, slots: list[dict[str, Any]], fail: str | None = None) -> dict[str, Any]:
    return {
        "state": "ended",
        "outcome": outcome,
        "provider": "0xp",
        "segment": 1,
        "steps": 20,
        "checkpointSteps": [10, 20],
        "verifierFee": "7",
        "inputs": [{"kind": "dataset", "ref": "0x01"}],
        "verifierSlots": slots,
        "result": {
            "price": "1000",
            "failReason": fail,
            "checkpoints": [{"stateHash": "0xa"}, {"stateHash": "0xb"}][: 1 if fail else 2],
        },
    }


def test_payments_of_an_ended_task() -> None:
    slots = [
        {"address": "0xv1", "stateHash": "0xb"},
        {"address": "0xv2", "stateHash": "0xc"},
        {"address": "0xv3", "stateHash": None},
    ]
    paid = task_payments(_ended("paid", slots), 5)
    assert paid["providerPaid"] == "1000" and paid["royalties"] == "50"
    assert paid["verifiersPaid"] == {"0xv1": "7"} and paid["requesterSpent"] == "1057"
    slashed = task_payments(_ended("provider_slashed", slots), 5)
    assert slashed["providerPaid"] == "0" and slashed["verifiersPaid"] == {"0xv2": "7"}
    partial = _ended("partial", [], fail="crash")
    partial["segment"] = 0
    assert task_payments(partial, 0)["providerPaid"] == "500"  # 10 of 20 steps proven
    refunded = task_payments({**_ended("expired", []), "result": None}, 5)
    assert refunded["requesterSpent"] == "0"


def test_watch_progress() -> None:
    assert watch_progress({"state": "open"})[0] == 0.0
    frac, note = watch_progress(
        {"state": "claimed", "progress": {"stage": "running", "done": 10, "total": 20}}
    )
    assert frac == pytest.approx(0.35) and "10/20" in note
    assert watch_progress({"state": "ended"})[0] == 1.0


@pytest.fixture
async def url(nursery: trio.Nursery, market: Market) -> AsyncIterator[str]:
    server = RpcServer(market, "127.0.0.1", 0, LIMITS)  # type: ignore[arg-type]
    yield await nursery.start(server.serve)
    nursery.cancel_scope.cancel()


async def test_list_show_and_status_against_a_node(
    url: str,
    market: Market,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    at = ("--rpc", url, "--datadir", str(tmp_path))

    def run(*argv: str) -> tuple[int, str, str]:
        return _run(capsys, *argv)

    code, out, _ = await trio.to_thread.run_sync(
        lambda: run("task", "list", "--requester", hx(addr(REQ_A)), "--json", *at)
    )
    assert code == 0
    ids = {t["id"] for t in json.loads(out)["tasks"]}
    assert ids == {hx(market.tasks["a1"]), hx(market.tasks["a2"])}
    code, out, _ = await trio.to_thread.run_sync(
        lambda: run("task", "list", "--state", "open", "--limit", "1", *at)
    )
    assert code == 0 and "more: --cursor" in out
    tid = hx(market.tasks["a2"])
    code, out, _ = await trio.to_thread.run_sync(lambda: run("task", "show", tid, *at))
    assert code == 0 and "ended (cancelled)" in out
    code, out, _ = await trio.to_thread.run_sync(lambda: run("task", "watch", tid, "--json", *at))
    assert code == 0 and json.loads(out)["payments"]["requesterSpent"] == "0"
    code, _, err = await trio.to_thread.run_sync(lambda: run("task", "cancel", tid, *at))
    assert code == 1 and "only an unclaimed task" in err
    code, _, err = await trio.to_thread.run_sync(lambda: run("compute", "status", *at))
    assert code == 1 and "no compute agent" in err

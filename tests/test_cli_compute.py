"""``neuroseed task …`` / ``compute …`` (node/cli_compute.py): parameters canonicalised and
checked locally before anything is sent (errors name the field, exit 1; an unknown recipe is a
usage error, exit 2), the payments shown by ``task watch``, the progress of ``task watch``, and
``task list`` / ``task show`` / ``compute status`` / ``compute providers`` against a real
``RpcServer`` over a chain with tasks and providers (the fixture of tests/rpc/test_compute_rpc.py):
the escrow ``task submit`` shows is what the chain locks for a task on a priced input, and the
default ``--platform`` is the providers' class when they share one (else an error naming them);
the default checkpoint policy of training tasks (at most 32 checkpoints) and ``compute offer``'s
own RPC timeout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from node import cli, cli_compute, cli_models
from node.api import ViewState
from node.cli_compute import (
    DEFAULT_CHECKPOINTS,
    OFFER_TIMEOUT_S,
    SubmitOptions,
    build_submit,
    canonical_task_params,
    default_platform,
    task_payments,
    watch_progress,
    with_default_checkpoints,
)
from node.compute import recipes
from node.compute_agent import ComputeAgent, ComputeSettings
from node.consensus.txs import KNOWN_KINDS, verify_transaction
from node.economy import tasks as tk
from node.economy.api import DEFAULT_ECONOMY_PARAMS, Role
from node.economy.roles import RoleRegister
from node.storage import MemoryKV
from node.types import NSD, ZERO_HASH, Amount, Hash32
from rpc import client as rpc_client
from rpc.client import Client
from rpc.server import RpcServer
from tests.helpers import FEES, addr, key, make_genesis, open_chain
from tests.rpc.conftest import LIMITS
from tests.rpc.test_compute_rpc import (
    CLS,
    GPU,
    GPU_CLS,
    PROV,
    PROV2,
    REQ_A,
    REQ_B,
    Market,
    hx,
    offer,
)
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
    # ids as the CLI prints them (0x, any case) are the same parameters
    prefixed, _ = canonical_task_params("train", {**PARAMS, "dataset": "0x" + "AB" * 32})
    assert prefixed == raw
    merge = {
        "method": "task_arithmetic",
        "parents": ["0x" + "aa" * 32, "bb" * 32],
        "base": "0X" + "cc" * 32,
        "coefficients": [0.5, 0.5],
    }
    _raw, parsed_merge = canonical_task_params("merge", merge)
    assert parsed_merge["parents"] == ["aa" * 32, "bb" * 32] and parsed_merge["base"] == "cc" * 32
    with pytest.raises(cli.CliError, match="field 'dataset'"):
        canonical_task_params("train", {**PARAMS, "dataset": "0xnothex"})


def test_default_checkpoint_policy() -> None:
    """Training parameters without ``checkpoint_every`` get ceil(steps / 32): at most 32
    checkpoints, every one of them when the task is shorter; a value given is kept; merge and
    evaluate take none; a bad ``steps`` is still reported by the schema."""
    bare = {k: v for k, v in PARAMS.items() if k != "checkpoint_every"}
    with pytest.raises(cli.CliError, match="field 'checkpoint_every'"):
        canonical_task_params("train", bare)
    for steps, every, count in ((1, 1, 1), (20, 1, 20), (32, 1, 32), (33, 2, 17), (20_000, 625, 32),
                                (20_001, 626, 32), (recipes.MAX_STEPS, -(-recipes.MAX_STEPS // 32), 32)):  # fmt: skip
        tree = with_default_checkpoints("train", {**bare, "steps": steps})
        assert tree["checkpoint_every"] == every, steps
        _, parsed = canonical_task_params("train", tree)
        assert recipes.checkpoint_count("train", parsed) == count <= DEFAULT_CHECKPOINTS
        assert len(recipes.checkpoint_steps("train", parsed)) == count
    assert with_default_checkpoints("train", PARAMS) == PARAMS  # given: kept
    finetune = {**bare, "model": "cd" * 32, "train_head_only": False, "steps": 640}
    finetune.pop("spec")
    assert with_default_checkpoints("finetune", finetune)["checkpoint_every"] == 20
    evaluate = {"model": "cd" * 32, "dataset": "ab" * 32, "split": "holdout"}
    assert with_default_checkpoints("evaluate", evaluate) == evaluate
    for bad in (-3, "20", True, None):
        tree = with_default_checkpoints("train", {**bare, "steps": bad})
        assert "checkpoint_every" not in tree
        with pytest.raises(cli.CliError, match="field 'steps'"):
            canonical_task_params("train", tree)


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
    # So does one that leaves checkpoint_every to the default policy.
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({k: v for k, v in PARAMS.items() if k != "checkpoint_every"}))
    code, _, err = _run(capsys, *base, "--params", str(bare), "--platform", "cpu-x")
    assert code == 3, err


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


async def test_providers_listing(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ("--rpc", url, "--datadir", str(tmp_path))

    def run(*argv: str) -> tuple[int, str, str]:
        return _run(capsys, *argv)

    code, out, _ = await trio.to_thread.run_sync(lambda: run("compute", "providers", *at))
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["CLASS", "ADDRESS", "DEVICE", "PRICE/DEVICE-S", "REPUTATION", "LOAD"]
    assert [line.split()[1] for line in lines] == sorted(hx(addr(p)) for p in (PROV, PROV2, GPU))
    gpu = next(line for line in lines if hx(addr(GPU)) in line)
    assert gpu.startswith(GPU_CLS) and "2x test gpu (sm 9.0, 80.0 GiB)" in gpu, gpu
    assert gpu.endswith("0/2") and "0 (0 ok, 0 slashed)" in gpu
    code, out, _ = await trio.to_thread.run_sync(
        lambda: run("compute", "providers", "--platform", CLS, "--json", *at)
    )
    page = json.loads(out)
    assert code == 0 and {p["address"] for p in page["providers"]} == {
        hx(addr(PROV)),
        hx(addr(PROV2)),
    }
    assert page["cursor"] is None
    code, out, _ = await trio.to_thread.run_sync(
        lambda: run("compute", "providers", "--limit", "2", *at)
    )
    assert code == 0 and len(out.splitlines()) == 4 and "more: --cursor" in out
    cursor = out.split("more: --cursor ")[1].strip()
    code, out, _ = await trio.to_thread.run_sync(
        lambda: run("compute", "providers", "--cursor", cursor, *at)
    )
    assert code == 0 and len(out.splitlines()) == 2 and "more" not in out
    code, out, _ = await trio.to_thread.run_sync(
        lambda: run("compute", "providers", "--platform", "none-such", *at)
    )
    assert code == 0 and out.strip() == "no providers of class none-such"
    code, _, err = run("compute", "providers", "--limit", "0", "--rpc", "http://127.0.0.1:9/")
    assert code == 1 and "--limit" in err  # refused before asking the node


async def test_the_default_platform_is_the_providers_class(
    url: str, nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "p.json"
    params.write_text(json.dumps(PARAMS))
    argv = ["task", "submit", "--recipe", "train", "--params", str(params), "--max-price", "1"]
    argv += ["--dev-key", str(REQ_B), "--rpc", url, "--datadir", str(tmp_path)]
    # Two classes among the providers: it must be named.
    code, _, err = await trio.to_thread.run_sync(lambda: _run(capsys, *argv))
    assert code == 1 and "--platform: name the platform class the task must run on" in err
    assert f"the registered providers run {CLS}, {GPU_CLS}" in err, err
    # One provider, so one class: that one.
    economy = replace(DEFAULT_ECONOMY_PARAMS, provider_bond=Amount(10 * NSD))
    genesis = make_genesis(
        funded=(PROV,), balance=1000 * NSD, fees=tuple(replace(FEES, kind=k) for k in KNOWN_KINDS)
    )
    solo = Market(
        open_chain(MemoryKV(), replace(genesis, economy_params=economy)), ZERO_HASH, ZERO_HASH
    )
    solo.block((PROV, RoleRegister(int(Role.COMPUTE_PROVIDER))))
    solo.block((PROV, offer("cpu-solo")))
    server = RpcServer(solo, "127.0.0.1", 0, LIMITS)  # type: ignore[arg-type]
    solo_url = await nursery.start(server.serve)

    def defaults() -> tuple[str, str]:
        with Client(solo_url) as client:
            return default_platform(client), cli_models.default_platform(client)

    assert await trio.to_thread.run_sync(defaults) == ("cpu-solo", "cpu-solo")


async def test_the_escrow_shown_is_what_the_chain_locks(url: str, market: Market) -> None:
    """A task on a priced dataset: the escrow ``task submit`` shows (``build_submit``, the input
    allowance read over RPC) is the one the chain takes when the same body is committed."""
    raw, parsed = canonical_task_params("train", {**PARAMS, "dataset": market.priced.hex()})
    opts = SubmitOptions(
        max_price=Amount(NSD),
        verifier_fee=Amount(NSD // 100),
        verifiers=2,
        memory=1 << 30,
        wall_seconds=60,
        deadline=50,
        min_reputation=0,
    )

    def build() -> tuple[tk.TaskSubmit, int]:
        with Client(url) as client:
            return build_submit(client, "train", raw, parsed, opts, CLS, [], 20)

    body, escrow = await trio.to_thread.run_sync(build)
    assert [(i.kind, bytes(i.ref)) for i in body.inputs] == [(tk.InputKind.DATASET, market.priced)]
    tid = tk.task_id(addr(REQ_B), market.nonces.get(REQ_B, 0))
    market.block((REQ_B, body))
    task = tk.get_task(ViewState(market.read_view()), tid)
    assert task is not None and task.input_allowance > 0
    assert (
        escrow == task.escrow == tk.escrow_for(DEFAULT_ECONOMY_PARAMS, body, task.input_allowance)
    )
    assert escrow > tk.escrow_for(DEFAULT_ECONOMY_PARAMS, body)  # the allowance is counted


class _SlowProbe(ComputeAgent):
    """The real agent; its hardware probe (a torch child in a node) takes 1 s here."""

    async def platform_info(self) -> dict[str, Any]:
        await trio.sleep(1.0)
        return {"class": CLS, "hw": {"machine": "x86_64", "cpu_cores": 4, "memory_bytes": 8 << 30}}


async def test_compute_offer_has_its_own_rpc_timeout(
    url: str,
    market: Market,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``compute offer`` waits ``OFFER_TIMEOUT_S`` for ``ns_computeOffer`` (the node's probe of
    its platform imports torch in a child: seconds under load), not the client's default."""
    assert OFFER_TIMEOUT_S >= 60 > rpc_client.DEFAULT_TIMEOUT
    sent: list[bytes] = []

    async def submit(raw: bytes) -> Hash32:
        sent.append(raw)
        return verify_transaction(raw).tx_id

    agent = _SlowProbe(market.chain, submit, key(PROV), tmp_path, ComputeSettings())
    monkeypatch.setattr(market, "compute_agent", agent, raising=False)
    argv = ("compute", "offer", "--no-wait", "--rpc", url, "--datadir", str(tmp_path))
    monkeypatch.setattr(cli_compute, "OFFER_TIMEOUT_S", 0.3)
    code, _, err = await trio.to_thread.run_sync(lambda: _run(capsys, *argv))
    assert code == cli.EXIT_UNREACHABLE and "within 0.3 s" in err, err
    monkeypatch.setattr(cli_compute, "OFFER_TIMEOUT_S", 30.0)
    code, out, err = await trio.to_thread.run_sync(lambda: _run(capsys, *argv))
    assert code == 0, err
    assert sent and cli._hex(verify_transaction(sent[-1]).tx_id) in out

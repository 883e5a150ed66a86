"""The compute market's "Done means" on a devnet of real processes (loopback only, every wait
bounded): a requester on the validator (node0) registers the digits dataset and, with the CLI,
submits a tiny train task (digits MLP, 20 steps, a checkpoint every 10, one verifier); node1 and
node2 run ``--provide-compute`` with their operator accounts registered as compute providers
(``compute offer``): one claims and runs it, the other is drawn to verify a segment;
``task watch`` follows it until it is settled and shows the payments; the provider's balance is
up by the price and the requester's down by price + royalty + verifier fee (less/plus the small
transaction fees, bounded).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from node.devkeys import dev_key
from node.devnet import operator_dev_key
from node.genesis import genesis_to_json, load_genesis
from node.types import NSD, Amount
from tests.integration.procs import (
    FAST_TIMEOUTS,
    REPO,
    NodeRpc,
    Procs,
    cli_json,
    init_devnet,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WAIT_S = 60.0
REQUESTER = 103  # a funded dev key of the devnet genesis
PRICE_PER_S = NSD // 100  # the providers' [compute] price: 0.01 NSD per device-second
WALL = 120  # the task's wall-time limit: the provider asks PRICE_PER_S * WALL = 1.2 NSD
ROYALTY_PERCENT = 5
SPEC = {"family": "mlp", "input_dim": 64, "hidden": [16], "num_classes": 10}
FEE_SLACK = NSD // 100  # what the transaction fees of one party may sum to here


def _template(path: Path) -> Path:
    genesis = load_genesis(REPO / "genesis.json")
    votable = dataclasses.replace(
        genesis.votable_params, **{**FAST_TIMEOUTS, "timeout_commit_ms": 400}
    )
    economy = dataclasses.replace(
        genesis.economy_params,
        provider_bond=Amount(10 * NSD),
        task_min_bond=Amount(NSD),
        verify_commit_heights=40,  # a verifier re-runs a segment in a torch child: seconds
        verify_reveal_heights=10,
        task_challenge_heights=3,
        bisect_step_heights=4,
        royalty_percent=ROYALTY_PERCENT,
    )
    path.write_text(
        genesis_to_json(
            dataclasses.replace(genesis, votable_params=votable, economy_params=economy)
        )
    )
    return path


def _digits(path: Path) -> Path:
    """scikit-learn's digits as a safetensors file: ``x`` F32 (n, 64) in [0, 1], ``y`` I64."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    xb = np.ascontiguousarray((d.data / 16.0).astype("<f4")).tobytes()
    yb = np.ascontiguousarray(d.target.astype("<i8")).tobytes()
    header = json.dumps(
        {
            "x": {"dtype": "F32", "shape": [len(d.target), 64], "data_offsets": [0, len(xb)]},
            "y": {
                "dtype": "I64",
                "shape": [len(d.target)],
                "data_offsets": [len(xb), len(xb) + len(yb)],
            },
        },
        separators=(",", ":"),
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + xb + yb)
    return path


def _enable_compute(datadir: Path) -> None:
    with open(datadir / "config.toml", "a", encoding="utf-8") as f:
        f.write(
            f"\n[compute]\nenabled = true\nprice_per_device_second = {PRICE_PER_S}\n"
            f"wall_seconds = {WALL}\nmemory_bytes = {2 << 30}\n"
        )


def test_a_train_task_on_a_devnet_is_settled_and_paid(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    summary = init_devnet(tmp_path / "devnet", 1, 2, _template(tmp_path / "template.json"))
    logs = tmp_path / "logs"
    logs.mkdir()
    with Procs(logs) as procs:
        try:
            _scenario(procs, summary, tmp_path)
        except BaseException:
            for p in procs.started:
                print(f"--- {p.name} (log tail) ---\n{p.log_tail(60)}")
            raise


def _scenario(procs: Procs, summary: dict[str, Any], tmp: Path) -> None:
    dirs = {n["node"]: Path(n["datadir"]) for n in summary["nodes"]}
    for i in (1, 2):
        _enable_compute(dirs[i])
    nodes = [
        procs.node(f"node{i}", dirs[i], *(("--provide-compute",) if i else ())) for i in range(3)
    ]
    rpcs = [NodeRpc(p.wait_for_rpc_url(), timeout=30.0) for p in nodes]
    try:
        home = rpcs[0]
        wait_until(
            lambda: home.status()["peers"] >= 2 and min(r.height() for r in rpcs) >= 2,
            WAIT_S,
            "the full nodes connected and syncing",
            interval=0.3,
        )
        on = {i: ("--rpc", rpcs[i].url, "--datadir", str(dirs[i])) for i in range(3)}
        for i in (1, 2):
            op = str(operator_dev_key(i))
            cli_json("role", "register", "compute_provider", "--dev-key", op, *on[i])
            offer = cli_json("compute", "offer", "--timeout", str(WAIT_S), *on[i])
            assert offer["receipt"]["success"] and offer["provider"] is not None
        status = cli_json("compute", "status", *on[1])
        cls = status["provider"]["platformClass"]
        assert status["provider"]["pricePerDeviceSecond"] == str(PRICE_PER_S)
        assert cli_json("compute", "status", *on[2])["provider"]["platformClass"] == cls

        req = str(REQUESTER)
        cli_json("role", "register", "data_supplier", "--dev-key", req, *on[0])
        dataset = cli_json(
            "dataset", "add", str(_digits(tmp / "digits.safetensors")), "--name", "digits",
            "--price", "0", "--dev-key", req, *on[0],
        )["id"]  # fmt: skip
        params = tmp / "params.json"
        params.write_text(
            json.dumps(
                {
                    "spec": SPEC,
                    "dataset": dataset.removeprefix("0x"),
                    "steps": 20,
                    "lr": 0.01,
                    "batch_size": 32,
                    "optimizer": "adam",
                    "seed": 1,
                    "checkpoint_every": 10,
                }
            )
        )
        client = home.client
        addresses = {
            "req": dev_key(REQUESTER).address,
            1: dev_key(operator_dev_key(1)).address,
            2: dev_key(operator_dev_key(2)).address,
        }
        before = {k: client.get_account(a).balance for k, a in addresses.items()}
        submitted = cli_json(
            "task", "submit", "--recipe", "train", "--params", str(params),
            "--max-price", "5", "--verifier-fee", "0.5", "--verifiers", "1",
            "--wall-seconds", str(WALL), "--memory", "1GiB", "--deadline", "150",
            "--platform", cls, "--dev-key", req, *on[0],
        )  # fmt: skip
        assert submitted["receipt"]["success"], submitted
        tid = submitted["taskId"]
        assert cli_json("task", "show", tid, *on[0])["state"] in ("open", "claimed")
        watched = cli_json("task", "watch", tid, "--timeout", "120", *on[0], timeout=150)
        task, pay = watched["task"], watched["payments"]
        assert task["state"] == "ended" and task["outcome"] == "paid", task
        assert len(task["result"]["checkpoints"]) == 2
        price = PRICE_PER_S * WALL
        assert pay["providerPaid"] == str(price) == task["result"]["price"]
        provider = 1 if task["provider"] == "0x" + addresses[1].hex() else 2
        verifier = 3 - provider
        assert task["provider"] == "0x" + addresses[provider].hex()
        assert pay["verifiersPaid"] == {"0x" + addresses[verifier].hex(): str(NSD // 2)}
        royalty = price * ROYALTY_PERCENT // 100
        assert pay["royalties"] == str(royalty)
        after = {k: client.get_account(a).balance for k, a in addresses.items()}
        # The provider: up by the price, less its claim / result fees (its bond is back).
        assert price - FEE_SLACK <= after[provider] - before[provider] <= price
        assert NSD // 2 - FEE_SLACK <= after[verifier] - before[verifier] <= NSD // 2
        # The requester (also the dataset's owner, so the royalty comes back to it).
        spent = price + NSD // 2
        assert spent <= before["req"] - after["req"] <= spent + FEE_SLACK
        mine = cli_json("task", "list", "--mine", "--dev-key", req, *on[0])
        assert [t["id"] for t in mine["tasks"]] == [tid]
    finally:
        for rpc in rpcs:
            rpc.close()

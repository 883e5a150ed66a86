"""Storage deals end to end on a devnet of real processes (loopback only, every wait bounded):
an honest provider is paid every epoch and a provider that deleted its replica is slashed.

node0 (the validator) is the owner: its operator account makes the deals through its storage
agent (``ns_proposeDeal``: replica built from its blob store, sent over ``/neuroseed/deal/1``,
signed by the provider, DealCreate submitted). node1 and node2 are full nodes whose operator
accounts register as storage providers and publish offers; their agents answer challenges.
node2's replica is deleted right after its deal lands on chain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from node.consensus.txs import make_transaction
from node.devkeys import dev_key
from node.devnet import operator_dev_key
from node.economy.api import Role
from node.economy.deals import StorageOffer
from node.economy.roles import RoleRegister
from node.encoding import Record
from node.genesis import genesis_to_json, load_genesis
from node.models.safetensors_header import TensorInfo, encode_header
from node.storage.format_v1 import make_leaf0
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

pytestmark = pytest.mark.slow

WAIT_S = 60.0
EPOCH = 6  # heights per deal epoch
EPOCHS = 2
ROWS = 300  # a ~1.2 MiB dataset: a replica of ~2.4 MiB, three upload requests


def _template(path: Path) -> Path:
    genesis = load_genesis(REPO / "genesis.json")
    votable = dataclasses.replace(
        genesis.votable_params, **{**FAST_TIMEOUTS, "timeout_commit_ms": 600}
    )
    economy = dataclasses.replace(
        genesis.economy_params,
        provider_bond=Amount(10 * NSD),
        deal_epoch_heights=EPOCH,
        deal_challenge_window=4,
        deal_challenge_percent=100,
    )
    path.write_text(
        genesis_to_json(
            dataclasses.replace(genesis, votable_params=votable, economy_params=economy)
        )
    )
    return path


def _dataset(path: Path) -> Path:
    x = b"".join(hashlib.sha256(f"row {i}".encode()).digest() * 128 for i in range(ROWS))
    header = encode_header([TensorInfo("x", "F32", (ROWS, 1024), 0, len(x))], None)
    path.write_bytes(make_leaf0(header) + x)
    return path


def _send(rpc: NodeRpc, signer: int, body: Record) -> None:
    """Sign ``body`` with dev key ``signer``, send it, wait until it is final and succeeded."""
    client = rpc.client
    key = dev_key(signer)
    chain_id = client.chain_id()
    nonce = client.pending_nonce(key.address)
    cost = client.estimate_fee(make_transaction(key, chain_id, nonce, 0, body).encode())
    signed = make_transaction(key, chain_id, nonce, cost + cost // 10, body)
    tx_id = client.send_raw_transaction(signed.encode())
    receipt = client.wait_for_receipt(tx_id, timeout=WAIT_S)
    assert receipt["success"], receipt


def _make_deal(rpc: NodeRpc, root: str, provider: int) -> dict[str, Any]:
    job = rpc.client.call(
        "ns_proposeDeal",
        [{"root": root, "provider": "0x" + dev_key(provider).address.hex(), "epochs": EPOCHS}],
    )
    deadline = time.monotonic() + WAIT_S
    while not job["done"]:
        assert time.monotonic() < deadline, f"deal job still {job['state']}"
        time.sleep(0.2)
        job = rpc.client.call("ns_getDealJob", [job["jobId"]])
    assert job["error"] is None, job["error"]
    receipt = rpc.client.wait_for_receipt(job["txId"], timeout=WAIT_S)
    assert receipt["success"], receipt
    return job


def test_storage_deals_on_a_devnet(tmp_path: Path) -> None:
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
    nodes = [procs.node(f"node{i}", dirs[i]) for i in range(3)]
    rpcs = [NodeRpc(p.wait_for_rpc_url(), timeout=30.0) for p in nodes]
    try:
        owner, honest, cheat = rpcs
        wait_until(
            lambda: owner.status()["peers"] >= 2 and min(r.height() for r in rpcs) >= 2,
            WAIT_S,
            "the full nodes connected and syncing",
            interval=0.3,
        )
        honest_key, cheat_key = operator_dev_key(1), operator_dev_key(2)
        # The honest provider through the CLI, the other through the SDK.
        on_honest = ("--rpc", honest.url, "--datadir", str(dirs[1]))
        cli_json("role", "register", "storage_provider", "--dev-key", str(honest_key), *on_honest)
        offer = cli_json(
            "storage",
            "offer",
            "--capacity",
            "1GiB",
            "--price-per-gib-epoch",
            "1000",
            "--collateral-per-gib",
            "10",
            "--max-epochs",
            "100",
            "--dev-key",
            str(honest_key),
            *on_honest,
        )
        assert offer["receipt"]["success"]
        _send(cheat, cheat_key, RoleRegister(int(Role.STORAGE_PROVIDER), b""))
        _send(cheat, cheat_key, StorageOffer(1 << 30, Amount(1000 * NSD), Amount(10 * NSD), 100))
        uploaded = owner.client.upload_artifact(_dataset(tmp / "data.safetensors"))
        root = str(uploaded["root"])

        honest_before = owner.client.get_account(dev_key(honest_key).address).balance
        on_owner = ("--rpc", owner.url, "--datadir", str(dirs[0]))
        good = cli_json(
            "storage",
            "deal",
            root,
            "--provider",
            "0x" + dev_key(honest_key).address.hex(),
            "--epochs",
            str(EPOCHS),
            "--timeout",
            str(WAIT_S),
            *on_owner,
        )
        assert good["receipt"]["success"]
        bad = _make_deal(owner, root, cheat_key)
        assert good["terms"]["replicaRoot"] != bad["terms"]["replicaRoot"]
        # The cheating provider deletes its replica as soon as the deal is on chain.
        shutil.rmtree(dirs[2] / "replicas" / "deals" / bad["dealId"][2:])

        def ended(deal_id: str) -> bool:
            deal = owner.client.call("ns_getDeal", [deal_id])
            return bool(deal["state"] != "active")

        wait_until(
            lambda: ended(good["dealId"]) and ended(bad["dealId"]),
            WAIT_S,
            "both deals ending",
            interval=0.5,
        )
        good_deal = owner.client.call("ns_getDeal", [good["dealId"]])
        bad_deal = owner.client.call("ns_getDeal", [bad["dealId"]])
        assert good_deal["state"] == "completed" and good_deal["epochsPaid"] == EPOCHS
        assert bad_deal["state"] == "slashed" and bad_deal["epochsPaid"] == 0
        price = int(good["terms"]["pricePerEpoch"])
        honest_after = owner.client.get_account(dev_key(honest_key).address).balance
        # Paid every epoch (less the small fees of its proofs), collateral back.
        assert good_deal["paid"] == str(EPOCHS * price) and good_deal["collateralLocked"] == "0"
        assert honest_after >= honest_before + EPOCHS * price - NSD // 100
        # The honest provider deleted the replica of its completed deal.
        wait_until(
            lambda: not (dirs[1] / "replicas" / "deals" / good["dealId"][2:]).exists(),
            10.0,
            "the completed deal's replica deleted",
        )
        status = cli_json("storage", "status", good["dealId"], *on_owner)
        assert status["state"] == "completed"
        mine = cli_json("storage", "status", *on_honest)
        assert [d["dealId"] for d in mine["asProvider"]] == [good["dealId"]]
        listed = owner.client.call(
            "ns_listDeals", [{"owner": "0x" + dev_key(operator_dev_key(0)).address.hex()}]
        )
        assert {d["dealId"] for d in listed["deals"]} == {good["dealId"], bad["dealId"]}
    finally:
        for rpc in rpcs:
            rpc.close()

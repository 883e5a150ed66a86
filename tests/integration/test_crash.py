"""Crash test: SIGKILL a real node at random moments while transfers stream in.

A devnet node process (one validator, fast blocks) receives a stream of transfers over JSON-RPC.
At a random moment (not aligned with block boundaries) it is killed with SIGKILL, then restarted
on the same data directory. After every restart:

* every block the node had reported final is still there with the same hash;
* every transaction that had a receipt still has it, in the same block;
* every recipient's balance equals the sum of its final transfers (each transfer goes to a fresh
  address, so balances tell exactly which transfers are final);
* the node replays its consensus WAL and goes on producing blocks.

Bounded: 10 kill cycles, each wait capped; loopback only; the process is always killed.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from node.consensus.txs import Transfer, make_transaction
from node.devkeys import dev_key
from node.genesis import load_genesis
from node.types import NSD, Address, Amount
from rpc.client import Client
from rpc.errors import ClientError, RpcError
from tests.integration.procs import Proc, fast_genesis

pytestmark = pytest.mark.slow

CYCLES = 10
START_WAIT_S = 60.0
SENDERS = (1, 2, 3)
FEE = NSD // 100


def start_node(datadir: Path, log: Path) -> Proc:
    """A single-validator devnet node on an ephemeral JSON-RPC port."""
    argv = [
        sys.executable,
        "-m",
        "node",
        "devnet",
        "--validators",
        "1",
        "--nodes",
        "0",
        "--datadir",
        str(datadir),
        "--rpc-port",
        "0",
    ]
    return Proc("node", argv, log)


@dataclasses.dataclass
class Ledger:
    """What the test saw as final before each kill."""

    blocks: dict[int, str] = dataclasses.field(default_factory=dict)  # height -> hash
    final: dict[str, tuple[int, bytes, int]] = dataclasses.field(default_factory=dict)
    sent: dict[str, tuple[bytes, int]] = dataclasses.field(default_factory=dict)  # id -> (to, amt)


def stream_transfers(
    client: Client, ledger: Ledger, rng: random.Random, stop: threading.Event, chain_id: int
) -> None:
    """Send transfers to fresh addresses until ``stop``; record receipts as they become final."""
    nonces = {i: client.pending_nonce(dev_key(i).address) for i in SENDERS}
    waiting: list[str] = []
    while not stop.is_set():
        try:
            for i in SENDERS:
                to = Address(rng.randbytes(20))
                amount = rng.randrange(1, 1000) * NSD // 1000
                tx = make_transaction(
                    dev_key(i), chain_id, nonces[i], FEE, Transfer(to, Amount(amount))
                )
                tx_id = client.send_raw_transaction(tx.encode()).hex()
                nonces[i] += 1
                ledger.sent[tx_id] = (to, amount)
                waiting.append(tx_id)
            still = []
            for tx_id in waiting:
                receipt = client.get_receipt(tx_id)
                if receipt is None:
                    still.append(tx_id)
                    continue
                to, amount = ledger.sent[tx_id]
                ledger.final[tx_id] = (receipt["height"], to, amount)
            waiting = still
            head = client.block_number()
            for h in range(max(1, head - 3), head + 1):
                block = client.get_block(h)
                if block is not None:
                    ledger.blocks[h] = block["hash"]
            time.sleep(0.02)
        except (ClientError, RpcError, OSError):
            return  # the node is being killed


def test_sigkill_at_random_moments_loses_nothing_final(tmp_path: Path) -> None:
    rng = random.Random(20261126)
    datadir = tmp_path / "node"
    genesis_path = tmp_path / "genesis.json"
    # 150 ms blocks: several blocks per kill cycle.
    fast_genesis(genesis_path, timeout_commit_ms=150, timeout_propose_ms=1000)
    init = subprocess.run(
        [
            sys.executable,
            "-m",
            "node",
            "--datadir",
            str(datadir),
            "init",
            "--dev",
            "--genesis",
            str(genesis_path),
        ],
        capture_output=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr.decode()
    chain_id = load_genesis(genesis_path).chain_id
    ledger = Ledger()
    last_height = 0
    for _cycle in range(CYCLES):
        node = start_node(datadir, tmp_path / "node.log")
        try:
            client = Client(node.wait_for_rpc_url(START_WAIT_S), timeout=10)
            try:
                check_after_restart(client, ledger, last_height)
                stop = threading.Event()
                worker = threading.Thread(
                    target=stream_transfers,
                    args=(client, ledger, random.Random(rng.random()), stop, chain_id),
                )
                worker.start()
                # A random moment: not aligned with the 150 ms block interval.
                time.sleep(rng.uniform(0.3, 2.5))
                node.kill()
                stop.set()
                worker.join(timeout=30)
                assert not worker.is_alive()
                last_height = max(ledger.blocks, default=0)
            finally:
                client.close()
        finally:
            node.close()
    assert len(ledger.final) > CYCLES, "too few transfers became final to test anything"
    # One last restart: everything is still there and blocks keep coming.
    node = start_node(datadir, tmp_path / "node.log")
    try:
        with Client(node.wait_for_rpc_url(START_WAIT_S), timeout=10) as client:
            check_after_restart(client, ledger, last_height)
            target = client.block_number() + 3
            deadline = time.monotonic() + 30
            while client.block_number() < target:
                assert time.monotonic() < deadline, "no new blocks after the restart"
                time.sleep(0.05)
    finally:
        node.close()


def check_after_restart(client: Client, ledger: Ledger, last_height: int) -> None:
    assert client.block_number() >= last_height
    for height, block_hash in ledger.blocks.items():
        block = client.get_block(height)
        assert block is not None and block["hash"] == block_hash, f"block {height} changed"
    for tx_id, (height, to, amount) in ledger.final.items():
        receipt = client.get_receipt(tx_id)
        assert receipt is not None and receipt["height"] == height, f"lost final tx {tx_id}"
        assert client.get_account(to).balance == amount
    # Transfers sent but never seen final either became final before the kill or were lost with
    # the mempool; either way the balance matches the receipt exactly.
    for tx_id, (to, amount) in ledger.sent.items():
        if tx_id in ledger.final:
            continue
        receipt = client.get_receipt(tx_id)
        assert client.get_account(to).balance == (amount if receipt is not None else 0)

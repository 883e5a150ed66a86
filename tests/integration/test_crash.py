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
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from node.consensus.txs import Transfer, make_transaction
from node.devkeys import dev_key
from node.genesis import genesis_to_json, load_genesis
from node.types import NSD, Address, Amount
from rpc.client import Client
from rpc.errors import ClientError, RpcError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CYCLES = 10
START_WAIT_S = 60.0
SENDERS = (1, 2, 3)
FEE = NSD // 100


def fast_genesis(path: Path) -> None:
    genesis = load_genesis(REPO / "genesis.json")
    params = dataclasses.replace(
        genesis.votable_params, timeout_commit_ms=150, timeout_propose_ms=1000
    )
    path.write_text(genesis_to_json(dataclasses.replace(genesis, votable_params=params)))


class NodeProcess:
    def __init__(self, datadir: Path, log: Path) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [
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
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "NEUROSEED_DATADIR"},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        self._pump_thread = threading.Thread(
            target=self._pump, args=(self.proc.stdout,), daemon=True
        )
        self._pump_thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def wait_ready(self) -> str:
        """Wait for the ``JSON-RPC: <url>`` line; return the URL (the port is ephemeral)."""
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"node exited early with code {self.proc.wait()}")
            if line.startswith("JSON-RPC:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError("node did not start in time")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._pump_thread.join(timeout=30)  # EOF once the process is gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


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
    fast_genesis(genesis_path)
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
        node = NodeProcess(datadir, tmp_path / "node.log")
        try:
            client = Client(node.wait_ready(), timeout=10)
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
            node.kill()
    assert len(ledger.final) > CYCLES, "too few transfers became final to test anything"
    # One last restart: everything is still there and blocks keep coming.
    node = NodeProcess(datadir, tmp_path / "node.log")
    try:
        with Client(node.wait_ready(), timeout=10) as client:
            check_after_restart(client, ledger, last_height)
            target = client.block_number() + 3
            deadline = time.monotonic() + 30
            while client.block_number() < target:
                assert time.monotonic() < deadline, "no new blocks after the restart"
                time.sleep(0.05)
    finally:
        node.kill()


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

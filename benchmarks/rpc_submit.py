"""Benchmark: transfers per second submitted over JSON-RPC until final, on a real devnet node.

A single-validator node (dev key 0, ``timeout_commit`` 200 ms) runs as a subprocess on a free
127.0.0.1 port with a temporary data directory; its genesis funds 50 dev accounts. 5,000
pre-signed transfers (50 senders × 100 nonces, in nonce order per sender) are submitted with
concurrent clients, twice:

* ``single``: one ``ns_sendRawTransaction`` per HTTP request, 16 requests in flight;
* ``batch``: JSON-RPC batches of 100 requests (the server's default batch limit), 4 in flight.

The figure is transfers ÷ the time from the first submit until every transfer is final. Final
is detected by polling the senders' committed nonces (``ns_getAccount``, one batch of 50 every
50 ms once all are submitted): a sender's nonce reaches N exactly when its transfers with nonces
below N are all in committed blocks, i.e. have receipts. After the clock stops, the receipt of
each sender's last transfer is fetched and checked (``ns_getReceipt``). Polling every receipt is
not done because a receipt lookup decodes the whole block and its receipts (tens of ms for a
1,000-transfer block; printed), so 5,000 lookups would measure the lookups, not the chain. Bound: raw coincurve public-key
recoveries per second on one core, measured in the same run before the node starts (every
submitted transfer costs the node one recovery at admission and one when the block is validated).
No target. The node is terminated at the end and on any failure.

Run: ``.venv/bin/python benchmarks/rpc_submit.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import time

import _common
from _common import devnet_node, make_genesis, raw_recovery_rate, result

from node.consensus.txs import Transfer, make_transaction
from node.crypto import sha256
from node.devkeys import dev_key
from node.types import Amount
from rpc.client import AsyncClient
from rpc.errors import RpcError, TransportError

FEE = 10**15  # 0.001 NSD: above the transfer cost of the repository's fee table
BATCH = 100
SINGLE_CONCURRENCY = 16
BATCH_CONCURRENCY = 4
PHASE_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.05


def sign_phase(
    keys: list, chain_id: int, first_nonce: int, per_sender: int, rng: random.Random
) -> list[tuple[bytes, bytes]]:
    """(raw, tx id) of ``per_sender`` transfers per key, nonce-major (every sender's nonce n
    comes before any sender's nonce n + 1)."""
    out = []
    n = len(keys)
    for nonce in range(first_nonce, first_nonce + per_sender):
        for s, key in enumerate(keys):
            r = rng.randrange(n - 1)
            r += r >= s
            body = Transfer(keys[r].address, Amount(1 + rng.randrange(1000)))
            raw = make_transaction(key, chain_id, nonce, FEE, body).encode()
            out.append((raw, sha256(raw)))
    return out


async def submit_single(client: AsyncClient, txs: list[tuple[bytes, bytes]], errors: dict) -> None:
    queue = collections.deque(txs)

    async def worker() -> None:
        while queue:
            raw, _ = queue.popleft()
            try:
                await client.send_raw_transaction(raw)
            except (RpcError, TransportError) as exc:
                errors[type(exc).__name__] += 1

    await asyncio.gather(*(worker() for _ in range(SINGLE_CONCURRENCY)))


async def submit_batches(client: AsyncClient, txs: list[tuple[bytes, bytes]], errors: dict) -> None:
    queue = collections.deque(txs[i : i + BATCH] for i in range(0, len(txs), BATCH))

    async def worker() -> None:
        while queue:
            chunk = queue.popleft()
            batch = client.batch()
            for raw, _ in chunk:
                batch.call("ns_sendRawTransaction", ["0x" + raw.hex()])
            try:
                calls = await batch.send()
            except (RpcError, TransportError) as exc:
                errors[type(exc).__name__] += len(chunk)
                continue
            for call in calls:
                try:
                    call.result()
                except RpcError as exc:
                    errors[type(exc).__name__] += 1

    await asyncio.gather(*(worker() for _ in range(BATCH_CONCURRENCY)))


async def wait_final(client: AsyncClient, expected: dict[str, int], deadline: float) -> int:
    """Poll the senders' committed nonces (one batch) until each reached ``expected``; returns
    how many senders are still short (0 when every transfer is final)."""
    pending = dict(expected)
    while pending and time.monotonic() < deadline:
        batch = client.batch()
        order = list(pending)
        for address in order:
            batch.call("ns_getAccount", [address])
        calls = await batch.send()
        for address, call in zip(order, calls, strict=True):
            if int(call.result()["nonce"]) >= pending[address]:
                del pending[address]
        if pending:
            await asyncio.sleep(POLL_INTERVAL_S)
    return len(pending)


async def check_receipts(client: AsyncClient, tx_ids: list[bytes]) -> float:
    """Every id must have a successful receipt; returns the mean seconds per lookup."""
    t0 = time.perf_counter()
    for tx_id in tx_ids:
        receipt = await client.get_receipt(tx_id)
        if receipt is None:
            raise SystemExit(f"transfer 0x{tx_id.hex()} is final by nonce but has no receipt")
        if receipt.get("success") is not True:
            raise SystemExit(f"transfer 0x{tx_id.hex()} failed: {receipt}")
    return (time.perf_counter() - t0) / max(1, len(tx_ids))


async def run_phase(
    url: str,
    mode: str,
    txs: list[tuple[bytes, bytes]],
    expected: dict[str, int],
    last_ids: list[bytes],
) -> tuple[float, float]:
    """Submit ``txs`` in ``mode``; returns (submit seconds, seconds until all final)."""
    errors: collections.Counter[str] = collections.Counter()
    async with AsyncClient(url, timeout=30.0) as client:
        t0 = time.perf_counter()
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        if mode == "single":
            await submit_single(client, txs, errors)
        else:
            await submit_batches(client, txs, errors)
        submitted = time.perf_counter() - t0
        if errors:
            raise SystemExit(f"{mode}: {sum(errors.values())} submissions failed: {dict(errors)}")
        left = await wait_final(client, expected, deadline)
        final = time.perf_counter() - t0
        if left:
            raise SystemExit(f"{mode}: {left} senders not final after {PHASE_TIMEOUT_S} s")
        head = await client.block_number()
        per_lookup = await check_receipts(client, last_ids)
    print(
        f"{mode:>6}: {len(txs):,} transfers submitted in {submitted:.2f} s "
        f"({len(txs) / submitted:,.0f}/s), all final after {final:.2f} s (head {head}); "
        f"receipts of each sender's last transfer found ({per_lookup * 1e3:.0f} ms a lookup)",
        flush=True,
    )
    return submitted, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 transfers from 10 senders")
    args = parser.parse_args()
    senders, per_sender = (10, 100) if args.quick else (50, 100)
    total = senders * per_sender
    print(f"machine: {_common.machine()}")
    print(
        f"rpc_submit: {total:,} transfers ({senders} senders x {per_sender} nonces) per mode, "
        f"single requests ({SINGLE_CONCURRENCY} in flight) and batches of {BATCH} "
        f"({BATCH_CONCURRENCY} in flight), node with timeout_commit 200 ms"
    )
    bound = raw_recovery_rate()

    keys = [dev_key(i) for i in range(1, senders + 1)]
    genesis = make_genesis([k.address for k in keys], timeout_commit_ms=200)
    rng = random.Random(7)
    phases = {
        "single": sign_phase(keys, genesis.chain_id, 0, per_sender, rng),
        "batch": sign_phase(keys, genesis.chain_id, per_sender, per_sender, rng),
    }
    rates = {}
    with devnet_node(genesis) as node:
        print(f"node pid {node.pid} at {node.url}", flush=True)
        try:
            for i, (mode, txs) in enumerate(phases.items()):
                expected = {"0x" + k.address.hex(): (i + 1) * per_sender for k in keys}
                last_ids = [tx_id for _, tx_id in txs[-senders:]]
                _, final = asyncio.run(run_phase(node.url, mode, txs, expected, last_ids))
                rates[mode] = len(txs) / final
        except BaseException:
            print(f"node log (tail):\n{node.log_tail()}")
            raise

    for mode, rate in rates.items():
        print(
            f"rpc_submit {mode}: {rate:,.0f} transfers/s to final  vs  bound {bound:,.0f} raw "
            f"recoveries/s (ratio {rate / bound:.3f})"
        )
    for mode, rate in rates.items():
        result(f"rpc_submit_{mode}", rate, "tx/s", bound, None)


if __name__ == "__main__":
    main()

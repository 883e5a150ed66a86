"""Benchmark: transfers per second submitted at one node of a 4-validator network and final on all
four, vs the single-node ``rpc_submit`` figure re-measured in the same run.

Both chains have the same chain id, ``timeout_commit`` 200 ms and the same funded senders (dev
keys 200..200+S-1, none of them a validator key), so **the very same signed transfers** (S senders
× N nonces, nonce-major, as ``rpc_submit.py`` makes them) are submitted to each:

* ``single`` (the bound): ``rpc_submit.py``'s batch mode against a single-validator node
  (``_common.devnet_node``) — JSON-RPC batches of 100, 4 in flight, final when every sender's
  committed nonce reached N;
* ``network``: ``neuroseed devnet --init-only --validators 4 --nodes 0`` with that genesis as
  template, four ``neuroseed run`` processes on 127.0.0.1 talking libp2p; the same batches go to
  validator 0 only (it gossips them to the others, whichever proposes includes them); final when
  every sender's committed nonce reached N **on each of the four validators** (polled in
  parallel; the clock stops at the last).

Figure: transfers ÷ (first submit → final on all four). After the clock stops, each sender's last
transfer must have a successful receipt on validator 3 as well. The single node runs first and
alone; the four validators after it (so neither disturbs the other). No target. Every process is
killed at the end and on failure.

Run: ``.venv/bin/python benchmarks/network_tps.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import shutil
import tempfile
import time
from pathlib import Path

import _common
import rpc_submit
from _common import devnet_node, make_genesis, result

from node.devkeys import dev_key
from node.genesis import genesis_to_json
from rpc.client import AsyncClient
from tests.integration.procs import NodeRpc, Procs, init_devnet, wait_until

VALIDATORS = 4
FIRST_SENDER = 200
TIMEOUT_COMMIT_MS = 200
NETWORK_TIMEOUT_S = 180.0


async def submit_and_wait_all(
    submit_url: str,
    urls: list[str],
    txs: list[tuple[bytes, bytes]],
    expected: dict[str, int],
    last_ids: list[bytes],
) -> tuple[float, float, list[float]]:
    """Submit ``txs`` to ``submit_url`` in batches; returns (submit s, final-on-all s, per-node
    final s)."""
    counts: collections.Counter[str] = collections.Counter()
    async with AsyncClient(submit_url, timeout=30.0) as submitter:
        clients = [AsyncClient(url, timeout=30.0) for url in urls]
        try:
            t0 = time.perf_counter()
            deadline = time.monotonic() + NETWORK_TIMEOUT_S
            await rpc_submit.submit_batches(submitter, txs, counts)
            submitted = time.perf_counter() - t0
            if counts:
                raise SystemExit(f"network: {sum(counts.values())} submissions failed: {counts}")

            async def final_at(client: AsyncClient) -> float:
                left = await rpc_submit.wait_final(client, expected, deadline)
                if left:
                    raise SystemExit(f"network: {left} senders not final at {client.url}")
                return time.perf_counter() - t0

            per_node = await asyncio.gather(*(final_at(c) for c in clients))
            final = max(per_node)
            per_lookup = await rpc_submit.check_receipts(clients[-1], last_ids)
        finally:
            for c in clients:
                await c.aclose()
    print(
        f"network: {len(txs):,} transfers submitted to validator 0 in {submitted:.2f} s, "
        f"final on all {len(urls)} after {final:.2f} s (per validator: "
        f"{', '.join(f'{t:.2f}' for t in per_node)} s); last receipts found on validator "
        f"{len(urls) - 1} ({per_lookup * 1e3:.0f} ms a lookup)",
        flush=True,
    )
    return submitted, final, list(per_node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 transfers from 10 senders")
    args = parser.parse_args()
    senders, per_sender = (10, 100) if args.quick else (50, 100)
    total = senders * per_sender
    print(f"machine: {_common.machine()}")
    print(
        f"network_tps: {total:,} transfers ({senders} senders x {per_sender} nonces), batches of "
        f"{rpc_submit.BATCH} ({rpc_submit.BATCH_CONCURRENCY} in flight), timeout_commit "
        f"{TIMEOUT_COMMIT_MS} ms; single validator, then {VALIDATORS} validator processes",
        flush=True,
    )
    keys = [dev_key(FIRST_SENDER + i) for i in range(senders)]
    genesis = make_genesis(
        [k.address for k in keys], timeout_commit_ms=TIMEOUT_COMMIT_MS, keep_repo_balances=True
    )
    txs = rpc_submit.sign_phase(keys, genesis.chain_id, 0, per_sender, random.Random(7))
    expected = {"0x" + k.address.hex(): per_sender for k in keys}
    last_ids = [tx_id for _, tx_id in txs[-senders:]]

    # The bound: rpc_submit's batch figure, re-measured now on this machine.
    with devnet_node(genesis) as node:
        try:
            _, final = asyncio.run(rpc_submit.run_phase(node.url, "batch", txs, expected, last_ids))
        except BaseException:
            print(f"node log (tail):\n{node.log_tail()}")
            raise
    single = total / final

    tmp = Path(tempfile.mkdtemp(prefix="neuroseed-bench-network-"))
    try:
        template = tmp / "template.json"
        template.write_text(genesis_to_json(genesis))
        summary = init_devnet(tmp / "devnet", VALIDATORS, 0, template)
        (tmp / "logs").mkdir()
        with Procs(tmp / "logs") as procs:
            nodes = [procs.node(f"node{n['node']}", Path(n["datadir"])) for n in summary["nodes"]]
            try:
                urls = [p.wait_for_rpc_url() for p in nodes]
                rpcs = [NodeRpc(u) for u in urls]
                try:
                    wait_until(
                        lambda: all((r.height_or_none() or 0) >= 3 for r in rpcs),
                        60.0,
                        "the 4 validators finalizing",
                        interval=0.2,
                    )
                finally:
                    for r in rpcs:
                        r.close()
                _, final, _ = asyncio.run(
                    submit_and_wait_all(urls[0], urls, txs, expected, last_ids)
                )
            except BaseException:
                for p in procs.started:
                    print(f"--- {p.name} (log tail) ---\n{p.log_tail(10)}")
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    network = total / final
    print(
        f"network_tps: {network:,.0f} transfers/s final on all {VALIDATORS} validators  vs  "
        f"single-node rpc_submit batch {single:,.0f} transfers/s (ratio {network / single:.3f})"
    )
    result("network_tps", network, "tx/s", single, None)


if __name__ == "__main__":
    main()

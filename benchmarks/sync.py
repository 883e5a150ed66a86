"""Benchmark: blocks per second for a fresh node syncing a chain over ``/neuroseed/sync/1``.

Fixture: a chain of 5,000 blocks of 50 transfers each (1,000 funded accounts, random recipients),
single validator (dev key 0), built once by a ``ChainService`` over LevelDB and cached under the
system temp dir (``neuroseed-bench-sync-<version>-<blocks>x<txs>-<genesis hash>``, so a change
of ``genesis.json`` or of the genesis state's format builds a new one; ``--rebuild`` forces it).
The build time (about a minute on 2 cores) is printed on its own line and is in no figure.

Timed: a fresh node (``ChainService`` over a new LevelDB, its ``ConsensusService`` not started)
runs ``SyncService.run`` — the initial sync, exclusive mode: fetch windows of 64 blocks from 3
serving peers over the in-memory network (``MemoryNetwork``, 0.2–1 ms per message), decode and
verify every window (commits, roots, links, every transaction's signature recovered) in worker
threads, then ``ChainService.validate`` + ``ChainService.commit`` (one synced LevelDB batch per
block) in order in another worker thread — from the start until ``run`` reports the node caught
up. The serving peers share one read-only ``ChainService`` over the fixture's LevelDB in the same
process; the CPU of each part is printed (serving, verifying, applying, and the rest: the trio
loop and LevelDB's background compaction threads).

Bound, measured in the same run on the same blocks: writing each block and its commit, encoded,
to a fresh LevelDB as one synced batch per block (``kv.batch()``; two plain puts), plus
recovering every transaction signature with raw coincurve
``PublicKey.from_signature_and_message`` on one thread (digests computed beforehand). bound =
blocks / (write seconds + recovery seconds); ratio = sync blocks/s ÷ bound. No target. A
CPU-time cross-check is printed too (the process's CPU seconds for the sync against the bound's
thread CPU seconds): it does not depend on other load on the machine.

Run: ``.venv/bin/python benchmarks/sync.py [--blocks N] [--txs N] [--peers N] [--window N]
[--rebuild]``. With no arguments: the full 5,000 blocks, ~1.5 min with a cached fixture, ~2.5 min
when it must be built (2 cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import _common
import trio
from _common import NSD, Stopwatch, bench_keys, make_genesis, result

import node.p2p.sync as sync_mod
from node import crypto
from node.chain import ChainService
from node.consensus.blocks import Block, Commit, Vote, VoteType, sign_vote
from node.consensus.mempool import Mempool
from node.consensus.txs import Transfer, VerifiedTransaction, decode_transaction, make_transaction
from node.consensus_service import ConsensusService
from node.devkeys import dev_key
from node.genesis import Genesis, genesis_hash
from node.p2p.memory import MemoryNetwork
from node.p2p.sync import SyncService, SyncSettings
from node.service import GC_THRESHOLDS
from node.storage.leveldb import LevelDB
from node.types import Amount, Round, TimestampMs

FIXTURE_VERSION = "v1"  # bump when the fixture's content or the chain format changes
ACCOUNTS = 1_000
FEE = 10**15  # 0.001 NSD: above the transfer cost of the repository's fee table
SEED = 20260101


# --- the fixture -----------------------------------------------------------------------------


def fixture_genesis(accounts: int) -> Genesis:
    keys = bench_keys(accounts, tag=b"neuroseed-bench-sync-")
    return make_genesis([k.address for k in keys], balance=1_000_000 * NSD)


def make_commit(block: Block, chain_id: int) -> Commit:
    """The single dev validator's precommit for ``block`` (time = block time + 1 ms)."""
    header = block.header
    vote = Vote(
        int(VoteType.PRECOMMIT),
        header.height,
        Round(0),
        header.hash(),
        TimestampMs(header.time + 1),
        dev_key(0).address,
    )
    return Commit(header.height, Round(0), header.hash(), (sign_vote(dev_key(0), chain_id, vote),))


def build_fixture(path: Path, blocks: int, per_block: int) -> dict[str, object]:
    """The chain in a LevelDB at ``path / "chain"``; returns what ``fixture.json`` records."""
    t0 = time.perf_counter()
    keys = bench_keys(ACCOUNTS, tag=b"neuroseed-bench-sync-")
    addresses = [k.address for k in keys]
    genesis = fixture_genesis(ACCOUNTS)
    chain_id = genesis.chain_id
    kv = LevelDB(path / "chain")
    chain = ChainService(kv, genesis)
    chain.open()
    rng = random.Random(SEED)
    nonces = [0] * ACCOUNTS
    proposer = dev_key(0).address
    last_commit: Commit | None = None
    sign_s = build_s = 0.0
    next_sender = 0
    try:
        for b in range(blocks):
            t1 = time.perf_counter()
            batch = []
            for _ in range(per_block):
                s = next_sender
                next_sender = (next_sender + 1) % ACCOUNTS
                r = (s + 1 + rng.randrange(ACCOUNTS - 1)) % ACCOUNTS
                body = Transfer(addresses[r], Amount(rng.randrange(1, 10**12)))
                signed = make_transaction(keys[s], chain_id, nonces[s], FEE, body)
                nonces[s] += 1
                raw = signed.encode()
                batch.append(
                    VerifiedTransaction(raw, crypto.sha256(raw), signed, addresses[s], body)
                )
            t2 = time.perf_counter()
            built = chain.build(0, proposer, last_commit, batch)
            if built.rejected or len(built.block.txs) != per_block:
                raise SystemExit(f"the fixture builder rejected transfers: {built.rejected[:3]}")
            commit = make_commit(built.block, chain_id)
            chain.commit(built.block, commit)
            last_commit = commit
            sign_s += t2 - t1
            build_s += time.perf_counter() - t2
            if (b + 1) % 500 == 0:
                print(
                    f"  fixture: {b + 1:,}/{blocks:,} blocks ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        head = chain.head
        assert head is not None
        info: dict[str, object] = {
            "version": FIXTURE_VERSION,
            "blocks": blocks,
            "txs_per_block": per_block,
            "head_hash": head.hash().hex(),
            "build_s": round(time.perf_counter() - t0, 1),
            "sign_s": round(sign_s, 1),
            "build_commit_s": round(build_s, 1),
        }
    finally:
        chain.close()
        kv.close()
    return info


def fixture(blocks: int, per_block: int, rebuild: bool) -> tuple[Path, dict[str, object]]:
    # Keyed by the version, the size and the genesis hash (a change to genesis.json or to the
    # genesis state's format makes a new fixture).
    ghash = genesis_hash(fixture_genesis(ACCOUNTS)).hex()[:12]
    root = Path(tempfile.gettempdir()) / (
        f"neuroseed-bench-sync-{FIXTURE_VERSION}-{blocks}x{per_block}-{ghash}"
    )
    marker = root / "fixture.json"
    if rebuild or not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        print(f"fixture: building {blocks:,} blocks x {per_block} transfers in {root} ...")
        info = build_fixture(root, blocks, per_block)
        marker.write_text(json.dumps(info))
        print(
            f"fixture build time: {info['build_s']} s (signing {info['sign_s']} s, build + "
            f"commit {info['build_commit_s']} s); cached for later runs",
            flush=True,
        )
    else:
        info = json.loads(marker.read_text())
        print(f"fixture: cached in {root} (built in {info['build_s']} s; --rebuild to redo)")
    return root, info


# --- the sync --------------------------------------------------------------------------------


async def sync_once(
    source: ChainService, genesis: Genesis, work: Path, peers: int, settings: SyncSettings
) -> tuple[float, ChainService, list[SyncService]]:
    net = MemoryNetwork(1, delay_ms=(0.2, 1.0))
    servers = []
    for i in range(peers):
        host = net.add_host(f"peer{i}")
        consensus = ConsensusService(source, Mempool(genesis.chain_id), None, work / f"wal{i}")
        servers.append(SyncService(host, source, consensus, SyncSettings(initial_sync=False)))
    host = net.add_host("fresh")
    kv = LevelDB(work / "fresh")
    chain = ChainService(kv, genesis)
    chain.open()
    consensus = ConsensusService(chain, Mempool(genesis.chain_id), None, work / "wal-fresh")
    fresh = SyncService(host, chain, consensus, settings)
    async with net, trio.open_nursery() as nursery:
        for s in servers:
            await nursery.start(s.run)
        t0 = time.perf_counter()
        await nursery.start(fresh.run)
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return elapsed, chain, [fresh, *servers]


# --- the bound -------------------------------------------------------------------------------


def bound_seconds(source: ChainService, blocks: int, work: Path) -> tuple[float, float, int, float]:
    """(write s, recovery s, signatures, CPU s of the timed parts) for the same blocks (see the
    module docstring)."""
    import coincurve  # the raw library on purpose: this is the bound, not the node's code

    view = source.read_view()
    chain_id = source.chain.chain_id
    kv = LevelDB(work / "bound")
    write_s = recover_s = cpu_s = 0.0
    count = 0
    recover = coincurve.PublicKey.from_signature_and_message
    chunk = 250
    try:
        for lo in range(1, blocks + 1, chunk):
            encoded: list[tuple[int, bytes, bytes]] = []
            pairs: list[tuple[bytes, bytes]] = []
            for h in range(lo, min(lo + chunk, blocks + 1)):
                block, commit = view.get_block(h), view.get_commit(h)
                assert block is not None and commit is not None
                encoded.append((h, block.encode(), commit.encode()))
                for raw in block.txs:
                    signed = decode_transaction(raw)
                    digest = crypto.signing_digest(crypto.TAG_TX, chain_id, signed.tx.encode())
                    pairs.append((bytes(signed.signature), digest))
            c0 = time.thread_time()
            t0 = time.perf_counter()
            for h, block_bytes, commit_bytes in encoded:
                batch = kv.batch()
                batch.put(b"b" + h.to_bytes(8, "big"), block_bytes)
                batch.put(b"c" + h.to_bytes(8, "big"), commit_bytes)
                batch.commit(sync=True)
            t1 = time.perf_counter()
            for sig, digest in pairs:
                recover(sig, digest, hasher=None)
            t2 = time.perf_counter()
            cpu_s += time.thread_time() - c0
            write_s += t1 - t0
            recover_s += t2 - t1
            count += len(pairs)
    finally:
        kv.close()
    return write_s, recover_s, count, cpu_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5_000)
    parser.add_argument("--txs", type=int, default=50, help="transfers per block")
    parser.add_argument("--peers", type=int, default=3, help="serving peers")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rebuild", action="store_true", help="build the fixture again")
    args = parser.parse_args()
    print(f"machine: {_common.machine()}")
    root, info = fixture(args.blocks, args.txs, args.rebuild)
    blocks = int(info["blocks"])  # type: ignore[call-overload]
    genesis = fixture_genesis(ACCOUNTS)

    source_kv = LevelDB(root / "chain")
    source = ChainService(source_kv, genesis)
    source.open()
    work = Path(tempfile.mkdtemp(prefix="neuroseed-bench-sync-run-"))
    try:
        if source.head_height != blocks or source.head is None:
            raise SystemExit("the cached fixture is incomplete: run with --rebuild")
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)  # as the node sets it after start-up
        settings = SyncSettings(window=args.window, follow=False)
        print(
            f"sync: a fresh node syncs {blocks:,} blocks x {args.txs} transfers from "
            f"{args.peers} peers (in-memory network, windows of {args.window})",
            flush=True,
        )
        sw = Stopwatch()
        parts = [
            ("_blocks_response", "serving peers: read + encode responses"),
            ("_decode_and_verify", "decode + verify windows (incl. tx recovery)"),
            ("_apply_exclusive", "apply: validate + commit (one thread)"),
        ]
        saved = {name: getattr(sync_mod, name) for name, _ in parts}
        for name, label in parts:
            setattr(sync_mod, name, sw.wrap(label, saved[name]))
        c0 = time.process_time()
        try:
            elapsed, chain, services = run_sync_once(source, genesis, work, args.peers, settings)
        finally:
            for name, fn in saved.items():
                setattr(sync_mod, name, fn)
        cpu = time.process_time() - c0
        fresh = services[0]
        if chain.head_height != blocks or chain.head != source.head:
            raise SystemExit(f"the fresh node reached {chain.head_height}, not the source's head")
        chain.close()
        rate = blocks / elapsed
        print(
            f"sync: {blocks:,} blocks in {elapsed:.1f} s = {rate:,.1f} blocks/s "
            f"({rate * args.txs:,.0f} transfers/s); windows fetched "
            f"{fresh.stats['windows_fetched']}, by peer "
            + ", ".join(f"{p.decode()}: {n}" for p, n in sorted(fresh.requests_by_peer.items()))
            + f"; at most {fresh.max_in_flight_seen} in flight",
            flush=True,
        )

        print(
            f"  process CPU {cpu:.1f} s in {elapsed:.1f} s wall ({cpu / elapsed:.0%} of a core); "
            "thread seconds (wall, CPU of the thread) by part:"
        )
        for label, secs in sw.totals.items():
            print(f"    {label:<46} {secs:6.1f} s wall {sw.cpu[label]:6.1f} s CPU")
        other = cpu - sum(sw.cpu.values())
        print(
            f"    {'other: trio loop, LevelDB background compaction':<46} {'':>6}        "
            f"{other:6.1f} s CPU"
        )

        write_s, recover_s, sigs, bound_cpu = bound_seconds(source, blocks, work)
        bound = blocks / (write_s + recover_s)
        print(
            f"bound: {blocks:,} synced batch writes of block + commit in {write_s:.1f} s and "
            f"{sigs:,} raw recoveries in {recover_s:.1f} s ({sigs / recover_s:,.0f}/s) = "
            f"{bound:,.1f} blocks/s"
        )
        print(
            f"cross-check per CPU second (insensitive to other load; the sync's counts every "
            f"thread of the process, the serving peers and LevelDB's included): sync "
            f"{blocks / cpu:,.1f} blocks/s vs bound {blocks / bound_cpu:,.1f} blocks/s "
            f"(ratio {bound_cpu / cpu:.3f})"
        )
        print(
            f"\nsync: {rate:,.1f} blocks/s vs bound {bound:,.1f} blocks/s (ratio {rate / bound:.3f})"
        )
        result("sync_blocks", rate, "blocks/s", bound)
    finally:
        source.close()
        source_kv.close()
        shutil.rmtree(work, ignore_errors=True)


def run_sync_once(
    source: ChainService, genesis: Genesis, work: Path, peers: int, settings: SyncSettings
) -> tuple[float, ChainService, list[SyncService]]:
    return trio.run(sync_once, source, genesis, work, peers, settings)


if __name__ == "__main__":
    main()

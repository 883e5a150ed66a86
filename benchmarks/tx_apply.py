"""Benchmark: signed transfers applied per second in block application, as a validator does it.

State: 100,000 funded accounts (a programmatic genesis). Blocks of 1,000 transfers between random
funded accounts, pre-signed before timing, built by a proposer-side ``ChainService`` over its own
LevelDB. The timed side is a second ``ChainService`` over a copy of the genesis database: for
each received block it runs ``validate(block)`` (header checks incl. the last commit's signature,
decode + recovery of every transaction via ``verify_block_transactions``, execution on the
overlay, receipts root, the state-tree update) and ``commit(block, commit)`` (the one synced
LevelDB batch) — all on one thread, on a real LevelDB in a temporary directory, with a cold
validated-block cache (it never built these blocks). One warm-up block, then ≥ 5 timed blocks.

Bound: raw coincurve public-key recoveries per second on one core
(``PublicKey.from_signature_and_message`` over pre-made signatures), measured in the same run in
0.3 s bursts right before each timed block, so that on a shared machine the bound and the figure
see the same load (a standalone measurement is printed too). ratio = transfers/s ÷
recoveries/s; target ≥ 0.30. A CPU-time cross-check (this thread's CPU seconds for both) is
printed as well; it does not depend on what else runs on the machine.

Run: ``.venv/bin/python benchmarks/tx_apply.py [--quick] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common
from _common import (
    RecoveryProbe,
    Stopwatch,
    bench_keys,
    make_genesis,
    recovery_bound,
    result,
)

import node.consensus.transition as transition
import node.consensus.txs as txs_mod
from node import crypto
from node.chain import ChainService
from node.consensus.blocks import Block, Commit, Vote, VoteType, sign_vote
from node.consensus.txs import Transfer, VerifiedTransaction, make_transaction
from node.crypto import sha256
from node.devkeys import dev_key
from node.service import GC_THRESHOLDS
from node.storage.chain_store import ChainStore
from node.storage.leveldb import LevelDB
from node.storage.smt import StateTree
from node.types import Amount, Round, TimestampMs

TARGET = 0.30
BURST_S = 0.3  # seconds of raw recoveries measured before each timed block
FEE = 10**15  # 0.001 NSD: above the transfer cost (~3.4e13) of the repository's fee table


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


def verify_costs(raws: list[bytes]) -> dict[str, float]:
    """CPU seconds per transfer of the parts of ``verify_transaction``, over ``raws``."""
    signed = [txs_mod.decode_transaction(r) for r in raws]
    digests = [crypto.signing_digest(crypto.TAG_TX, s.tx.chain_id, s.tx.encode()) for s in signed]
    parts = {
        "verify_transaction": lambda: [txs_mod.verify_transaction(r) for r in raws],
        "decode": lambda: [txs_mod.decode_body(txs_mod.decode_transaction(r).tx) for r in raws],
        "recover_sender": lambda: [txs_mod.recover_sender(s) for s in signed],
        "of which signature->pubkey": lambda: [
            crypto.recover_public_key(d, s.signature) for d, s in zip(digests, signed, strict=True)
        ],
    }
    out = {}
    for name, fn in parts.items():
        c0 = time.thread_time()
        fn()
        out[name] = (time.thread_time() - c0) / len(raws)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 accounts, 3 timed blocks")
    parser.add_argument("--accounts", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks (after 1 warm-up)")
    parser.add_argument("--block-txs", type=int, default=1_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the timed blocks")
    parser.add_argument(
        "--cold-tree",
        action="store_true",
        help="validator opens a copy of the genesis database: empty tree-node cache",
    )
    args = parser.parse_args()
    accounts = args.accounts or (10_000 if args.quick else 100_000)
    timed_blocks = args.blocks or (3 if args.quick else 6)
    per_block = args.block_txs
    print(f"machine: {_common.machine()}")
    print(
        f"tx_apply: {accounts:,} funded accounts, 1 warm-up + {timed_blocks} timed blocks of "
        f"{per_block:,} transfers, validator side on one thread, LevelDB in a temp dir"
    )

    standalone = recovery_bound()
    probe = RecoveryProbe()

    t0 = time.perf_counter()
    keys = bench_keys(accounts)
    addresses = [k.address for k in keys]
    print(f"setup: derived {accounts:,} keys in {time.perf_counter() - t0:.1f} s")
    genesis = make_genesis(addresses, max_block_txs=max(per_block, 1))
    chain_id = genesis.chain_id

    tmp = Path(tempfile.mkdtemp(prefix="neuroseed-bench-txapply-"))
    try:
        # Proposer and validator each initialise their own database from the genesis (so the
        # validator's tree-node cache holds the genesis tree, as on a node that has been running);
        # with --cold-tree the validator gets a byte copy instead and starts with an empty cache,
        # as right after a restart.
        t0 = time.perf_counter()
        kv = LevelDB(tmp / "proposer")
        proposer = ChainService(kv, genesis)
        proposer.open()
        proposer.close()
        kv.close()
        if args.cold_tree:
            shutil.copytree(tmp / "proposer", tmp / "validator")
        print(f"setup: genesis state of {accounts:,} accounts in {time.perf_counter() - t0:.1f} s")

        # Pre-sign every transfer: random funded sender and recipient, nonces in order.
        rng = random.Random(20250101)
        nonces = [0] * accounts
        batches: list[list[VerifiedTransaction]] = []
        t0 = time.perf_counter()
        for _ in range(1 + timed_blocks):
            batch = []
            for _ in range(per_block):
                s = rng.randrange(accounts)
                r = rng.randrange(accounts - 1)
                r += r >= s
                body = Transfer(addresses[r], Amount(rng.randrange(1, 10**12)))
                signed = make_transaction(keys[s], chain_id, nonces[s], FEE, body)
                nonces[s] += 1
                raw = signed.encode()
                batch.append(VerifiedTransaction(raw, sha256(raw), signed, addresses[s], body))
            batches.append(batch)
        signed_n = sum(map(len, batches))
        print(f"setup: signed {signed_n:,} transfers in {time.perf_counter() - t0:.1f} s")

        # The proposer builds and commits the blocks (its own timings are for information).
        kv = LevelDB(tmp / "proposer")
        proposer = ChainService(kv, genesis)
        proposer.open()
        proposer_addr = dev_key(0).address
        blocks: list[tuple[Block, Commit]] = []
        last_commit: Commit | None = None
        build_s = []
        for batch in batches:
            t0 = time.perf_counter()
            built = proposer.build(0, proposer_addr, last_commit, batch)
            commit = make_commit(built.block, chain_id)
            proposer.commit(built.block, commit)
            build_s.append(time.perf_counter() - t0)
            if built.rejected or len(built.block.txs) != len(batch):
                raise SystemExit(f"the proposer rejected transfers: {built.rejected[:3]}")
            blocks.append((built.block, commit))
            last_commit = commit
        proposer.close()
        kv.close()
        build_rate = per_block * timed_blocks / sum(build_s[1:])
        print(
            f"proposer (info): build + commit {statistics.median(build_s[1:]) * 1e3:.0f} ms a "
            f"block, {build_rate:,.0f} tx/s (no signature recovery: mempool txs are pre-verified)",
            flush=True,
        )

        # The validator: its own database and tree cache, a cold validated-block cache.
        t0 = time.perf_counter()
        kv = LevelDB(tmp / "validator")
        validator = ChainService(kv, genesis)
        validator.open()
        print(
            f"setup: validator opened in {time.perf_counter() - t0:.1f} s "
            f"({'cold' if args.cold_tree else 'genesis-warm'} tree-node cache)",
            flush=True,
        )
        sw = Stopwatch()
        patches = [
            (transition, "check_header", "header checks (incl. last-commit signature)"),
            (transition, "verify_block_transactions", "decode + recover all txs"),
            (transition, "execute_block", "execution on the overlay"),
            (transition, "compute_receipts_root", "receipts root"),
            (StateTree, "apply", "state tree update"),
            (ChainStore, "commit_block", "commit batch (LevelDB, synced)"),
            (StateTree, "committed", "tree-node cache update after the commit"),
        ]
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
        for mod, attr, label in patches:
            setattr(mod, attr, sw.wrap(label, getattr(mod, attr)))
        # The setup's objects (100k keys, pre-signed transfers) are not the node's: drop them and
        # freeze the rest out of the cyclic collector, so its full passes cost what they would
        # cost a node (the tree-node cache is built of untracked tuples and bytearrays).
        del keys, batches, built, proposer
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)  # as the node sets it after start-up (node/service.py)
        profiler = cProfile.Profile() if args.profile else None
        times = []
        cpu_times = []
        bursts = []
        try:
            for i, (block, commit) in enumerate(blocks):
                if i >= 1:
                    # The bound, sampled right before each timed block: both see the same load.
                    bursts.append(probe.burst(BURST_S))
                    if i == 1:
                        sw.reset()
                    if profiler is not None:
                        profiler.enable()
                c0 = time.thread_time()
                t0 = time.perf_counter()
                validator.validate(block)
                validator.commit(block, commit)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.thread_time() - c0)
                if profiler is not None:
                    profiler.disable()
        finally:
            if profiler is not None:
                profiler.disable()
            for mod, attr, fn in saved:
                setattr(mod, attr, fn)
        if validator.head_height != len(blocks) or validator.head != blocks[-1][0].header:
            raise SystemExit("the validator did not reach the proposer's head")
        per_tx = verify_costs([raw for block, _ in blocks[1:] for raw in block.txs])
        validator.close()
        kv.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    timed = times[1:]
    total = sum(timed)
    rate = per_block * len(timed) / total
    recoveries = sum(b[0] for b in bursts)
    bound = recoveries / sum(b[1] for b in bursts)
    cpu_bound = recoveries / sum(b[2] for b in bursts)
    print(
        f"\nwarm-up block: {times[0] * 1e3:.0f} ms; timed blocks: median "
        f"{statistics.median(timed) * 1e3:.0f} ms, min {min(timed) * 1e3:.0f} ms, "
        f"max {max(timed) * 1e3:.0f} ms"
    )
    cpu_total = sum(cpu_times[1:])
    n = len(timed)
    print("where the time goes, per block (wall ms, CPU ms of this thread, share of the wall):")
    accounted = accounted_cpu = 0.0
    for label, secs in sw.totals.items():
        cpu = sw.cpu[label]
        if not label.startswith(" "):
            accounted += secs
            accounted_cpu += cpu
        print(f"  {label:<46} {secs / n * 1e3:7.1f} {cpu / n * 1e3:7.1f}  {secs / total:6.1%}")
    other = total - accounted
    other_cpu = cpu_total - accounted_cpu
    print(
        f"  {'other (block hash, commit checks, view, ...)':<46} {other / n * 1e3:7.1f} "
        f"{other_cpu / n * 1e3:7.1f}  {other / total:6.1%}"
    )
    print(
        f"per transfer, CPU µs: {cpu_total / (per_block * n) * 1e6:.0f} in all; measured "
        f"apart over the same transfers: "
        + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in per_tx.items())
        + f"; the bound's raw recovery {1e6 / cpu_bound:.1f}"
    )
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(45)
        print(out.getvalue())

    cpu_rate = per_block * len(timed) / sum(cpu_times[1:])
    print(
        f"cross-check per CPU second of this thread (insensitive to other load on the machine): "
        f"{cpu_rate:,.0f} transfers/s vs {cpu_bound:,.0f} recoveries/s "
        f"(ratio {cpu_rate / cpu_bound:.3f})"
    )
    print(
        f"bound: {bound:,.0f} raw recoveries/s in {BURST_S} s bursts before each timed block "
        f"(standalone before the run: best {standalone.wall:,.0f}/s; the share of a core this "
        f"process got: bursts {sum(b[2] for b in bursts) / sum(b[1] for b in bursts):.0%}, "
        f"blocks {sum(cpu_times[1:]) / total:.0%})"
    )
    print(
        f"\ntx_apply: {rate:,.0f} transfers/s  vs  bound {bound:,.0f} raw recoveries/s "
        f"(ratio {rate / bound:.3f}, target >= {TARGET})"
    )
    result("tx_apply", rate, "tx/s", bound, TARGET)


if __name__ == "__main__":
    main()

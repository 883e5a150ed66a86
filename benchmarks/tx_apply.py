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
(``PublicKey.from_signature_and_message`` over pre-made signatures), measured in the same run.
ratio = transfers/s ÷ recoveries/s; target ≥ 0.30.

Run: ``.venv/bin/python benchmarks/tx_apply.py [--quick] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common
from _common import Stopwatch, bench_keys, make_genesis, raw_recovery_rate, result

import node.consensus.transition as transition
import node.consensus.txs as txs_mod
from node.chain import ChainService
from node.consensus.blocks import Block, Commit, Vote, VoteType, sign_vote
from node.consensus.txs import Transfer, VerifiedTransaction, make_transaction
from node.crypto import sha256
from node.devkeys import dev_key
from node.storage.chain_store import ChainStore
from node.storage.leveldb import LevelDB
from node.storage.smt import StateTree
from node.types import Amount, Round, TimestampMs

TARGET = 0.30
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 accounts, 3 timed blocks")
    parser.add_argument("--accounts", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks (after 1 warm-up)")
    parser.add_argument("--block-txs", type=int, default=1_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the timed blocks")
    args = parser.parse_args()
    accounts = args.accounts or (10_000 if args.quick else 100_000)
    timed_blocks = args.blocks or (3 if args.quick else 6)
    per_block = args.block_txs
    print(f"machine: {_common.machine()}")
    print(
        f"tx_apply: {accounts:,} funded accounts, 1 warm-up + {timed_blocks} timed blocks of "
        f"{per_block:,} transfers, validator side on one thread, LevelDB in a temp dir"
    )

    bound = raw_recovery_rate()

    t0 = time.perf_counter()
    keys = bench_keys(accounts)
    addresses = [k.address for k in keys]
    print(f"setup: derived {accounts:,} keys in {time.perf_counter() - t0:.1f} s")
    genesis = make_genesis(addresses, max_block_txs=max(per_block, 1))
    chain_id = genesis.chain_id

    tmp = Path(tempfile.mkdtemp(prefix="neuroseed-bench-txapply-"))
    try:
        # Genesis once, then a byte copy: proposer and validator start from the same database.
        t0 = time.perf_counter()
        kv = LevelDB(tmp / "proposer")
        proposer = ChainService(kv, genesis)
        proposer.open()
        proposer.close()
        kv.close()
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

        # The validator: cold validated cache, its own database and tree cache.
        kv = LevelDB(tmp / "validator")
        validator = ChainService(kv, genesis)
        validator.open()
        sw = Stopwatch()
        patches = [
            (transition, "check_header", "header checks (incl. last-commit signature)"),
            (transition, "verify_block_transactions", "decode + recover all txs"),
            (txs_mod, "recover_sender", "  of which: recover_sender"),
            (transition, "execute_block", "execution on the overlay"),
            (transition, "compute_receipts_root", "receipts root"),
            (StateTree, "apply", "state tree update"),
            (ChainStore, "commit_block", "commit batch (LevelDB, synced)"),
        ]
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
        for mod, attr, label in patches:
            setattr(mod, attr, sw.wrap(label, getattr(mod, attr)))
        profiler = cProfile.Profile() if args.profile else None
        times = []
        try:
            for i, (block, commit) in enumerate(blocks):
                if i == 1:
                    sw.reset()
                    if profiler is not None:
                        profiler.enable()
                t0 = time.perf_counter()
                validator.validate(block)
                validator.commit(block, commit)
                times.append(time.perf_counter() - t0)
        finally:
            if profiler is not None:
                profiler.disable()
            for mod, attr, fn in saved:
                setattr(mod, attr, fn)
        if validator.head_height != len(blocks) or validator.head != blocks[-1][0].header:
            raise SystemExit("the validator did not reach the proposer's head")
        validator.close()
        kv.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    timed = times[1:]
    total = sum(timed)
    rate = per_block * len(timed) / total
    print(
        f"\nwarm-up block: {times[0] * 1e3:.0f} ms; timed blocks: median "
        f"{statistics.median(timed) * 1e3:.0f} ms, min {min(timed) * 1e3:.0f} ms, "
        f"max {max(timed) * 1e3:.0f} ms"
    )
    print("where the time goes (sum over the timed blocks, share of the total):")
    accounted = 0.0
    for label, secs in sw.totals.items():
        if not label.startswith(" "):
            accounted += secs
        print(f"  {label:<46} {secs / len(timed) * 1e3:8.1f} ms/block  {secs / total:6.1%}")
    other = total - accounted
    print(f"  {'other (block hash, commit checks, view, ...)':<46} "
          f"{other / len(timed) * 1e3:8.1f} ms/block  {other / total:6.1%}")
    recov = sw.totals.get("  of which: recover_sender", 0.0)
    print(f"  per-tx recover_sender: {recov / (per_block * len(timed)) * 1e6:.1f} µs "
          f"(raw bound {1e6 / bound:.1f} µs)")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())

    print(f"\ntx_apply: {rate:,.0f} transfers/s  vs  bound {bound:,.0f} raw recoveries/s "
          f"(ratio {rate / bound:.3f}, target >= {TARGET})")
    result("tx_apply", rate, "tx/s", bound, TARGET)


if __name__ == "__main__":
    main()

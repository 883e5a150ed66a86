"""Benchmark: proposal → final on all 4 validators of a devnet, vs three one-hop message delays.

Setup (loopback only): ``neuroseed devnet --init-only --validators 4 --nodes 0`` with the
repository's genesis.json parameters (the devnet's settings: timeout_commit 1000 ms, empty
blocks), four ``neuroseed run`` processes on 127.0.0.1, and two probe processes (this file's
``watch`` and ``send`` modes) that run the node's own libp2p host (``Libp2pHost``, default
settings, as every node):

* **watcher** — bootstraps to the four validators and subscribes to the chain's proposals topic;
  it records the wall-clock time at which each signed proposal (height, round) first reaches it
  (in its topic validator, which answers IGNORE: it never forwards). It is one hop from every
  proposer.
* **one-hop probe** — the sender, connected to the watcher only, publishes a 200-byte message
  (the size of a vote batch) every 100 ms on a probe topic; the watcher records arrival minus
  the send time (both read CLOCK_REALTIME of this machine). The median over the run is **the
  one-hop message delay**: gossip between two such hosts, at the same time and under the same
  load as the validators. For comparison the watcher also pings validator 0 over
  ``/neuroseed/ping/1`` (a stream per ping, as the nodes' liveness ping) and RTT/2 is printed.
* **final** — each validator logs ``finalized block N`` (or ``caught up: committed block N``)
  with a millisecond timestamp when the block is written; final on all 4 = the latest of the 4.

Per height: latency = final on all 4 − (proposal seen by the watcher − one-hop delay), for the
proposal of the round the block was decided in (``ns_getBlockByNumber``'s ``round``). Figure: the
median over ``--heights`` heights after a warm-up; bound: 3 × the one-hop delay (Algorithm 1
decides after three message delays: proposal, prevote, precommit). Everything is killed at the
end and on failure.

Run: ``.venv/bin/python benchmarks/finality_latency.py [--heights N]``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import _common
from _common import GENESIS_FILE, result

from tests.integration.procs import NodeRpc, Proc, Procs, init_devnet, wait_until

VALIDATORS = 4
WARMUP_HEIGHTS = 3
PROBE_TOPIC = "/neuroseed-bench/onehop/1"
PROBE_BYTES = 200
PROBE_INTERVAL_S = 0.1
PROBE_SKIP = 10  # first messages, sent while the mesh forms
PINGS = 40
RUN_TIMEOUT_S = 200.0

_FINAL_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO\s+node\.consensus_service: "
    r"(?:finalized block|caught up: committed block) (\d+) "
)


# --- the probe processes --------------------------------------------------------------------------


def _emit(line: str) -> None:
    print(line, flush=True)


async def _until_signalled() -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def watch(chain_id: int, bootstrap: list[str], ping_addr: str) -> None:
    import trio

    from node.p2p import api
    from node.p2p.identity import generate_secret
    from node.p2p.libp2p_host import Libp2pHost
    from node.p2p.messages import ProposalMessage, decode_gossip

    host = Libp2pHost(generate_secret(), ["/ip4/127.0.0.1/tcp/0"], bootstrap)
    seen: set[tuple[int, int]] = set()

    async def on_proposal(msg: api.GossipMessage) -> api.Verdict:
        t = time.time_ns()
        try:
            decoded = decode_gossip(api.Topic.PROPOSALS, msg.data)
        except Exception:
            return api.Verdict.IGNORE
        if isinstance(decoded, ProposalMessage):
            p = decoded.signed_proposal.proposal
            key = (int(p.height), int(p.round))
            if key not in seen:
                seen.add(key)
                _emit(f"PROPOSAL {key[0]} {key[1]} {t}")
        return api.Verdict.IGNORE

    async def on_probe(msg: api.GossipMessage) -> api.Verdict:
        t = time.time_ns()
        seq, sent = msg.data.split(b" ", 2)[:2]
        _emit(f"ONEHOP {int(seq)} {t - int(sent)}")
        return api.Verdict.IGNORE

    async def pings() -> None:
        # For comparison only: a failure is reported, never fatal.
        try:
            with trio.fail_after(30):
                while True:
                    try:
                        peer = await host.connect(ping_addr)
                        break
                    except api.P2PError:
                        await trio.sleep(0.5)
            await trio.sleep(2.0)
            for _ in range(PINGS):
                t0 = time.perf_counter_ns()
                await host.request(peer, api.PROTOCOL_PING, b"12345678", timeout_s=5.0)
                _emit(f"PING {time.perf_counter_ns() - t0}")
                await trio.sleep(0.25)
        except (api.P2PError, trio.TooSlowError) as exc:
            _emit(f"PINGFAIL {exc!r}")

    await host.subscribe(api.topic_name(chain_id, api.Topic.PROPOSALS), on_proposal)
    await host.subscribe(PROBE_TOPIC, on_probe)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(host.run)
        _emit(f"ADDR {addrs[0]}")
        nursery.start_soon(pings)
        await _until_signalled()
        _emit("DONE")
        nursery.cancel_scope.cancel()


async def send(target: str) -> None:
    import trio

    from node.p2p import api
    from node.p2p.identity import generate_secret
    from node.p2p.libp2p_host import Libp2pHost

    host = Libp2pHost(generate_secret(), ["/ip4/127.0.0.1/tcp/0"], [target])

    async def ignore(msg: api.GossipMessage) -> api.Verdict:
        return api.Verdict.IGNORE

    async def publish() -> None:
        with trio.fail_after(30):
            while not host.topic_peers(PROBE_TOPIC):
                await trio.sleep(0.05)
        seq = 0
        while True:
            head = b"%d %d " % (seq, time.time_ns())
            await host.publish(PROBE_TOPIC, head + b"." * (PROBE_BYTES - len(head)))
            seq += 1
            await trio.sleep(PROBE_INTERVAL_S)

    await host.subscribe(PROBE_TOPIC, ignore)  # in the topic's mesh, as validators are
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        nursery.start_soon(publish)
        await _until_signalled()
        nursery.cancel_scope.cancel()


# --- the run ------------------------------------------------------------------------------------


def final_times(log: Path) -> dict[int, float]:
    """Height → wall-clock time (s) at which this validator logged it final (first time)."""
    out: dict[int, float] = {}
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _FINAL_RE.match(line)
        if m:
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.setdefault(int(m.group(2)), when)
    return out


def probe_argv(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def measure(heights: int, tmp: Path) -> None:
    summary = init_devnet(tmp / "devnet", VALIDATORS, 0, GENESIS_FILE)
    nodes = summary["nodes"]
    chain_id = int(summary["chainId"])
    logs = tmp / "logs"
    logs.mkdir()
    with Procs(logs) as procs:
        validators: list[Proc] = [procs.node(f"node{n['node']}", Path(n["datadir"])) for n in nodes]
        urls = [p.wait_for_rpc_url() for p in validators]
        print(f"4 validators up: {', '.join(urls)}", flush=True)
        addrs = [str(n["p2p"]) for n in nodes]
        watcher = procs.start("watcher", probe_argv("watch", str(chain_id), addrs[0], *addrs))
        watch_addr = watcher.wait_for_line(lambda s: s.startswith("ADDR "), what="ADDR")
        sender = procs.start("sender", probe_argv("send", watch_addr.split(" ", 1)[1]))
        try:
            seen, finals = collect(watcher, validators, heights)
        except BaseException:
            for p in procs.started:
                print(f"--- {p.name} (log tail) ---\n{p.log_tail(10)}")
            raise
        sender.terminate()
        watcher.signal(signal.SIGTERM)
        watcher.wait_for_line(lambda s: s == "DONE", 20.0, "DONE")
        watcher.terminate()
        rpc = NodeRpc(urls[0])
        try:
            rounds = block_rounds(rpc, sorted(finals))
        finally:
            rpc.close()
        report(watcher.lines, seen, finals, rounds)


def collect(
    watcher: Proc, validators: list[Proc], heights: int
) -> tuple[dict[tuple[int, int], float], dict[int, tuple[float, float]]]:
    """Wait until ``heights`` heights after the warm-up are final on all four validators and
    their proposals were seen; returns (proposal seen times, height → (final on the first
    validator, final on all four))."""
    seen: dict[tuple[int, int], float] = {}
    state: dict[str, dict[int, tuple[float, float]]] = {"finals": {}}

    def ready() -> bool:
        for p in (watcher, *validators):
            if not p.alive:
                raise SystemExit(f"{p.name} exited ({p.proc.returncode}):\n{p.log_tail()}")
        for line in watcher.drain():
            if line.startswith("PROPOSAL "):
                _, h, r, t = line.split()
                seen[(int(h), int(r))] = int(t) / 1e9
        if not seen:
            return False
        first = min(h for h, _ in seen) + WARMUP_HEIGHTS
        per_node = [final_times(p.log_path) for p in validators]
        common = set.intersection(*(set(f) for f in per_node))
        state["finals"] = {
            h: (min(f[h] for f in per_node), max(f[h] for f in per_node))
            for h in common
            if h >= first
        }
        return len(state["finals"]) >= heights

    wait_until(ready, RUN_TIMEOUT_S, f"{heights} heights final on all 4", interval=0.5)
    finals = dict(sorted(state["finals"].items())[:heights])
    return seen, finals


def block_rounds(rpc: NodeRpc, heights: list[int]) -> dict[int, int]:
    batch = rpc.client.batch()
    calls = [batch.call("ns_getBlockByNumber", [h, False]) for h in heights]
    batch.send()
    return {h: int(c.result()["round"]) for h, c in zip(heights, calls, strict=True)}


def report(
    lines: list[str],
    seen: dict[tuple[int, int], float],
    finals: dict[int, tuple[float, float]],
    rounds: dict[int, int],
) -> None:
    onehop = [int(s.split()[2]) / 1e6 for s in lines if s.startswith("ONEHOP ")]
    onehop = [d for i, d in enumerate(onehop) if i >= PROBE_SKIP]
    pings = [int(s.split()[1]) / 1e6 for s in lines if s.startswith("PING ")]
    if len(onehop) < 20:
        raise SystemExit(f"only {len(onehop)} one-hop probe messages arrived")
    hop = statistics.median(onehop)
    latencies = []
    to_first = []
    missed = 0
    for h, (first, final) in finals.items():
        t_seen = seen.get((h, rounds[h]))
        if t_seen is None:
            missed += 1
            continue
        proposed = t_seen - hop / 1e3
        latencies.append((final - proposed) * 1e3)
        to_first.append((first - proposed) * 1e3)
    if len(latencies) < 5:
        raise SystemExit(f"too few heights with a seen proposal ({len(latencies)})")
    value = statistics.median(latencies)
    bound = 3 * hop
    later_rounds = sum(1 for h in finals if rounds[h] > 0)
    q = statistics.quantiles(onehop, n=10)
    print(
        f"one-hop gossip delay (probe → probe, {PROBE_BYTES} B, {len(onehop)} messages): "
        f"median {hop:.2f} ms, p10 {q[0]:.2f}, p90 {q[-1]:.2f}, max {max(onehop):.2f}"
    )
    if pings:
        print(
            f"libp2p ping to validator 0 ({len(pings)} pings, a stream each): RTT median "
            f"{statistics.median(pings):.2f} ms → RTT/2 {statistics.median(pings) / 2:.2f} ms"
        )
    lq = statistics.quantiles(latencies, n=10)
    print(
        f"proposal → final on all 4 validators over {len(latencies)} heights "
        f"({min(finals)}..{max(finals)}; {later_rounds} decided after round 0, {missed} proposals "
        f"not seen by the watcher): median {value:.1f} ms, p10 {lq[0]:.1f}, p90 {lq[-1]:.1f}, "
        f"max {max(latencies):.1f}"
    )
    print(
        f"  of which proposal → final on the first validator: median "
        f"{statistics.median(to_first):.1f} ms (log timestamps have 1 ms resolution)"
    )
    print(
        f"finality_latency: {value:.1f} ms  vs  bound 3 x one-hop {bound:.2f} ms "
        f"(ratio {value / bound:.1f})"
    )
    result("finality_latency", value, "ms", bound, None)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "watch":
        import trio

        trio.run(watch, int(sys.argv[2]), sys.argv[4:], sys.argv[3])
        return
    if len(sys.argv) == 3 and sys.argv[1] == "send":
        import trio

        trio.run(send, sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heights", type=int, default=30, help="heights measured (default 30)")
    args = parser.parse_args()
    print(f"machine: {_common.machine()}")
    print(
        f"finality_latency: {VALIDATORS} validator processes (devnet settings from "
        f"{GENESIS_FILE.name}), {args.heights} heights after {WARMUP_HEIGHTS} warm-up heights",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="neuroseed-bench-finality-"))
    try:
        started = time.monotonic()
        measure(args.heights, tmp)
        print(f"(ran {time.monotonic() - started:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark: read throughput of the JSON-RPC server against bare aiohttp (DESIGN §1, §11).

Starts the real ``rpc.server.RpcServer`` (its own thread and asyncio loop, started from trio) over
a minimal in-memory read view, and, in the same run, a bare aiohttp server in the same kind of
thread answering the same ``eth_blockNumber`` request with a fixed JSON-RPC answer (decode the
body, encode the answer: the least any JSON-RPC server does). Each is loaded with ``wrk`` (keep-
alive connections, a Lua script POSTing the JSON body) in alternating rounds; the best round of
each is reported (the one least disturbed by other load on a shared machine), with the median of
the per-round ratios alongside. Without wrk (and no way to install it) several Python client processes are
used instead. Only 127.0.0.1 is targeted; the run takes about 45 s.

Ends with ``RESULT name=rpc_read_eth_blockNumber value=<req/s> unit=req/s bound=<bare req/s>
ratio=<value/bound> target=0.7``. Run: ``python benchmarks/rpc_read.py`` (no arguments).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import trio
from aiohttp import web  # the bare baseline; the node itself imports aiohttp only in rpc/

from node.api import NodeStatus, StateProof, TxLocation
from node.consensus.blocks import Block, Commit, Header
from node.consensus.params import ChainParams, FeeSchedule, VotableParams
from node.consensus.state import EMPTY_ACCOUNT, Account
from node.errors import NodeUnavailable, NotFound
from node.types import (
    ZERO_ADDRESS,
    ZERO_HASH,
    Address,
    Amount,
    ChainId,
    Hash32,
    Height,
    Round,
    TimestampMs,
)
from rpc.server import RpcServer

HOST = "127.0.0.1"
BODY = '{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}'
HEIGHT = 123_456
ROUNDS = 8
SECONDS = 2
CONNECTIONS = 32
TARGET = 0.7


# --- a minimal node: one head header, everything else empty ------------------------------------


class _View:
    def __init__(self) -> None:
        self.chain = ChainParams(ChainId(4242), TimestampMs(0), 100, 100, 1)
        self.params = VotableParams(
            1000,
            500,
            1000,
            500,
            1000,
            500,
            1000,
            1 << 20,
            1000,
            1 << 16,
            (FeeSchedule(1, Amount(1), Amount(1), Amount(1), Amount(1)),),
        )
        self.head: Header | None = Header(
            ChainId(4242),
            Height(HEIGHT),
            Round(0),
            ZERO_HASH,
            TimestampMs(0),
            ZERO_ADDRESS,
            ZERO_HASH,
            ZERO_HASH,
            ZERO_HASH,
            ZERO_HASH,
            ZERO_HASH,
            ZERO_HASH,
            ZERO_HASH,
        )

    def get_block(self, height: int) -> Block | None:
        return None

    def get_block_by_hash(self, block_hash: bytes) -> Block | None:
        return None

    def get_commit(self, height: int) -> Commit | None:
        return None

    def get_transaction(self, tx_id: bytes) -> TxLocation | None:
        return None

    def get_account(self, address: Address) -> Account:
        return EMPTY_ACCOUNT

    def get_state(self, key: bytes) -> bytes | None:
        return None

    def get_proof(self, key: bytes, height: int | None = None) -> StateProof:
        raise NotFound("no state in the benchmark node")


class _Node:
    def __init__(self) -> None:
        self._view = _View()

    def read_view(self) -> _View:
        return self._view

    async def submit_transaction(self, raw: bytes) -> Hash32:
        raise NodeUnavailable("the benchmark node accepts no transactions")

    async def status(self) -> NodeStatus:
        raise NodeUnavailable("the benchmark node has no status")

    async def pending_nonce(self, address: Address) -> int:
        return 0


# --- the bare aiohttp baseline ------------------------------------------------------------------


class BareServer:
    """aiohttp in its own thread and loop, answering every POST like eth_blockNumber."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="bare-aiohttp", daemon=True)

    def start(self) -> str:
        self._thread.start()
        self._ready.wait()
        return f"http://{HOST}:{self.port}/"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        result = hex(HEIGHT)

        async def handle(request: web.Request) -> web.Response:
            req = json.loads(await request.read())
            answer = {"jsonrpc": "2.0", "id": req.get("id"), "result": result}
            return web.Response(body=json.dumps(answer).encode(), content_type="application/json")

        app = web.Application()
        app.router.add_post("/", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0, backlog=1024)
        await site.start()
        self.port = runner.addresses[0][1]
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


# --- load generators ----------------------------------------------------------------------------


def check_answer(url: str) -> None:
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("POST", "/", BODY, {"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    if answer.get("result") != hex(HEIGHT):
        raise SystemExit(f"unexpected answer from {url}: {answer}")


def find_wrk() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing wrk (Debian package) ...", flush=True)
        subprocess.run(
            "apt-get update -qq && apt-get install -y -qq wrk",
            shell=True,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wrk = shutil.which("wrk")
    return wrk


def run_wrk(wrk: str, url: str, script: str, seconds: int) -> float:
    out = subprocess.run(
        [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors against {url}:\n{out}")
    match = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if match is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    return float(match.group(1))


def _python_client(args: tuple[str, float, int]) -> int:
    url, seconds, connections = args
    host, port = url.split("//")[1].rstrip("/").split(":")
    count = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop() -> None:
        nonlocal count
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        n = 0
        while time.monotonic() < deadline:
            conn.request("POST", "/", BODY, {"Content-Type": "application/json"})
            conn.getresponse().read()
            n += 1
        conn.close()
        with lock:
            count += n

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return count


def run_python_clients(url: str, seconds: int) -> float:
    procs = max(2, os.cpu_count() or 2)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        counts = pool.map(_python_client, [(url, seconds, 4)] * procs)
    return sum(counts) / seconds


def measure(rpc_url: str, bare_url: str) -> tuple[float, float, str]:
    check_answer(rpc_url)
    check_answer(bare_url)
    wrk = find_wrk()
    rpc, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "post.lua")
        Path(script).write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = '{BODY}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )

        def load(url: str, seconds: int) -> float:
            if wrk is not None:
                return run_wrk(wrk, url, script, seconds)
            return run_python_clients(url, seconds)

        load(bare_url, 1)  # warm up both
        load(rpc_url, 1)
        for i in range(ROUNDS):
            bare.append(load(bare_url, SECONDS))
            rpc.append(load(rpc_url, SECONDS))
            print(
                f"round {i + 1}: bare aiohttp {bare[-1]:,.0f} req/s, "
                f"RpcServer {rpc[-1]:,.0f} req/s",
                flush=True,
            )
    tool = "wrk" if wrk is not None else "python clients"
    paired = statistics.median(r / b for r, b in zip(rpc, bare, strict=True))
    print(f"median of the per-round ratios: {paired:.2f}")
    # Best of the alternating rounds: the round least disturbed by other load on the machine.
    return max(rpc), max(bare), tool


async def main() -> None:
    bare_server = BareServer()
    bare_url = bare_server.start()
    try:
        async with trio.open_nursery() as nursery:
            rpc_url = await nursery.start(RpcServer(_Node(), HOST, 0).serve)
            rpc_rps, bare_rps, tool = await trio.to_thread.run_sync(measure, rpc_url, bare_url)
            nursery.cancel_scope.cancel()
    finally:
        bare_server.stop()
    ratio = rpc_rps / bare_rps
    print(
        f"eth_blockNumber over HTTP keep-alive ({tool}, {CONNECTIONS} connections, "
        f"best of {ROUNDS} x {SECONDS} s): RpcServer {rpc_rps:,.0f} req/s, "
        f"bare aiohttp {bare_rps:,.0f} req/s"
    )
    print(
        f"RESULT name=rpc_read_eth_blockNumber value={rpc_rps:.0f} unit=req/s "
        f"bound={bare_rps:.0f} ratio={ratio:.2f} target={TARGET}"
    )


if __name__ == "__main__":
    trio.run(main)

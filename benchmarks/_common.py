"""Shared helpers of the benchmarks: timing, the RESULT line, the raw signature-recovery bound,
genesis builders with N funded accounts, and a single-validator devnet node run as a subprocess.

Every benchmark prints its figure next to the bound it chases, measured in the same run on the
same machine, and ends with one machine-readable line per figure::

    RESULT name=<id> value=<v> unit=<u> bound=<b> ratio=<v/b> target=<t>

``target=none`` when the figure has no target.

Run as a script, this module is the node entry used by the benchmarks (``serve``); with no
arguments it only says so (``make bench`` runs every file in ``benchmarks/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from node.genesis import Genesis, GenesisAccount, genesis_to_json, load_genesis  # noqa: E402
from node.types import Address, Amount  # noqa: E402

if TYPE_CHECKING:
    from node.crypto import PrivateKey

GENESIS_FILE = REPO / "genesis.json"
LOOPBACK = "127.0.0.1"
NSD = 10**18


# --- timing and reporting ----------------------------------------------------------------------


class Stopwatch:
    """Accumulates wall time and this thread's CPU time per named phase.

    ``with sw("exec"): ...`` or ``fn = sw.wrap("exec", fn)``; ``totals[name]`` is wall seconds,
    ``cpu[name]`` CPU seconds of the calling thread.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c0

    def wrap(self, name: str, fn: Callable[..., object]) -> Callable[..., object]:
        """``fn`` with its calls timed under ``name`` (cheap: about 1 µs a call)."""
        totals = self.totals
        cpu = self.cpu
        clock = time.perf_counter
        cpu_clock = time.thread_time
        totals.setdefault(name, 0.0)
        cpu.setdefault(name, 0.0)

        def timed(*args: object, **kwargs: object) -> object:
            c0 = cpu_clock()
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += clock() - t0
                cpu[name] += cpu_clock() - c0

        return timed

    def reset(self) -> None:
        for name in self.totals:
            self.totals[name] = 0.0
            self.cpu[name] = 0.0


def fmt(v: float) -> str:
    """A compact number for RESULT lines: 4 significant digits, no exponent for usual sizes."""
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.4g}"


def result(
    name: str, value: float, unit: str, bound: float, target: float | str | None = None
) -> None:
    """Print the machine-readable RESULT line of one figure."""
    ratio = value / bound if bound else float("nan")
    tgt = "none" if target is None else (target if isinstance(target, str) else fmt(target))
    print(
        f"RESULT name={name} value={fmt(value)} unit={unit} bound={fmt(bound)} "
        f"ratio={ratio:.3f} target={tgt}",
        flush=True,
    )


def machine() -> str:
    cpus = os.cpu_count() or 0
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{cpus} cores, {model or 'unknown CPU'}, Python {sys.version.split()[0]}"


# --- the bound: raw public-key recoveries per second on one core --------------------------------


@dataclasses.dataclass(frozen=True)
class RecoveryBound:
    wall: float  # recoveries per wall-clock second (the bound the RESULT lines use)
    cpu: float  # recoveries per CPU second of this process (insensitive to being descheduled)


class RecoveryProbe:
    """Raw coincurve ``PublicKey.from_signature_and_message`` calls, one thread, timed.

    Over ``distinct`` pre-made recoverable signatures of pre-hashed digests: no hashing, no
    decoding, no address derivation — the bare libsecp256k1 recovery plus coincurve's call
    overhead. ``burst(seconds)`` runs for about that long and returns (calls, wall s, CPU s).
    """

    def __init__(self, distinct: int = 256) -> None:
        import coincurve  # the raw library on purpose: this is the bound, not the node's code

        keys = [
            coincurve.PrivateKey(hashlib.sha256(b"bound-key-%d" % i).digest()) for i in range(16)
        ]
        digests = [hashlib.sha256(b"bound-msg-%d" % i).digest() for i in range(distinct)]
        sigs = [keys[i % 16].sign_recoverable(d, hasher=None) for i, d in enumerate(digests)]
        self._pairs = list(zip(sigs, digests, strict=True))
        self._recover = coincurve.PublicKey.from_signature_and_message
        for sig, digest in self._pairs[:32]:  # warm-up
            self._recover(sig, digest, hasher=None)

    def burst(self, seconds: float) -> tuple[int, float, float]:
        recover = self._recover
        pairs = self._pairs
        n = 0
        c0 = time.thread_time()
        t0 = time.perf_counter()
        while True:
            for sig, digest in pairs:
                recover(sig, digest, hasher=None)
            n += len(pairs)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        return n, elapsed, time.thread_time() - c0


def recovery_bound(seconds: float = 2.0, runs: int = 5) -> RecoveryBound:
    """Raw recoveries per second on one core (see ``RecoveryProbe``): ``runs`` runs of
    ``seconds / runs`` each; the best run is the bound (the least disturbed by other load on
    the machine, as ``timeit`` recommends)."""
    probe = RecoveryProbe()
    rates = []
    cpu_rates = []
    for _ in range(runs):
        n, wall, cpu = probe.burst(seconds / runs)
        rates.append(n / wall)
        cpu_rates.append(n / cpu if cpu > 0 else 0.0)
    bound = RecoveryBound(max(rates), max(cpu_rates))
    print(
        f"bound: raw coincurve recoveries/s on one core: best {bound.wall:,.0f} "
        f"(median {statistics.median(rates):,.0f}, min {min(rates):,.0f} over {runs} runs; "
        f"per CPU second {bound.cpu:,.0f})",
        flush=True,
    )
    return bound


def raw_recovery_rate(seconds: float = 2.0, runs: int = 5) -> float:
    """The bound in recoveries per wall-clock second (see ``recovery_bound``)."""
    return recovery_bound(seconds, runs).wall


# --- keys and genesis -------------------------------------------------------------------------


def bench_secret(i: int, tag: bytes = b"neuroseed-bench-") -> bytes:
    """A cheap deterministic secret (a sha-256 output is a valid scalar with overwhelming odds)."""
    return hashlib.sha256(tag + str(i).encode()).digest()


def bench_keys(n: int, tag: bytes = b"neuroseed-bench-") -> list[PrivateKey]:
    from node.crypto import PrivateKey

    return [PrivateKey(bench_secret(i, tag)) for i in range(n)]


def make_genesis(
    addresses: Sequence[bytes],
    balance: int = 1_000_000 * NSD,
    *,
    timeout_commit_ms: int | None = None,
    max_block_txs: int | None = None,
    keep_repo_balances: bool = False,
) -> Genesis:
    """The repository's genesis (chain id, parameters, the dev validator) with ``addresses``
    funded with ``balance`` each (and, if asked, the repository's own funded accounts kept)."""
    base = load_genesis(GENESIS_FILE)
    params = base.votable_params
    if timeout_commit_ms is not None:
        params = dataclasses.replace(params, timeout_commit_ms=timeout_commit_ms)
    if max_block_txs is not None:
        params = dataclasses.replace(params, max_block_txs=max_block_txs)
    accounts = {bytes(a): GenesisAccount(Address(bytes(a)), Amount(balance)) for a in addresses}
    if keep_repo_balances:
        for acc in base.balances:
            accounts.setdefault(bytes(acc.address), acc)
    balances = tuple(accounts[a] for a in sorted(accounts))
    return dataclasses.replace(base, votable_params=params, balances=balances)


# --- a devnet node as a subprocess ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class NodeProcess:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path
    status_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def inspect(self, timeout: float = 10.0) -> dict[str, object]:
        """Ask the node (SIGUSR1) to report its imported modules; returns its JSON answer."""
        with contextlib.suppress(FileNotFoundError):
            self.status_path.unlink()
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status_path.exists():
                with contextlib.suppress(ValueError):
                    answer: dict[str, object] = json.loads(self.status_path.read_text())
                    return answer
            time.sleep(0.05)
        raise TimeoutError("the node did not answer the inspection signal")


def _wait_ready(node: NodeProcess, timeout: float) -> None:
    from rpc.client import Client

    deadline = time.monotonic() + timeout
    with Client(node.url, timeout=2.0) as client:
        while True:
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"the node exited with {node.proc.returncode}:\n{node.log_tail()}"
                )
            try:
                client.chain_id()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the node did not answer within {timeout} s:\n{node.log_tail()}"
                    ) from None
                time.sleep(0.1)


@contextlib.contextmanager
def devnet_node(genesis: Genesis, *, ready_timeout: float = 60.0) -> Iterator[NodeProcess]:
    """A single-validator node (dev key 0) on a free 127.0.0.1 port in a temporary data dir.

    The node runs ``trio.run(run_node, ...)`` in a child Python process (this file's ``serve``
    entry); it is terminated (then killed) on exit, whatever happened.
    """
    tmp = Path(tempfile.mkdtemp(prefix="neuroseed-bench-node-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    (data_dir / "genesis.json").write_text(genesis_to_json(genesis))
    port = free_port()
    log_path = tmp / "node.log"
    status_path = tmp / "status.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "serve",
        str(data_dir),
        str(port),
        str(status_path),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    node = NodeProcess(proc, f"http://{LOOPBACK}:{port}/", data_dir, log_path, status_path)
    try:
        _wait_ready(node, ready_timeout)
        yield node
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def _serve(data_dir: str, port: str, status_path: str) -> None:
    """The node entry: run_node with the dev validator key; SIGUSR1 writes an inspection file."""
    import trio

    from node.config import NodeConfig
    from node.devkeys import dev_key
    from node.genesis import load_genesis as load
    from node.service import run_node

    def report(signum: int, frame: object) -> None:
        modules = sorted(sys.modules)
        answer = {
            "pid": os.getpid(),
            "torch_imported": any(m == "torch" or m.startswith("torch.") for m in modules),
            "modules": len(modules),
        }
        tmp = status_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(answer, fh)
        os.replace(tmp, status_path)

    signal.signal(signal.SIGUSR1, report)
    root = Path(data_dir)
    config = NodeConfig(data_dir=root, rpc_host=LOOPBACK, rpc_port=int(port), log_level="warning")
    genesis = load(root / "genesis.json")
    trio.run(lambda: run_node(config, key=dev_key(0), genesis=genesis))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        _serve(*sys.argv[2:5])
    else:
        print("benchmarks/_common.py: shared helpers; run the benchmarks next to it instead.")

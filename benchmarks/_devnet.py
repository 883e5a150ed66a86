"""Process helpers of the benchmarks that run a devnet of real node processes on 127.0.0.1.

* ``Proc`` — one child process: stdout lines read by a thread (``wait_for_line``,
  ``wait_for_rpc_url``), stderr appended to a log file; ``stop`` (SIGTERM, then SIGKILL past a
  deadline). Children started here get SIGTERM from Linux if the benchmark itself dies.
* ``Procs`` — a context manager owning every process started through it (nodes and CLI calls):
  on the way out, whatever happened, each one still alive is stopped.
* ``sigterm_exits`` — SIGTERM raises ``SystemExit``, so a benchmark stopped that way unwinds
  through its ``with`` blocks: processes stopped, temporary directories removed.
* ``wait_until`` — the one way to wait: poll with a deadline, fail naming what was awaited.
* ``make_devnet`` / ``enable_compute`` — a devnet directory (``node.devnet.prepare_devnet``) from
  a genesis template, with free ports; a node's ``[compute]`` section.
* ``send_body`` — sign and send a transaction body as the CLI does (the next nonce, the
  estimated fee plus the CLI's tip), from the benchmark's own process, so a clock started
  just before it times the chain and not a client's start-up.
* ``write_classification_data`` — a deterministic classification dataset as safetensors.

Nothing here waits without a bound, and nothing listens anywhere but on loopback. Run as a
script, this module only says so (``make bench`` runs every file in ``benchmarks/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from node.devnet import die_with_parent  # noqa: E402

if TYPE_CHECKING:
    from node.crypto import PrivateKey
    from node.devnet import DevnetPlan
    from node.genesis import Genesis

T = TypeVar("T")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 90.0


class WaitTimeout(AssertionError):
    """A bounded wait ran out."""


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call ``check`` until it returns something truthy (returned), at most ``timeout`` seconds;
    ``WaitTimeout`` names ``what`` (and ``describe()``) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            state = f": {describe()}" if describe is not None else ""
            raise WaitTimeout(f"not within {timeout:g} s: {what}{state}")
        time.sleep(interval)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """While inside: SIGTERM raises ``SystemExit(143)`` in the main thread (Ctrl-C already
    raises ``KeyboardInterrupt``), so ``finally`` and ``with`` clean-ups run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NEUROSEED_DATADIR", None)
    root = str(REPO)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    return env


class Proc:
    """One child process; its stdout is read line by line, its stderr appended to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=child_env(),
                cwd=REPO,
                preexec_fn=die_with_parent(),  # nodes start before any thread here
            )
        except BaseException:
            self._log.close()
            raise
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        self._pump_thread = threading.Thread(
            target=self._pump, args=(self.proc.stdout,), daemon=True, name=f"pump-{name}"
        )
        self._pump_thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                self._queue.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        self._queue.put(None)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_line(
        self, match: Callable[[str], bool], timeout: float = START_TIMEOUT_S, what: str = ""
    ) -> str:
        """The next stdout line for which ``match`` is true; fails if the process exits or
        ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(timeout=STOP_TIMEOUT_S)
                raise RuntimeError(
                    f"{self.name} exited ({code}) before printing {what or 'the line'}:\n"
                    f"{self.log_tail()}"
                )
            self.lines.append(line)
            if match(line):
                return line
        raise WaitTimeout(
            f"{self.name}: no {what or 'matching line'} within {timeout:g} s:\n{self.log_tail()}"
        )

    def wait_for_rpc_url(self, timeout: float = START_TIMEOUT_S) -> str:
        """The URL of the ``JSON-RPC: <url>`` line ``neuroseed run`` prints."""
        line = self.wait_for_line(lambda s: "JSON-RPC: " in s, timeout, "JSON-RPC line")
        return line.split("JSON-RPC: ", 1)[1].strip()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (if not sent already), then SIGKILL once ``timeout`` has passed; reaped."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        """Make sure the process is gone, then release its pipe, thread and log file."""
        if self.alive:
            self.stop()
        self._pump_thread.join(timeout=STOP_TIMEOUT_S)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._log.close()


class Procs:
    """Owns the processes started through it: on exit every one still alive is stopped (all
    get SIGTERM at once, then each is waited for, SIGKILL past the deadline)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Proc] = []
        self._cli: set[subprocess.Popen[str]] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        proc = Proc(name, argv, self.log_dir / f"{name}.log")
        self.started.append(proc)
        return proc

    def node(self, name: str, datadir: Path, *extra: str) -> Proc:
        """``python -m node --datadir D run`` (its config says ports, peers, keys)."""
        argv = [sys.executable, "-m", "node", "--datadir", str(datadir), "run", *extra]
        return self.start(name, argv)

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> Any:
        """``python -m node ... --json`` (thread-safe); returns its parsed last line."""
        child = subprocess.Popen(
            [sys.executable, "-m", "node", *args, "--json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=REPO,
        )
        with self._lock:
            self._cli.add(child)
        try:
            out, err = child.communicate(timeout=timeout)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            with self._lock:
                self._cli.discard(child)
        if child.returncode != 0:
            raise RuntimeError(f"neuroseed {' '.join(args[:2])}: exit {child.returncode}\n{err}")
        return json.loads(out.strip().splitlines()[-1])

    def close_all(self) -> None:
        with self._lock:
            clis = list(self._cli)
        for child in clis:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        for proc in self.started:
            proc.signal(signal.SIGTERM)
        errors: list[BaseException] = []
        for proc in self.started:
            try:
                proc.close()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]


# --- a devnet directory ---------------------------------------------------------------------


def make_devnet(root: Path, genesis: Genesis, *, validators: int, nodes: int) -> DevnetPlan:
    """A devnet directory under ``root`` (dev keys 0..validators-1 validate, then ``nodes``
    full nodes), its genesis made from ``genesis`` as ``neuroseed devnet`` does; JSON-RPC on
    ephemeral ports, libp2p on free ones, all on 127.0.0.1."""
    from node.devnet import prepare_devnet
    from node.genesis import genesis_to_json

    root.mkdir(parents=True, exist_ok=True)
    template = root.parent / f"{root.name}-template.json"
    template.write_text(genesis_to_json(genesis))
    return prepare_devnet(
        root, validators=validators, nodes=nodes, template=template, rpc_port=0, p2p_port=0
    )


def enable_compute(
    datadir: Path,
    *,
    price_per_device_second: int,
    wall_seconds: int,
    memory_bytes: int,
    threads: int = 1,
) -> None:
    """Append a ``[compute]`` section to a node's ``config.toml`` (the agent then runs with
    ``neuroseed run --provide-compute``)."""
    with open(datadir / "config.toml", "a", encoding="utf-8") as f:
        f.write(
            f"\n[compute]\nenabled = true\nprice_per_device_second = {price_per_device_second}\n"
            f"wall_seconds = {wall_seconds}\nmemory_bytes = {memory_bytes}\nthreads = {threads}\n"
        )


def send_body(client: Any, key: PrivateKey, body: Any) -> bytes:
    """Sign ``body`` with ``key`` at its next nonce, with the estimated fee plus the CLI's tip,
    and send it; returns the transaction id (not waiting for it)."""
    from node.cli import TIP_DIVISOR
    from node.consensus.txs import make_transaction

    chain_id = client.chain_id()
    nonce = client.pending_nonce(key.address)
    draft = make_transaction(key, chain_id, nonce, 0, body)
    cost = client.estimate_fee(draft.encode())
    signed = make_transaction(key, chain_id, nonce, cost + cost // TIP_DIVISOR, body)
    return bytes(client.send_raw_transaction(signed.encode()))


# --- data ---------------------------------------------------------------------------------------


def write_classification_data(
    path: Path, *, rows: int, dim: int, classes: int, seed: int = 0, noise: float = 2.0
) -> Path:
    """Gaussian clusters (one centre per class, unit-variance centres, ``noise`` spread) as a
    safetensors file: ``x`` F32 ``(rows, dim)``, ``y`` I64 ``(rows,)``. Deterministic."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, dim))
    y = rng.integers(0, classes, rows)
    x = centres[y] + rng.normal(0.0, noise, (rows, dim))
    xb = np.ascontiguousarray(x.astype("<f4")).tobytes()
    yb = np.ascontiguousarray(y.astype("<i8")).tobytes()
    header = json.dumps(
        {
            "x": {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, len(xb)]},
            "y": {"dtype": "I64", "shape": [rows], "data_offsets": [len(xb), len(xb) + len(yb)]},
        },
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + xb + yb)
    return path


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that have been waited for."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (``/proc/<pid>/stat``; its own threads,
    not its children); 0.0 where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # after "pid (comm)": state is fields[0]; utime and stime are the 14th and 15th of the line
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    print("benchmarks/_devnet.py: process helpers; run the benchmarks next to it instead.")

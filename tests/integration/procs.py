"""Process helpers for the tests and benchmarks that run real node processes on 127.0.0.1.

* ``Proc`` — one ``python -m node ...`` process: stdout lines read by a thread (``wait_for_line``,
  ``wait_for_rpc_url``), stderr appended to a log file; ``kill`` (SIGKILL), ``terminate`` (SIGTERM,
  then SIGKILL past a deadline), ``close``.
* ``Procs`` — a context manager that owns every process started through it and kills whatever is
  still alive on the way out, whatever happened.
* ``wait_until`` — the one way to wait: poll with a deadline, fail with what was awaited.
* ``init_devnet`` — ``neuroseed devnet --init-only`` for a devnet with fast timeouts
  (``fast_genesis``); ``NodeRpc`` — a small blocking JSON-RPC view of one node.

Nothing here waits without a bound, and nothing listens anywhere but on loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # imported by benchmarks run as scripts
    sys.path.insert(0, str(REPO))

from node.genesis import genesis_to_json, load_genesis  # noqa: E402

T = TypeVar("T")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 60.0
# Test chains: blocks every few hundred ms on a loaded 2-core machine, short rounds when a
# proposer is down (Algorithm 1's timeouts grow by the delta each round).
FAST_TIMEOUTS = {
    "timeout_propose_ms": 1500,
    "timeout_propose_delta_ms": 500,
    "timeout_prevote_ms": 500,
    "timeout_prevote_delta_ms": 250,
    "timeout_precommit_ms": 500,
    "timeout_precommit_delta_ms": 250,
    "timeout_commit_ms": 300,
}


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
    ``WaitTimeout`` names ``what`` (and ``describe()``'s state) otherwise. Exceptions of
    ``check`` propagate."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            state = f": {describe()}" if describe is not None else ""
            raise WaitTimeout(f"not within {timeout:g} s: {what}{state}")
        time.sleep(interval)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NEUROSEED_DATADIR", None)
    return env


class Proc:
    """One child process; its stdout is read line by line, its stderr appended to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=cli_env(),
                cwd=REPO,
            )
        except BaseException:
            self._log.close()
            raise
        self.lines: list[str] = []  # every stdout line so far
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
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_line(
        self, match: Callable[[str], bool], timeout: float = START_TIMEOUT_S, what: str = ""
    ) -> str:
        """The next stdout line for which ``match`` is true (lines before it are kept in
        ``lines``); fails if the process exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(timeout=STOP_TIMEOUT_S)
                raise AssertionError(
                    f"{self.name} exited ({code}) before printing {what or 'the line'}:\n"
                    f"{self.log_tail()}"
                )
            self.lines.append(line)
            if match(line):
                return line
        raise WaitTimeout(
            f"{self.name}: no {what or 'matching line'} within {timeout:g} s:\n{self.log_tail()}"
        )

    def drain(self) -> list[str]:
        """The stdout lines that arrived since the last wait or drain (also kept in ``lines``),
        without waiting."""
        new: list[str] = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return new
            if line is None:
                self._queue.put(None)  # EOF stays visible to later waits
                return new
            self.lines.append(line)
            new.append(line)

    def wait_for_rpc_url(self, timeout: float = START_TIMEOUT_S) -> str:
        """The URL of the ``JSON-RPC: <url>`` line ``neuroseed run``/``devnet`` prints."""
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

    def kill(self) -> None:
        """SIGKILL and reap (no clean-up runs in the process: a crash)."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM; SIGKILL if it is still alive after ``timeout``. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} ignored SIGTERM for {timeout:g} s:\n{self.log_tail()}"
            ) from None

    def close(self) -> None:
        """Make sure the process is gone, then release its pipe, thread and log file."""
        if self.alive:
            self.kill()
        self._pump_thread.join(timeout=STOP_TIMEOUT_S)  # EOF once the process is gone
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._log.close()


class Procs:
    """Owns the processes started through it: on exit every one still alive is SIGKILLed."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Proc] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        proc = Proc(name, argv, self.log_dir / f"{name}.log")
        self.started.append(proc)
        return proc

    def node(self, name: str, datadir: Path, *extra: str) -> Proc:
        """``python -m node --datadir D run`` (its config says ports, peers, key)."""
        return self.start(name, node_argv(datadir, *extra))

    def close_all(self) -> None:
        errors: list[BaseException] = []
        for proc in self.started:
            try:
                proc.close()
            except Exception as exc:  # keep killing the others
                errors.append(exc)
        if errors:
            raise errors[0]


def node_argv(datadir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "node", "--datadir", str(datadir), "run", *extra]


@contextlib.contextmanager
def procs_in(log_dir: Path) -> Iterator[Procs]:
    with Procs(log_dir) as procs:
        yield procs


def cli_json(*args: str, timeout: float = CLI_TIMEOUT_S) -> Any:
    """``python -m node ... --json``; returns the parsed last line (fails with stderr shown)."""
    done = subprocess.run(
        [sys.executable, "-m", "node", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def fast_genesis(path: Path, **overrides: int) -> Path:
    """The repository's genesis with ``FAST_TIMEOUTS`` (and ``overrides``) written to ``path``."""
    genesis = load_genesis(REPO / "genesis.json")
    changes: dict[str, Any] = {**FAST_TIMEOUTS, **overrides}
    params = dataclasses.replace(genesis.votable_params, **changes)
    path.write_text(genesis_to_json(dataclasses.replace(genesis, votable_params=params)))
    return path


def init_devnet(root: Path, validators: int, nodes: int, template: Path) -> dict[str, Any]:
    """``neuroseed devnet --init-only`` with ephemeral JSON-RPC ports and free p2p ports (fixed
    from then on, so a node restarted later is found at the same address); returns its JSON
    summary (``nodes``: index, role, datadir, p2p, validator)."""
    summary: dict[str, Any] = cli_json(
        "devnet",
        "--datadir",
        str(root),
        "--validators",
        str(validators),
        "--nodes",
        str(nodes),
        "--rpc-port",
        "0",
        "--p2p-port",
        "0",
        "--genesis",
        str(template),
        "--init-only",
    )
    return summary


# --- a node's JSON-RPC, blocking ----------------------------------------------------------------


class NodeRpc:
    """The few JSON-RPC reads the multi-process tests need, with short timeouts."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        from rpc.client import Client

        self.url = url
        self.client = Client(url, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def height(self) -> int:
        return int(self.client.block_number())

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("ns_status")
        return result

    def block_hashes(self, first: int, last: int) -> dict[int, str]:
        """Height → hash of the final blocks ``first..last`` this node has (batches of 100)."""
        out: dict[int, str] = {}
        for start in range(first, last + 1, 100):
            heights = list(range(start, min(last, start + 99) + 1))
            batch = self.client.batch()
            calls = [batch.call("ns_getBlockByNumber", [h, False]) for h in heights]
            batch.send()
            for h, call in zip(heights, calls, strict=True):
                block = call.result()
                if block is not None:
                    out[h] = str(block["hash"])
        return out

    def height_or_none(self) -> int | None:
        """The head height, or None while the node does not answer (starting, killed)."""
        from rpc.errors import ClientError

        try:
            return self.height()
        except (ClientError, OSError):
            return None

"""Linux network namespaces for tests: a small switched network that lives entirely inside
namespaces this module creates, and a way for the test process to talk to each of them.

``Lan`` builds, for node namespaces ``n0..nK`` and one ``hub`` namespace::

    n0 eth0 ── p0 ┐              ┌ p2 ── eth0 n2
                  brA ─ xa ═ xb ─ brB            (all in hub; 10.77.0.0/24, one L2 segment)
    n1 eth0 ── p1 ┘              └ p3 ── eth0 n3

Node ``i`` gets ``10.77.0.<i+1>/24`` on its ``eth0`` and ``lo`` up (so a service bound to
127.0.0.1 in it is reachable from inside it only). ``cut()`` sets the inter-bridge veth ``xa``
down (both ends lose carrier: the two groups cannot reach each other), ``heal()`` sets it up. No
link, address or bridge is ever created in the caller's (root) namespace: every veth is created
from inside ``hub`` with its other end placed straight into the node's namespace.

Names: every namespace is ``nsptest<pid>x<random>-<name>``, unique per run; ``clean_stale()``
deletes namespaces of that family whose creating process is gone (a run that was SIGKILLed), and
``Lan.close()`` (also the context manager's exit) deletes this run's. Deleting a namespace
destroys the interfaces in it, and the bridges go with ``hub``.

``exec_argv`` wraps a command so it runs inside a node's namespace and dies with the test
process even when that is SIGKILLed (``PR_SET_PDEATHSIG``); ``clean_stale()`` also kills what
still runs in a stale namespace before deleting it.

``NetnsThread`` runs callables in a thread that has entered a namespace (``setns(2)`` on that
thread only; Python 3.11 has no ``os.setns``, hence ctypes): sockets that thread opens belong to
the namespace, so the test reaches a node's 127.0.0.1 JSON-RPC without any route out of it.

Every ``ip`` command runs with a timeout. Requires root (or CAP_NET_ADMIN + CAP_SYS_ADMIN);
``netns_unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

FAMILY = "nsptest"
_NAME_RE = re.compile(rf"^{FAMILY}(\d+)x[0-9a-f]+-")
IP_TIMEOUT_S = 10.0
SUBNET = "10.77.0"
PREFIX_LEN = 24
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


# Run as ``python -c _DIE_WITH_PARENT PARENT_PID PROGRAM ARGS...``: ask for SIGKILL when the
# parent dies (prctl option 1 is PR_SET_PDEATHSIG), give up if it already has, become PROGRAM.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); "
    "os.getppid() != int(sys.argv[1]) and sys.exit(1); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


class NetnsError(RuntimeError):
    pass


def ip_binary() -> str | None:
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.path.exists(p)), None
    )


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS`` (bounded); returns stdout, raises ``NetnsError`` with stderr on failure."""
    binary = ip_binary()
    if binary is None:
        raise NetnsError("the `ip` command (iproute2) is not installed")
    try:
        done = subprocess.run(
            [binary, *args],
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"ip {' '.join(args)}: no answer within {IP_TIMEOUT_S:g} s") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def list_netns() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def delete_netns(name: str) -> None:
    with contextlib.suppress(NetnsError):
        ip("netns", "del", name, check=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[str]:
    """Delete this family's namespaces left by runs whose process is gone; returns their names."""
    removed = []
    for name in list_netns():
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            # Processes that run killed left in it (started by that run inside its namespace).
            for pid in ip("netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            delete_netns(name)
            removed.append(name)
    return removed


def netns_unavailable() -> str | None:
    """None if namespaces can be created here, else why not (for ``pytest.skip``)."""
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        return "this system has no network namespaces (/proc/self/ns/net is missing)"
    if ip_binary() is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{FAMILY}{os.getpid()}x{secrets.token_hex(3)}-probe"
    try:
        ip("netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace (needs root / CAP_SYS_ADMIN): {exc}"
    delete_netns(probe)
    return None


def _setns(name: str) -> None:
    """Move the calling thread (only it) into namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsThread:
    """One worker thread inside a namespace; ``call(fn, ...)`` runs ``fn`` there, bounded."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"in-{netns}", initializer=_setns, initargs=(netns,)
        )

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        return self._pool.submit(fn, *args).result(timeout=timeout)

    def close(self) -> None:
        # Whatever runs there is bounded by its own socket timeouts.
        self._pool.shutdown(wait=True, cancel_futures=True)


def json_rpc(
    url: str, method: str, params: Sequence[Any] | None = None, timeout: float = 3.0
) -> Any:
    """One JSON-RPC call with http.client (no proxy settings consulted: it goes exactly to
    ``url``, which must be ``http://host:port/...``). Raises on transport or RPC errors."""
    m = re.match(r"^http://([^/:]+):(\d+)(/.*)?$", url)
    if m is None:
        raise ValueError(f"not an http://host:port URL: {url!r}")
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params or [])}
    ).encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


class Lan:
    """Node namespaces on two bridges joined by one cuttable link (see the module docstring)."""

    def __init__(self, groups: Sequence[Sequence[int]] = ((0, 1), (2, 3))) -> None:
        if len(groups) != 2:
            raise ValueError("a Lan has exactly two groups")
        self.groups = [tuple(g) for g in groups]
        self.prefix = f"{FAMILY}{os.getpid()}x{secrets.token_hex(3)}"
        self.hub = f"{self.prefix}-hub"
        self.nodes = sorted(i for g in self.groups for i in g)
        self.created: list[str] = []
        self._threads: dict[int, NetnsThread] = {}

    def ns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    @staticmethod
    def addr(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> Lan:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        hub = self.hub
        self._add(hub)
        for bridge in ("brA", "brB"):
            ip("-n", hub, "link", "add", bridge, "type", "bridge")
            ip("-n", hub, "link", "set", bridge, "up")
        ip("-n", hub, "link", "add", "xa", "type", "veth", "peer", "name", "xb")
        ip("-n", hub, "link", "set", "xa", "master", "brA")
        ip("-n", hub, "link", "set", "xb", "master", "brB")
        for g, bridge in zip(self.groups, ("brA", "brB"), strict=True):
            for i in g:
                ns = self.ns(i)
                self._add(ns)
                port = f"p{i}"
                veth = ("type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("-n", hub, "link", "add", port, *veth)
                ip("-n", hub, "link", "set", port, "master", bridge)
                ip("-n", hub, "link", "set", port, "up")
                ip("-n", ns, "addr", "add", f"{self.addr(i)}/{PREFIX_LEN}", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", hub, "link", "set", "xa", "up")
        ip("-n", hub, "link", "set", "xb", "up")

    def cut(self) -> None:
        ip("-n", self.hub, "link", "set", "xa", "down")

    def heal(self) -> None:
        ip("-n", self.hub, "link", "set", "xa", "up")

    def exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside node ``i``'s namespace, killed (SIGKILL) if the process that
        started it dies first (``PR_SET_PDEATHSIG``, kept across both ``execv``: the wrapper
        execs ``ip netns exec``, which execs ``argv``, so the child's pid is ``argv``'s)."""
        binary = ip_binary()
        assert binary is not None
        wrapper = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid())]
        return [*wrapper, binary, "netns", "exec", self.ns(i), *argv]

    def thread(self, i: int) -> NetnsThread:
        if i not in self._threads:
            self._threads[i] = NetnsThread(self.ns(i))
        return self._threads[i]

    def rpc(self, i: int, url: str, method: str, params: Sequence[Any] | None = None) -> Any:
        """A JSON-RPC call to ``url`` as seen from inside node ``i``'s namespace."""
        return self.thread(i).call(json_rpc, url, method, params, timeout=10.0)

    def close(self) -> None:
        """Stop the namespace threads, then delete every namespace this Lan created."""
        for t in self._threads.values():
            with contextlib.suppress(Exception):
                t.close()
        self._threads.clear()
        for name in reversed(self.created):
            delete_netns(name)
        self.created.clear()
        leftovers = [n for n in list_netns() if n.startswith(self.prefix + "-")]
        for name in leftovers:
            delete_netns(name)

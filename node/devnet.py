"""The local multi-process devnet behind ``neuroseed devnet``: N validators and M full nodes, each a
separate ``neuroseed run`` process, talking libp2p on 127.0.0.1 (DESIGN §6, §11).

Layout of a devnet directory ``D``::

    D/genesis.json       the devnet's chain: the template's parameters (the repository's
                         genesis.json unless ``--genesis``), validators = dev keys 0..N-1 (power 1,
                         equal bonds), the template's balances plus dev keys 100..109
    D/node<i>/           one node's data directory (as ``neuroseed init`` makes it): node0 ..
                         node<N-1> are the validators (dev key i in the keystore under the public
                         dev password), the next ones full nodes (no key)
    D/node<i>/node.log   that node's log (its stderr), appended to on every start

Every node also gets an **operator account**: dev key ``OPERATOR_DEV_KEY_BASE + i`` (funded in the
genesis, in its keystore under the public dev password), which signs the node's own
transactions — key posts for the priced datasets it sells, storage deals.

Every start rewrites the ports in each node's ``config.toml``: JSON-RPC on ``rpc_port + i`` (0: an
ephemeral port, printed when the node serves), libp2p on ``/ip4/127.0.0.1/tcp/<p2p_port + i>``
(0: free ports picked here), and as bootstrap peers every validator's address
(``…/p2p/<peer id>``, from each node's persistent ``p2p_key``). Bootstrapping to every validator
rather than to node0 alone means any validator can be down (or restarted) without cutting the
others or a newcomer off: each node redials its bootstrap peers by itself.

The supervisor starts the processes, prints each node's JSON-RPC URL as it comes up, reports a node
that exits (the others keep running) and forwards SIGINT/SIGTERM to every node, returning once
all are down. The dev keys and their password are public (``node.devkeys``): loopback only.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from node.config import (
    DEV_PASSWORD_FILE,
    DataDirLayout,
    init_data_dir,
    load_config,
    render_config_toml,
)
from node.devkeys import DEV_PASSWORD, dev_address, dev_secret
from node.errors import ConfigError
from node.genesis import (
    Genesis,
    GenesisAccount,
    GenesisValidator,
    genesis_from_json,
    genesis_to_json,
    load_genesis,
)
from node.keystore import LIGHT_SCRYPT, Keystore
from node.p2p.identity import load_or_create_node_key
from node.types import Amount

LOOPBACK = "127.0.0.1"
DEFAULT_VALIDATORS = 4
DEFAULT_NODES = 1
DEFAULT_RPC_PORT = 8645
DEFAULT_P2P_PORT = 8745
MAX_NODES = 32
# Funded besides the template's accounts (dev keys 1..10 in the repository's genesis, of which
# 1..N-1 are also validator keys on a devnet of N validators): never validators.
EXTRA_FUNDED_DEV_KEYS = range(100, 110)
# Node i's operator account is dev key OPERATOR_DEV_KEY_BASE + i (funded, never a validator).
OPERATOR_DEV_KEY_BASE = 200
OPERATOR_DEV_KEYS = range(OPERATOR_DEV_KEY_BASE, OPERATOR_DEV_KEY_BASE + 32)
DEFAULT_FUNDING = 1_000_000 * 10**18  # when the template funds no account
_FUNDED_SCAN = 1000  # dev keys 1.._FUNDED_SCAN-1 are checked for a genesis balance

GENESIS_FILE = "genesis.json"
NODE_DIR_PREFIX = "node"
NODE_LOG = "node.log"
STOP_GRACE_S = 20.0  # after SIGTERM, before SIGKILL
_POLL_S = 0.2

RPC_LINE = "JSON-RPC: "  # what ``neuroseed run`` prints once it serves
P2P_LINE = "P2P: "


@dataclass(frozen=True, slots=True)
class DevnetNode:
    index: int
    is_validator: bool
    datadir: Path
    rpc_port: int  # in config.toml; 0: ephemeral
    p2p_port: int
    peer_id: str  # base58 (16Uiu2…)

    @property
    def role(self) -> str:
        return "validator" if self.is_validator else "full"

    @property
    def p2p_addr(self) -> str:
        return f"/ip4/{LOOPBACK}/tcp/{self.p2p_port}/p2p/{self.peer_id}"

    @property
    def log_path(self) -> Path:
        return self.datadir / NODE_LOG


@dataclass(frozen=True, slots=True)
class DevnetPlan:
    root: Path
    genesis: Genesis
    nodes: tuple[DevnetNode, ...]
    created: bool  # the genesis was written by this call

    @property
    def validators(self) -> tuple[DevnetNode, ...]:
        return tuple(n for n in self.nodes if n.is_validator)


# --- the genesis -----------------------------------------------------------------------------


def devnet_genesis(template: Genesis, validators: int) -> Genesis:
    """``template`` with dev keys 0..validators-1 as the validators (power 1, the template's
    largest bond, at least the minimum bond) and dev keys 100..109 funded as well."""
    if not 1 <= validators <= MAX_NODES:
        raise ConfigError(f"--validators: expected 1 to {MAX_NODES}, got {validators}")
    bond = max(
        [v.bond for v in template.validators] + [template.authority_params.min_validator_bond]
    )
    vals = [GenesisValidator(dev_address(i), 1, Amount(bond)) for i in range(validators)]
    balances = {a.address: a for a in template.balances}
    amount = max((a.balance for a in template.balances), default=DEFAULT_FUNDING)
    for i in (*EXTRA_FUNDED_DEV_KEYS, *OPERATOR_DEV_KEYS):
        balances.setdefault(dev_address(i), GenesisAccount(dev_address(i), Amount(amount)))
    genesis = dataclasses.replace(
        template,
        validators=tuple(sorted(vals, key=lambda v: v.address)),
        balances=tuple(balances[a] for a in sorted(balances)),
    )
    # Through the file format and back: checked exactly as a genesis.json a node loads.
    return genesis_from_json(genesis_to_json(genesis))


def funded_dev_keys(genesis: Genesis) -> list[int]:
    """Indices of the dev keys (≥ 1) that have a genesis balance."""
    funded = {a.address for a in genesis.balances}
    return [i for i in range(1, _FUNDED_SCAN) if dev_address(i) in funded]


def format_ranges(indices: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1..3, 7"``."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            out.append(_range_text(run))
            run = []
        run.append(i)
    if run:
        out.append(_range_text(run))
    return ", ".join(out) or "none"


def _range_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}"


def validator_count(genesis: Genesis) -> int | None:
    """N if the genesis validators are exactly dev keys 0..N-1, else None."""
    addresses = {v.address for v in genesis.validators}
    n = len(addresses)
    return n if addresses == {dev_address(i) for i in range(n)} else None


# --- the directory -----------------------------------------------------------------------------


def node_dir(root: Path, index: int) -> Path:
    return root / f"{NODE_DIR_PREFIX}{index}"


def is_single_node_dir(root: Path) -> bool:
    """A data directory of one node (``neuroseed init``, or the one-validator devnet)."""
    return (root / "config.toml").exists()


def prepare_devnet(
    root: Path,
    *,
    validators: int,
    nodes: int,
    template: Path,
    rpc_host: str = LOOPBACK,
    rpc_port: int = DEFAULT_RPC_PORT,
    p2p_port: int = DEFAULT_P2P_PORT,
) -> DevnetPlan:
    """Create ``root`` on first use (genesis, then each node directory; an interrupted run can
    simply be repeated), add node directories that are missing, and (re)write every node's
    config for these ports. Refuses a directory that is not a devnet of ``validators``."""
    total = validators + nodes
    if nodes < 0 or not 1 <= total <= MAX_NODES:
        raise ConfigError(f"a devnet has 1 to {MAX_NODES} nodes, not {validators} + {nodes}")
    for name, base in (("--rpc-port", rpc_port), ("--p2p-port", p2p_port)):
        if base != 0 and not 1 <= base <= 65536 - total:
            raise ConfigError(f"{name}: {base} + {total} nodes leaves the port range")
    genesis_path = root / GENESIS_FILE
    if is_single_node_dir(root):
        raise ConfigError(_single_node_message(root))
    created = False
    if genesis_path.exists():
        genesis = load_genesis(genesis_path)
        have = validator_count(genesis)
        if have is None:
            raise ConfigError(
                f"{root} is not a devnet data directory (its genesis validators are not the dev "
                "keys 0..N-1); use another --datadir"
            )
        if have != validators:
            raise ConfigError(
                f"{root} is a devnet of {have} validator(s); pass --validators {have} "
                "(or use another --datadir for a new devnet)"
            )
    else:
        if root.exists() and any(not _is_node_dir_name(p.name) for p in root.iterdir()):
            raise ConfigError(
                f"{root} is not empty and not a devnet directory; use another --datadir"
            )
        genesis = devnet_genesis(load_genesis(template), validators)
        root.mkdir(parents=True, exist_ok=True)
        _write_file(genesis_path, genesis_to_json(genesis).encode(), mode=0o644)
        created = True
    p2p_ports = free_ports(total) if p2p_port == 0 else [p2p_port + i for i in range(total)]
    planned = [
        _init_node(root, i, i < validators, genesis_path, 0 if rpc_port == 0 else rpc_port + i, p)
        for i, p in enumerate(p2p_ports)
    ]
    plan = DevnetPlan(root, genesis, tuple(planned), created)
    for n in plan.nodes:
        _write_node_config(plan, n, rpc_host)
    return plan


def _is_node_dir_name(name: str) -> bool:
    return name.startswith(NODE_DIR_PREFIX) and name[len(NODE_DIR_PREFIX) :].isdigit()


def _single_node_message(root: Path) -> str:
    try:
        config = load_config(root)
    except ConfigError:
        config = None
    if (
        config is not None
        and config.validator_address == dev_address(0)
        and (root / GENESIS_FILE).exists()
    ):
        return (
            f"{root} holds a one-validator devnet; run it with --validators 1 --nodes 0, or use "
            "another --datadir for a multi-node devnet"
        )
    return f"{root} is not a devnet data directory (it is one node's); use another --datadir"


def _init_node(
    root: Path, index: int, is_validator: bool, genesis_path: Path, rpc_port: int, p2p_port: int
) -> DevnetNode:
    datadir = node_dir(root, index)
    datadir.mkdir(parents=True, exist_ok=True)
    layout = DataDirLayout(datadir)
    init_data_dir(datadir, genesis_path, dev=False)
    if is_validator:
        keystore = Keystore(layout.keystore)
        if not keystore.has(dev_address(index)):
            # The key and its password are public: a strong KDF would only slow every start.
            keystore.import_key(dev_secret(index), DEV_PASSWORD, kdf_params=LIGHT_SCRYPT)
    ensure_dev_operator(datadir, index)
    peer_id = peer_id_of(load_or_create_node_key(datadir))
    return DevnetNode(index, is_validator, datadir, rpc_port, p2p_port, peer_id)


def operator_dev_key(index: int) -> int:
    """The dev key number of devnet node ``index``'s operator account."""
    return OPERATOR_DEV_KEY_BASE + index


def ensure_dev_operator(datadir: Path, index: int) -> None:
    """Put node ``index``'s operator dev key in its keystore (public dev password, in
    ``validator.password``, mode 0600); the config names it (``_write_node_config``)."""
    keystore = Keystore(DataDirLayout(datadir).keystore)
    number = operator_dev_key(index)
    if not keystore.has(dev_address(number)):
        keystore.import_key(dev_secret(number), DEV_PASSWORD, kdf_params=LIGHT_SCRYPT)
    password_file = datadir / DEV_PASSWORD_FILE
    if not password_file.exists():
        _write_file(password_file, DEV_PASSWORD.encode() + b"\n", mode=0o600)


def peer_id_of(secret: bytes) -> str:
    """The libp2p peer id (base58) of a node key, through ``libp2p_host`` (the libp2p importer)."""
    try:
        from node.p2p.libp2p_host import Libp2pHost, peer_id_text
    except ImportError as exc:
        raise ConfigError(
            "a multi-node devnet needs py-libp2p (the `p2p` extra: pip install -e '.[p2p]')"
        ) from exc
    return peer_id_text(Libp2pHost(secret, ()).peer_id)


def bootstrap_of(plan: DevnetPlan, index: int) -> tuple[str, ...]:
    """Node ``index``'s bootstrap peers: every other validator."""
    return tuple(v.p2p_addr for v in plan.validators if v.index != index)


def _write_node_config(plan: DevnetPlan, n: DevnetNode, rpc_host: str) -> None:
    config = dataclasses.replace(
        load_config(n.datadir),
        rpc_host=rpc_host,
        rpc_port=n.rpc_port,
        p2p_listen_addrs=(f"/ip4/{LOOPBACK}/tcp/{n.p2p_port}",),
        p2p_bootstrap_peers=bootstrap_of(plan, n.index),
        validator_address=dev_address(n.index) if n.is_validator else None,
        validator_password_file=Path(DEV_PASSWORD_FILE) if n.is_validator else None,
        operator_address=dev_address(operator_dev_key(n.index)),
        operator_password_file=Path(DEV_PASSWORD_FILE),
    )
    _write_file(config.layout.config, render_config_toml(config).encode(), mode=0o644)


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --- ports ---------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now (the OS picks them)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((LOOPBACK, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def check_ports_free(plan: DevnetPlan, rpc_host: str) -> None:
    """Fail before starting anything if a fixed port is taken (a node would die with it)."""
    wanted = [(n.p2p_port, LOOPBACK, f"node {n.index}'s p2p") for n in plan.nodes]
    wanted += [(n.rpc_port, rpc_host, f"node {n.index}'s JSON-RPC") for n in plan.nodes]
    for port, host, what in wanted:
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                raise ConfigError(
                    f"port {port} ({what}) on {host} is in use: stop what uses it or pass "
                    "--rpc-port/--p2p-port (0 for free ports)"
                ) from None


# --- the processes -------------------------------------------------------------------------------


@dataclass
class NodeUp:
    """What a node reported once serving."""

    node: DevnetNode
    rpc_url: str
    p2p_addrs: tuple[str, ...]
    pid: int


@dataclass
class _Child:
    node: DevnetNode
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    p2p_addrs: list[str] = dataclasses.field(default_factory=list)
    url: str = ""
    up: bool = False
    exited: bool = False


def node_command(datadir: Path, *, provide_compute: bool = False) -> list[str]:
    """The command line of one node process (``provide_compute``: it runs the compute agent
    with its operator account)."""
    cmd = [sys.executable, "-m", "node", "--datadir", str(datadir), "run"]
    return [*cmd, "--provide-compute"] if provide_compute else cmd


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies, so a devnet
    (or a benchmark) killed with SIGKILL leaves no nodes behind; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class DevnetSupervisor:
    """Runs the plan's nodes as child processes until SIGINT/SIGTERM (or until all are gone)."""

    def __init__(
        self,
        plan: DevnetPlan,
        *,
        on_up: Callable[[NodeUp], None],
        on_all_up: Callable[[list[NodeUp]], None],
        on_exit: Callable[[DevnetNode, int, str], None],
        provide_compute: bool = False,
    ) -> None:
        self.plan = plan
        self._provide_compute = provide_compute  # the full nodes run the compute agent
        self._on_up = on_up
        self._on_all_up = on_all_up
        self._on_exit = on_exit
        self._lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self._children: list[_Child] = []
        self._stop_signal: int | None = None

    def run(self) -> int:
        """0 after a SIGINT/SIGTERM stopped every node; 1 if every node exited by itself."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start_all()
            return self._watch()
        finally:
            self._stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _start_all(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NEUROSEED_DATADIR"}
        preexec = die_with_parent()
        # Every child is forked before any thread exists here (preexec_fn is not thread-safe).
        for n in self.plan.nodes:
            log = open(n.log_path, "ab")  # noqa: SIM115 - closed in _stop_all
            try:
                proc = subprocess.Popen(
                    node_command(
                        n.datadir, provide_compute=self._provide_compute and not n.is_validator
                    ),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=env,
                    preexec_fn=preexec,
                    # Its own process group: a Ctrl-C in the terminal reaches this supervisor
                    # only, which stops every node once (SIGTERM), not twice.
                    process_group=0,
                )
            except BaseException:
                log.close()
                raise
            self._children.append(_Child(n, proc, log))
        for i, child in enumerate(self._children):
            assert child.proc.stdout is not None
            threading.Thread(
                target=self._pump,
                args=(i, child.proc.stdout),
                daemon=True,
                name=f"devnet-node{i}",
            ).start()

    def _pump(self, index: int, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                self._lines.put((index, raw.decode("utf-8", "replace").rstrip("\r\n")))
        self._lines.put((index, None))

    def _watch(self) -> int:
        reported_all = False
        while self._stop_signal is None:
            try:
                index, line = self._lines.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            else:
                if line is not None:
                    self._on_line(self._children[index], line)
            for child in self._children:
                if not child.exited and child.proc.poll() is not None:
                    child.exited = True
                    self._on_exit(child.node, child.proc.returncode, _log_tail(child.node))
            if all(c.exited for c in self._children):
                return 1
            ups = [self._up_of(c) for c in self._children if c.up]
            if not reported_all and len(ups) == len(self._children):
                reported_all = True
                self._on_all_up(ups)
        return 0

    def _on_line(self, child: _Child, line: str) -> None:
        if line.startswith(P2P_LINE):
            child.p2p_addrs.append(line.removeprefix(P2P_LINE).strip())
        elif line.startswith(RPC_LINE) and not child.up:
            child.up = True
            child.url = line.removeprefix(RPC_LINE).strip()
            self._on_up(self._up_of(child))

    def _up_of(self, child: _Child) -> NodeUp:
        return NodeUp(child.node, child.url, tuple(child.p2p_addrs), child.proc.pid)

    def _stop_all(self) -> None:
        live = [c for c in self._children if c.proc.poll() is None]
        for c in live:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for c in live:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=STOP_GRACE_S)
        for c in self._children:
            c.log.close()
            if c.proc.stdout is not None:
                with contextlib.suppress(OSError):
                    c.proc.stdout.close()


def _log_tail(n: DevnetNode, lines: int = 5) -> str:
    try:
        text = n.log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"

"""Network partition: 4 validators split 2 + 2 in Linux network namespaces, then healed.

The network (``tests/integration/netns.py``, ``Lan``): one namespace per node (``n0..n3``) and a
``hub`` namespace holding two bridges, A (n0, n1) and B (n2, n3), joined by one veth pair. Each
node has ``10.77.0.<i+1>/24`` on its ``eth0``; nothing is added to the host's namespace, and the
node namespaces have no route anywhere else. ``tc netem``, iptables and nft are not available on
this machine, so the partition is ``ip -n hub link set xa down`` (the inter-bridge veth) and the
heal is ``... up``. Every namespace is named ``nsptest<pid>x<random>-…``: unique per run; ones
left by a killed run (its pid is gone) are deleted at the start, this run's in ``finally``.

The nodes are the real ``python -m node --datadir D run`` processes, each started with
``ip netns exec <ns>`` (which execs: the child's pid is the node's, so a SIGKILL reaches it).
Their data directories are built here: a genesis from the repository's ``genesis.json`` with
``procs.FAST_TIMEOUTS`` (commit 300 ms, propose 1.5 s) and dev keys 0..3 as the 4 validators
(power 1 each, so 3 of 4 are needed for a quorum); dev key ``i`` imported into node ``i``'s
keystore under the public dev password, with a password file and ``validator.address`` in its
``config.toml``; p2p on ``/ip4/10.77.0.<i+1>/tcp/7700``, bootstrapping to the other three by
``/p2p/<peer id>`` (each node's ``p2p_key`` is created first and its peer id derived through
``node.p2p.libp2p_host``, as the node itself derives it); JSON-RPC on 127.0.0.1 of its namespace.

The test reaches each JSON-RPC from a worker thread that has entered that node's namespace
(``setns(2)`` affects only the calling thread), with plain ``http.client`` calls.

Steps, every wait bounded:

1. all 4 connect to each other and finalize a few blocks, agreeing on every hash;
2. cut 2 + 2: neither side has a quorum, so for 7 s (≈ 17 block intervals) no node's final
   height passes the highest head read just after the cut by more than 1 (a block whose
   precommits were already out may still complete), and no two nodes hold different hashes at
   any height;
3. heal: finality resumes, every node gains ≥ 3 heights, and all agree on every hash.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from node.config import init_data_dir, load_config, render_config_toml
from node.devkeys import DEV_PASSWORD, dev_address, dev_secret
from node.genesis import GenesisValidator, genesis_from_json, genesis_to_json, load_genesis
from node.keystore import LIGHT_SCRYPT, Keystore
from tests.integration.netns import Lan, NetnsError, clean_stale, netns_unavailable
from tests.integration.procs import FAST_TIMEOUTS, REPO, Proc, Procs, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

VALIDATORS = 4
GROUPS = ((0, 1), (2, 3))
P2P_PORT = 7700  # the same in every namespace: each has its own port space
RPC_PORT = 8645  # on 127.0.0.1 inside each namespace
PASSWORD_FILE = "validator.password"
START_S = 60.0  # JSON-RPC line, all 4 starting in parallel
FIRST_BLOCKS = 5
CONNECT_S = 30.0
FIRST_BLOCKS_S = 45.0
# Heads are sampled every 0.5 s for this long; connected, the chain makes a block every ~0.4 s.
PARTITION_S = 7.0
RESUME_HEIGHTS = 3
RESUME_S = 45.0  # rounds grew while partitioned (the propose timeout grows each round)


# --- data directories ----------------------------------------------------------------------------


def write_genesis(path: Path) -> Path:
    """The repository's genesis with fast timeouts and dev keys 0..3 as the validators."""
    template = load_genesis(REPO / "genesis.json")
    bond = max(
        [v.bond for v in template.validators] + [template.authority_params.min_validator_bond]
    )
    validators = sorted(
        (GenesisValidator(dev_address(i), 1, bond) for i in range(VALIDATORS)),
        key=lambda v: v.address,
    )
    timeouts: dict[str, Any] = dict(FAST_TIMEOUTS)
    genesis = dataclasses.replace(
        template,
        votable_params=dataclasses.replace(template.votable_params, **timeouts),
        validators=tuple(validators),
    )
    text = genesis_to_json(genesis)
    genesis_from_json(text)  # checked exactly as a node will load it
    path.write_text(text)
    return path


def peer_id_of(secret: bytes) -> str:
    """The peer id a node with p2p key ``secret`` has (derived by the node's own libp2p code)."""
    from node.p2p.libp2p_host import Libp2pHost, peer_id_text

    return peer_id_text(Libp2pHost(secret, ()).peer_id)


def prepare_nodes(root: Path, lan: Lan) -> dict[int, Path]:
    from node.p2p.identity import load_or_create_node_key

    genesis = write_genesis(root / "genesis.json")
    dirs: dict[int, Path] = {}
    peers: dict[int, str] = {}
    for i in range(VALIDATORS):
        d = root / f"node{i}"
        d.mkdir()
        config = init_data_dir(d, genesis, dev=False)
        # Public dev key and password (node.devkeys): a strong KDF would only slow the start.
        Keystore(config.layout.keystore).import_key(
            dev_secret(i), DEV_PASSWORD, kdf_params=LIGHT_SCRYPT
        )
        fd = os.open(d / PASSWORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(DEV_PASSWORD + "\n")
        peers[i] = f"/ip4/{lan.addr(i)}/tcp/{P2P_PORT}/p2p/{peer_id_of(load_or_create_node_key(d))}"
        dirs[i] = d
    for i, d in dirs.items():
        config = dataclasses.replace(
            load_config(d),
            rpc_host="127.0.0.1",
            rpc_port=RPC_PORT,
            p2p_listen_addrs=(f"/ip4/{lan.addr(i)}/tcp/{P2P_PORT}",),
            p2p_bootstrap_peers=tuple(p for j, p in peers.items() if j != i),
            validator_address=dev_address(i),
            validator_password_file=Path(PASSWORD_FILE),
        )
        (d / "config.toml").write_text(render_config_toml(config))
    return dirs


# --- the running nodes ---------------------------------------------------------------------------


class Net:
    """The 4 node processes, each reached through its namespace."""

    def __init__(self, lan: Lan, procs: Procs, dirs: dict[int, Path]) -> None:
        self.lan = lan
        self.procs = procs
        self.dirs = dirs
        self.proc: dict[int, Proc] = {}
        self.url: dict[int, str] = {}

    def start(self) -> None:
        for i, d in self.dirs.items():
            argv = [sys.executable, "-m", "node", "--datadir", str(d), "run"]
            self.proc[i] = self.procs.start(f"node{i}", self.lan.exec_argv(i, argv))
        for i, p in self.proc.items():
            self.url[i] = p.wait_for_rpc_url(START_S)

    def call(self, i: int, method: str, *params: Any) -> Any:
        return self.lan.rpc(i, self.url[i], method, list(params))

    def status(self, i: int) -> dict[str, Any]:
        result: dict[str, Any] = self.call(i, "ns_status")
        return result

    def heads(self) -> dict[int, int]:
        return {i: int(self.status(i)["headHeight"]) for i in self.proc}

    def peers(self) -> dict[int, int]:
        return {i: int(self.status(i)["peers"]) for i in self.proc}

    def hashes(self, i: int, last: int) -> dict[int, str]:
        out: dict[int, str] = {}
        for h in range(1, last + 1):
            block = self.call(i, "ns_getBlockByNumber", h, False)
            assert block is not None, f"node {i} has no final block at height {h} (head {last})"
            out[h] = str(block["hash"])
        return out

    def check_no_conflict(self) -> dict[int, int]:
        """No two nodes hold different hashes at any height (each up to its own head); every
        node has every block up to its head. Returns the heads read."""
        heads = self.heads()
        by_node = {i: self.hashes(i, h) for i, h in heads.items()}
        for h in range(1, max(heads.values()) + 1):
            seen = {i: hs[h] for i, hs in by_node.items() if h in hs}
            assert len(set(seen.values())) <= 1, f"conflicting final blocks at height {h}: {seen}"
        return heads

    def wait_all_at(self, height: int, timeout: float, what: str) -> None:
        wait_until(
            lambda: all(h >= height for h in self.heads().values()),
            timeout,
            f"{what}: every node at height {height}",
            interval=0.2,
            describe=lambda: f"heads {self.heads()}",
        )

    def assert_alive(self) -> None:
        dead = {i: p.proc.returncode for i, p in self.proc.items() if not p.alive}
        assert not dead, f"node processes exited: {dead}"


# --- the test ------------------------------------------------------------------------------------


def test_partition_2_2_halts_then_heals(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"partition test needs network namespaces: {reason}")
    stale = clean_stale()
    if stale:
        print(f"deleted namespaces left by killed runs: {stale}")
    logs = tmp_path / "logs"
    logs.mkdir()
    with Lan(GROUPS) as lan, Procs(logs) as procs:
        net = Net(lan, procs, prepare_nodes(tmp_path, lan))
        try:
            scenario(net)
        except BaseException:
            for p in procs.started:
                print(f"--- {p.name} (log tail) ---\n{p.log_tail(20)}")
            raise
        # Procs.__exit__ kills the nodes, then Lan.__exit__ deletes the namespaces (also on error).


def scenario(net: Net) -> None:
    t0 = time.monotonic()

    def phase(name: str, heads: dict[int, int] | None = None) -> None:
        heads = heads if heads is not None else net.heads()
        print(f"[{time.monotonic() - t0:5.1f} s] {name}; heads {heads}", flush=True)

    # 1. All four connected, finalizing, agreeing.
    net.start()
    phase("4 validators serving")
    wait_until(
        lambda: all(n >= VALIDATORS - 1 for n in net.peers().values()),
        CONNECT_S,
        "every node connected to the 3 others",
        describe=lambda: f"peers {net.peers()}",
    )
    net.wait_all_at(FIRST_BLOCKS, FIRST_BLOCKS_S, "first blocks")
    net.check_no_conflict()
    phase("all connected and finalizing")

    # 2. Partition 2 + 2: no quorum on either side.
    net.lan.cut()
    at_cut = net.heads()
    phase("cut A (n0, n1) | B (n2, n3)", at_cut)
    bound = max(at_cut.values()) + 1
    highest = dict(at_cut)
    deadline = time.monotonic() + PARTITION_S
    while time.monotonic() < deadline:
        time.sleep(0.5)
        for i, h in net.heads().items():
            highest[i] = max(highest[i], h)
        over = {i: h for i, h in highest.items() if h > bound}
        assert not over, (
            f"finality went on while split 2 + 2: heads {highest} (at the cut {at_cut}, "
            f"allowed up to {bound})"
        )
    frozen = net.check_no_conflict()
    phase(f"partitioned for {PARTITION_S:g} s (highest heads {highest})", frozen)
    net.assert_alive()
    assert max(frozen.values()) <= bound

    # 3. Heal: progress resumes and everyone agrees.
    net.lan.heal()
    phase("healed")
    target = max(frozen.values()) + RESUME_HEIGHTS
    net.wait_all_at(target, RESUME_S, "after the heal")
    heads = net.check_no_conflict()
    assert min(heads.values()) >= target
    net.assert_alive()
    phase(f"progress resumed, all agree on heights 1..{min(heads.values())}", heads)


def test_netns_helpers_clean_up(tmp_path: Path) -> None:
    """A Lan deletes its namespaces on exit, also when building it fails half-way."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    from tests.integration.netns import list_netns

    with Lan(GROUPS) as lan:
        prefix = lan.prefix
        assert len([n for n in list_netns() if n.startswith(prefix)]) == VALIDATORS + 1
    assert not [n for n in list_netns() if n.startswith(prefix)]

    broken = _BrokenLan(GROUPS)
    with pytest.raises(NetnsError, match="injected"), broken:
        pass
    assert broken.prefix and not [n for n in list_netns() if n.startswith(broken.prefix)]


class _BrokenLan(Lan):
    def build(self) -> None:
        super().build()
        raise NetnsError("injected")

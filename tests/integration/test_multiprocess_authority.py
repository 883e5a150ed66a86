"""The validator set changing under real node processes over libp2p on 127.0.0.1.

One devnet (``neuroseed devnet --init-only``: 4 validators = dev keys 0..3, 2 full nodes, fast
timeouts); node 4 runs with dev key 4 (funded at genesis) as its validator key, so it signs once it
is in the set. In order, every wait bounded:

1. the candidate bonds (``neuroseed tx bond``) and validators 1..3 vote it in (``neuroseed tx
   validator-vote --add``): every node shows 5 validators, commits of heights before the effective
   height h+2 have no signature of it and a later one has;
2. validators 1..3 vote it out again (``--remove``): 4 validators everywhere, still finalizing;
3. a fresh full node started now syncs from genesis to the tip (verifying commits across both
   changes) and agrees on every hash;
4. validator 0 is stopped, its data directory copied (same key, its own WAL and chain, a new p2p
   identity and port) and both copies run: the key signs twice at the same heights, the duplicate
   votes become evidence, and validator 0 leaves the set on every node while 1..3 keep finalizing.

The CLI runs in this process (``node.cli.main``); processes are always killed (``procs.Procs``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from node import cli
from node.config import load_config, render_config_toml
from node.devkeys import DEV_PASSWORD, dev_address, dev_secret
from node.devnet import free_ports
from node.keystore import LIGHT_SCRYPT, Keystore
from node.p2p.identity import node_key_path
from tests.integration.procs import NodeRpc, Procs, fast_genesis, init_devnet, wait_until
from tests.integration.test_multiprocess import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CANDIDATE = 4  # node index and dev key of the candidate
FRESH = 5  # the full node started late
CLONE = 9  # the second process of validator OFFENDER
OFFENDER = 0
VOTERS = (1, 2, 3)  # funded validator dev keys (dev key 0 has a bond but no balance)
BOND_NSD = "10000"  # authority_params.min_validator_bond of the repository's genesis
SET_CHANGE_S = 30.0
PROGRESS_S = 30.0
EVIDENCE_S = 50.0


def hexaddr(index: int) -> str:
    return "0x" + dev_address(index).hex()


def send(cluster: Cluster, node: int, *argv: str) -> dict[str, Any]:
    """``neuroseed tx ... --json`` in this process against ``node``; its receipt must succeed."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["tx", *argv, "--rpc", cluster.rpc[node].url, "--json", "--timeout", "30"])
    assert code == 0, f"tx {argv}: exit {code}"
    result: dict[str, Any] = json.loads(out.getvalue())
    assert result["receipt"]["success"] is True, result
    return result


def members(rpc: NodeRpc) -> set[str] | None:
    try:
        return {str(v["address"]).lower() for v in rpc.status()["validators"]}
    except Exception:
        return None


def signers_of(rpc: NodeRpc, height: int) -> set[str] | None:
    """Who signed the commit of ``height`` (block ``height + 1``'s last commit), if final."""
    block = rpc.client.call("ns_getBlockByNumber", [height + 1, False])
    if block is None or block.get("lastCommit") is None:
        return None
    return {str(s).lower() for s in block["lastCommit"]["signers"]}


def wait_members(cluster: Cluster, expected: set[str], timeout: float, what: str) -> None:
    wait_until(
        lambda: all(members(rpc) == expected for rpc in cluster.rpc.values()),
        timeout,
        what,
        interval=0.2,
        describe=lambda: f"{ {i: members(r) for i, r in cluster.rpc.items()} }",
    )


def test_validator_set_changes_over_libp2p(tmp_path: Path) -> None:
    template = fast_genesis(tmp_path / "template.json")
    summary = init_devnet(tmp_path / "devnet", 4, 2, template)
    logs = tmp_path / "logs"
    logs.mkdir()
    with Procs(logs) as procs:
        cluster = Cluster(procs, summary)
        try:
            run_scenario(cluster, procs, tmp_path)
        except BaseException:
            for p in procs.started:
                print(f"--- {p.name} (log tail) ---\n{p.log_tail(15)}")
            raise
        finally:
            cluster.close()


def run_scenario(cluster: Cluster, procs: Procs, tmp_path: Path) -> None:
    t0 = time.monotonic()

    def phase(name: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {name}; heights {cluster.heights()}", flush=True)

    old = {hexaddr(i) for i in range(4)}
    candidate = hexaddr(CANDIDATE)

    # The candidate's key in its node's keystore (public dev key and password).
    cand_dir = cluster.dirs[CANDIDATE]
    Keystore(cand_dir / "keystore").import_key(
        dev_secret(CANDIDATE), DEV_PASSWORD, kdf_params=LIGHT_SCRYPT
    )
    password_file = tmp_path / "dev-password.txt"
    password_file.write_text(DEV_PASSWORD + "\n")

    cluster.start(0, 1, 2, 3)
    cluster.proc[CANDIDATE] = procs.node(
        "candidate", cand_dir, "--validator", candidate, "--password-file", str(password_file)
    )
    cluster.rpc[CANDIDATE] = NodeRpc(cluster.proc[CANDIDATE].wait_for_rpc_url())
    cluster.wait_all_at(2, 60.0, "first blocks")
    phase("started 4 validators and the candidate")

    # 1. Bond, then a majority (3 of 4) votes the candidate in, effective at h+2.
    send(cluster, CANDIDATE, "bond", "--amount", BOND_NSD, "--dev-key", str(CANDIDATE))
    receipts = [
        send(cluster, i, "validator-vote", "--subject", candidate, "--add", "--dev-key", str(i))
        for i in VOTERS
    ]
    decided = int(receipts[-1]["receipt"]["height"])
    effective = decided + 2
    wait_members(cluster, old | {candidate}, SET_CHANGE_S, "5 validators on every node")
    phase(f"candidate voted in at {decided}, effective at {effective}")
    cluster.wait_all_at(effective, PROGRESS_S, "the block at the effective height")
    rpc = cluster.rpc[1]
    for h in range(max(1, decided - 2), effective):
        signed = signers_of(rpc, h)
        assert signed is not None and candidate not in signed and signed <= old, (h, signed)

    def candidate_signed() -> int | None:
        head = rpc.height()
        for h in range(effective, head):
            signed = signers_of(rpc, h)
            if signed is not None and candidate in signed:
                return h
        return None

    first_signed = wait_until(candidate_signed, PROGRESS_S, "a commit signed by the candidate")
    phase(f"the candidate signed the commit of height {first_signed}")

    # 2. Voted out again: 4 validators everywhere, finality goes on.
    receipts = [
        send(cluster, i, "validator-vote", "--subject", candidate, "--remove", "--dev-key", str(i))
        for i in VOTERS
    ]
    removed_at = int(receipts[-1]["receipt"]["height"]) + 2
    wait_members(cluster, old, SET_CHANGE_S, "4 validators on every node")
    cluster.wait_all_at(removed_at + 3, PROGRESS_S, "finality after the removal")
    for h in range(removed_at, removed_at + 2):  # blocks up to removed_at + 3 are final
        signed = signers_of(rpc, h)
        assert signed is not None and candidate not in signed, (h, signed)
    cluster.check_agreement()
    phase(f"candidate voted out, effective at {removed_at}")

    # 3. A fresh node syncs across both changes.
    cluster.start(FRESH)
    tip = max(h or 0 for h in cluster.heights().values())
    cluster.wait_all_at(tip, PROGRESS_S, "the fresh node synced from genesis to the tip")
    compared = cluster.check_agreement()
    assert compared >= removed_at
    phase(f"fresh node agrees on heights 1..{compared}")

    # 4. The offender's key runs twice: evidence removes it.
    cluster.proc[OFFENDER].terminate()
    cluster.rpc.pop(OFFENDER).close()
    clone_dir = tmp_path / "clone"
    shutil.copytree(cluster.dirs[OFFENDER], clone_dir)
    node_key_path(clone_dir).unlink()  # its own libp2p identity
    (clone_dir / "node.log").unlink(missing_ok=True)
    (port,) = free_ports(1)
    config = load_config(clone_dir)
    config = dataclasses.replace(config, p2p_listen_addrs=(f"/ip4/127.0.0.1/tcp/{port}",))
    config.layout.config.write_text(render_config_toml(config))
    cluster.dirs[CLONE] = clone_dir
    cluster.start(OFFENDER, CLONE)
    phase("validator 0 runs twice")
    honest = old - {hexaddr(OFFENDER)}
    wait_members(cluster, honest, EVIDENCE_S, "the double signer removed on every node")
    at_removal = max(h or 0 for h in cluster.heights().values())
    phase("evidence removed validator 0")
    cluster.wait_all_at(at_removal + 3, PROGRESS_S, "validators 1..3 keep finalizing")
    cluster.check_agreement()
    cluster.kill(CLONE)
    phase("done")

"""The one-command devnet as a user runs it: real processes, loopback only, every wait bounded.

``python -m node devnet`` in a temporary data directory; a transfer signed with a public dev key
becomes final; the balance survives a SIGTERM and a restart; blocks keep coming after it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from node.types import NSD
from tests.integration.procs import (
    NodeRpc,
    Procs,
    cli_json,
    fast_genesis,
    procs_in,
    wait_until,
)

pytestmark = pytest.mark.slow

WAIT_S = 30.0
RECIPIENT = "0x" + "5e" * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> Any:
    return cli_json(*args, timeout=WAIT_S + 15)


def devnet_argv(datadir: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "node",
        "devnet",
        "--validators",
        "1",
        "--nodes",
        "0",
        "--datadir",
        str(datadir),
        "--rpc-port",
        str(port),
    ]


def wait_for_height(url: str, above: int) -> int:
    return wait_until(
        lambda: h if (h := int(cli("status", "--rpc", url)["height"])) > above else None,
        WAIT_S,
        f"a block above height {above}",
        interval=0.3,
    )


def test_devnet_transfer_survives_restart(tmp_path: Path) -> None:
    with procs_in(tmp_path) as procs:
        _transfer_survives_restart(procs, tmp_path / "devnet")


def _transfer_survives_restart(procs: Procs, datadir: Path) -> None:
    port = free_port()
    first = procs.start("node1", devnet_argv(datadir, port))
    url = first.wait_for_rpc_url(WAIT_S)
    assert url == f"http://127.0.0.1:{port}/"

    result = cli(
        "tx", "transfer", "--dev-key", "1", "--to", RECIPIENT, "--amount", "1.5", "--rpc", url
    )
    receipt = result["receipt"]
    assert receipt["success"] is True
    assert receipt["txId"] == result["txId"]
    assert receipt["height"] >= 1
    balance = cli("balance", RECIPIENT, "--rpc", url)
    assert balance["balance"] == str(3 * NSD // 2)
    assert balance["balanceNSD"] == "1.500000000000000000"
    height_before = int(cli("status", "--rpc", url)["height"])

    assert first.terminate(WAIT_S) == 0, first.log_tail()

    second = procs.start("node2", devnet_argv(datadir, port))
    url = second.wait_for_rpc_url(WAIT_S)
    assert cli("balance", RECIPIENT, "--rpc", url)["balanceNSD"] == "1.500000000000000000"
    wait_for_height(url, height_before)  # the restarted validator keeps finalizing blocks

    assert second.terminate(WAIT_S) == 0, second.log_tail()


def _children_of(pid: int) -> list[int]:
    """Child pids of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(p) for p in text.split()]
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.timeout(150)
def test_multi_node_devnet_command(tmp_path: Path) -> None:
    """``neuroseed devnet`` with 4 validators and a full node: one process per node, one
    ``node I (role): JSON-RPC: URL`` line each; a node that dies is reported while the others go
    on; SIGTERM stops every node and the command exits 0."""

    template = fast_genesis(tmp_path / "template.json")
    datadir = tmp_path / "devnet"
    argv = [
        sys.executable, "-m", "node", "devnet", "--datadir", str(datadir),
        "--validators", "4", "--nodes", "1", "--rpc-port", "0", "--p2p-port", "0",
        "--genesis", str(template),
    ]  # fmt: skip
    with Procs(tmp_path) as procs:
        devnet = procs.start("devnet", argv)
        urls: dict[int, str] = {}
        for _ in range(5):
            line = devnet.wait_for_line(lambda s: " JSON-RPC: " in s, WAIT_S * 2, "node line")
            head, url = line.split(": JSON-RPC: ")
            index, role = head.removeprefix("node ").split(" ")
            assert role == ("(full)" if int(index) == 4 else "(validator)"), line
            urls[int(index)] = url.strip()
        assert sorted(urls) == [0, 1, 2, 3, 4]
        rpcs = {i: NodeRpc(url) for i, url in urls.items()}
        try:
            wait_until(
                lambda: all((r.height_or_none() or 0) >= 2 for r in rpcs.values()),
                WAIT_S, "every node at height 2", interval=0.2,
            )  # fmt: skip
            hashes = {i: r.block_hashes(1, 2) for i, r in rpcs.items()}
            assert all(h == hashes[0] for h in hashes.values()), hashes

            # `status` against the full node: peers, heights, syncing.
            st = cli("status", "--rpc", urls[4])
            assert st["peers"] >= 1 and st["finalizedHeight"] >= 2 and st["syncing"] is False
            assert st["isValidator"] is False

            # A validator dies: reported on stderr, the other nodes keep finalizing.
            children = _children_of(devnet.pid)
            assert len(children) == 5, children
            node3 = f"--datadir {datadir / 'node3'} run"
            os.kill(next(p for p in children if _cmdline(p).endswith(node3)), signal.SIGKILL)
            rpcs.pop(3).close()
            wait_until(
                lambda: "node 3 (validator) exited (killed by SIGKILL)" in devnet.log_tail(),
                WAIT_S, "the devnet reports the dead node",
            )  # fmt: skip
            assert devnet.alive
            now = rpcs[4].height()
            wait_until(
                lambda: all((r.height_or_none() or 0) >= now + 2 for r in rpcs.values()),
                WAIT_S, "progress without node 3", interval=0.2,
            )  # fmt: skip
        finally:
            for r in rpcs.values():
                r.close()

        assert devnet.terminate(timeout=WAIT_S) == 0, devnet.log_tail()
        assert not [p for p in children if _pid_alive(p)], "a node outlived the devnet"
        assert "devnet stopped" in devnet.log_tail()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""

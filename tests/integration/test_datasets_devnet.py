"""Datasets end to end on a devnet of real processes (loopback only, every wait bounded):

* ``dataset add`` on one node and ``dataset get`` on another give a byte-identical file whose root
  CID is the IPFS one (``unixfs.cid_of_file``, checked against the IPFS vectors elsewhere);
* a composite of two datasets downloads only the blocks covering its rows;
* a priced dataset cannot be fetched without paying, and can after ``dataset buy`` (the key is
  posted by the owner node's key agent and opened by the buyer's CLI).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.devnet import operator_dev_key
from node.models.safetensors_header import TensorInfo, encode_header
from node.storage.format_v1 import LEAF0_BYTES, make_leaf0
from node.storage.unixfs import cid_of_file
from tests.integration.procs import (
    REPO,
    NodeRpc,
    Procs,
    cli_env,
    fast_genesis,
    init_devnet,
    wait_until,
)

pytestmark = pytest.mark.slow

WAIT_S = 60.0
ROW_BYTES = 4096  # one F32 row of 1024 values
BUYER_KEY = 101  # funded dev keys (devnet genesis): a buyer
SUPPLIER2_KEY = 102


def tensor_file(path: Path, rows: int, seed: int, *, v1: bool) -> bytes:
    """A dataset file with tensor ``x`` (F32, rows x 1024) and ``y`` (U8, rows x 4); returns its
    bytes. ``v1``: already in artifact format v1 (leaf 0 = the padded header)."""
    x = b"".join(
        hashlib.sha256(f"{seed}/{i}".encode()).digest() * (ROW_BYTES // 32) for i in range(rows)
    )
    y = bytes((seed + i) % 256 for i in range(rows * 4))
    header = encode_header(
        [
            TensorInfo("x", "F32", (rows, 1024), 0, len(x)),
            TensorInfo("y", "U8", (rows, 4), len(x), len(x) + len(y)),
        ],
        None,
    )
    head = make_leaf0(header) if v1 else struct.pack("<Q", len(header)) + header
    data = head + x + y
    path.write_bytes(data)
    return data


def run_cli(*args: str, ok: bool = True, timeout: float = WAIT_S + 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "node", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )
    if ok:
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr}"
    return done


def cli(*args: str) -> Any:
    return json.loads(run_cli(*args).stdout.strip().splitlines()[-1])


def test_datasets_on_a_devnet(tmp_path: Path) -> None:
    template = fast_genesis(tmp_path / "template.json")
    summary = init_devnet(tmp_path / "devnet", 1, 1, template)
    logs = tmp_path / "logs"
    logs.mkdir()
    with Procs(logs) as procs:
        try:
            _scenario(procs, summary, tmp_path)
        except BaseException:
            for p in procs.started:
                print(f"--- {p.name} (log tail) ---\n{p.log_tail(40)}")
            raise


def _scenario(procs: Procs, summary: dict[str, Any], tmp: Path) -> None:
    dirs = {n["node"]: Path(n["datadir"]) for n in summary["nodes"]}
    owner_proc = procs.node("node0", dirs[0])
    reader_proc = procs.node("node1", dirs[1])
    owner_url = owner_proc.wait_for_rpc_url()
    reader_url = reader_proc.wait_for_rpc_url()
    owner_rpc, reader_rpc = NodeRpc(owner_url), NodeRpc(reader_url)
    try:
        wait_until(
            lambda: reader_rpc.height() >= 2 and reader_rpc.status()["peers"] >= 1,
            WAIT_S,
            "the full node syncing from the validator",
            interval=0.3,
        )
    finally:
        owner_rpc.close()
        reader_rpc.close()
    operator = str(operator_dev_key(0))  # node0's operator account: sells the priced data
    on_owner = ("--rpc", owner_url, "--datadir", str(dirs[0]))
    on_reader = ("--rpc", reader_url, "--datadir", str(dirs[1]))
    for who in (operator, str(SUPPLIER2_KEY)):
        cli("role", "register", "data_supplier", "--dev-key", who, *on_owner)
    cli("role", "register", "customer", "--dev-key", str(BUYER_KEY), *on_reader)

    # 1. A free dataset: added on node0, fetched through node1, byte-identical, IPFS CID.
    src = tmp / "a.safetensors"
    a_bytes = tensor_file(src, 768, 1, v1=True)
    added = cli(
        "dataset", "add", str(src), "--name", "A", "--price", "0", "--dev-key", operator, *on_owner
    )
    assert added["cid"] == str(cid_of_file(io.BytesIO(a_bytes)))
    assert added["receipt"]["success"]
    out = tmp / "a.out"
    got = cli("dataset", "get", added["cid"], "-o", str(out), *on_reader)
    assert got["bytes"] == len(a_bytes) and out.read_bytes() == a_bytes

    # A compact (non-v1) file is converted on upload: same tensors, v1 layout.
    src_b = tmp / "b.safetensors"
    b_plain = tensor_file(src_b, 800, 2, v1=False)
    b_v1 = tensor_file(tmp / "b.v1", 800, 2, v1=True)
    added_b = cli(
        "dataset", "add", str(src_b), "--name", "B", "--price", "0",
        "--dev-key", str(SUPPLIER2_KEY), *on_owner,
    )
    assert added_b["cid"] == str(cid_of_file(io.BytesIO(b_v1))) and len(b_plain) < len(b_v1)

    # 2. A composite of the two: only the covering leaves are fetched.
    comp = cli(
        "dataset", "compose",
        "--part", f"{added['id']}:700:768",
        "--part", f"{added_b['id']}:0:20",
        "--name", "A-tail+B-head", "--price", "0", "--dev-key", str(SUPPLIER2_KEY), *on_owner,
    )
    out_c = tmp / "c.out"
    got_c = cli("dataset", "get", comp["id"], "-o", str(out_c), *on_reader)
    # A's rows 700..768 of x are in its last data leaves, plus y; B's first 20 rows: one leaf
    # each for x and y; plus each source's leaf 0.
    assert got_c["leavesFetched"] <= 6
    a_info = cli_info(reader_url, added_b["cid"])
    assert not a_info["complete"]
    expected_x = a_bytes[LEAF0_BYTES + 700 * ROW_BYTES : LEAF0_BYTES + 768 * ROW_BYTES]
    expected_x += b_v1[LEAF0_BYTES : LEAF0_BYTES + 20 * ROW_BYTES]
    composite = out_c.read_bytes()
    header = json.loads(composite[8:LEAF0_BYTES].rstrip(b" "))
    assert header["x"]["shape"] == [88, 1024] and header["y"]["shape"] == [88, 4]
    x0, x1 = header["x"]["data_offsets"]
    assert composite[LEAF0_BYTES + x0 : LEAF0_BYTES + x1] == expected_x

    # 3. A priced dataset: refused without paying; bought; the owner's node posts the key.
    src_p = tmp / "p.safetensors"
    p_bytes = tensor_file(src_p, 400, 3, v1=True)
    added_p = cli(
        "dataset", "add", str(src_p), "--name", "P", "--price", "1.5", "--dev-key", operator,
        *on_owner,
    )
    out_p = tmp / "p.out"
    refused = run_cli(
        "dataset", "get", added_p["id"], "-o", str(out_p), "--dev-key", str(BUYER_KEY),
        *on_reader, ok=False,
    )
    assert refused.returncode == 1 and "buy" in refused.stderr
    assert not out_p.exists()
    bought = cli(
        "dataset", "buy", added_p["id"], "--wait", "--timeout", str(WAIT_S),
        "--dev-key", str(BUYER_KEY), *on_reader,
    )
    assert bought["receipt"]["success"]
    got_p = cli(
        "dataset", "get", added_p["id"], "-o", str(out_p), "--dev-key", str(BUYER_KEY), *on_reader
    )
    assert got_p["bytes"] == len(p_bytes) and out_p.read_bytes() == p_bytes
    keys = list((dirs[1] / "keystore" / "purchases").iterdir())
    assert keys and all(k.stat().st_mode & 0o777 == 0o600 for k in keys)

    # 4. A priced composite (rows of the free A and of the priced P): bought, the owner's node
    # posts P's key for it, and the reader fetches only the covering leaves and decrypts them.
    mixed = cli(
        "dataset", "compose",
        "--part", f"{added['id']}:700:768",
        "--part", f"{added_p['id']}:0:50",
        "--name", "mixed", "--price", "4", "--dev-key", operator, *on_owner,
    )
    cli(
        "dataset", "buy", mixed["id"], "--wait", "--timeout", str(WAIT_S),
        "--dev-key", str(BUYER_KEY), *on_reader,
    )
    out_m = tmp / "m.out"
    cli("dataset", "get", mixed["id"], "-o", str(out_m), "--dev-key", str(BUYER_KEY), *on_reader)
    m = out_m.read_bytes()
    header_m = json.loads(m[8:LEAF0_BYTES].rstrip(b" "))
    assert header_m["x"]["shape"] == [118, 1024]
    mx0, mx1 = header_m["x"]["data_offsets"]
    expected_mx = a_bytes[LEAF0_BYTES + 700 * ROW_BYTES : LEAF0_BYTES + 768 * ROW_BYTES]
    expected_mx += p_bytes[LEAF0_BYTES : LEAF0_BYTES + 50 * ROW_BYTES]
    assert m[LEAF0_BYTES + mx0 : LEAF0_BYTES + mx1] == expected_mx


def cli_info(url: str, cid: str) -> Any:
    from rpc.client import Client

    with Client(url) as c:
        return c.get_artifact(cid)

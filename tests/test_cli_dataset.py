"""``neuroseed dataset …`` and ``role …`` in-process: input errors before anything is sent, and the
read/fetch commands against a real RPC server whose node has a real ``ArtifactService`` and chain
state from the economy transition (``tests/rpc/test_artifacts_rpc``). The full add → buy → get
flow over real processes is ``tests/integration/test_datasets_devnet.py``."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from node import cli
from node.api import StateProof, TxLocation
from node.config import DataDirLayout, load_config, render_config_toml
from node.consensus.state import Account, get_account
from node.consensus.txs import verify_transaction
from node.devkeys import DEV_PASSWORD, dev_address, dev_secret
from node.economy.api import Role
from node.economy.datasets import get_dataset
from node.economy.purchases import (
    KeyPost,
    Purchase,
    ShareState,
    get_purchase,
    key_wrap_context,
    purchase_id,
)
from node.errors import ConfigError
from node.keystore import LIGHT_SCRYPT, Keystore
from node.p2p.memory import MemoryNetwork
from node.storage import encryption
from node.storage.format_v1 import LEAF0_BYTES
from node.types import Address, Amount, Hash32, Height
from rpc.server import ArtifactHttpSettings, RpcServer
from tests.economy.econ import (
    BUYER,
    BUYER2,
    BUYER_PRIV,
    BUYER_PUB,
    PRICE,
    SLASH,
    SUPPLIER,
    SUPPLIER2,
    Artifact,
    EconomyChain,
    addr,
    build_artifact,
    economy_genesis,
    header_json,
    register_body,
    tx,
)
from tests.helpers import key
from tests.rpc.test_artifacts_rpc import (
    ArtifactNode,
    EconView,
    Served,
    _run_network,
    make_service,
    register,
    serve,
)
from tests.test_artifact_service import write_safetensors


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.ENV_DATADIR, raising=False)


def run(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def arun(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = await trio.to_thread.run_sync(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- input errors: refused before any connection ----------------------------------------------------

UNREACHABLE = ("--rpc", "http://127.0.0.1:9/")


def test_add_refuses_a_non_safetensors_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    code, _, err = run(
        ["dataset", "add", str(bad), "--name", "n", "--price", "0", "--dev-key", "1", *UNREACHABLE],
        capsys,
    )
    assert code == 1 and "JSON object" in err


def test_add_refuses_truncated_and_non_dataset_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "d.safetensors"
    write_safetensors(src, rows=4)
    with open(src, "r+b") as fh:
        fh.truncate(src.stat().st_size - 10)
    code, _, err = run(
        ["dataset", "add", str(src), "--name", "n", "--price", "0", "--dev-key", "1", *UNREACHABLE],
        capsys,
    )
    assert code == 1 and "truncated" in err
    scalar = tmp_path / "s.safetensors"
    header = b'{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}'
    scalar.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    code, _, err = run(
        [
            "dataset",
            "add",
            str(scalar),
            "--name",
            "n",
            "--price",
            "0",
            "--dev-key",
            "1",
            *UNREACHABLE,
        ],
        capsys,
    )
    assert code == 1 and "scalar" in err


def test_add_checks_its_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "d.safetensors"
    write_safetensors(src, rows=4)
    base = ["dataset", "add", str(src), "--dev-key", "1", *UNREACHABLE]
    code, _, err = run([*base, "--name", "n", "--price", "-1"], capsys)
    assert code == 1 and "--price" in err
    code, _, err = run([*base, "--name", "  ", "--price", "0"], capsys)
    assert code == 1 and "--name" in err
    code, _, err = run(
        ["dataset", "add", str(tmp_path / "missing"), "--name", "n", "--price", "0", *UNREACHABLE],
        capsys,
    )
    assert code == 1 and "no such file" in err
    code, _, _ = run(["dataset", "add", str(src), "--price", "0"], capsys)
    assert code == 2  # --name is required


def test_unreachable_node_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["dataset", "list", *UNREACHABLE], capsys)
    assert code == 3 and "is the node running" in err
    code, _, err = run(
        ["dataset", "get", "0x" + "00" * 32, "-o", str(tmp_path / "o"), *UNREACHABLE], capsys
    )
    assert code == 3


def test_bad_references_and_roles(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["dataset", "show", "not-a-cid", *UNREACHABLE], capsys)
    assert code == 1 and "neither a dataset id" in err
    code, _, err = run(["role", "register", "wizard", "--dev-key", "1", *UNREACHABLE], capsys)
    assert code == 1 and "unknown role" in err and "data_supplier" in err


# --- against a node --------------------------------------------------------------------------------


@pytest.fixture
def econ() -> EconomyChain:
    chain = EconomyChain()
    chain.register_roles((SUPPLIER, Role.DATA_SUPPLIER), (SUPPLIER2, Role.DATA_SUPPLIER))
    return chain


async def upload(served: Served, path: Path, price: int = 0) -> dict[str, Any]:
    return await served.sync(lambda c: c.upload_artifact(path, price=price))


async def test_list_show_and_get(
    nursery: trio.Nursery, tmp_path: Path, econ: EconomyChain, capsys: pytest.CaptureFixture[str]
) -> None:
    served = await serve(nursery, tmp_path, econ, ArtifactHttpSettings())
    rpc = ("--rpc", served.url)
    src = tmp_path / "cats.safetensors"
    data = write_safetensors(src, rows=300, seed=4)
    up = await upload(served, src)
    root = register(econ, SUPPLIER, up, "cats")
    src2 = tmp_path / "dogs.safetensors"
    write_safetensors(src2, rows=10, seed=5)
    register(econ, SUPPLIER2, await upload(served, src2, price=10**18), "dogs", price=10**18)

    code, out, _ = await arun(["dataset", "list", "--json", *rpc], capsys)
    assert code == 0
    assert sorted(d["name"] for d in json.loads(out)["datasets"]) == ["cats", "dogs"]
    code, out, _ = await arun(["dataset", "list", "--priced", *rpc], capsys)
    assert code == 0 and "dogs" in out and "cats" not in out
    code, out, _ = await arun(["dataset", "show", up["root"], *rpc], capsys)
    assert code == 0 and "cats" in out and "x F32[1024]" in out and "free" in out
    code, out, _ = await arun(["role", "show", "0x" + key(SUPPLIER).address.hex(), *rpc], capsys)
    assert code == 0 and "data_supplier" in out

    # get: the node holds it, so the job is done at once; the file is the stored v1 file.
    out_file = tmp_path / "got.safetensors"
    code, out, err = await arun(
        ["dataset", "get", up["root"], "-o", str(out_file), "--json", *rpc], capsys
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["bytes"] == LEAF0_BYTES + len(data) and result["cid"] == up["root"]
    got = out_file.read_bytes()
    assert got[LEAF0_BYTES:] == data and not (tmp_path / "got.safetensors.part").exists()
    assert root == bytes.fromhex(up["rootHex"][2:])

    # A priced dataset without a purchase kept here: refused with what to do.
    code, _, err = await arun(
        [
            "dataset",
            "get",
            _id_of(econ, "dogs"),
            "-o",
            str(tmp_path / "dogs.out"),
            "--datadir",
            str(tmp_path / "buyer"),
            "--dev-key",
            "4",
            *rpc,
        ],
        capsys,
    )
    assert code == 1 and "dataset buy" in err and not (tmp_path / "dogs.out").exists()
    # A free dataset cannot be bought.
    code, _, err = await arun(
        ["dataset", "buy", up["root"], "--dev-key", "4", "--datadir", str(tmp_path / "b"), *rpc],
        capsys,
    )
    assert code == 1 and "free" in err
    # Unknown dataset.
    code, _, err = await arun(["dataset", "show", "0x" + "00" * 32, *rpc], capsys)
    assert code == 1 and "no dataset" in err
    nursery.cancel_scope.cancel()


def _id_of(econ: EconomyChain, name: str) -> str:
    from node.economy.api import NS_DATASET
    from node.economy.datasets import DatasetRecord

    for k, v in econ.state.items():
        if k.startswith(NS_DATASET):
            record = DatasetRecord.decode(v)
            if record.name == name:
                return "0x" + record.id.hex()
    raise AssertionError(name)


# --- operator account settings ---------------------------------------------------------------------


def test_operator_config_round_trip_and_unlock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datadir = tmp_path / "d"
    datadir.mkdir()
    address = dev_address(201)
    (datadir / "config.toml").write_text(
        f'[operator]\naddress = "0x{address.hex()}"\npassword_env = "NS_OP_PW"\n'
        "[artifacts]\nquota_bytes = 1048576\nupload_max_bytes = 1024\nupload_remote = true\n"
    )
    config = load_config(datadir)
    assert config.operator_address == address and config.operator_password_env == "NS_OP_PW"
    assert config.blob_quota_bytes == 1 << 20 and config.upload_max_bytes == 1024
    assert config.upload_remote
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "config.toml").write_text(render_config_toml(config))
    assert load_config(tmp_path / "again").operator_address == address
    Keystore(config.layout.keystore).import_key(
        dev_secret(201), DEV_PASSWORD, kdf_params=LIGHT_SCRYPT
    )
    with pytest.raises(cli.CliError, match="NS_OP_PW"):
        cli._unlock_operator(config, None)
    monkeypatch.setenv("NS_OP_PW", DEV_PASSWORD)
    unlocked = cli._unlock_operator(config, None)
    assert unlocked is not None and unlocked.address == address


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[operator]\npassword_env = "X"\n', "operator.address is not"),
        ('[operator]\naddress = "0x' + "11" * 20 + '"\npassword_env = "1bad"\n', "password_env"),
        ("[artifacts]\nupload_max_bytes = 0\n", "upload_max_bytes"),
        ("[artifacts]\nupload_remote = 1\n", "upload_remote"),
        ("[artifacts]\nquota = 5\n", "unknown key"),
    ],
)
def test_bad_artifact_settings(tmp_path: Path, toml: str, needle: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path)


# --- dataset dispute: against a node that mines what it is sent ------------------------------------


class MiningEconView(EconView):
    """The chain state, accounts, proofs (values only) and the receipts of mined transactions."""

    def __init__(self, node: MiningEconNode) -> None:
        super().__init__(node.econ)
        self._node = node

    def get_account(self, address: Address) -> Account:
        return get_account(self._node.econ.view(), address)

    def get_proof(self, key_: bytes, height: int | None = None) -> StateProof:
        econ = self._node.econ
        head = 0 if econ.head is None else int(econ.head.height)
        return StateProof(key_, econ.state.get(key_), Height(head), Hash32(bytes(32)), b"")

    def get_transaction(self, tx_id: bytes) -> TxLocation | None:
        return self._node.located(tx_id)


class MiningEconNode(ArtifactNode):
    """Takes transactions as a mempool would (any order of arrival, kept per sender) and puts
    everything it holds in one block the first time a receipt is asked for, so a dispute's open
    and all its parts are judged in one block by the real economy transition."""

    def __init__(self, econ: EconomyChain, service: Any) -> None:
        super().__init__(econ, service)
        self.held: list[bytes] = []
        self.mined: dict[bytes, TxLocation] = {}
        self.rejected: list[str] = []
        self._lock = threading.Lock()

    def read_view(self) -> MiningEconView:
        return MiningEconView(self)

    async def submit_transaction(self, raw: bytes) -> Hash32:
        vtx = verify_transaction(raw, self.econ.params.max_tx_bytes)
        with self._lock:
            self.held.append(raw)
        return vtx.tx_id

    async def pending_nonce(self, address: Address) -> int:
        with self._lock:
            held = sum(verify_transaction(r).sender == address for r in self.held)
            return get_account(self.econ.view(), address).nonce + held

    def located(self, tx_id: bytes) -> TxLocation | None:
        with self._lock:
            if self.held:
                built = self.econ.step(self.held, strict=False)
                self.econ.check_economy_supply()
                self.rejected += [e.message for _, e in built.rejected]
                block = built.block
                for i, (raw, receipt) in enumerate(
                    zip(block.txs, built.result.receipts, strict=True)
                ):
                    self.mined[receipt.tx_id] = TxLocation(
                        receipt.tx_id, block.header.height, i, block.hash(), raw, receipt
                    )
                self.held = []
            return self.mined.get(bytes(tx_id))


async def serve_mining(nursery: trio.Nursery, tmp: Path, econ: EconomyChain) -> Served:
    net = MemoryNetwork(seed=7)
    await nursery.start(_run_network, net)
    service = make_service(net, "node", tmp, econ)
    peer = make_service(net, "peer", tmp, econ)
    await nursery.start(service.run)
    await nursery.start(peer.run)
    node = MiningEconNode(econ, service)
    server = RpcServer(node, "127.0.0.1", 0, artifacts=ArtifactHttpSettings())  # type: ignore[arg-type]
    url = await nursery.start(server.serve)
    return Served(url, node, service, peer, tmp)


DISPUTE_KEY, DISPUTE_SALT = b"\x41" * 32, b"\x42" * 7
# 1.5 MiB of data: leaf 1 is a full 1 MiB chunk, leaf 2 the short last one.
DISPUTE_HEADER = header_json({"x": ("U8", (1536, 1024))})
DISPUTE_DATA = bytes(i % 241 for i in range(1536 * 1024))


def dispute_market(max_tx: int = 64 << 10) -> EconomyChain:
    econ = EconomyChain(economy_genesis(max_tx_bytes=max_tx))
    econ.register_roles(
        (SUPPLIER, Role.DATA_SUPPLIER), (BUYER, Role.CUSTOMER), (BUYER2, Role.CUSTOMER)
    )
    return econ


def sell(econ: EconomyChain, a: Artifact, name: str) -> None:
    econ.run(econ.tx(SUPPLIER, register_body(a, price=PRICE, name=name)))


def buy_and_post(
    econ: EconomyChain, datadir: Path, a: Artifact, buyer: int, content_key: bytes
) -> str:
    """``buyer`` buys ``a`` (the one-off key kept as ``dataset buy`` keeps it) and the owner
    posts ``content_key`` wrapped to it; returns the purchase id."""
    pid = purchase_id(addr(buyer), econ.nonce(buyer))
    econ.run(tx(buyer, Purchase(a.id, BUYER_PUB, Amount(10**6)), nonce=econ.nonce(buyer)))
    wrapped = encryption.wrap_key(content_key, BUYER_PUB, key_wrap_context(pid, a.id))
    econ.run(econ.tx(SUPPLIER, KeyPost(pid, a.id, wrapped)))
    cli._save_purchase(
        DataDirLayout(datadir).keystore / cli.PURCHASES_DIR,
        {
            "purchase": "0x" + pid.hex(),
            "dataset": "0x" + a.id.hex(),
            "buyer": "0x" + addr(buyer).hex(),
            "privateKey": "0x" + BUYER_PRIV.hex(),
            "createdMs": econ.height,  # newest first: `dataset get` picks the newest
        },
    )
    return "0x" + pid.hex()


def store_blocks(service: Any, a: Artifact) -> None:
    for cid, data in a.blocks.items():
        service.store.put(cid, data)
    service.store.pin(a.root, list(a.blocks))


async def test_dispute_a_garbage_leaf_then_get_names_the_remedy(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    econ = dispute_market()
    served = await serve_mining(nursery, tmp_path, econ)
    node = served.node
    assert isinstance(node, MiningEconNode)
    bad = build_artifact(
        DISPUTE_HEADER,
        DISPUTE_DATA,
        key=DISPUTE_KEY,
        salt=DISPUTE_SALT,
        encrypt_with=b"\x43" * 32,
    )
    sell(econ, bad, "bad")
    # Only the seller's node stores it: the dispute has the buyer's node fetch it first.
    store_blocks(served.peer, bad)
    await served.peer.provide(bad.root)
    datadir = tmp_path / "buyer"
    pid = buy_and_post(econ, datadir, bad, BUYER, DISPUTE_KEY)
    base = ["--datadir", str(datadir), "--rpc", served.url, "--dev-key", str(BUYER)]

    height = econ.height
    code, out, err = await arun(["dataset", "dispute", pid, "--dry-run", "--json", *base], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["dryRun"] and plan["verdict"] == "owner_fault_decrypt" and plan["leaf"] == 1
    kinds = [t["kind"] for t in plan["transactions"]]
    assert kinds == ["leaf_dispute_open"] + ["leaf_dispute_part"] * 32
    assert plan["leafBytes"] == 1 << 20 and plan["refund"] == str(PRICE)
    assert econ.height == height and node.held == []  # nothing sent
    assert served.service.store.is_pinned(bad.root)  # fetched from the seller's node

    # `dataset get` cannot decrypt it: nothing is left behind and the remedy is named.
    out_file = tmp_path / "bad.safetensors"
    code, _, err = await arun(
        ["dataset", "get", "0x" + bad.id.hex(), "-o", str(out_file), *base], capsys
    )
    assert code == 1 and f"neuroseed dataset dispute {pid}" in err, err
    assert "nothing was written" in err and "by height" in err
    assert not out_file.exists() and not (tmp_path / "bad.safetensors.part").exists()
    assert not list(tmp_path.glob(".bad.safetensors*"))

    buyer_before = econ.balance(BUYER)
    code, out, err = await arun(["dataset", "dispute", pid, "--json", *base], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert len(result["transactions"]) == 33 and node.rejected == []
    assert [t["nonce"] for t in result["transactions"]] == list(range(2, 35))
    assert result["outcome"] == {
        "state": "owner_fault",
        "refunded": str(PRICE),
        "slashed": str(SLASH),
    }
    fees = sum(int(t["fee"]) for t in result["transactions"])
    assert econ.balance(BUYER) == buyer_before + PRICE - fees
    record = get_purchase(econ.view(), bytes.fromhex(pid[2:]))
    assert record is not None and record.shares[0].state == ShareState.OWNER_FAULT
    # Settled: a second run sends nothing.
    code, _, err = await arun(["dataset", "dispute", pid, *base], capsys)
    assert code == 1 and "settled (owner_fault)" in err
    nursery.cancel_scope.cancel()


async def test_dispute_an_honest_seller_and_a_garbage_key(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    econ = dispute_market()
    served = await serve_mining(nursery, tmp_path, econ)
    node = served.node
    assert isinstance(node, MiningEconNode)
    good = build_artifact(DISPUTE_HEADER, DISPUTE_DATA, key=DISPUTE_KEY, salt=DISPUTE_SALT)
    sell(econ, good, "good")
    store_blocks(served.service, good)
    datadir = tmp_path / "buyer"
    honest = buy_and_post(econ, datadir, good, BUYER, DISPUTE_KEY)
    cheated = buy_and_post(econ, datadir, good, BUYER2, b"\x99" * 32)
    base = ["--datadir", str(datadir), "--rpc", served.url]
    as_buyer = [*base, "--dev-key", str(BUYER)]
    as_buyer2 = [*base, "--dev-key", str(BUYER2)]

    height = econ.height
    code, _, err = await arun(["dataset", "dispute", honest, *as_buyer], capsys)
    assert code == 1 and "all 2 data leaves" in err and "owner delivered" in err
    assert econ.height == height and node.held == []
    code, _, err = await arun(["dataset", "dispute", honest, "--leaf", "3", *as_buyer], capsys)
    assert code == 1 and "data leaves 1 to 2" in err
    # The wrong account cannot sign the buyer's dispute.
    code, _, err = await arun(["dataset", "dispute", cheated, *as_buyer], capsys)
    assert code == 1 and "sign with that account" in err and node.held == []

    # `dataset get` refuses a key that fails the key check and names the dispute.
    out_file = tmp_path / "good.safetensors"
    code, _, err = await arun(
        ["dataset", "get", "0x" + good.id.hex(), "-o", str(out_file), *as_buyer2], capsys
    )
    assert code == 1 and "does not match its registered key check" in err, err
    assert f"neuroseed dataset dispute {cheated}" in err and not out_file.exists()

    code, out, err = await arun(["dataset", "dispute", cheated, *as_buyer2], capsys)
    assert code == 0, err
    assert "key check" in out and "the owner was at fault" in out
    assert f"{cli.format_nsd(PRICE)} NSD to you" in out
    record = get_purchase(econ.view(), bytes.fromhex(cheated[2:]))
    assert record is not None and record.shares[0].state == ShareState.OWNER_FAULT
    nursery.cancel_scope.cancel()


def test_dispute_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["dataset", "dispute", "--datadir", str(tmp_path), "--dev-key", "4", *UNREACHABLE]
    code, _, err = run([*base, "0x1234"], capsys)
    assert code == 1 and "not a purchase id" in err
    pid = "0x" + "ab" * 32
    code, _, err = run([*base, pid, "--leaf", "0"], capsys)
    assert code == 1 and "leaf 0 is the public header" in err
    code, _, err = run([*base, pid], capsys)
    assert code == 1 and "no one-off key for purchase" in err
    code, _, err = run([*base, pid, "--source", "not-an-id"], capsys)
    assert code == 1 and "neither a dataset id" in err
    cid = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    code, _, err = run([*base, pid, "--source", cid], capsys)
    assert code == 1 and "--source" in err and "expected a dataset id" in err


async def test_dispute_finishes_an_interrupted_leaf_dispute(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The open and 5 parts made it on chain before the buyer's CLI stopped: a new run reads how
    many leaf bytes the chain holds and posts the 27 parts left."""
    from node.dispute_client import BlockArtifact, plan_dispute

    econ = dispute_market()
    served = await serve_mining(nursery, tmp_path, econ)
    bad = build_artifact(
        DISPUTE_HEADER, DISPUTE_DATA, key=DISPUTE_KEY, salt=DISPUTE_SALT, encrypt_with=b"\x44" * 32
    )
    sell(econ, bad, "bad")
    store_blocks(served.service, bad)
    datadir = tmp_path / "buyer"
    pid = buy_and_post(econ, datadir, bad, BUYER, DISPUTE_KEY)
    purchase = get_purchase(econ.view(), bytes.fromhex(pid[2:]))
    source = get_dataset(econ.view(), bad.id)
    assert purchase is not None and source is not None
    plan = plan_dispute(
        purchase,
        0,
        source,
        BUYER_PRIV,
        BlockArtifact(bad.root, bad.blocks.get),
        max_tx_bytes=64 << 10,
    )
    first = econ.nonce(BUYER)
    econ.run(*(tx(BUYER, b, nonce=first + i) for i, b in enumerate(plan.bodies[:6])))
    base = ["--datadir", str(datadir), "--rpc", served.url, "--dev-key", str(BUYER)]
    code, _, err = await arun(["dataset", "dispute", pid, "--leaf", "2", *base], capsys)
    assert code == 1 and "already open" in err
    code, out, err = await arun(["dataset", "dispute", pid, "--json", *base], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["resumed"] and len(result["transactions"]) == 27
    assert {t["kind"] for t in result["transactions"]} == {"leaf_dispute_part"}
    assert result["outcome"]["state"] == "owner_fault"
    nursery.cancel_scope.cancel()

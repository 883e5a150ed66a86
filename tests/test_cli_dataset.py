"""``neuroseed dataset …`` and ``role …`` in-process: input errors before anything is sent, and the
read/fetch commands against a real RPC server whose node has a real ``ArtifactService`` and chain
state from the economy transition (``tests/rpc/test_artifacts_rpc``). The full add → buy → get
flow over real processes is ``tests/integration/test_datasets_devnet.py``."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from node import cli
from node.config import load_config, render_config_toml
from node.devkeys import DEV_PASSWORD, dev_address, dev_secret
from node.economy.api import Role
from node.errors import ConfigError
from node.keystore import LIGHT_SCRYPT, Keystore
from node.storage.format_v1 import LEAF0_BYTES
from rpc.server import ArtifactHttpSettings
from tests.economy.econ import SUPPLIER, SUPPLIER2, EconomyChain
from tests.helpers import key
from tests.rpc.test_artifacts_rpc import Served, register, serve
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


def test_add_refuses_a_non_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
        ["dataset", "add", str(scalar), "--name", "n", "--price", "0", "--dev-key", "1",
         *UNREACHABLE],
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
    code, _, err = run(["dataset", "add", str(tmp_path / "missing"), "--name", "n", "--price",
                        "0", *UNREACHABLE], capsys)
    assert code == 1 and "no such file" in err
    code, _, _ = run(["dataset", "add", str(src), "--price", "0"], capsys)
    assert code == 2  # --name is required


def test_unreachable_node_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["dataset", "list", *UNREACHABLE], capsys)
    assert code == 3 and "is the node running" in err
    code, _, err = run(["dataset", "get", "0x" + "00" * 32, "-o", str(tmp_path / "o"),
                        *UNREACHABLE], capsys)
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
        ["dataset", "get", _id_of(econ, "dogs"), "-o",
         str(tmp_path / "dogs.out"), "--datadir", str(tmp_path / "buyer"), "--dev-key", "4", *rpc],
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
    Keystore(config.layout.keystore).import_key(dev_secret(201), DEV_PASSWORD, kdf_params=LIGHT_SCRYPT)
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

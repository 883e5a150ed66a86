"""Node settings: defaults, config.toml, CLI overrides, validation, and data-directory init."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from node.config import (
    DEFAULT_RPC_HOST,
    DEFAULT_RPC_PORT,
    DataDirLayout,
    NodeConfig,
    init_data_dir,
    load_config,
    render_config_toml,
)
from node.devkeys import DEV_PASSWORD, dev_address, dev_key
from node.errors import ConfigError
from node.genesis import to_checksum
from node.keystore import LIGHT_SCRYPT, Keystore, read_password

REPO_GENESIS = Path(__file__).resolve().parent.parent / "genesis.json"


def test_defaults(tmp_path: Path) -> None:
    c = load_config(tmp_path)
    assert c.data_dir == tmp_path
    assert c.rpc_host == DEFAULT_RPC_HOST == "127.0.0.1"
    assert c.rpc_port == DEFAULT_RPC_PORT == 8645
    assert c.admin_rpc_enabled is False
    assert c.mempool_max_future_per_sender == 64
    assert c.validator_address is None
    assert c.validator_password_file is None
    assert c.log_level == "info"
    assert c.rpc_max_body_bytes > 0 and c.rpc_max_batch > 0


def test_layout(tmp_path: Path) -> None:
    layout = NodeConfig(tmp_path).layout
    assert layout == DataDirLayout(tmp_path)
    assert layout.chain == tmp_path / "chain"
    assert layout.keystore == tmp_path / "keystore"
    assert layout.consensus_wal == tmp_path / "consensus.wal"
    assert layout.genesis == tmp_path / "genesis.json"
    assert layout.lock == tmp_path / "node.lock"
    assert layout.config == tmp_path / "config.toml"


def test_load_from_toml(tmp_path: Path) -> None:
    addr = to_checksum(dev_address(0))
    (tmp_path / "config.toml").write_text(
        f"""
[rpc]
host = "::1"
port = 9000
max_body_bytes = 100000
max_batch = 7
admin_enabled = true

[p2p]
listen = ["/ip4/127.0.0.1/tcp/9001"]
bootstrap = ["/ip4/10.0.0.1/tcp/9001/p2p/16Uiu2HAm"]

[validator]
address = "{addr}"
password_file = "pw.txt"

[mempool]
max_txs = 500
max_bytes = 2000000
max_future_per_sender = 8

[log]
level = "debug"
"""
    )
    c = load_config(tmp_path)
    assert c.rpc_host == "::1"
    assert c.rpc_port == 9000
    assert c.rpc_max_body_bytes == 100000
    assert c.rpc_max_batch == 7
    assert c.admin_rpc_enabled is True
    assert c.p2p_listen_addrs == ("/ip4/127.0.0.1/tcp/9001",)
    assert c.p2p_bootstrap_peers == ("/ip4/10.0.0.1/tcp/9001/p2p/16Uiu2HAm",)
    assert c.validator_address == dev_address(0)
    assert c.validator_password_file == Path("pw.txt")
    assert c.password_file_path == tmp_path / "pw.txt"
    assert (c.mempool_max_txs, c.mempool_max_bytes, c.mempool_max_future_per_sender) == (
        500,
        2000000,
        8,
    )
    assert c.log_level == "debug"


def test_partial_toml_keeps_defaults(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[rpc]\nport = 9100\n")
    c = load_config(tmp_path)
    assert c.rpc_port == 9100
    assert c.rpc_host == DEFAULT_RPC_HOST


def test_render_roundtrip(tmp_path: Path) -> None:
    c = NodeConfig(
        tmp_path,
        rpc_port=9999,
        p2p_bootstrap_peers=("/dns4/example.org/tcp/1",),
        validator_address=dev_address(3),
        validator_password_file=Path('secret "pw".txt'),
        log_level="warning",
    )
    (tmp_path / "config.toml").write_text(render_config_toml(c))
    assert load_config(tmp_path) == c
    default = NodeConfig(tmp_path)
    (tmp_path / "config.toml").write_text(render_config_toml(default))
    assert load_config(tmp_path) == default


def test_overrides(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[rpc]\nport = 9100\n")
    c = load_config(
        tmp_path,
        {
            "rpc_port": 9200,
            "rpc_host": None,
            "log_level": "DEBUG",
            "validator_address": to_checksum(dev_address(1)),
            "validator_password_file": "pw",
        },
    )
    assert c.rpc_port == 9200  # the flag beats the file
    assert c.rpc_host == DEFAULT_RPC_HOST  # None = flag not given
    assert c.log_level == "debug"
    assert c.validator_address == dev_address(1)
    # A path from the command line is relative to the working directory, made absolute.
    assert c.validator_password_file is not None and c.validator_password_file.is_absolute()
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(tmp_path, {"rpc_prot": 1})
    with pytest.raises(ConfigError, match=r"rpc\.port"):
        load_config(tmp_path, {"rpc_port": 70000})


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[rpc]\nport = -1\n", "rpc.port"),
        ("[rpc]\nport = 65536\n", "rpc.port"),
        ('[rpc]\nport = "8645"\n', "rpc.port"),
        ("[rpc]\nport = 8645.0\n", "rpc.port"),
        ("[rpc]\nport = true\n", "rpc.port"),
        ('[rpc]\nhost = "not a host!"\n', "rpc.host"),
        ("[rpc]\nhost = 127\n", "rpc.host"),
        ("[rpc]\nmax_batch = 0\n", "rpc.max_batch"),
        ("[rpc]\nmax_body_bytes = 10\n", "rpc.max_body_bytes"),
        ('[rpc]\nadmin_enabled = "yes"\n', "rpc.admin_enabled"),
        ('[rpc]\nadmin_enabled = true\nhost = "0.0.0.0"\n', "loopback"),
        ('[rpc]\nadmin_enabled = true\nhost = "example.org"\n', "loopback"),
        ("[rpc]\nportt = 1\n", "rpc.portt"),
        ("[rcp]\nport = 1\n", "[rcp]"),
        ("port = 1\n", "[port]"),
        ('[p2p]\nlisten = "/ip4/0.0.0.0/tcp/1"\n', "p2p.listen"),
        ('[p2p]\nlisten = ["0.0.0.0:1"]\n', "p2p.listen"),
        ("[p2p]\nbootstrap = [1]\n", "p2p.bootstrap"),
        ('[validator]\naddress = "0x12"\n', "validator.address"),
        ('[validator]\npassword_file = "pw"\n', "validator.address"),
        (
            '[validator]\naddress = "0x7578a097cecf0307a14a4e296ddc3e7b9b9663c2"\n'
            'password_file = ""\n',
            "validator.password_file",
        ),
        ("[mempool]\nmax_txs = 0\n", "mempool.max_txs"),
        ("[mempool]\nmax_bytes = 1\n", "mempool.max_bytes"),
        ("[mempool]\nmax_future_per_sender = -1\n", "mempool.max_future_per_sender"),
        ("[mempool]\nmax_txs = 10\nmax_future_per_sender = 11\n", "max_future_per_sender"),
        ('[log]\nlevel = "verbose"\n', "log.level"),
        ("[compute]\nclaim_margin_heights = 0\n", "compute.claim_margin_heights"),
        ("[compute]\ntasks_per_block = -5\n", "compute.tasks_per_block"),
        ("[rpc\n", "TOML"),
    ],
)
def test_invalid_config(tmp_path: Path, toml: str, needle: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert needle in str(info.value), str(info.value)
    assert "config.toml" in str(info.value)


def test_invalid_bytes_in_config(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(tmp_path)


def test_direct_construction_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        NodeConfig(tmp_path, rpc_port=-1)
    with pytest.raises(ConfigError):
        NodeConfig("relative")  # type: ignore[arg-type]
    assert NodeConfig(tmp_path, rpc_host="localhost", admin_rpc_enabled=True).admin_rpc_enabled


# --- init_data_dir -----------------------------------------------------------------------------


def test_init_plain(tmp_path: Path) -> None:
    d = tmp_path / "node"
    c = init_data_dir(d, REPO_GENESIS, dev=False)
    assert (d / "genesis.json").read_bytes() == REPO_GENESIS.read_bytes()
    assert (d / "config.toml").exists()
    assert c == load_config(d)
    assert c.validator_address is None
    assert not (d / "keystore").exists()


def test_init_dev(tmp_path: Path) -> None:
    d = tmp_path / "node"
    c = init_data_dir(d, REPO_GENESIS, dev=True, password=None, kdf_params=LIGHT_SCRYPT)
    key = dev_key(0)
    assert c.validator_address == key.address
    assert c.password_file_path == d / "validator.password"
    assert stat.S_IMODE((d / "validator.password").stat().st_mode) == 0o600
    password = read_password(c.password_file_path, confirm=False)
    assert password == DEV_PASSWORD
    ks = Keystore(c.layout.keystore)
    assert ks.list() == [key.address]
    assert ks.load(key.address, password).secret == key.secret
    assert stat.S_IMODE(c.layout.keystore.stat().st_mode) == 0o700
    assert load_config(d) == c


def test_init_dev_custom_password(tmp_path: Path) -> None:
    d = tmp_path / "node"
    c = init_data_dir(d, REPO_GENESIS, dev=True, password="hunter2", kdf_params=LIGHT_SCRYPT)
    assert c.validator_address is not None
    Keystore(c.layout.keystore).load(c.validator_address, "hunter2")


def test_init_password_without_dev_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dev"):
        init_data_dir(tmp_path / "node", REPO_GENESIS, dev=False, password="x")


def test_init_is_idempotent_for_the_same_genesis(tmp_path: Path) -> None:
    d = tmp_path / "node"
    first = init_data_dir(d, REPO_GENESIS, dev=True, kdf_params=LIGHT_SCRYPT)
    # A reformatted but equal genesis is the same chain.
    same = tmp_path / "same.json"
    same.write_text(json.dumps(json.loads(REPO_GENESIS.read_text())))
    again = init_data_dir(d, same, dev=True, kdf_params=LIGHT_SCRYPT)
    assert again == first
    assert (d / "genesis.json").read_bytes() == REPO_GENESIS.read_bytes()
    assert len(list((d / "keystore").iterdir())) == 1


def test_init_refuses_a_different_genesis(tmp_path: Path) -> None:
    d = tmp_path / "node"
    init_data_dir(d, REPO_GENESIS, dev=False)
    doc = json.loads(REPO_GENESIS.read_text())
    doc["chain_id"] = 9999
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="already initialised for another chain"):
        init_data_dir(d, other, dev=False)
    assert (d / "genesis.json").read_bytes() == REPO_GENESIS.read_bytes()


def test_init_keeps_an_existing_config(tmp_path: Path) -> None:
    d = tmp_path / "node"
    d.mkdir()
    (d / "config.toml").write_text("[rpc]\nport = 9300\n")
    c = init_data_dir(d, REPO_GENESIS, dev=False)
    assert c.rpc_port == 9300


def test_init_rejects_bad_genesis_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    d = tmp_path / "node"
    with pytest.raises(ConfigError, match=r"bad\.json"):
        init_data_dir(d, bad, dev=False)
    assert not d.exists()


def test_init_dev_needs_the_dev_validator(tmp_path: Path) -> None:
    doc = json.loads(REPO_GENESIS.read_text())
    doc["validators"][0]["address"] = to_checksum(dev_address(9))
    g = tmp_path / "g.json"
    g.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="dev key 0"):
        init_data_dir(tmp_path / "node", g, dev=True, kdf_params=LIGHT_SCRYPT)


def test_init_resumes_after_an_interrupted_run(tmp_path: Path) -> None:
    # Simulate a crash after the key import but before config.toml and genesis.json were written.
    d = tmp_path / "node"
    Keystore(d / "keystore").import_key(dev_key(0).secret, DEV_PASSWORD, kdf_params=LIGHT_SCRYPT)
    c = init_data_dir(d, REPO_GENESIS, dev=True, kdf_params=LIGHT_SCRYPT)
    assert c.validator_address == dev_key(0).address
    assert (d / "genesis.json").exists()


def test_port_zero_means_an_ephemeral_port(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[rpc]\nport = 0\n")
    assert load_config(tmp_path).rpc_port == 0


def test_compute_agent_limits_from_toml(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        "[compute]\nclaim_margin_heights = 25\ntasks_per_block = 64\n"
    )
    c = load_config(tmp_path)
    assert (c.compute_claim_margin_heights, c.compute_tasks_per_block) == (25, 64)
    assert load_config(tmp_path / "other").compute_tasks_per_block == 512  # the default

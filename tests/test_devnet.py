"""The multi-node devnet's layout (node.devnet) and its CLI checks, without starting processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli import REPO_GENESIS, main
from node.config import load_config
from node.devkeys import dev_address
from node.devnet import (
    EXTRA_FUNDED_DEV_KEYS,
    OPERATOR_DEV_KEYS,
    devnet_genesis,
    format_ranges,
    funded_dev_keys,
    prepare_devnet,
    validator_count,
)
from node.errors import ConfigError
from node.genesis import genesis_hash, load_genesis
from node.keystore import Keystore

pytest.importorskip("libp2p")  # peer ids come from node.p2p.libp2p_host


def test_devnet_genesis_has_dev_validators_and_funds() -> None:
    template = load_genesis(REPO_GENESIS)
    genesis = devnet_genesis(template, 4)
    assert validator_count(genesis) == 4
    assert {v.power for v in genesis.validators} == {1}
    bonds = {v.bond for v in genesis.validators}
    assert len(bonds) == 1 and bonds.pop() >= template.authority_params.min_validator_bond
    funded = funded_dev_keys(genesis)
    assert funded == [*funded_dev_keys(template), *EXTRA_FUNDED_DEV_KEYS, *OPERATOR_DEV_KEYS]
    assert genesis.votable_params == template.votable_params
    assert genesis.chain_params == template.chain_params
    assert validator_count(template) == 1


def test_format_ranges() -> None:
    assert format_ranges([3, 1, 2, 7, 100, 101]) == "1..3, 7, 100..101"
    assert format_ranges([]) == "none"


def test_prepare_devnet_layout(tmp_path: Path) -> None:
    root = tmp_path / "devnet"
    plan = prepare_devnet(
        root, validators=3, nodes=2, template=REPO_GENESIS, rpc_port=9100, p2p_port=9200
    )
    assert plan.created and [n.role for n in plan.nodes] == ["validator"] * 3 + ["full"] * 2
    validator_addrs = {n.p2p_addr for n in plan.validators}
    for n in plan.nodes:
        config = load_config(n.datadir)
        assert config.rpc_port == 9100 + n.index
        assert config.p2p_listen_addrs == (f"/ip4/127.0.0.1/tcp/{9200 + n.index}",)
        assert set(config.p2p_bootstrap_peers) == validator_addrs - {n.p2p_addr}
        assert genesis_hash(load_genesis(n.datadir / "genesis.json")) == genesis_hash(plan.genesis)
        if n.is_validator:
            assert config.validator_address == dev_address(n.index)
            assert Keystore(config.layout.keystore).has(dev_address(n.index))
        else:
            assert config.validator_address is None
    # Again, with other ports: same chain, same identities, new ports.
    again = prepare_devnet(root, validators=3, nodes=2, template=REPO_GENESIS, rpc_port=0,
                           p2p_port=0)  # fmt: skip
    assert not again.created
    assert [n.peer_id for n in again.nodes] == [n.peer_id for n in plan.nodes]
    assert load_config(again.nodes[0].datadir).rpc_port == 0
    with pytest.raises(ConfigError, match="pass --validators 3"):
        prepare_devnet(root, validators=4, nodes=1, template=REPO_GENESIS)


def test_prepare_devnet_refuses_other_directories(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_devnet(busy, validators=4, nodes=1, template=REPO_GENESIS)
    with pytest.raises(ConfigError, match="1 to 32 nodes"):
        prepare_devnet(tmp_path / "big", validators=30, nodes=3, template=REPO_GENESIS)


def test_cli_devnet_init_only_and_layout_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    single = tmp_path / "single"
    args = ["devnet", "--datadir", str(single), "--init-only"]
    assert main([*args, "--validators", "1", "--nodes", "0"]) == 0
    assert load_config(single).validator_address == dev_address(0)
    capsys.readouterr()
    assert main(args) == 1  # the default 4 + 1 on a one-validator devnet
    assert "--validators 1 --nodes 0" in capsys.readouterr().err

    multi = tmp_path / "multi"
    args = ["devnet", "--datadir", str(multi), "--init-only", "--p2p-port", "0", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [n["role"] for n in summary["nodes"]] == ["validator"] * 4 + ["full"]
    assert "100" in summary["devKeys"] and "1" in summary["devKeys"]
    assert main([*args[:-1], "--validators", "1", "--nodes", "0"]) == 1
    assert "multi-node devnet" in capsys.readouterr().err


def test_devnet_provide_compute_runs_the_agent_on_full_nodes_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.devnet import node_command

    plain = node_command(tmp_path / "node4")
    assert plain[-1] == "run" and "--provide-compute" not in plain
    assert node_command(tmp_path / "node4", provide_compute=True)[-2:] == [
        "run",
        "--provide-compute",
    ]
    single = ["devnet", "--datadir", str(tmp_path / "s"), "--init-only", "--provide-compute"]
    assert main([*single, "--validators", "1", "--nodes", "0"]) == 1
    assert "full nodes" in capsys.readouterr().err

"""The ``neuroseed`` CLI in-process: amounts, keys, init, usage and connection errors, and the
client commands against a real RPC server over a fake node (tests/rpc/fakes.py)."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from node import cli
from node.cli import CliError, format_nsd, main, parse_nsd
from node.config import DEFAULT_RPC_PORT
from node.consensus.params import FeeSchedule
from node.consensus.txs import (
    Bond,
    Transfer,
    TxKind,
    Unbond,
    ValidatorVote,
    VoteAction,
    verify_transaction,
)
from node.crypto import PrivateKey
from node.devkeys import DEV_PASSWORD, dev_address
from node.errors import MempoolFull
from node.genesis import to_checksum
from node.keystore import LIGHT_SCRYPT, Keystore
from node.types import NSD, UINT256_MAX, Address, Amount, Hash32
from rpc.server import RpcLimits, RpcServer
from tests.rpc.fakes import ALICE, BOB, CHAIN_ID, FakeNode

PW = "correct horse battery staple"
REPO_GENESIS = Path(__file__).resolve().parent.parent / "genesis.json"


@pytest.fixture(autouse=True)
def light_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "KEY_KDF_PARAMS", LIGHT_SCRYPT)
    monkeypatch.delenv(cli.ENV_DATADIR, raising=False)


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    path = tmp_path / "pw.txt"
    path.write_text(PW + "\n")
    return path


@pytest.fixture
def datadir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def out_json(capsys: pytest.CaptureFixture[str]) -> object:
    return json.loads(capsys.readouterr().out)


# --- amounts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("1", NSD),
        ("1.5", NSD + NSD // 2),
        ("0.000000000000000001", 1),
        ("1.000000000000000000", NSD),
        (" 2.25 ", 2 * NSD + NSD // 4),
        ("007", 7 * NSD),
        ("123456789.123456789123456789", 123456789 * NSD + 123456789123456789),
    ],
)
def test_parse_nsd_accepts(text: str, units: int) -> None:
    assert parse_nsd(text) == units


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "greater than zero"),
        ("0.000", "greater than zero"),
        ("-1", "must be positive"),
        ("-0.5", "must be positive"),
        ("1.0000000000000000001", "at most 18 decimals"),
        ("0.0000000000000000000", "at most 18 decimals"),
        ("", "not an amount"),
        ("abc", "not an amount"),
        ("1,5", "not an amount"),
        ("1e18", "not an amount"),
        ("+1", "not an amount"),
        ("1.", "not an amount"),
        (".5", "not an amount"),
        ("1.5.2", "not an amount"),
        ("nan", "not an amount"),
        ("inf", "not an amount"),
        ("\u0661", "not an amount"),  # ARABIC-INDIC DIGIT ONE: str.isdigit() but not ASCII
        ("9" * 100, "too large"),
        (str(UINT256_MAX), "too large"),
    ],
)
def test_parse_nsd_rejects(text: str, message: str) -> None:
    with pytest.raises(CliError, match=message):
        parse_nsd(text)


def test_parse_nsd_zero_fee_allowed_and_bounds() -> None:
    assert parse_nsd("0", allow_zero=True) == 0
    largest = f"{UINT256_MAX // NSD}.{UINT256_MAX % NSD:018d}"
    assert parse_nsd(largest) == UINT256_MAX
    with pytest.raises(CliError, match="too large"):
        parse_nsd(f"{UINT256_MAX // NSD}.{UINT256_MAX % NSD + 1:018d}")


def test_format_nsd() -> None:
    assert format_nsd(0) == "0.000000000000000000"
    assert format_nsd(1) == "0.000000000000000001"
    assert format_nsd(NSD + NSD // 2) == "1.500000000000000000"
    assert parse_nsd(format_nsd(123 * NSD + 45)) == 123 * NSD + 45


# --- usage errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["status", "--no-such-flag"],
        ["keys"],
        ["balance"],
        ["tx", "transfer", "--amount", "1"],
        ["tx", "transfer", "--to", "0x" + "11" * 20],
        [
            "tx",
            "transfer",
            "--to",
            "0x" + "11" * 20,
            "--amount",
            "1",
            "--dev-key",
            "1",
            "--from",
            "0x" + "22" * 20,
        ],
        ["tx", "transfer", "--to", "0x" + "11" * 20, "--amount", "1", "--dev-key", "one"],
        ["run", "--rpc-port", "eighty"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "tx" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("neuroseed ")


# --- node unreachable ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["balance", "0x" + "11" * 20],
        ["tx", "transfer", "--dev-key", "1", "--to", "0x" + "11" * 20, "--amount", "1"],
    ],
)
def test_unreachable_node_exits_3(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    assert main([*argv, "--rpc", url]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the node at " + url)
    assert "is the node running?" in err
    assert "Traceback" not in err


def test_verbose_adds_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "status", "--rpc", f"127.0.0.1:{free_port()}"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: cannot reach" in err


def test_rpc_url_comes_from_datadir_config(
    datadir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--datadir", str(datadir)]) == 0
    port = free_port()
    config = datadir / "config.toml"
    config.write_text(config.read_text().replace(f"port = {DEFAULT_RPC_PORT}", f"port = {port}"))
    capsys.readouterr()
    # Global options work before and after the subcommand.
    assert main(["--datadir", str(datadir), "status"]) == 3
    assert f"http://127.0.0.1:{port}/" in capsys.readouterr().err


def test_defaults_match_node_config() -> None:
    # node.cli repeats these so that client commands need not import node.config (eth-account).
    from node import config

    default_url = cli.DEFAULT_RPC_URL
    assert default_url == f"http://{config.DEFAULT_RPC_HOST}:{config.DEFAULT_RPC_PORT}/"
    assert cli.CONFIG_FILE == config.CONFIG_FILE
    assert cli.REPO_GENESIS == REPO_GENESIS


def test_bad_rpc_url_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--rpc", "ftp://example.org/"]) == 1
    assert "--rpc" in capsys.readouterr().err
    assert main(["status", "--rpc", "127.0.0.1:notaport"]) == 1
    assert "bad port" in capsys.readouterr().err


def test_bad_transfer_inputs_fail_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens: exit 1 proves no call was made
    base = ["tx", "transfer", "--dev-key", "1", "--rpc", url]
    to = ["--to", "0x" + "11" * 20]
    cases = [
        ([*to, "--amount", "1.0000000000000000001"], "--amount: at most 18 decimals"),
        ([*to, "--amount", "-1"], "--amount: must be positive"),
        ([*to, "--amount", "0"], "--amount: must be greater than zero"),
        ([*to, "--amount", "1", "--fee", "x"], "--fee: 'x' is not an amount"),
        ([*to, "--amount", "1", "--memo", "é" * 200], "--memo: at most 256 bytes"),
        ([*to, "--amount", "1", "--timeout", "0"], "--timeout"),
        (["--to", "0x1234", "--amount", "1"], "--to: expected an address"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 1, extra
        err = capsys.readouterr().err
        assert err.startswith("error: " + message), (extra, err)


# --- init ------------------------------------------------------------------------------------------


def test_init_creates_and_is_idempotent(datadir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--datadir", str(datadir), "--json"]) == 0
    first = out_json(capsys)
    assert first == {
        "datadir": str(datadir),
        "chainId": 7310,
        "genesisHash": first["genesisHash"],  # type: ignore[index]
        "created": True,
        "validator": None,
    }
    assert (datadir / "genesis.json").read_bytes() == REPO_GENESIS.read_bytes()
    config = (datadir / "config.toml").read_bytes()
    assert main(["--datadir", str(datadir), "init"]) == 0
    assert "already initialised" in capsys.readouterr().out
    assert (datadir / "config.toml").read_bytes() == config


def test_init_refuses_another_chain(
    datadir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--datadir", str(datadir)]) == 0
    other = tmp_path / "other.json"
    doc = json.loads(REPO_GENESIS.read_text())
    doc["chain_id"] = 999
    other.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["init", "--datadir", str(datadir), "--genesis", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already initialised for another chain" in err


def test_init_missing_genesis(
    datadir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--datadir", str(datadir), "--genesis", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_init_dev_imports_validator(datadir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--dev", "--datadir", str(datadir), "--json"]) == 0
    assert out_json(capsys)["validator"] == to_checksum(dev_address(0))  # type: ignore[index]
    keystore = Keystore(datadir / "keystore")
    assert keystore.list() == [dev_address(0)]
    assert keystore.load(dev_address(0), DEV_PASSWORD).address == dev_address(0)


def test_init_password_file_needs_dev(
    datadir: Path, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--datadir", str(datadir), "--password-file", str(pwfile)]) == 1
    assert "only used with --dev" in capsys.readouterr().err
    assert not datadir.exists()


def test_init_dev_after_plain_init_is_refused(
    datadir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--datadir", str(datadir)]) == 0
    assert main(["init", "--dev", "--datadir", str(datadir)]) == 1
    assert "without the dev validator" in capsys.readouterr().err


def test_run_needs_an_initialised_datadir(
    datadir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--datadir", str(datadir)]) == 1
    err = capsys.readouterr().err
    assert "not initialised" in err and "neuroseed" in err


def test_devnet_refuses_a_non_devnet_datadir(
    datadir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--datadir", str(datadir)]) == 0
    assert main(["devnet", "--datadir", str(datadir)]) == 1
    assert "not a devnet data directory" in capsys.readouterr().err


# --- keys ------------------------------------------------------------------------------------------


def test_keys_new_list_export(
    datadir: Path, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = ["--datadir", str(datadir)]
    assert main(["keys", "list", *d]) == 0
    assert "no keys" in capsys.readouterr().err
    assert main(["keys", "new", *d, "--password-file", str(pwfile), "--json"]) == 0
    created = out_json(capsys)
    assert isinstance(created, dict)
    address = created["address"]
    assert Path(created["file"]).parent == datadir / "keystore"
    assert main(["keys", "list", *d]) == 0
    assert capsys.readouterr().out.split() == [address]

    # export: refused without the explicit flag, and with a wrong password
    assert main(["keys", "export", *d, "--password-file", str(pwfile)]) == 1
    err = capsys.readouterr()
    assert "--yes-show-private-key" in err.err and err.out == ""
    wrong = pwfile.parent / "wrong.txt"
    wrong.write_text("nope\n")
    argv = ["keys", "export", address, *d, "--yes-show-private-key"]
    assert main([*argv, "--password-file", str(wrong)]) == 1
    err = capsys.readouterr()
    assert "wrong password" in err.err and err.out == ""
    assert main([*argv, "--password-file", str(pwfile)]) == 0
    secret = capsys.readouterr().out.strip()
    assert PrivateKey(bytes.fromhex(secret.removeprefix("0x"))).address.hex() == (
        address[2:].lower()
    )


def test_keys_new_prompts_and_confirms(
    datadir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["pw-one", "pw-two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert main(["keys", "new", "--datadir", str(datadir)]) == 1
    assert "passwords do not match" in capsys.readouterr().err
    answers = iter(["same", "same"])
    assert main(["keys", "new", "--datadir", str(datadir)]) == 0
    assert len(Keystore(datadir / "keystore").list()) == 1


def test_keys_new_refuses_empty_password_file(
    datadir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["keys", "new", "--datadir", str(datadir), "--password-file", str(empty)]) == 1
    assert "empty password" in capsys.readouterr().err


def test_keys_import_from_file_and_prompt(
    datadir: Path,
    pwfile: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = ["--datadir", str(datadir), "--password-file", str(pwfile)]
    keyfile = tmp_path / "alice.hex"
    keyfile.write_text("0x" + ALICE.secret.hex() + "\n")
    assert main(["keys", "import", *d, "--key-file", str(keyfile), "--json"]) == 0
    assert out_json(capsys)["address"] == to_checksum(ALICE.address)  # type: ignore[index]
    # the same key again
    assert main(["keys", "import", *d, "--key-file", str(keyfile)]) == 1
    assert "already in the keystore" in capsys.readouterr().err
    # from the prompt (no 0x)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": BOB.secret.hex())
    assert main(["keys", "import", *d]) == 0
    assert Keystore(datadir / "keystore").list() == sorted([ALICE.address, BOB.address])


def test_keys_import_refuses_key_on_command_line(
    datadir: Path, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = ALICE.secret.hex()
    argv = ["keys", "import", secret, "--datadir", str(datadir), "--password-file", str(pwfile)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "shell history" in err and secret not in err
    assert not (datadir / "keystore").exists()


@pytest.mark.parametrize("content", ["", "0x1234", "zz" * 32, "11" * 33, "00" * 32])
def test_keys_import_bad_key_file_never_echoes_it(
    datadir: Path,
    pwfile: Path,
    tmp_path: Path,
    content: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keyfile = tmp_path / "bad.hex"
    keyfile.write_text(content)
    argv = [
        "keys",
        "import",
        "--datadir",
        str(datadir),
        "--password-file",
        str(pwfile),
        "--key-file",
        str(keyfile),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    if len(content) > 8:
        assert content not in err


# --- client commands against a real RPC server over a fake node -------------------------------------


class MiningNode(FakeNode):
    """Includes each admitted transaction at once, so a receipt exists right away."""

    async def submit_transaction(self, raw: bytes) -> Hash32:
        tx_id = await super().submit_transaction(raw)
        self.mine(raw)
        return tx_id


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[tuple[str, MiningNode]]:
    node = MiningNode()
    server = RpcServer(node, "127.0.0.1", 0, RpcLimits(max_body_bytes=64 * 1024))
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await server.serve(task_status=task_status)

    url = await nursery.start(run)
    yield url, node
    scope.cancel()


async def run_cli(argv: list[str]) -> int:
    # main() blocks; the trio loop must stay free to serve the calls it makes.
    return await trio.to_thread.run_sync(main, argv)


async def test_status_and_balance(
    served: tuple[str, MiningNode], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = served
    assert await run_cli(["status", "--rpc", url]) == 0
    out = capsys.readouterr().out
    assert "height     5" in out and "active" in out
    assert await run_cli(["status", "--rpc", url, "--json"]) == 0
    st = out_json(capsys)
    assert isinstance(st, dict) and st["chainId"] == CHAIN_ID and st["height"] == 5
    assert await run_cli(["balance", to_checksum(BOB.address), "--rpc", url]) == 0
    assert "2.500000000000000000 NSD" in capsys.readouterr().out
    assert await run_cli(["--json", "--rpc", url, "balance", "0x" + BOB.address.hex()]) == 0
    assert out_json(capsys) == {
        "address": to_checksum(BOB.address),
        "balance": str(5 * NSD // 2),
        "balanceNSD": "2.500000000000000000",
        "nonce": 0,
    }
    bad_checksum = to_checksum(BOB.address).swapcase().replace("0X", "0x")
    assert await run_cli(["balance", bad_checksum, "--rpc", url]) == 1
    assert "checksum" in capsys.readouterr().err


@pytest.fixture
def alice_keystore(datadir: Path, pwfile: Path) -> Iterator[Path]:
    Keystore(datadir / "keystore").import_key(ALICE.secret, PW, kdf_params=LIGHT_SCRYPT)
    yield datadir


async def test_transfer_from_keystore_waits_for_receipt(
    served: tuple[str, MiningNode],
    alice_keystore: Path,
    pwfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, node = served
    to = "0x" + "ab" * 20
    argv = [
        "tx",
        "transfer",
        "--to",
        to,
        "--amount",
        "0.25",
        "--memo",
        "thanks",
        "--datadir",
        str(alice_keystore),
        "--password-file",
        str(pwfile),
        "--rpc",
        url,
    ]
    assert await run_cli([*argv, "--json"]) == 0
    result = out_json(capsys)
    assert isinstance(result, dict)
    assert result["from"] == to_checksum(ALICE.address)
    assert result["amount"] == str(NSD // 4) and result["nonce"] == 5
    receipt = result["receipt"]
    assert receipt["success"] is True and receipt["txId"] == result["txId"]
    (raw,) = node.submitted
    vtx = verify_transaction(raw)
    assert vtx.sender == ALICE.address
    assert isinstance(vtx.body, Transfer)
    assert (vtx.body.to, vtx.body.amount, vtx.body.memo) == (
        bytes.fromhex("ab" * 20),
        NSD // 4,
        b"thanks",
    )
    # fee = estimated cost + a tenth of it; the fake's schedule: 1000 + 10/byte + 100/sig + 5000
    cost = 1000 + 10 * len(raw) + 100 + 5000
    assert vtx.tx.fee == cost + cost // 10 == int(result["fee"])

    # text output, explicit fee, next nonce
    assert await run_cli([*argv, "--fee", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "status  success" in out and "fee     0.001000000000000000 NSD" in out
    assert verify_transaction(node.submitted[-1]).tx.nonce == 6


async def test_transfer_with_dev_key_no_wait_and_insufficient_funds(
    served: tuple[str, MiningNode], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = served
    argv = ["tx", "transfer", "--dev-key", "1", "--to", "0x" + "ab" * 20, "--rpc", url]
    # dev key 1 has nothing on the fake chain
    assert await run_cli([*argv, "--amount", "1"]) == 1
    err = capsys.readouterr().err
    assert "public dev key 1" in err and "error: insufficient funds" in err


async def test_transfer_key_choice(
    served: tuple[str, MiningNode],
    datadir: Path,
    pwfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, node = served
    argv = [
        "tx",
        "transfer",
        "--to",
        "0x" + "ab" * 20,
        "--amount",
        "1",
        "--no-wait",
        "--datadir",
        str(datadir),
        "--password-file",
        str(pwfile),
        "--rpc",
        url,
    ]
    assert await run_cli(argv) == 1
    assert "no keys in" in capsys.readouterr().err
    keystore = Keystore(datadir / "keystore")
    keystore.import_key(ALICE.secret, PW, kdf_params=LIGHT_SCRYPT)
    keystore.import_key(BOB.secret, PW, kdf_params=LIGHT_SCRYPT)
    assert await run_cli(argv) == 1  # stdin is not a terminal: no prompt, a clear refusal
    assert "choose one with --from" in capsys.readouterr().err
    assert await run_cli([*argv, "--from", to_checksum(ALICE.address)]) == 0
    assert "sent (not waiting for finality)" in capsys.readouterr().out
    assert len(node.submitted) == 1


async def test_transfer_rejected_by_node(
    served: tuple[str, MiningNode],
    alice_keystore: Path,
    pwfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, node = served
    node.submit_error = MempoolFull("mempool is full (10000 transactions)")
    argv = [
        "tx",
        "transfer",
        "--to",
        "0x" + "ab" * 20,
        "--amount",
        "1",
        "--datadir",
        str(alice_keystore),
        "--password-file",
        str(pwfile),
        "--rpc",
        url,
    ]
    assert await run_cli(argv) == 1
    err = capsys.readouterr().err
    assert err == "error: the node refused: mempool is full (10000 transactions)\n"


# --- validator-set transactions (bond, unbond, validator-vote) ---------------------------------


def _authority_fees(node: MiningNode) -> None:
    """Fee schedules for the validator-set kinds on the fake chain (it prices transfers only)."""
    schedules = [
        FeeSchedule(
            kind=k,
            base=Amount(2000),
            per_byte=Amount(10),
            per_signature=Amount(100),
            per_new_account=Amount(5000),
        )
        for k in (TxKind.BOND, TxKind.UNBOND, TxKind.VALIDATOR_VOTE)
    ]
    node.view.params = dataclasses.replace(
        node.view.params, fees=(*node.view.params.fees, *schedules)
    )


async def test_bond_unbond_and_validator_votes(
    served: tuple[str, MiningNode],
    alice_keystore: Path,
    pwfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, node = served
    _authority_fees(node)
    sender = ["--datadir", str(alice_keystore), "--password-file", str(pwfile), "--rpc", url]

    assert await run_cli(["tx", "bond", "--amount", "1.5", *sender, "--json"]) == 0
    result = out_json(capsys)
    assert isinstance(result, dict)
    assert result["from"] == to_checksum(ALICE.address) and result["nonce"] == 5
    assert result["amount"] == str(NSD + NSD // 2) and result["receipt"]["success"] is True
    vtx = verify_transaction(node.submitted[-1])
    assert vtx.sender == ALICE.address and vtx.tx.kind == TxKind.BOND
    assert vtx.body == Bond(Amount(NSD + NSD // 2))
    # one new record (the validator entry): 2000 + 10/byte + 100/sig + 5000
    cost = 2000 + 10 * vtx.size + 100 + 5000
    assert vtx.tx.fee == cost + cost // 10 == int(result["fee"])

    assert await run_cli(["tx", "unbond", *sender, "--no-wait"]) == 0
    out = capsys.readouterr().out
    assert "sent (not waiting for finality)" in out and "nonce   6" in out
    vtx = verify_transaction(node.submitted[-1])
    assert vtx.tx.kind == TxKind.UNBOND and vtx.body == Unbond()

    subject = "0x" + "cd" * 20
    for flag, action in (("--add", VoteAction.ADD), ("--remove", VoteAction.REMOVE)):
        argv = ["tx", "validator-vote", "--subject", subject, flag, *sender, "--fee", "0.01"]
        assert await run_cli([*argv, "--json"]) == 0
        result = out_json(capsys)
        assert isinstance(result, dict)
        assert result["subject"] == to_checksum(bytes.fromhex("cd" * 20))
        assert result["action"] == action.name.lower() and result["fee"] == str(NSD // 100)
        vtx = verify_transaction(node.submitted[-1])
        assert vtx.tx.kind == TxKind.VALIDATOR_VOTE and vtx.tx.fee == NSD // 100
        assert vtx.body == ValidatorVote(Address(bytes.fromhex("cd" * 20)), int(action))
    assert len(node.submitted) == 4


async def test_authority_tx_with_dev_key_insufficient_funds(
    served: tuple[str, MiningNode], capsys: pytest.CaptureFixture[str]
) -> None:
    url, node = served
    _authority_fees(node)
    # dev key 1 has nothing on the fake chain
    assert await run_cli(["tx", "unbond", "--dev-key", "1", "--rpc", url]) == 1
    err = capsys.readouterr().err
    assert "public dev key 1" in err and "error: insufficient funds" in err
    assert "NSD (fee 0." in err and "amount" not in err.split("needs")[1]
    assert await run_cli(["tx", "bond", "--amount", "2", "--dev-key", "1", "--rpc", url]) == 1
    assert "(amount 2.000000000000000000 + fee" in capsys.readouterr().err
    assert node.submitted == []


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["tx", "validator-vote", "--subject", "0x" + "cd" * 20], 2, "--add --remove"),
        (["tx", "validator-vote", "--subject", "0x" + "cd" * 20, "--add", "--remove"], 2, "not"),
        (["tx", "validator-vote", "--add"], 2, "--subject"),
        (["tx", "validator-vote", "--subject", "0x12", "--add"], 1, "--subject"),
        (["tx", "bond"], 2, "--amount"),
        (["tx", "bond", "--amount", "0"], 1, "--amount"),
        (["tx", "bond", "--amount", "1", "--timeout", "0"], 1, "--timeout"),
        (["tx", "unbond", "--fee", "x"], 1, "--fee"),
        (["tx", "unbond", "--dev-key", "1", "--from", "0x" + "cd" * 20], 2, "not allowed"),
    ],
)
def test_authority_tx_bad_inputs_fail_before_connecting(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # port 9 (discard) on loopback: nothing listens, so any attempt to connect would exit 3
    assert main([*argv, "--rpc", "http://127.0.0.1:9"]) == code
    assert message in capsys.readouterr().err

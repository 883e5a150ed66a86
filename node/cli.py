"""The ``neuroseed`` command line (DESIGN §11): init, keys, run, devnet, status, balance, tx.

Every command that talks to a node goes through the SDK (``rpc.client.Client``). Output is text
for people, or one line of JSON per result with ``--json``. Exit codes::

    0  success
    1  user or input error (bad amount, wrong password, transaction rejected, ...)
    2  usage error (unknown flag, missing argument: argparse)
    3  the node could not be reached
    130 interrupted (Ctrl-C) outside ``run``/``devnet``, which stop cleanly with 0

An error prints one line ``error: <message>`` to stderr; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from node import crypto
from node.consensus.txs import (
    MAX_MEMO_BYTES,
    Bond,
    Transfer,
    Unbond,
    ValidatorVote,
    VoteAction,
    make_transaction,
)
from node.devkeys import DEV_PASSWORD, DEV_VALIDATOR_INDEX, dev_address, dev_key
from node.encoding import Record
from node.errors import NeuroSeedError, NodeUnavailable
from node.genesis import format_timestamp, genesis_hash, load_genesis, parse_address, to_checksum
from node.types import NSD, UINT256_MAX, Address, Amount, ChainId, Hash32, TimestampMs
from rpc.errors import ClientError, RpcError, TransportError

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.devnet import DevnetNode, DevnetPlan, NodeUp
    from node.keystore import Keystore, ScryptParams
    from node.service import NodeHandle
    from rpc.client import Client

# node.config and node.keystore import eth-account, and rpc.client aiohttp: each takes a good
# part of a second, so they are imported where needed and each command loads only its own.

log = logging.getLogger("neuroseed")

ENV_DATADIR = "NEUROSEED_DATADIR"
DEFAULT_DATADIR = "~/.neuroseed"
DEVNET_DATADIR = ".devnet"
# node.devnet's DEFAULT_VALIDATORS and DEFAULT_NODES (that module is imported only by devnet).
DEVNET_VALIDATORS = 4
DEVNET_NODES = 1
# node.config's DEFAULT_RPC_HOST, DEFAULT_RPC_PORT and CONFIG_FILE (checked by the tests).
DEFAULT_RPC_URL = "http://127.0.0.1:8645/"
CONFIG_FILE = "config.toml"
NSD_DECIMALS = 18
DEFAULT_TX_TIMEOUT = 30.0
# The tip added to the consensus cost when the fee is estimated: a tenth of the cost, so the
# proposer earns something and the transaction is not the cheapest in a busy mempool.
TIP_DIVISOR = 10
# The repository's genesis.json (the devnet's): the directory above this package.
REPO_GENESIS = Path(__file__).resolve().parent.parent / "genesis.json"
# Work factor of key files written by ``keys new``/``keys import`` (None: the keystore's standard).
# Tests lower it; nothing else should.
KEY_KDF_PARAMS: ScryptParams | None = None

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user or input error the CLI reports as ``error: <message>``."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# --- amounts ---------------------------------------------------------------------------------------

_DECIMAL_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)
# 2**256 has 78 digits: a longer integer part is too large whatever its value (and int() of a
# huge digit string is slow or refused).
_MAX_WHOLE_DIGITS = 78


def parse_nsd(text: str, *, what: str = "amount", allow_zero: bool = False) -> Amount:
    """A decimal NSD string (``"1.5"``, up to 18 decimals) as base units; never via floats."""
    s = text.strip()
    shown = s if len(s) <= 40 else s[:37] + "..."
    if s.startswith("-"):
        raise CliError(f"{what}: must be positive, not {shown}")
    m = _DECIMAL_RE.fullmatch(s)
    if m is None:
        raise CliError(
            f"{what}: {shown!r} is not an amount of NSD; write a plain decimal number with a dot, "
            "e.g. 1.5 or 0.000001"
        )
    whole, frac = m.group(1), m.group(2) or ""
    if len(frac) > NSD_DECIMALS:
        raise CliError(
            f"{what}: at most {NSD_DECIMALS} decimals (1 NSD = 10^18 base units), got {len(frac)}"
        )
    if len(whole.lstrip("0")) > _MAX_WHOLE_DIGITS:
        raise CliError(f"{what}: too large")
    units = int(whole) * NSD + int(frac.ljust(NSD_DECIMALS, "0"))
    if units > UINT256_MAX:
        raise CliError(f"{what}: too large")
    if units == 0 and not allow_zero:
        raise CliError(f"{what}: must be greater than zero")
    return Amount(units)


def format_nsd(units: int) -> str:
    """Base units as NSD with exactly 18 decimals (``"1.500000000000000000"``)."""
    return f"{units // NSD}.{units % NSD:018d}"


# --- data directory and node URL --------------------------------------------------------------


def _datadir(args: argparse.Namespace, *, devnet: bool = False) -> Path:
    if args.datadir:
        return Path(args.datadir).expanduser().absolute()
    if devnet:
        # The devnet's own directory: never a real node's data directory from the environment.
        return Path(DEVNET_DATADIR).absolute()
    return Path(os.environ.get(ENV_DATADIR) or DEFAULT_DATADIR).expanduser().absolute()


def _normalise_url(url: str) -> str:
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise CliError(f"--rpc: bad port in {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--rpc: expected a URL like {DEFAULT_RPC_URL}, not {url!r}")
    if not parts.path:
        text += "/"
    return text


def _client_url_of(config: NodeConfig) -> str:
    host = config.rpc_host
    # A node listening on every interface is reached on loopback.
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.rpc_port}/"


def _rpc_url(args: argparse.Namespace) -> str:
    """``--rpc``, else the RPC address in the data directory's config, else the default."""
    if args.rpc:
        return _normalise_url(args.rpc)
    datadir = _datadir(args)
    if (datadir / CONFIG_FILE).is_file():
        from node.config import load_config

        return _client_url_of(load_config(datadir))
    return DEFAULT_RPC_URL


def _client(args: argparse.Namespace) -> Client:
    from rpc.client import Client

    return Client(_rpc_url(args))


# --- output ----------------------------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, separators=(",", ":")), flush=True)


def _rows(rows: Sequence[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


# --- passwords and keys ----------------------------------------------------------------------------


def _prompt(text: str) -> str:
    # Looked up at call time so tests can replace getpass.getpass.
    return getpass.getpass(text)


def _password(password_file: str | None, *, confirm: bool) -> str:
    from node.keystore import read_password

    path = Path(password_file).expanduser() if password_file is not None else None
    password = read_password(path, confirm=confirm, prompt=_prompt)
    if confirm and password == "":
        raise CliError("an empty password is not allowed for a new key")
    return password


def _parse_secret_hex(text: str, source: str) -> bytes:
    """A 32-byte private key from hex; the message never repeats the input (it is a secret)."""
    s = text.strip()
    if s[:2] in ("0x", "0X"):
        s = s[2:]
    if len(s) != 64 or not re.fullmatch(r"[0-9a-fA-F]{64}", s, re.ASCII):
        raise CliError(
            f"{source}: expected a private key as 64 hex digits (optionally 0x-prefixed)"
        )
    return bytes.fromhex(s)


def _address_arg(value: str, what: str) -> Address:
    return parse_address(value.strip(), what)


def _choose_key(keystore: Keystore) -> Address:
    """The only key in the keystore; with several, ask on a terminal, else refuse."""
    addresses = keystore.list()
    if not addresses:
        raise CliError(
            f"no keys in {keystore.directory}; create one with `neuroseed keys new` "
            "(or on a devnet sign with a public dev key: --dev-key N)"
        )
    if len(addresses) == 1:
        return addresses[0]
    names = [to_checksum(a) for a in addresses]
    if not sys.stdin.isatty():
        raise CliError("several keys in the keystore; choose one with --from: " + ", ".join(names))
    for i, name in enumerate(names, 1):
        print(f"  {i}. {name}", file=sys.stderr)
    answer = input(f"Send from which key [1-{len(names)}]? ").strip()
    if not answer.isdigit() or not 1 <= int(answer) <= len(names):
        raise CliError("no key chosen")
    return addresses[int(answer) - 1]


# --- init ------------------------------------------------------------------------------------------


def _default_genesis(datadir: Path) -> Path:
    """The data directory's own genesis.json, else the repository's."""
    from node.config import DataDirLayout

    for candidate in (DataDirLayout(datadir).genesis, REPO_GENESIS):
        if candidate.is_file():
            return candidate
    raise CliError(
        f"no genesis.json found (looked in {datadir} and {REPO_GENESIS.parent}); "
        "pass --genesis PATH"
    )


def _dev_kdf_params() -> ScryptParams:
    """The devnet validator key and its password are public (node.devkeys): a strong KDF
    protects nothing there and would only slow down every devnet start."""
    from node.keystore import LIGHT_SCRYPT

    return LIGHT_SCRYPT


def cmd_init(args: argparse.Namespace) -> int:
    from node.config import DataDirLayout, init_data_dir

    datadir = _datadir(args)
    if args.password_file is not None and not args.dev:
        raise CliError("--password-file is only used with --dev (to encrypt the dev validator key)")
    genesis_path = Path(args.genesis).expanduser() if args.genesis else _default_genesis(datadir)
    layout = DataDirLayout(datadir)
    existed = layout.genesis.is_file()
    password = _password(args.password_file, confirm=False) if args.password_file else None
    config = init_data_dir(
        datadir, genesis_path, dev=args.dev, password=password, kdf_params=_dev_kdf_params()
    )
    dev_validator = dev_address(DEV_VALIDATOR_INDEX)
    if existed and args.dev and config.validator_address != dev_validator:
        raise CliError(
            f"{datadir} is already initialised without the dev validator; "
            "use an empty data directory for a devnet"
        )
    genesis = load_genesis(layout.genesis)
    ghash = _hex(genesis_hash(genesis))
    validator = None if config.validator_address is None else to_checksum(config.validator_address)
    if args.json:
        _print_json(
            {
                "datadir": str(datadir),
                "chainId": genesis.chain_id,
                "genesisHash": ghash,
                "created": not existed,
                "validator": validator,
            }
        )
        return EXIT_OK
    if existed:
        print(
            f"{datadir} is already initialised for chain {genesis.chain_id} (genesis "
            f"{ghash[:18]}…); nothing changed"
        )
    else:
        print(f"initialised {datadir} for chain {genesis.chain_id} (genesis {ghash[:18]}…)")
    if validator is not None:
        print(f"validator key: {validator}")
    if args.dev and not existed:
        print("  the public devnet validator key (node.devkeys), for local devnets only")
    print(f"start the node with: neuroseed --datadir {datadir} run")
    return EXIT_OK


# --- keys ------------------------------------------------------------------------------------------


def _keystore(args: argparse.Namespace) -> Keystore:
    from node.config import DataDirLayout
    from node.keystore import Keystore

    return Keystore(DataDirLayout(_datadir(args)).keystore)


def _print_new_key(args: argparse.Namespace, keystore: Keystore, address: Address) -> None:
    path = keystore.path_of(address)
    if args.json:
        _print_json({"address": to_checksum(address), "file": str(path)})
    else:
        print(_rows([("address", to_checksum(address)), ("key file", path)]))


def cmd_keys_new(args: argparse.Namespace) -> int:
    keystore = _keystore(args)
    password = _password(args.password_file, confirm=True)
    address = keystore.new(password, kdf_params=KEY_KDF_PARAMS)
    _print_new_key(args, keystore, address)
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    keystore = _keystore(args)
    addresses = keystore.list()
    if args.json:
        _print_json(
            [{"address": to_checksum(a), "file": str(keystore.path_of(a))} for a in addresses]
        )
    elif not addresses:
        print(f"no keys in {keystore.directory}", file=sys.stderr)
    else:
        for a in addresses:
            print(to_checksum(a))
    return EXIT_OK


def cmd_keys_import(args: argparse.Namespace) -> int:
    if args.private_key is not None:
        # argparse already holds it, but at least it goes no further, and the user learns why.
        raise CliError(
            "refusing a private key on the command line (it would stay in your shell history "
            "and be visible to other users in the process list); use --key-file FILE or "
            "enter it at the prompt"
        )
    if args.key_file is not None:
        path = Path(args.key_file).expanduser()
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                text = fh.read(4096)
        except OSError as exc:
            raise CliError(f"cannot read key file {path}: {exc.strerror}") from None
        secret = _parse_secret_hex(text, f"key file {path}")
    else:
        secret = _parse_secret_hex(_prompt("Private key (hex): "), "private key")
    keystore = _keystore(args)
    password = _password(args.password_file, confirm=True)
    address = keystore.import_key(secret, password, kdf_params=KEY_KDF_PARAMS)
    _print_new_key(args, keystore, address)
    return EXIT_OK


def cmd_keys_export(args: argparse.Namespace) -> int:
    if not args.yes_show_private_key:
        raise CliError(
            "this prints the private key in clear: anyone who sees it controls the account; "
            "repeat with --yes-show-private-key if that is what you want"
        )
    keystore = _keystore(args)
    if args.address is not None:
        address = _address_arg(args.address, "address")
    else:
        addresses = keystore.list()
        if len(addresses) != 1:
            raise CliError(
                "several keys in the keystore; name the one to export: "
                + ", ".join(to_checksum(a) for a in addresses)
                if addresses
                else f"no keys in {keystore.directory}"
            )
        address = addresses[0]
    password = _password(args.password_file, confirm=False)
    secret = keystore.export_key(address, password)
    if args.json:
        _print_json({"address": to_checksum(address), "privateKey": _hex(secret)})
    else:
        print(_hex(secret))
    return EXIT_OK


# --- run and devnet --------------------------------------------------------------------------------


def _setup_logging(level: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )


def _run_until_stopped(
    config: NodeConfig,
    key: crypto.PrivateKey | None,
    on_serving: Callable[[NodeHandle], None],
    *,
    operator: crypto.PrivateKey | None = None,
) -> int:
    """Run the node in trio until SIGTERM/SIGINT; ``on_serving(handle)`` once JSON-RPC is up."""
    import trio

    from node.service import run_node

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(partial(run_node, config, key=key, operator=operator))
            on_serving(handle)

    # A Ctrl-C before the node's own signal handling started is still a clean stop.
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve)
    log.info("node stopped")
    return EXIT_OK


def _unlock_validator(
    config: NodeConfig, password_file: str | None, default_password: str | None = None
) -> crypto.PrivateKey | None:
    from node.keystore import Keystore, read_password

    address = config.validator_address
    if address is None:
        return None
    keystore = Keystore(config.layout.keystore)
    if not keystore.has(address):
        raise CliError(
            f"the validator key {to_checksum(address)} is not in {keystore.directory}; "
            "import it with `neuroseed keys import`"
        )
    if password_file is not None:
        password = _password(password_file, confirm=False)
    elif config.password_file_path is not None:
        password = read_password(config.password_file_path, confirm=False)
    elif default_password is not None:
        password = default_password
    else:
        print(f"unlocking validator key {to_checksum(address)}", file=sys.stderr)
        password = _password(None, confirm=False)
    return keystore.load(address, password)


def _unlock_operator(
    config: NodeConfig, validator: crypto.PrivateKey | None
) -> crypto.PrivateKey | None:
    """The operator account's key (``[operator]`` in config.toml), or None when none is set.
    Its password comes from ``operator.password_file``, else the environment variable named by
    ``operator.password_env``, else a prompt on a terminal."""
    from node.keystore import Keystore, read_password

    address = config.operator_address
    if address is None:
        return None
    if validator is not None and validator.address == address:
        return validator
    keystore = Keystore(config.layout.keystore)
    if not keystore.has(address):
        raise CliError(
            f"the operator key {to_checksum(address)} is not in {keystore.directory}; "
            "import it with `neuroseed keys import`"
        )
    if config.operator_password_path is not None:
        password = read_password(config.operator_password_path, confirm=False)
    elif config.operator_password_env is not None:
        value = os.environ.get(config.operator_password_env)
        if value is None:
            raise CliError(
                f"operator.password_env names ${config.operator_password_env}, which is not set"
            )
        password = value
    elif sys.stdin.isatty():
        print(f"unlocking operator key {to_checksum(address)}", file=sys.stderr)
        password = _password(None, confirm=False)
    else:
        raise CliError(
            "the operator key needs a password: set operator.password_file or "
            "operator.password_env in config.toml"
        )
    return keystore.load(address, password)


def _require_initialised(datadir: Path) -> None:
    from node.config import DataDirLayout

    if not DataDirLayout(datadir).genesis.is_file():
        raise CliError(
            f"{datadir} is not initialised (no genesis.json); run `neuroseed --datadir {datadir} "
            "init` first (or `neuroseed devnet` for a local devnet)"
        )


def _node_config(args: argparse.Namespace, datadir: Path) -> NodeConfig:
    from node.config import load_config

    overrides: dict[str, object] = {"rpc_host": args.rpc_host, "rpc_port": args.rpc_port}
    return load_config(datadir, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    datadir = _datadir(args)
    _require_initialised(datadir)
    config = _node_config(args, datadir)
    if args.validator is not None:
        address = _address_arg(args.validator, "--validator")
        if address != config.validator_address:
            # The config's password file belongs to the config's validator, not to this one.
            config = dataclasses.replace(
                config, validator_address=address, validator_password_file=None
            )
    if getattr(args, "provide_compute", False):
        config = dataclasses.replace(config, compute_enabled=True)
    key = _unlock_validator(config, args.password_file)
    operator = _unlock_operator(config, key)
    _setup_logging(config.log_level, args.verbose)

    def on_serving(handle: NodeHandle) -> None:
        if args.json:
            _print_json(
                {
                    "rpc": handle.rpc_url,
                    "p2p": list(handle.p2p_addrs),
                    "validator": _checksum_or_none(config.validator_address),
                    "operator": _checksum_or_none(config.operator_address),
                }
            )
            return
        # The JSON-RPC line comes first and is what scripts (and `neuroseed devnet`) wait for.
        lines = [f"JSON-RPC: {handle.rpc_url}", *(f"P2P: {a}" for a in handle.p2p_addrs)]
        print("\n".join(lines), flush=True)

    return _run_until_stopped(config, key, on_serving, operator=operator)


def _checksum_or_none(address: Address | None) -> str | None:
    return None if address is None else to_checksum(address)


def _funded_dev_keys(datadir: Path) -> list[int]:
    """Indices of the dev keys with a genesis balance (1..10 in the repository's genesis)."""
    from node.config import DataDirLayout
    from node.devnet import funded_dev_keys

    return funded_dev_keys(load_genesis(DataDirLayout(datadir).genesis))


def cmd_devnet(args: argparse.Namespace) -> int:
    if args.validators < 1 or args.nodes < 0:
        raise CliError("--validators must be at least 1 and --nodes at least 0")
    if args.validators == 1 and args.nodes == 0:
        if getattr(args, "provide_compute", False):
            raise CliError(
                "--provide-compute runs the compute agent on the full nodes: use --nodes 1 or more"
            )
        return _devnet_single(args)
    return _devnet_multi(args)


def _devnet_template(args: argparse.Namespace) -> Path:
    if args.genesis:
        return Path(args.genesis).expanduser().absolute()
    if not REPO_GENESIS.is_file():
        raise CliError(f"the devnet genesis {REPO_GENESIS} is missing; is this a checkout?")
    return REPO_GENESIS


def _devnet_single(args: argparse.Namespace) -> int:
    """One validator (dev key 0) in this very process, data directly in the devnet directory."""
    from node.config import DataDirLayout, init_data_dir

    datadir = _datadir(args, devnet=True)
    if (datadir / "node0").is_dir() and not DataDirLayout(datadir).config.exists():
        raise CliError(
            f"{datadir} holds a multi-node devnet; run it without --validators 1 --nodes 0, "
            "or use another --datadir"
        )
    if not DataDirLayout(datadir).genesis.is_file():
        init_data_dir(datadir, _devnet_template(args), dev=True, kdf_params=_dev_kdf_params())
        print(f"initialised devnet data directory {datadir}", file=sys.stderr)
    config = _node_config(args, datadir)
    if args.p2p_port is not None:
        config = dataclasses.replace(
            config, p2p_listen_addrs=(f"/ip4/127.0.0.1/tcp/{args.p2p_port}",)
        )
    validator = dev_address(DEV_VALIDATOR_INDEX)
    if config.validator_address != validator:
        raise CliError(
            f"{datadir} is not a devnet data directory (its validator is not the dev validator "
            f"{to_checksum(validator)}); use another --datadir"
        )
    if args.init_only:
        return EXIT_OK
    key = _unlock_validator(config, None, default_password=DEV_PASSWORD)
    if key is None or key.address != dev_key(DEV_VALIDATOR_INDEX).address:
        raise CliError("the devnet validator key could not be unlocked")
    funded = _funded_dev_keys(datadir)
    chain_id = load_genesis(config.layout.genesis).chain_id
    _setup_logging(config.log_level, args.verbose)

    def on_serving(handle: NodeHandle) -> None:
        url = handle.rpc_url
        if args.json:
            _print_json(
                {
                    "rpc": url,
                    "p2p": list(handle.p2p_addrs),
                    "datadir": str(datadir),
                    "chainId": chain_id,
                    "validator": to_checksum(validator),
                    "devKeys": {str(i): to_checksum(dev_address(i)) for i in funded},
                }
            )
            return
        from node.devnet import format_ranges

        example = "0x000000000000000000000000000000000000dEaD"
        print(
            f"JSON-RPC: {url}\n"
            f"devnet: chain {chain_id}, data in {datadir}, validator {to_checksum(validator)}\n"
            f"funded public dev keys: {format_ranges(funded)} "
            "(devnet only: anyone can spend them)\n"
            "try:\n"
            f"  neuroseed status --rpc {url}\n"
            f"  neuroseed tx transfer --dev-key 1 --to {example} --amount 1.5 --rpc {url}\n"
            f"  neuroseed balance {example} --rpc {url}\n"
            "stop with Ctrl-C; run the same command again to continue this chain",
            flush=True,
        )

    return _run_until_stopped(config, key, on_serving)


def _devnet_multi(args: argparse.Namespace) -> int:
    """N validators and M full nodes, each its own ``neuroseed run`` process (node.devnet)."""
    from node.devnet import (
        DEFAULT_P2P_PORT,
        DEFAULT_RPC_PORT,
        DevnetSupervisor,
        check_ports_free,
        prepare_devnet,
    )

    datadir = _datadir(args, devnet=True)
    rpc_host = args.rpc_host or "127.0.0.1"
    plan = prepare_devnet(
        datadir,
        validators=args.validators,
        nodes=args.nodes,
        template=_devnet_template(args),
        rpc_host=rpc_host,
        rpc_port=DEFAULT_RPC_PORT if args.rpc_port is None else args.rpc_port,
        p2p_port=DEFAULT_P2P_PORT if args.p2p_port is None else args.p2p_port,
    )
    if plan.created:
        print(
            f"initialised a devnet of {args.validators} validator(s) in {datadir}", file=sys.stderr
        )
    if args.init_only:
        if args.json:
            _print_json(_devnet_summary(plan, []))
        else:
            for n in plan.nodes:
                print(f"node {n.index} ({n.role}): {n.datadir} p2p {n.p2p_addr}")
        return EXIT_OK
    check_ports_free(plan, rpc_host)
    print(
        f"starting {len(plan.validators)} validator(s) and "
        f"{len(plan.nodes) - len(plan.validators)} full node(s) in {datadir} "
        f"(logs: {datadir}/node<i>/node.log)",
        file=sys.stderr,
        flush=True,
    )

    def on_up(up: NodeUp) -> None:
        if args.json:
            _print_json(
                {
                    "node": up.node.index,
                    "role": up.node.role,
                    "rpc": up.rpc_url,
                    "p2p": list(up.p2p_addrs),
                    "datadir": str(up.node.datadir),
                    "pid": up.pid,
                }
            )
        else:
            print(f"node {up.node.index} ({up.node.role}): JSON-RPC: {up.rpc_url}", flush=True)

    def on_all_up(ups: list[NodeUp]) -> None:
        if args.json:
            _print_json(_devnet_summary(plan, ups))
        else:
            print(_devnet_help(plan, ups), flush=True)

    def on_exit(node: DevnetNode, code: int, log_tail: str) -> None:
        from node.devnet import describe_exit

        print(
            f"node {node.index} ({node.role}) exited ({describe_exit(code)}); the others keep "
            f"running. Its log: {node.log_path}" + (f"\n{log_tail}" if log_tail else ""),
            file=sys.stderr,
            flush=True,
        )

    code = DevnetSupervisor(
        plan,
        on_up=on_up,
        on_all_up=on_all_up,
        on_exit=on_exit,
        provide_compute=bool(getattr(args, "provide_compute", False)),
    ).run()
    if code != EXIT_OK:
        raise CliError("every devnet node exited; see their logs")
    print("devnet stopped", file=sys.stderr)
    return EXIT_OK


def _devnet_summary(plan: DevnetPlan, ups: list[NodeUp]) -> dict[str, Any]:
    from node.devnet import funded_dev_keys

    urls = {up.node.index: up.rpc_url for up in ups}
    return {
        "datadir": str(plan.root),
        "chainId": plan.genesis.chain_id,
        "nodes": [
            {
                "node": n.index,
                "role": n.role,
                "datadir": str(n.datadir),
                "rpc": urls.get(n.index),
                "p2p": n.p2p_addr,
                "validator": to_checksum(dev_address(n.index)) if n.is_validator else None,
            }
            for n in plan.nodes
        ],
        "devKeys": {str(i): to_checksum(dev_address(i)) for i in funded_dev_keys(plan.genesis)},
    }


def _devnet_help(plan: DevnetPlan, ups: list[NodeUp]) -> str:
    from node.devnet import EXTRA_FUNDED_DEV_KEYS, format_ranges, funded_dev_keys

    funded = funded_dev_keys(plan.genesis)
    n_validators = len(plan.validators)
    spare = [i for i in funded if i >= n_validators]
    key = next((i for i in spare if i in EXTRA_FUNDED_DEV_KEYS), spare[0] if spare else 1)
    full = next((up for up in ups if not up.node.is_validator), ups[0])
    url = full.rpc_url
    example = "0x000000000000000000000000000000000000dEaD"
    also = [i for i in funded if i < n_validators]
    note = f" ({format_ranges(also)} are also validator keys)" if also else ""
    return (
        f"devnet: chain {plan.genesis.chain_id}, {n_validators} validator(s) "
        f"(dev keys 0..{n_validators - 1}), data in {plan.root}\n"
        f"funded public dev keys: {format_ranges(funded)}{note} "
        "(devnet only: anyone can spend them)\n"
        f"try (node {full.node.index}, {full.node.role}):\n"
        f"  neuroseed status --rpc {url}\n"
        f"  neuroseed tx transfer --dev-key {key} --to {example} --amount 1.5 --rpc {url}\n"
        f"  neuroseed balance {example} --rpc {url}\n"
        "stop with Ctrl-C (every node stops); run the same command again to continue this chain"
    )


# --- status and balance ----------------------------------------------------------------------------


def _status_extras(raw: Any, head_height: int) -> tuple[int, int | None, list[dict[str, Any]]]:
    """(finalized height, round, validators) from ``ns_status``. Every block the node has is
    final (BFT finality), so the finalized height is the head unless the node says otherwise;
    the round and the validator set are shown only if the node reports them."""
    raw = raw if isinstance(raw, dict) else {}
    finalized = raw.get("finalizedHeight", head_height)
    round_ = raw.get("round")
    validators: list[dict[str, Any]] = []
    for v in raw.get("validators") or []:
        if isinstance(v, dict):
            validators.append({"address": v.get("address"), "power": v.get("power")})
        else:
            validators.append({"address": v, "power": None})
    return (
        int(finalized) if isinstance(finalized, int) else head_height,
        round_ if isinstance(round_, int) else None,
        validators,
    )


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        st = client.status()
        # The fields the typed NodeStatus does not carry (yet): round, validator set.
        raw = client.call("ns_status")
    finalized, round_, validators = _status_extras(raw, st.head_height)
    validator = _checksum_or_none(st.validator_address)
    if args.json:
        _print_json(
            {
                "rpc": client.url,
                "chainId": st.chain_id,
                "nodeVersion": st.node_version,
                "height": st.head_height,
                "finalizedHeight": finalized,
                "round": round_,
                "headHash": _hex(st.head_hash),
                "headTime": st.head_time_ms,
                "validator": validator,
                "isValidator": st.is_validator,
                "validators": validators or None,
                "mempoolSize": st.mempool_size,
                "mempoolBytes": st.mempool_bytes,
                "peers": st.peers,
                "syncing": st.syncing,
            }
        )
        return EXIT_OK
    if validator is None:
        role = "none (not a validator node)"
    else:
        role = f"{validator} ({'active' if st.is_validator else 'not in the validator set'})"
    print(
        _rows(
            [
                ("node", f"{st.node_version} at {client.url}"),
                ("chain id", st.chain_id),
                ("height", st.head_height),
                ("finalized", finalized),
                ("round", "not reported by this node" if round_ is None else round_),
                ("head hash", _hex(st.head_hash)),
                ("head time", format_timestamp(st.head_time_ms)),
                ("validator", role),
                ("mempool", f"{st.mempool_size} transactions, {st.mempool_bytes} bytes"),
                ("peers", st.peers),
                ("syncing", "yes" if st.syncing else "no"),
            ]
        )
    )
    if validators:
        total = sum(v["power"] or 0 for v in validators)
        print(f"validator set ({len(validators)}, total power {total}):")
        for v in validators:
            power = "" if v["power"] is None else f"  power {v['power']}"
            print(f"  {v['address']}{power}")
    else:
        print("validator set: not reported by this node")
    return EXIT_OK


def cmd_balance(args: argparse.Namespace) -> int:
    address = _address_arg(args.address, "address")
    with _client(args) as client:
        account = client.get_account(address)
    if args.json:
        _print_json(
            {
                "address": to_checksum(address),
                "balance": str(account.balance),
                "balanceNSD": format_nsd(account.balance),
                "nonce": account.nonce,
            }
        )
    else:
        print(
            _rows(
                [
                    ("address", to_checksum(address)),
                    ("balance", f"{format_nsd(account.balance)} NSD"),
                    ("nonce", account.nonce),
                ]
            )
        )
    return EXIT_OK


# --- tx ----------------------------------------------------------------------------------------


def _sender_key(args: argparse.Namespace) -> crypto.PrivateKey:
    if args.dev_key is not None:
        if args.dev_key < 0:
            raise CliError("--dev-key: expected a dev key number (1, 2, ...)")
        print(
            f"signing with public dev key {args.dev_key} (devnet only: anyone can spend it)",
            file=sys.stderr,
        )
        return dev_key(args.dev_key)
    keystore = _keystore(args)
    if args.sender is not None:
        address = _address_arg(args.sender, "--from")
    else:
        address = _choose_key(keystore)
    if not keystore.has(address):
        raise CliError(f"no key for {to_checksum(address)} in {keystore.directory}")
    if args.password_file is None:
        print(f"unlocking key {to_checksum(address)}", file=sys.stderr)
    return keystore.load(address, _password(args.password_file, confirm=False))


def _receipt_summary(receipt: dict[str, Any]) -> list[tuple[str, object]]:
    status = "success" if receipt.get("success") else f"failed: {receipt.get('error') or '?'}"
    rows: list[tuple[str, object]] = [
        ("tx id", receipt.get("txId")),
        ("block", f"{receipt.get('height')} ({receipt.get('blockHash')})"),
        ("status", status),
    ]
    for label, key in (("fee", "feePaid"), ("burned", "burned")):
        value = receipt.get(key)
        rows.append((label, f"{format_nsd(int(value))} NSD" if value is not None else "?"))
    return rows


def _fee_option(args: argparse.Namespace) -> Amount | None:
    """``--fee`` and ``--timeout``, checked before anything is unlocked or sent."""
    if args.timeout <= 0:
        raise CliError("--timeout: expected a positive number of seconds")
    return parse_nsd(args.fee, what="--fee", allow_zero=True) if args.fee is not None else None


def _sign_send_wait(
    args: argparse.Namespace,
    body: Record,
    fields: Sequence[tuple[str, str, object, object]],
    *,
    spend: int = 0,
    on_nonce: Callable[[Address, int], Sequence[tuple[str, str, object, object]]] | None = None,
) -> int:
    """Sign ``body`` with the sender's key (the next nonce; ``--fee`` or the estimated cost plus a
    tip), check the balance covers ``spend`` + fee, send it and (unless ``--no-wait``) wait for
    its receipt; print the result. ``fields`` are the kind's own ``(json key, json value, text
    label, text value)`` shown after the sender (no text row where the label is None). Exit 1
    if the transaction failed. ``on_nonce(sender, nonce)``, called just before sending, may keep
    what depends on the nonce (an id) and returns more fields to show first."""
    fee_arg = _fee_option(args)
    with _client(args) as client:
        chain_id = client.chain_id()  # fails fast (exit 3) before a password is asked
        key = _sender_key(args)
        sender = key.address
        nonce = client.pending_nonce(sender)
        if fee_arg is None:
            # The encoded size does not depend on the fee (a fixed-width uint256), so a draft
            # signed with fee 0 prices the real transaction exactly.
            draft = make_transaction(key, chain_id, nonce, 0, body)
            cost = client.estimate_fee(draft.encode())
            fee = cost + cost // TIP_DIVISOR
        else:
            fee = fee_arg
        balance = client.get_account(sender).balance
        if balance < spend + fee:
            parts = f"fee {format_nsd(fee)}"
            if spend:
                parts = f"amount {format_nsd(spend)} + {parts}"
            raise CliError(
                f"insufficient funds: {to_checksum(sender)} has {format_nsd(balance)} NSD, "
                f"needs {format_nsd(spend + fee)} NSD ({parts})"
            )
        signed = make_transaction(key, chain_id, nonce, fee, body)
        if on_nonce is not None:
            fields = [*on_nonce(sender, nonce), *fields]
        tx_id = client.send_raw_transaction(signed.encode())
        receipt = None
        if not args.no_wait:
            if not args.json:
                print(
                    f"sent {_hex(tx_id)}; waiting until it is final (up to {args.timeout:g} s)",
                    file=sys.stderr,
                )
            receipt = client.wait_for_receipt(tx_id, timeout=args.timeout)
    if args.json:
        _print_json(
            {
                "txId": _hex(tx_id),
                "from": to_checksum(sender),
                **{key_: value for key_, value, _, _ in fields},
                "fee": str(fee),
                "nonce": nonce,
                "receipt": receipt,
            }
        )
    elif receipt is None:
        rows: list[tuple[str, object]] = [("tx id", _hex(tx_id)), ("from", to_checksum(sender))]
        rows += [(str(label), text) for _, _, label, text in fields if label is not None]
        rows += [
            ("fee", f"{format_nsd(fee)} NSD"),
            ("nonce", nonce),
            ("status", "sent (not waiting for finality)"),
        ]
        print(_rows(rows))
    else:
        # The kind's own fields (ids the transaction created: dataset, purchase, deal, …) first.
        own = [(str(label), text) for _, _, label, text in fields if label is not None]
        print(_rows([*own, *_receipt_summary(receipt)]))
    if receipt is not None and not receipt.get("success"):
        raise CliError(f"transaction {_hex(tx_id)} failed: {receipt.get('error') or 'no reason'}")
    return EXIT_OK


def _amount_fields(amount: int) -> list[tuple[str, str, object, object]]:
    return [
        ("amount", str(amount), "amount", f"{format_nsd(amount)} NSD"),
        ("amountNSD", format_nsd(amount), None, None),
    ]


def cmd_tx_transfer(args: argparse.Namespace) -> int:
    # Every input is checked before anything is unlocked or sent.
    to = _address_arg(args.to, "--to")
    amount = parse_nsd(args.amount, what="--amount")
    _fee_option(args)
    memo = (args.memo or "").encode("utf-8")
    if len(memo) > MAX_MEMO_BYTES:
        raise CliError(f"--memo: at most {MAX_MEMO_BYTES} bytes of UTF-8, got {len(memo)}")
    fields = [("to", to_checksum(to), "to", to_checksum(to)), *_amount_fields(amount)]
    return _sign_send_wait(args, Transfer(to, amount, memo), fields, spend=amount)


def cmd_tx_bond(args: argparse.Namespace) -> int:
    amount = parse_nsd(args.amount, what="--amount")
    _fee_option(args)
    return _sign_send_wait(args, Bond(amount), _amount_fields(amount), spend=amount)


def cmd_tx_unbond(args: argparse.Namespace) -> int:
    _fee_option(args)
    return _sign_send_wait(args, Unbond(), [])


def cmd_tx_validator_vote(args: argparse.Namespace) -> int:
    subject = _address_arg(args.subject, "--subject")
    _fee_option(args)
    action = VoteAction.ADD if args.add else VoteAction.REMOVE
    name = action.name.lower()
    fields: list[tuple[str, str, object, object]] = [
        ("subject", to_checksum(subject), "subject", to_checksum(subject)),
        ("action", name, "action", name),
    ]
    return _sign_send_wait(args, ValidatorVote(subject, int(action)), fields)


# --- datasets and roles ----------------------------------------------------------------------------

PURCHASES_DIR = "purchases"  # one-off purchase keys, under the keystore directory
DEFAULT_GET_TIMEOUT = 3600.0
FETCH_POLL_S = 0.2
ACCESS_LIFETIME_MS = 3600 * 1000
DOWNLOAD_SLICE_BYTES = 8 << 20
_PART_RE = re.compile(r"([^:]+):([0-9]+):([0-9]+)(?::([^:]*))?", re.ASCII)
ROLE_NAMES = (
    "data_supplier",
    "storage_provider",
    "compute_provider",
    "model_developer",
    "attester",
    "distributor",
    "customer",
)


class _ProgressBar:
    """A one-line progress bar on stderr (only when stderr is a terminal), redrawn ≤ 10×/s."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        if not self.enabled:
            return
        import time

        now = time.monotonic()
        if now - self._last < 0.1 and (self.total is None or done < self.total):
            return
        self._last = now
        if self.total:
            frac = min(1.0, done / self.total)
            bar = "#" * int(frac * 30)
            text = (
                f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% "
                f"{done / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
            )
        else:
            text = f"\r{self.label} {done / 2**20:.1f} MiB"
        sys.stderr.write(text)
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False


def _sender_address(args: argparse.Namespace) -> Address:
    """The address ``_sender_key`` will unlock, without unlocking it."""
    if args.dev_key is not None:
        if args.dev_key < 0:
            raise CliError("--dev-key: expected a dev key number (1, 2, ...)")
        return dev_address(args.dev_key)
    if args.sender is not None:
        return _address_arg(args.sender, "--from")
    return _choose_key(_keystore(args))


def _unhex(value: Any, what: str = "value") -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise CliError(f"the node sent a malformed {what}")
    return bytes.fromhex(value[2:])


def _dataset_ref(text: str) -> str:
    """A dataset id (0x + 64 hex digits) or a root CID, as the node takes it."""
    s = text.strip()
    if s.startswith(("0x", "0X")):
        body = s[2:]
        if not re.fullmatch(r"[0-9a-fA-F]+", body or "x") or len(body) % 2:
            raise CliError(f"{text!r} is neither a dataset id (0x…) nor a CID")
        return "0x" + body.lower()
    from node.errors import DecodeError
    from node.storage.unixfs import parse_cid

    try:
        parse_cid(s)
    except DecodeError:
        raise CliError(f"{text!r} is neither a dataset id (0x…) nor a CID") from None
    return s


def _require_dataset(client: Client, ref: str) -> dict[str, Any]:
    record = client.get_dataset(_dataset_ref(ref))
    if record is None:
        raise CliError(f"no dataset {ref} on chain (see `neuroseed dataset list`)")
    return record


def _local_dataset_header(path: Path) -> Any:
    """The safetensors header of ``path`` and its row count (checked before uploading)."""
    import struct

    from node.models.safetensors_header import MAX_HEADER_BYTES, parse_header
    from node.storage.format_v1 import dataset_rows

    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise CliError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise CliError(f"{path}: its header of {n} bytes exceeds {MAX_HEADER_BYTES}")
            raw = fh.read(n)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    header = parse_header(raw.rstrip(b" "))  # typed errors: not safetensors, bad offsets, ...
    rows = dataset_rows(header)
    if size != 8 + n + header.data_size:
        raise CliError(
            f"{path} is {size} bytes but its header implies {8 + n + header.data_size} "
            "(truncated or padded file)"
        )
    return header, rows


def _node_operator(client: Client) -> Address | None:
    info = client.node_info()
    op = info.get("operator")
    return None if op is None else Address(_unhex(op, "operator"))


def cmd_dataset_add(args: argparse.Namespace) -> int:
    from node.economy.datasets import DatasetRegister, dataset_id
    from node.storage.format_v1 import ArtifactProof

    path = Path(args.file).expanduser()
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    price = parse_nsd(args.price, what="--price", allow_zero=True)
    name = args.name.strip()
    if not name:
        raise CliError("--name: must not be empty")
    _fee_option(args)
    _, rows = _local_dataset_header(path)
    with _client(args) as client:
        client.chain_id()  # fails fast (exit 3) before anything is uploaded
        sender = _sender_address(args)
        if price > 0:
            operator = _node_operator(client)
            if operator is None:
                raise CliError(
                    "a priced dataset is sold through its node's key agent, and this node has no "
                    "operator account ([operator] in config.toml); configure one and restart it"
                )
            if operator != sender:
                raise CliError(
                    f"a priced dataset must be registered by the node's operator account "
                    f"{to_checksum(operator)} (its key agent posts the keys to buyers); sign "
                    "with that account (--from / --dev-key)"
                )
        bar = _ProgressBar("upload", path.stat().st_size)
        try:
            up = client.upload_artifact(path, price=price, progress=bar)
        finally:
            bar.close()
    root = _unhex(up["rootHex"], "root")
    body = DatasetRegister(
        root=root,
        proof=ArtifactProof.decode(_unhex(up["proof"], "proof")),
        name=name,
        description=args.description or "",
        license=args.license or "",
        price=price,
        salt=None if up.get("salt") is None else _unhex(up["salt"], "salt"),
        key_check=None if up.get("keyCheck") is None else Hash32(_unhex(up["keyCheck"])),
        plain_data_hash=Hash32(_unhex(up["plainDataHash"])) if price > 0 else None,
    )
    did = _hex(dataset_id(root))
    fields: list[tuple[str, str, object, object]] = [
        ("id", did, "dataset id", did),
        ("cid", str(up["root"]), "CID", up["root"]),
        ("rows", str(rows), "rows", rows),
        ("price", str(price), "price", f"{format_nsd(price)} NSD"),
    ]
    if not args.json:
        print(f"uploaded {path.name}: CID {up['root']}, {up['size']} bytes stored", file=sys.stderr)
    return _sign_send_wait(args, body, fields)


def _parse_part(text: str, client: Client) -> Any:
    from node.economy.composite import CompositePartSpec

    m = _PART_RE.fullmatch(text.strip())
    if m is None:
        raise CliError(f"--part {text!r}: expected SRC:START:END[:tensor1,tensor2]")
    source = _require_dataset(client, m.group(1))
    start, end = int(m.group(2)), int(m.group(3))
    if not start < end:
        raise CliError(f"--part {text!r}: START must be below END")
    tensors = tuple(t for t in (m.group(4) or "").split(",") if t)
    return CompositePartSpec(Hash32(_unhex(source["id"], "id")), start, end, tensors)


def cmd_dataset_compose(args: argparse.Namespace) -> int:
    from node.economy.composite import CompositeDefine, composite_id

    price = parse_nsd(args.price, what="--price", allow_zero=True)
    name = args.name.strip()
    if not name:
        raise CliError("--name: must not be empty")
    if not args.part:
        raise CliError("give at least one --part SRC:START:END[:tensors]")
    _fee_option(args)
    with _client(args) as client:
        parts = tuple(_parse_part(p, client) for p in args.part)
    body = CompositeDefine(
        name=name,
        description=args.description or "",
        license=args.license or "",
        price=price,
        parts=parts,
    )

    def on_nonce(sender: Address, nonce: int) -> list[tuple[str, str, object, object]]:
        cid = _hex(composite_id(sender, nonce))
        return [("id", cid, "composite id", cid)]

    fields = [("parts", str(len(parts)), "parts", len(parts))]
    return _sign_send_wait(args, body, fields, on_nonce=on_nonce)


def _purchases_dir(args: argparse.Namespace) -> Path:
    from node.config import DataDirLayout

    return DataDirLayout(_datadir(args)).keystore / PURCHASES_DIR


def _save_purchase(directory: Path, record: dict[str, Any]) -> Path:
    """Keep a purchase's one-off private key (mode 0600 in a 0700 directory)."""
    from node.input_purchases import save_key_file

    return save_key_file(directory, f"{record['purchase'][2:]}.json", record)


def _load_purchases(directory: Path, dataset: str) -> list[dict[str, Any]]:
    """The purchases of ``dataset`` (0x id) kept in ``directory``, newest first."""
    out: list[dict[str, Any]] = []
    if not directory.is_dir():
        return out
    for p in directory.glob("*.json"):
        try:
            record = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("dataset") == dataset:
            out.append(record)
    out.sort(key=lambda r: r.get("createdMs", 0), reverse=True)
    return out


def cmd_dataset_buy(args: argparse.Namespace) -> int:
    import time

    from node.economy.purchases import Purchase, purchase_id
    from node.storage.encryption import generate_wrap_keypair

    _fee_option(args)
    max_price = parse_nsd(args.max_price, what="--max-price") if args.max_price else None
    directory = _purchases_dir(args)
    with _client(args) as client:
        record = _require_dataset(client, args.dataset)
    price = int(record["price"])
    if price == 0:
        raise CliError(f"dataset {record['id']} is free: fetch it with `neuroseed dataset get`")
    if max_price is not None and max_price < price:
        raise CliError(
            f"the price {format_nsd(price)} NSD is above --max-price {format_nsd(max_price)} NSD"
        )
    secret, pubkey = generate_wrap_keypair()
    body = Purchase(Hash32(_unhex(record["id"], "id")), pubkey, Amount(max_price or price))
    chain_holder: dict[str, Any] = {}

    def on_nonce(sender: Address, nonce: int) -> list[tuple[str, str, object, object]]:
        pid = _hex(purchase_id(sender, nonce))
        # Kept before the purchase is sent: without it the key posted for it cannot be opened.
        _save_purchase(
            directory,
            {
                "purchase": pid,
                "dataset": record["id"],
                "buyer": _hex(sender),
                "privateKey": _hex(secret),
                "createdMs": int(time.time() * 1000),
            },
        )
        chain_holder["purchase"] = pid
        return [
            ("purchase", pid, "purchase id", pid),
            ("dataset", record["id"], "dataset", record["id"]),
        ]

    code = _sign_send_wait(args, body, [], spend=price, on_nonce=on_nonce)
    if code == EXIT_OK and args.wait and not args.no_wait:
        pid = chain_holder["purchase"]
        if not args.json:
            print("waiting for the owner(s) to post the key…", file=sys.stderr)
        with _client(args) as client:
            _wait_for_keys(client, pid, args.timeout)
        if not args.json:
            print(
                f"key posted for purchase {pid}; fetch with `neuroseed dataset get {record['id']}`"
            )
    return code


def _wait_for_keys(client: Client, pid: str, timeout: float) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        purchase = client.get_purchase(pid)
        if purchase is not None and all(
            s.get("wrappedKey") not in (None, "0x") or int(s.get("state", 0)) == 3
            for s in purchase.get("shares", [])
        ):
            return purchase
        if purchase is not None and any(
            int(s.get("state", 0)) in (4, 5) for s in purchase["shares"]
        ):
            raise CliError(f"purchase {pid} was refunded: the owner did not post the key in time")
        if time.monotonic() > deadline:
            raise CliError(
                f"no key posted for purchase {pid} within {timeout:g} s; try again later"
            )
        time.sleep(0.5)


# --- dataset get -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """One plain dataset a get reads from, with what is needed to read it."""

    record: dict[str, Any]
    root: bytes
    header: Any  # SafetensorsHeader
    encrypted: bool
    key: bytes | None = None
    access: bytes | None = None
    leaves: set[int] | None = None  # None: the whole artifact
    purchase: str | None = None  # the purchase whose key opened it (0x id)


def _source_of(record: dict[str, Any]) -> _Source:
    from node.models.safetensors_header import parse_header

    root = _unhex(record["root"], "root")
    header = parse_header(_unhex(record["header"], "header"))
    return _Source(record, root, header, record.get("salt") is not None)


def _content_keys(
    args: argparse.Namespace, client: Client, top: dict[str, Any], sources: list[_Source]
) -> None:
    """Open the content keys of the encrypted sources and sign their access requests, from the
    purchase of ``top`` this CLI made (``dataset buy``)."""
    import secrets
    import time

    from node.economy.purchases import key_wrap_context
    from node.p2p.chunks import AccessTerms, sign_access
    from node.storage.encryption import KeyUnwrapFailed, key_check, unwrap_key

    encrypted = [s for s in sources if s.encrypted]
    if not encrypted:
        return
    kept = _load_purchases(_purchases_dir(args), top["id"])
    if not kept:
        raise CliError(
            f"dataset {top['id']} is priced and you have no purchase of it here; buy it first: "
            f"neuroseed dataset buy {top['id']}"
        )
    info = client.node_info()
    if info.get("peerId") is None:
        raise CliError("the node has no peer-to-peer network to fetch a priced dataset with")
    peer_id = _unhex(info["peerId"], "peer id")
    chain_id = client.chain_id()
    chosen: tuple[dict[str, Any], dict[str, Any]] | None = None
    for mine in kept:
        purchase = client.get_purchase(mine["purchase"])
        if purchase is not None:
            chosen = (mine, purchase)
            break
    if chosen is None:
        raise CliError(
            f"your purchase of {top['id']} is not on chain (yet); wait for it or buy again"
        )
    mine, purchase = chosen
    buyer = Address(_unhex(mine["buyer"], "buyer"))
    if args.dev_key is None and args.sender is None:
        args.sender = to_checksum(buyer)
    key = _sender_key(args)
    if key.address != buyer:
        raise CliError(f"the purchase was made by {to_checksum(buyer)}; sign with that account")
    shares = {s["source"]: s for s in purchase.get("shares", [])}
    secret = _unhex(mine["privateKey"], "private key")
    for src in encrypted:
        share = shares.get(src.record["id"])
        if share is None:
            raise CliError(f"purchase {mine['purchase']} does not cover dataset {src.record['id']}")
        wrapped = share.get("wrappedKey") or "0x"
        if wrapped == "0x":
            raise CliError(
                f"the owner of {src.record['id']} has not posted the key for purchase "
                f"{mine['purchase']} yet; wait (`dataset buy --wait`) and try again"
            )
        context = key_wrap_context(_unhex(mine["purchase"]), _unhex(src.record["id"]))
        try:
            content_key = unwrap_key(_unhex(wrapped), secret, context)
        except KeyUnwrapFailed:
            raise CliError(
                f"the key posted for {src.record['id']} does not open with your purchase's "
                f"one-off key; nothing was written. "
                + _dispute_remedy(mine["purchase"], share, src.record["id"], len(encrypted))
            ) from None
        if key_check(_unhex(src.record["salt"]), content_key) != _unhex(src.record["keyCheck"]):
            raise CliError(
                f"the key posted for {src.record['id']} does not match its registered key check; "
                "nothing was written. "
                + _dispute_remedy(mine["purchase"], share, src.record["id"], len(encrypted))
            )
        src.key = content_key
        src.purchase = mine["purchase"]
        terms = AccessTerms(
            chain_id=ChainId(chain_id),
            root=src.root,
            address=key.address,
            peer_id=peer_id,
            grant_id=Hash32(_unhex(mine["purchase"])),
            expires_ms=TimestampMs(int(time.time() * 1000) + ACCESS_LIFETIME_MS),
            nonce=int.from_bytes(secrets.token_bytes(8), "big"),
        )
        src.access = sign_access(key, terms).encode()


def _run_fetch(client: Client, src: _Source, timeout: float, label: str) -> None:
    """Have the node fetch ``src`` (its leaves only when set) and wait for the job."""
    import time

    leaves = None if src.leaves is None else sorted(src.leaves)
    job = client.fetch_artifact(src.root, leaves=leaves, access=src.access)
    bar = _ProgressBar(label)
    deadline = time.monotonic() + timeout
    try:
        while job["state"] == "running":
            bar(int(job.get("bytesFetched") or 0))
            if time.monotonic() > deadline:
                raise CliError(
                    f"the fetch did not finish within {timeout:g} s; run again to resume"
                )
            time.sleep(FETCH_POLL_S)
            job = client.fetch_status(job["job"])
    finally:
        bar.close()
    if job["state"] != "done":
        raise CliError(
            f"fetching {src.record.get('rootCid') or src.record['id']} failed: {job.get('error')}"
        )


class _SliceReader:
    """Plaintext data bytes of one source, read through the node (decrypting when needed)."""

    def __init__(self, client: Client, src: _Source) -> None:
        self._client = client
        self._src = src
        self._chunk: tuple[int, bytes] | None = None

    def _get(self, start: int, end: int) -> bytes:
        import io

        buf = io.BytesIO()
        self._client.download_artifact(self._src.root, buf, start=start, end=end)
        data = buf.getvalue()
        if len(data) != end - start:
            raise CliError(f"the node sent {len(data)} of {end - start} bytes; run again")
        return data

    def read(self, begin: int, end: int) -> Iterator[bytes]:
        from node.storage.encryption import CIPHER_CHUNK_BYTES, decrypt_range, encrypted_size
        from node.storage.format_v1 import LEAF0_BYTES

        src = self._src
        if src.key is None:
            pos = begin
            while pos < end:
                stop = min(end, pos + DOWNLOAD_SLICE_BYTES)
                yield self._get(LEAF0_BYTES + pos, LEAF0_BYTES + stop)
                pos = stop
            return
        data_size = src.header.data_size
        stored = encrypted_size(data_size)

        def get_chunk(i: int) -> bytes:
            if self._chunk is not None and self._chunk[0] == i:
                return self._chunk[1]
            lo = i * CIPHER_CHUNK_BYTES
            data = self._get(LEAF0_BYTES + lo, LEAF0_BYTES + min(stored, lo + CIPHER_CHUNK_BYTES))
            self._chunk = (i, data)
            return data

        salt = _unhex(src.record["salt"])
        yield from decrypt_range(src.key, salt, data_size, get_chunk, begin, end)


def _write_atomically(out: Path, write: Callable[[Any], None]) -> None:
    """Write ``out`` through a temp file renamed at the end (nothing half-written under
    ``out`` on failure)."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _download_whole(client: Client, src: _Source, out: Path) -> int:
    """The stored file of ``src`` into ``out`` (decrypted when priced), resuming a partial
    download kept in ``out.part``."""
    from node.storage.encryption import decrypt_stream
    from node.storage.format_v1 import LEAF0_BYTES

    info = client.get_artifact(src.root)
    size = int(info["size"])
    part = out.with_name(out.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    bar = _ProgressBar("download", size)
    try:
        if have < size:
            with open(part, "ab") as fh:
                client.download_artifact(src.root, fh, start=have, progress=lambda n: bar(have + n))
    finally:
        bar.close()
    if part.stat().st_size != size:
        raise CliError("the download is incomplete; run the same command again to resume")
    if src.key is None:
        os.replace(part, out)
        return size
    salt = _unhex(src.record["salt"])
    expected = _unhex(src.record["plainDataHash"]) if src.record.get("plainDataHash") else None
    content_key = src.key

    def write(fh: Any) -> None:
        with open(part, "rb") as cipher:
            fh.write(cipher.read(LEAF0_BYTES))
            decrypt_stream(
                content_key, salt, cipher, fh, src.header.data_size, expected_sha256=expected
            )

    _write_atomically(out, write)
    part.unlink()
    return int(LEAF0_BYTES + src.header.data_size)


def cmd_dataset_get(args: argparse.Namespace) -> int:
    from node.storage.encryption import DecryptionFailed
    from node.storage.format_v1 import (
        CompositePart,
        leaves_for_data_range,
        row_byte_ranges,
        write_composite,
    )

    out = Path(args.output).expanduser()
    if args.timeout <= 0:
        raise CliError("--timeout: expected a positive number of seconds")
    if out.is_dir():
        raise CliError(f"-o {out}: is a directory")
    with _client(args) as client:
        ref = _dataset_ref(args.dataset)
        record = client.get_dataset(ref)
        if record is None:
            if ref.startswith("0x") and len(ref) == 66:
                raise CliError(f"no dataset {ref} on chain")
            # Not a registered dataset: an artifact by CID, fetched and written as stored.
            root_cid = ref
            job_src = _Source({"id": ref, "rootCid": ref}, _root_bytes(ref), None, False)
            _run_fetch(client, job_src, args.timeout, "fetch")
            written = _download_whole(client, job_src, out)
            return _print_get(args, out, written, root_cid, None)
        if record.get("isComposite"):
            names = tuple(s["name"] for s in record["schema"])
            sources: dict[str, _Source] = {}
            plan: list[tuple[_Source, int, int]] = []
            for entry in record["composite"]:
                src = sources.get(entry["source"])
                if src is None:
                    leaf = client.get_dataset(entry["source"])
                    if leaf is None:
                        raise CliError(f"source {entry['source']} of the composite is unknown")
                    src = sources[entry["source"]] = _source_of(leaf)
                    src.leaves = {0}
                plan.append((src, int(entry["start"]), int(entry["end"])))
            for src, start, end in plan:
                for r in row_byte_ranges(src.header, start, end, names):
                    assert src.leaves is not None
                    src.leaves.update(
                        leaves_for_data_range(r.begin, r.end, encrypted=src.encrypted)
                    )
            unique = list(sources.values())
            _content_keys(args, client, record, unique)
            for i, src in enumerate(unique):
                _run_fetch(client, src, args.timeout, f"fetch {i + 1}/{len(unique)}")
            parts = [CompositePart(src.header, start, end, names) for src, start, end in plan]
            readers = [_SliceReader(client, src) for src, _, _ in plan]
            written = 0

            def write(fh: Any) -> None:
                nonlocal written
                written = write_composite(
                    fh, parts, lambda i, begin, end: readers[i].read(begin, end)
                )

            try:
                _write_atomically(out, write)
            except DecryptionFailed as exc:
                raise _undecryptable(client, out, unique, exc) from None
            blocks = sum(len(s.leaves or ()) for s in unique)
            return _print_get(args, out, written, None, record, leaves=blocks)
        src = _source_of(record)
        _content_keys(args, client, record, [src])
        _run_fetch(client, src, args.timeout, "fetch")
        try:
            written = _download_whole(client, src, out)
        except DecryptionFailed as exc:
            raise _undecryptable(client, out, [src], exc) from None
        return _print_get(args, out, written, record.get("rootCid"), record)


def _dispute_remedy(
    purchase: str, share: dict[str, Any] | None, source: str | None, encrypted: int
) -> str:
    """What a buyer whose paid data does not open can do: ``dataset dispute``, by when."""
    command = f"neuroseed dataset dispute {purchase}"
    if encrypted > 1:
        command += f" --source {source}" if source else " --source ID"
    until = ""
    if share is not None and int(share.get("state", 0)) == 2 and share.get("deadline") is not None:
        until = f" by height {share['deadline']} (the end of the dispute window)"
    return (
        f"Dispute it{until}: `{command}` checks the posted key and every leaf and, if the "
        "seller is at fault, gets your payment back."
    )


def _undecryptable(
    client: Client, out: Path, sources: list[_Source], exc: NeuroSeedError
) -> CliError:
    """The error of a ``dataset get`` whose paid data does not decrypt: nothing is left behind
    (the output was never renamed into place; the downloaded ciphertext is of no use and is
    removed: the node keeps its copy for a dispute), and the remedy is named."""
    with contextlib.suppress(FileNotFoundError):
        out.with_name(out.name + ".part").unlink()
    encrypted = [s for s in sources if s.key is not None]
    pid = next((s.purchase for s in encrypted if s.purchase is not None), None)
    message = f"{exc.message}: nothing was written to {out}."
    if pid is None:  # pragma: no cover - a key is only ever opened from a kept purchase
        return CliError(message)
    purchase = client.get_purchase(pid)
    shares = {s["source"]: s for s in (purchase or {}).get("shares", [])}
    only = encrypted[0].record["id"] if len(encrypted) == 1 else None
    share = shares.get(only) if only is not None else None
    return CliError(
        f"{message} The seller's data does not decrypt as registered with the key it posted. "
        + _dispute_remedy(pid, share, only, len(encrypted))
    )


def _root_bytes(ref: str) -> bytes:
    from node.storage.unixfs import parse_cid

    return bytes(parse_cid(ref))


def _print_get(
    args: argparse.Namespace,
    out: Path,
    written: int,
    cid: str | None,
    record: dict[str, Any] | None,
    *,
    leaves: int | None = None,
) -> int:
    result = {
        "file": str(out),
        "bytes": written,
        "cid": cid,
        "dataset": None if record is None else record["id"],
        "composite": bool(record and record.get("isComposite")),
        "leavesFetched": leaves,
    }
    if args.json:
        _print_json(result)
    else:
        rows: list[tuple[str, object]] = [("file", out), ("bytes", written)]
        if record is not None:
            rows.append(("dataset", record["id"]))
        if cid is not None:
            rows.append(("CID", cid))
        if leaves is not None:
            rows.append(("leaves read", leaves))
        print(_rows(rows))
    return EXIT_OK


# --- dataset dispute ---------------------------------------------------------------------------


def _purchase_id_arg(text: str) -> str:
    s = text.strip().lower()
    if not re.fullmatch(r"0x[0-9a-f]{64}", s):
        raise CliError(f"{text!r} is not a purchase id (0x and 64 hex digits)")
    return s


def _kept_purchase(args: argparse.Namespace, pid: str) -> dict[str, Any]:
    """The one-off key ``dataset buy`` kept for purchase ``pid``."""
    directory = _purchases_dir(args)
    path = directory / f"{pid[2:]}.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(
            f"no one-off key for purchase {pid} in {directory}: a dispute reveals the key "
            "`neuroseed dataset buy` kept there (use the --datadir you bought with)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the purchase key file {path}: {exc}") from None
    if (
        not isinstance(record, dict)
        or record.get("purchase") != pid
        or not isinstance(record.get("privateKey"), str)
        or not isinstance(record.get("buyer"), str)
    ):
        raise CliError(f"{path} is not a purchase key file written by `neuroseed dataset buy`")
    return record


def _state_value(client: Client, key: bytes) -> bytes | None:
    """The chain's latest value under ``key`` (``ns_getProof``; the proof is not checked)."""
    return client.get_proof(key).value


class _Signer:
    """The buyer's key, unlocked once and only when needed (a fetch's access request, the
    transactions)."""

    def __init__(self, args: argparse.Namespace, buyer: Address) -> None:
        self._args = args
        self._buyer = buyer
        self._key: crypto.PrivateKey | None = None

    def __call__(self) -> crypto.PrivateKey:
        if self._key is None:
            if self._args.dev_key is None and self._args.sender is None:
                self._args.sender = to_checksum(self._buyer)
            key = _sender_key(self._args)
            if key.address != self._buyer:
                raise CliError(
                    f"the purchase was made by {to_checksum(self._buyer)}; sign with that account"
                )
            self._key = key
        return self._key


def _dispute_blocks(
    client: Client, source: Any, pid: str, signer: _Signer, chain_id: int
) -> Callable[[bytes], bytes | None]:
    """``get(cid)`` of the source's stored blocks through the node (``GET /blocks/<cid>``; the
    dispute client checks each against its CID); the first read has the node fetch what it lacks
    (the purchase grants access while the share is disputed)."""
    import secrets
    import time

    from node.p2p.chunks import AccessTerms, sign_access
    from node.storage.unixfs import parse_cid

    ready = False
    root = bytes(source.root)

    def ensure() -> None:
        nonlocal ready
        if ready:
            return
        info = client.get_artifact(root)
        if not info.get("complete"):
            node = client.node_info()
            if node.get("peerId") is None:
                raise CliError(
                    "the node lacks blocks of the dataset and has no peer-to-peer network to "
                    "fetch them with"
                )
            key = signer()
            terms = AccessTerms(
                chain_id=ChainId(chain_id),
                root=root,
                address=key.address,
                peer_id=_unhex(node["peerId"], "peer id"),
                grant_id=Hash32(_unhex(pid)),
                expires_ms=TimestampMs(int(time.time() * 1000) + ACCESS_LIFETIME_MS),
                nonce=int.from_bytes(secrets.token_bytes(8), "big"),
            )
            src = _Source(
                {"id": _hex(source.id), "rootCid": str(parse_cid(root))},
                root,
                None,
                True,
                access=sign_access(key, terms).encode(),
            )
            _run_fetch(client, src, DEFAULT_GET_TIMEOUT, "fetch")
        ready = True

    from node.artifact_service import UnknownArtifact

    def get(cid: bytes) -> bytes | None:
        ensure()
        try:
            return client.get_block_bytes(cid)
        except UnknownArtifact:
            return None

    return get


def _fee_for(client: Client, raw: bytes, cache: dict[tuple[int, int], int]) -> int:
    """The estimated cost plus the tip; parts of one size cost the same, so it is asked once."""
    from node.consensus.txs import decode_transaction

    kind = decode_transaction(raw).tx.kind
    cost = cache.get((kind, len(raw)))
    if cost is None:
        cost = cache[(kind, len(raw))] = int(client.estimate_fee(raw))
    return cost + cost // TIP_DIVISOR


def _send_dispute(
    args: argparse.Namespace,
    client: Client,
    key: crypto.PrivateKey,
    chain_id: int,
    bodies: Sequence[Record],
) -> list[dict[str, Any]]:
    """Sign ``bodies`` with consecutive nonces, check the balance covers every fee, send them in
    nonce order and (unless ``--no-wait``) wait for each receipt in turn."""
    from node.dispute_client import body_kind

    fee_arg = _fee_option(args)
    nonce = client.pending_nonce(key.address)
    cache: dict[tuple[int, int], int] = {}
    signed = []
    for i, body in enumerate(bodies):
        if fee_arg is None:
            fee = _fee_for(
                client, make_transaction(key, chain_id, nonce + i, 0, body).encode(), cache
            )
        else:
            fee = fee_arg
        signed.append((make_transaction(key, chain_id, nonce + i, fee, body), fee, body))
    total = sum(fee for _, fee, _ in signed)
    balance = client.get_account(key.address).balance
    if balance < total:
        raise CliError(
            f"insufficient funds: {to_checksum(key.address)} has {format_nsd(balance)} NSD, the "
            f"dispute's {len(signed)} transaction(s) cost {format_nsd(total)} NSD in fees"
        )
    sent: list[dict[str, Any]] = []
    for i, (tx, fee, body) in enumerate(signed):
        try:
            tx_id = client.send_raw_transaction(tx.encode())
        except (NeuroSeedError, ClientError) as exc:
            if not sent:
                raise
            raise CliError(
                f"sending transaction {i + 1} of {len(signed)} failed ({exc}); the first {i} were "
                "sent: run the same command again to post the rest"
            ) from None
        sent.append(
            {"txId": _hex(tx_id), "kind": body_kind(body), "nonce": nonce + i, "fee": str(fee)}
        )
    if args.no_wait:
        return sent
    if not args.json:
        print(
            f"sent {len(sent)} transaction(s); waiting until they are final "
            f"(up to {args.timeout:g} s each)",
            file=sys.stderr,
        )
    for i, item in enumerate(sent):
        receipt = client.wait_for_receipt(item["txId"], timeout=args.timeout)
        item["receipt"] = receipt
        if not receipt.get("success"):
            raise CliError(
                f"dispute transaction {i + 1} of {len(sent)} ({item['kind']}, {item['txId']}) "
                f"failed: {receipt.get('error') or 'no reason'}"
            )
    return sent


def _event_attributes(receipt: dict[str, Any] | None, names: Sequence[str]) -> dict[str, Any]:
    """The attributes of the receipt's first event named one of ``names``."""
    for event in (receipt or {}).get("events", []):
        if event.get("name") in names:
            return {a.get("key"): a.get("value") for a in event.get("attributes", [])}
    return {}


def _amount_attr(value: Any) -> int | None:
    if isinstance(value, str) and value.startswith("0x"):
        return int(value[2:] or "0", 16)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def cmd_dataset_dispute(args: argparse.Namespace) -> int:
    from node.consensus.params import VotableParams
    from node.consensus.state import PARAMS_KEY
    from node.dispute_client import (
        BlockArtifact,
        body_kind,
        plan_dispute,
        plan_resume,
        require_disputable,
        select_share,
        total_leaf_bytes,
    )
    from node.economy.datasets import DatasetRecord, dataset_key
    from node.economy.purchases import (
        LeafDispute,
        PurchaseRecord,
        ShareState,
        leaf_dispute_key,
        purchase_key,
    )

    pid = _purchase_id_arg(args.purchase)
    if args.leaf is not None and args.leaf < 1:
        raise CliError("--leaf: data leaves start at 1 (leaf 0 is the public header)")
    source_id: bytes | None = None
    if args.source is not None:
        ref = _dataset_ref(args.source)
        if not ref.startswith("0x") or len(ref) != 66:
            raise CliError(f"--source {args.source!r}: expected a dataset id (0x + 64 hex digits)")
        source_id = bytes.fromhex(ref[2:])
    if not args.dry_run:
        _fee_option(args)
    kept = _kept_purchase(args, pid)
    secret = _unhex(kept["privateKey"], "private key")
    buyer = Address(_unhex(kept["buyer"], "buyer"))
    signer = _Signer(args, buyer)
    with _client(args) as client:
        chain_id = client.chain_id()  # fails fast (exit 3)
        raw = _state_value(client, purchase_key(bytes.fromhex(pid[2:])))
        if raw is None:
            raise CliError(f"purchase {pid} is not on chain (yet)")
        purchase = PurchaseRecord.decode(raw)
        if purchase.buyer != buyer:
            raise CliError(
                f"purchase {pid} was made by {to_checksum(purchase.buyer)}, not by "
                f"{to_checksum(buyer)} as the kept key file says"
            )
        index = select_share(purchase, source_id)
        share = purchase.shares[index]
        require_disputable(share, client.block_number() + 1)
        raw = _state_value(client, dataset_key(share.source))
        if raw is None:  # pragma: no cover - a share's source is never deleted
            raise CliError(f"source 0x{share.source.hex()} of the purchase is not on chain")
        source = DatasetRecord.decode(raw)
        raw = _state_value(client, PARAMS_KEY)
        if raw is None:  # pragma: no cover - written at genesis
            raise CliError("the node sent no chain parameters")
        max_tx_bytes = VotableParams.decode(raw).max_tx_bytes
        artifact = BlockArtifact(
            source.root, _dispute_blocks(client, source, pid, signer, chain_id)
        )
        if share.state == ShareState.LEAF_DISPUTE:
            raw = _state_value(client, leaf_dispute_key(purchase.id, index))
            if raw is None:  # pragma: no cover - written with the LEAF_DISPUTE state
                raise CliError("the open leaf dispute's record is missing on chain")
            dispute = LeafDispute.decode(raw)
            if args.leaf is not None and args.leaf != dispute.leaf_index:
                raise CliError(
                    f"--leaf {args.leaf}: a dispute over leaf {dispute.leaf_index} is already "
                    "open on this share; run without --leaf to finish it"
                )
            plan = plan_resume(
                purchase, index, source, dispute, artifact, max_tx_bytes=max_tx_bytes
            )
        else:
            plan = plan_dispute(
                purchase,
                index,
                source,
                secret,
                artifact,
                max_tx_bytes=max_tx_bytes,
                leaf=args.leaf,
            )
        kinds: dict[str, int] = {}
        for body in plan.bodies:
            kinds[body_kind(body)] = kinds.get(body_kind(body), 0) + 1
        summary = {
            "purchase": pid,
            "source": _hex(plan.source),
            "leaf": plan.leaf_index,
            "verdict": plan.verdict.name.lower(),
            "finding": plan.reason,
            "refund": str(plan.refund),
            "resumed": plan.resumed,
            "leafBytes": total_leaf_bytes(plan.bodies),
        }
        if args.dry_run:
            if args.json:
                _print_json(
                    {
                        **summary,
                        "dryRun": True,
                        "transactions": [
                            {"kind": body_kind(b), "bodyBytes": len(b.encode())}
                            for b in plan.bodies
                        ],
                    }
                )
            else:
                print(_rows(_dispute_rows(summary, kinds)))
                print("dry run: nothing sent", file=sys.stderr)
            return EXIT_OK
        sent = _send_dispute(args, client, signer(), chain_id, plan.bodies)
        final: Any = None
        if not args.no_wait:
            raw = _state_value(client, purchase_key(purchase.id))
            final = None if raw is None else PurchaseRecord.decode(raw).shares[index]
    outcome: dict[str, Any] | None = None
    if final is not None:
        last = sent[-1].get("receipt")
        attrs = _event_attributes(last, ("key_dispute", "leaf_dispute"))
        outcome = {
            "state": ShareState(final.state).name.lower(),
            "refunded": str(_amount_attr(attrs.get("refunded")) or 0),
            "slashed": str(_amount_attr(attrs.get("slashed")) or 0),
        }
    if args.json:
        _print_json({**summary, "dryRun": False, "transactions": sent, "outcome": outcome})
    else:
        rows = _dispute_rows(summary, kinds)
        rows.append(
            (
                "transactions",
                ", ".join(t["txId"] for t in sent[:2])
                + (f", … ({len(sent)} in all)" if len(sent) > 2 else ""),
            )
        )
        if outcome is None:
            rows.append(("status", "sent (not waiting for finality)"))
        elif outcome["state"] == "owner_fault":
            rows.append(("verdict", "the owner was at fault"))
            rows.append(("refunded", f"{format_nsd(int(outcome['refunded']))} NSD to you"))
            rows.append(("owner slashed", f"{format_nsd(int(outcome['slashed']))} NSD"))
        else:
            rows.append(("share", outcome["state"]))
        print(_rows(rows))
    if outcome is not None and outcome["state"] != "owner_fault":
        raise CliError(f"the dispute did not refund the share: it is {outcome['state']}")
    return EXIT_OK


def _dispute_rows(summary: dict[str, Any], kinds: dict[str, int]) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("purchase", summary["purchase"]),
        ("source", summary["source"]),
        ("finding", summary["finding"]),
        ("expected verdict", summary["verdict"]),
        ("refund", f"{format_nsd(int(summary['refund']))} NSD"),
        ("to send", ", ".join(f"{n} × {k}" for k, n in kinds.items())),
    ]
    if summary["leafBytes"]:
        rows.append(("leaf bytes on chain", summary["leafBytes"]))
    return rows


def _dataset_rows(record: dict[str, Any]) -> list[tuple[str, object]]:
    price = int(record["price"])
    rows: list[tuple[str, object]] = [
        ("id", record["id"]),
        ("name", record["name"]),
        ("kind", "composite" if record.get("isComposite") else "dataset"),
        ("owner", to_checksum(Address(_unhex(record["owner"], "owner")))),
        ("rows", record["rows"]),
        ("price", f"{format_nsd(price)} NSD" if price else "free"),
    ]
    if record.get("rootCid"):
        rows.append(("CID", record["rootCid"]))
    if record.get("license"):
        rows.append(("license", record["license"]))
    if record.get("description"):
        rows.append(("description", record["description"]))
    schema = ", ".join(
        f"{s['name']} {s['dtype']}[{','.join(str(d) for d in s['rowShape'])}]"
        for s in record.get("schema", [])
    )
    rows.append(("schema (per row)", schema or "-"))
    rows.append(("registered at", record["height"]))
    return rows


def cmd_dataset_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = _require_dataset(client, args.dataset)
    if args.json:
        _print_json(record)
    else:
        print(_rows(_dataset_rows(record)))
        for i, e in enumerate(record.get("composite") or []):
            print(f"  part {i}: {e['source']} rows [{e['start']}, {e['end']})")
    return EXIT_OK


def cmd_dataset_list(args: argparse.Namespace) -> int:
    owner = _address_arg(args.owner, "--owner") if args.owner else None
    if not 1 <= args.limit <= 100:
        raise CliError("--limit: expected 1 to 100")
    with _client(args) as client:
        page = client.list_datasets(
            owner=owner,
            priced=True if args.priced else False if args.free else None,
            composite=True if args.composite else None,
            text=args.text,
            cursor=args.cursor,
            limit=args.limit,
        )
    if args.json:
        _print_json(page)
        return EXIT_OK
    datasets = page.get("datasets", [])
    if not datasets:
        print("no datasets", file=sys.stderr)
    for d in datasets:
        price = int(d["price"])
        kind = "composite" if d.get("isComposite") else "dataset"
        print(
            f"{d['id']}  {kind:9}  {d['rows']:>10} rows  "
            f"{(format_nsd(price) + ' NSD') if price else 'free':>28}  {d['name']}"
        )
    if page.get("nextCursor"):
        print(f"more: --cursor {page['nextCursor']}", file=sys.stderr)
    return EXIT_OK


def _parse_role(text: str) -> int:
    from node.economy.api import Role

    key = text.strip().lower().replace("-", "_")
    if key.isdigit() and int(key) in {r.value for r in Role}:
        return int(key)
    try:
        return int(Role[key.upper()])
    except KeyError:
        raise CliError(f"unknown role {text!r}; one of {', '.join(ROLE_NAMES)}") from None


def cmd_role_register(args: argparse.Namespace) -> int:
    from node.economy.roles import RoleRegister

    role = _parse_role(args.role)
    metadata = (args.metadata or "").encode("utf-8")
    if len(metadata) > 1024:
        raise CliError("--metadata: at most 1024 bytes of UTF-8")
    _fee_option(args)
    name = ROLE_NAMES[role - 1]
    with _client(args) as client:
        bond = _role_bond(client, role)
    fields: list[tuple[str, str, object, object]] = [("role", name, "role", name)]
    return _sign_send_wait(args, RoleRegister(role, metadata), fields, spend=bond)


def _role_bond(client: Client, role: int) -> int:
    """The bond the role locks (read from the chain's economy params)."""
    from node.economy.api import DEFAULT_ECONOMY_PARAMS, ECONOMY_PARAMS_KEY, EconomyParams
    from node.economy.roles import required_bond

    proof = client.get_proof(ECONOMY_PARAMS_KEY)
    params = DEFAULT_ECONOMY_PARAMS if proof.value is None else EconomyParams.decode(proof.value)
    return int(required_bond(params, role))


def cmd_role_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.address is not None:
            address = _address_arg(args.address, "address")
        else:
            address = _sender_address(args)
        roles = client.get_roles(address)
    if args.json:
        _print_json(roles)
        return EXIT_OK
    entries = roles.get("roles", [])
    if not entries:
        print(f"{to_checksum(address)} holds no roles")
    for e in entries:
        bond = int(e["bond"])
        print(
            f"{e.get('name') or e['role']}: since height {e['since']}, bond "
            f"{format_nsd(bond)} NSD, open obligations {e['obligations']}"
        )
    return EXIT_OK


# --- argument parsing ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The same options on the top parser and every subcommand, so they go before or after it.

    On subcommands the defaults are SUPPRESS: a value given before the subcommand is not
    overwritten by the subcommand's default.
    """

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    g = parser.add_argument_group("global options")
    g.add_argument(
        "--datadir",
        metavar="PATH",
        default=default(None),
        help=f"data directory (default: ${ENV_DATADIR} or {DEFAULT_DATADIR}; "
        f"{DEVNET_DATADIR} for devnet)",
    )
    g.add_argument(
        "--rpc",
        metavar="URL",
        default=default(None),
        help=f"node JSON-RPC URL (default: from the data directory's config, else {DEFAULT_RPC_URL})",
    )
    g.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="debug logging and tracebacks on errors",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neuroseed")
    except PackageNotFoundError:
        return "(not installed)"


def _add_sender_options(p: argparse.ArgumentParser) -> None:
    """The options every ``tx`` kind shares: the sender's key, the fee, waiting."""
    sender = p.add_mutually_exclusive_group()
    sender.add_argument(
        "--from",
        dest="sender",
        metavar="ADDRESS",
        help="keystore key to send from (default: the only key in the keystore)",
    )
    sender.add_argument(
        "--dev-key",
        metavar="N",
        type=int,
        help="DEVNET ONLY: sign with public dev key N (node.devkeys), no keystore",
    )
    p.add_argument(
        "--fee", metavar="NSD", help="fee in NSD (default: the estimated cost plus a 10%% tip)"
    )
    p.add_argument("--password-file", metavar="FILE", help="key password from this file")
    p.add_argument(
        "--no-wait", action="store_true", help="return once sent, without waiting for finality"
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=DEFAULT_TX_TIMEOUT,
        help=f"seconds to wait for finality (default {DEFAULT_TX_TIMEOUT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="neuroseed",
        description="NeuroSeed node and wallet command line.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 node unreachable",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        group: Any, name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_)
        _add_global_options(p, top=False)
        p.set_defaults(handler=handler)
        return p

    p = command(commands, "init", cmd_init, "initialise a data directory from a genesis file")
    p.add_argument(
        "--genesis",
        metavar="PATH",
        help="genesis file (default: the data directory's, else the repository's genesis.json)",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        help="import the public devnet validator key and make it this node's validator",
    )
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="with --dev: encrypt the dev key with this file's first line "
        "(default: the public dev password)",
    )

    keys = commands.add_parser("keys", help="manage the keystore (<datadir>/keystore)")
    _add_global_options(keys, top=False)
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = command(key_commands, "new", cmd_keys_new, "create a new encrypted key")
    p.add_argument("--password-file", metavar="FILE", help="password from this file's first line")
    command(key_commands, "list", cmd_keys_list, "list the keystore's addresses")
    p = command(key_commands, "import", cmd_keys_import, "import a hex private key")
    p.add_argument("private_key", nargs="?", help=argparse.SUPPRESS)
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help="read the hex private key from FILE (default: prompt; never on the command line)",
    )
    p.add_argument("--password-file", metavar="FILE", help="password from this file's first line")
    p = command(key_commands, "export", cmd_keys_export, "print a key's hex private key")
    p.add_argument("address", nargs="?", help="the key's address (default: the only key)")
    p.add_argument("--password-file", metavar="FILE", help="password from this file's first line")
    p.add_argument(
        "--yes-show-private-key",
        action="store_true",
        help="confirm that the private key may be printed in clear",
    )

    p = command(commands, "run", cmd_run, "run a node")
    p.add_argument(
        "--provide-compute",
        action="store_true",
        help="run compute-market tasks for others with the operator account ([compute] limits)",
    )
    p.add_argument("--rpc-host", metavar="HOST", help="JSON-RPC listen host")
    p.add_argument("--rpc-port", metavar="PORT", type=int, help="JSON-RPC listen port")
    p.add_argument(
        "--validator",
        metavar="ADDRESS",
        help="validate with this keystore key (default: validator.address in the config)",
    )
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="validator key password (default: the config's, else a prompt)",
    )

    p = command(
        commands,
        "devnet",
        cmd_devnet,
        "initialise (once) and run a local devnet: N validators and M full nodes, each its own "
        "process, on 127.0.0.1",
    )
    p.add_argument(
        "--validators",
        metavar="N",
        type=int,
        default=DEVNET_VALIDATORS,
        help=f"validators, dev keys 0..N-1 (default {DEVNET_VALIDATORS}); with --nodes 0 and "
        "N = 1 the one validator runs in this process, data directly in --datadir",
    )
    p.add_argument(
        "--nodes",
        metavar="M",
        type=int,
        default=DEVNET_NODES,
        help=f"full (non-validator) nodes (default {DEVNET_NODES})",
    )
    p.add_argument(
        "--provide-compute",
        action="store_true",
        help="the full nodes run the compute agent with their operator accounts (register the "
        "compute_provider role and send `compute offer` to start claiming tasks)",
    )
    p.add_argument("--rpc-host", metavar="HOST", help="JSON-RPC listen host (default 127.0.0.1)")
    p.add_argument(
        "--rpc-port",
        metavar="BASE",
        type=int,
        help="JSON-RPC port of node 0, node i gets BASE+i (default 8645; 0: ephemeral ports)",
    )
    p.add_argument(
        "--p2p-port",
        metavar="BASE",
        type=int,
        help="libp2p port of node 0 on 127.0.0.1, node i gets BASE+i "
        "(default 8745; 0: free ports picked at each start)",
    )
    p.add_argument(
        "--genesis",
        metavar="PATH",
        help="take the chain parameters (chain id, timeouts, fees, balances) from this genesis "
        "when the devnet is created (default: the repository's genesis.json)",
    )
    p.add_argument(
        "--init-only",
        action="store_true",
        help="create (or update) the devnet's directories and configs, then exit",
    )

    command(commands, "status", cmd_status, "show the node's status")
    p = command(commands, "balance", cmd_balance, "show an account's balance and nonce")
    p.add_argument("address", metavar="ADDRESS")

    tx = commands.add_parser("tx", help="send transactions")
    _add_global_options(tx, top=False)
    tx_commands = tx.add_subparsers(dest="tx_command", metavar="KIND", required=True)
    p = command(tx_commands, "transfer", cmd_tx_transfer, "send NSD and wait until final")
    p.add_argument("--to", metavar="ADDRESS", required=True, help="recipient address")
    p.add_argument(
        "--amount", metavar="NSD", required=True, help="amount in NSD, up to 18 decimals (1.5)"
    )
    p.add_argument("--memo", metavar="TEXT", help=f"memo (at most {MAX_MEMO_BYTES} bytes)")
    _add_sender_options(p)
    p = command(
        tx_commands,
        "bond",
        cmd_tx_bond,
        "lock NSD as validator bond (a candidate once it reaches the minimum bond)",
    )
    p.add_argument(
        "--amount", metavar="NSD", required=True, help="bond to add in NSD, up to 18 decimals"
    )
    _add_sender_options(p)
    p = command(
        tx_commands,
        "unbond",
        cmd_tx_unbond,
        "leave the validator set; the bond returns after the unbonding period",
    )
    _add_sender_options(p)
    p = command(
        tx_commands,
        "validator-vote",
        cmd_tx_validator_vote,
        "as a validator, vote to add a bonded candidate to the set or remove a validator",
    )
    p.add_argument("--subject", metavar="ADDRESS", required=True, help="who the vote is about")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--add", action="store_true", help="add the (bonded) candidate")
    action.add_argument("--remove", action="store_true", help="remove the validator")
    _add_sender_options(p)
    _add_dataset_commands(commands, command)
    from node import cli_compute, cli_models, cli_storage

    cli_storage.register(commands)
    cli_models.register(commands)
    cli_compute.register(commands)
    return parser


def _add_dataset_commands(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """``dataset …`` and ``role …``."""
    dataset = commands.add_parser("dataset", help="publish, buy and fetch datasets")
    _add_global_options(dataset, top=False)
    ds = dataset.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    p = command(
        ds,
        "add",
        cmd_dataset_add,
        "upload a safetensors file to the local node (converted to artifact format v1; encrypted "
        "when priced) and register it as a dataset",
    )
    p.add_argument("file", metavar="FILE", help="a safetensors file whose tensors share rows")
    p.add_argument("--name", required=True, help="the dataset's name (at most 128 bytes)")
    p.add_argument(
        "--price",
        metavar="NSD",
        required=True,
        help="price per purchase in NSD; 0 = free (a priced dataset is registered by the "
        "node's operator account)",
    )
    p.add_argument("--description", default="", help="free text (at most 4 KiB)")
    p.add_argument("--license", default="", help="license name (at most 128 bytes)")
    _add_sender_options(p)
    p = command(
        ds,
        "get",
        cmd_dataset_get,
        "fetch a dataset (or a composite: only the blocks it needs) through the local node and "
        "write it as a safetensors file; resumable",
    )
    p.add_argument("dataset", metavar="CID|ID", help="root CID or dataset id (0x…)")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write it")
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=DEFAULT_GET_TIMEOUT,
        help=f"seconds to wait for the fetch (default {DEFAULT_GET_TIMEOUT:g})",
    )
    _add_signer_options(p, "for a priced dataset: the account that bought it")
    p = command(
        ds,
        "compose",
        cmd_dataset_compose,
        "define a composite dataset from row ranges of existing ones (no data copied)",
    )
    p.add_argument(
        "--part",
        metavar="SRC:START:END[:t1,t2]",
        action="append",
        default=[],
        help="rows [START, END) of dataset SRC (id or CID), optionally only some tensors; "
        "repeat in order",
    )
    p.add_argument("--name", required=True, help="the composite's name")
    p.add_argument("--price", metavar="NSD", required=True, help="price per purchase in NSD")
    p.add_argument("--description", default="", help="free text")
    p.add_argument("--license", default="", help="license name")
    _add_sender_options(p)
    p = command(
        ds,
        "buy",
        cmd_dataset_buy,
        "buy a priced dataset: a one-off key is kept in <datadir>/keystore/purchases/ and the "
        "price is escrowed until the owner posts the content key",
    )
    p.add_argument("dataset", metavar="ID|CID", help="dataset id (0x…) or root CID")
    p.add_argument("--max-price", metavar="NSD", help="refuse to pay more than this")
    p.add_argument(
        "--wait", action="store_true", help="also wait until the owner has posted the key"
    )
    _add_sender_options(p)
    p = command(
        ds,
        "dispute",
        cmd_dataset_dispute,
        "dispute the content key a seller posted for your purchase: checks the key and the stored "
        "ciphertext with the purchase's one-off key and, if the seller is at fault, posts the "
        "proof (the key, or a leaf that does not decrypt) to get the price back",
    )
    p.add_argument("purchase", metavar="PURCHASE_ID", help="the purchase id `dataset buy` printed")
    p.add_argument(
        "--source",
        metavar="ID",
        help="the source dataset to dispute (needed when a composite has several priced sources)",
    )
    p.add_argument(
        "--leaf", metavar="N", type=int, help="check data leaf N (1, 2, ...) only, not every leaf"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="decide and show the dispute without sending it"
    )
    _add_sender_options(p)
    p = command(ds, "list", cmd_dataset_list, "list registered datasets")
    p.add_argument("--owner", metavar="ADDRESS", help="only this owner's")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--priced", action="store_true", help="only priced ones")
    kind.add_argument("--free", action="store_true", help="only free ones")
    p.add_argument("--composite", action="store_true", help="only composites")
    p.add_argument("--text", metavar="TEXT", help="name or description contains TEXT")
    p.add_argument("--limit", metavar="N", type=int, default=20, help="at most N (max 100)")
    p.add_argument("--cursor", metavar="HEX", help="continue after this id (from a previous page)")
    p = command(ds, "show", cmd_dataset_show, "show one dataset or composite")
    p.add_argument("dataset", metavar="ID|CID", help="dataset id (0x…) or root CID")

    role = commands.add_parser("role", help="on-chain roles (data supplier, customer, …)")
    _add_global_options(role, top=False)
    rs = role.add_subparsers(dest="role_command", metavar="ACTION", required=True)
    p = command(
        rs, "register", cmd_role_register, "register a role for the sender (locks its bond)"
    )
    p.add_argument("role", metavar="ROLE", help=", ".join(ROLE_NAMES))
    p.add_argument("--metadata", metavar="TEXT", help="public metadata (at most 1 KiB)")
    _add_sender_options(p)
    p = command(rs, "show", cmd_role_show, "show the roles of an address")
    p.add_argument("address", metavar="ADDRESS", nargs="?", help="default: the sender key's")
    _add_signer_options(p, "whose roles (default: the only keystore key)")


def _add_signer_options(p: argparse.ArgumentParser, what: str) -> None:
    """The key options of commands that sign but send no transaction themselves."""
    sender = p.add_mutually_exclusive_group()
    sender.add_argument("--from", dest="sender", metavar="ADDRESS", help=f"keystore key ({what})")
    sender.add_argument(
        "--dev-key",
        metavar="N",
        type=int,
        help="DEVNET ONLY: public dev key N (node.devkeys), no keystore",
    )
    p.add_argument("--password-file", metavar="FILE", help="key password from this file")


# --- entry point -----------------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _report(exc: BaseException) -> int:
    """``error: <message>`` on stderr for an expected failure; returns the exit code."""
    if isinstance(exc, BaseExceptionGroup):
        # Errors out of the node's nurseries: report the first one the user can act on.
        leaves = _leaves(exc)
        exc = next(
            (e for e in leaves if isinstance(e, NeuroSeedError | CliError | ClientError)),
            leaves[0],
        )
    code = EXIT_ERROR
    if isinstance(exc, CliError):
        message, code = exc.message, exc.exit_code
    elif isinstance(exc, TransportError):
        message = (
            f"{exc} (is the node running? start one with `neuroseed run` or `neuroseed devnet`, "
            "or pass --rpc URL)"
        )
        code = EXIT_UNREACHABLE
    elif isinstance(exc, NodeUnavailable):
        message, code = f"the node is unavailable: {exc.message}", EXIT_UNREACHABLE
    elif isinstance(exc, RpcError):
        message = f"the node refused: {exc.message}"
    elif isinstance(exc, NeuroSeedError):
        message = exc.message
    elif isinstance(exc, ClientError):
        message = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        message, code = "interrupted", EXIT_INTERRUPTED
    elif isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}"
    else:
        message = f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)"
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # The reader went away (`neuroseed status | head -1`): not an error worth a message.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:
        if args.verbose:
            traceback.print_exc()
        return _report(exc)

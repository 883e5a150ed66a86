"""Node settings that are not consensus (DESIGN §5, §11): ``NodeConfig`` and the data directory.

A node's data directory holds everything it owns::

    <data_dir>/config.toml      these settings (every key optional; defaults below)
    <data_dir>/genesis.json     the chain this data directory belongs to
    <data_dir>/chain/           the LevelDB chain database
    <data_dir>/keystore/        encrypted key files (mode 0700, files 0600)
    <data_dir>/consensus.wal    the validator's consensus write-ahead log
    <data_dir>/node.lock        held while a node runs, so two processes never share the data
    <data_dir>/blobs/           the artifact blob store (blocks + its own index; not the chain DB)
    <data_dir>/artifact-keys/   content keys of priced datasets this node uploaded (mode 0700,
                                files 0600; never logged)
    <data_dir>/uploads/         uploads being received (temp files, removed on any failure)

Settings come from ``config.toml`` and then from command-line flags (``overrides``); every value
is validated and an error names the key. ``config.toml`` layout::

    [rpc]        host, port, max_body_bytes, max_batch, admin_enabled
    [p2p]        listen (multiaddrs), bootstrap (multiaddrs)
    [validator]  address, password_file (relative paths are inside the data directory)
    [mempool]    max_txs, max_bytes, max_future_per_sender
    [artifacts]  quota_bytes, upload_max_bytes, upload_remote
    [operator]   address, password_file, password_env (the account that signs the node's own
                 transactions: key posts, deals; without it those agents are off)
    [log]        level
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.consensus.txs import MAX_TX_BYTES_HARD
from node.devkeys import DEV_PASSWORD, DEV_VALIDATOR_INDEX, dev_key
from node.errors import ConfigError
from node.genesis import (
    Genesis,
    genesis_hash,
    load_genesis,
    parse_address,
    read_genesis,
    to_checksum,
)
from node.keystore import Keystore, ScryptParams
from node.types import Address

CONFIG_FILE = "config.toml"
GENESIS_FILE = "genesis.json"
CHAIN_DIR = "chain"
KEYSTORE_DIR = "keystore"
WAL_FILE = "consensus.wal"
LOCK_FILE = "node.lock"
BLOBS_DIR = "blobs"
ARTIFACT_KEYS_DIR = "artifact-keys"
UPLOADS_DIR = "uploads"
DEV_PASSWORD_FILE = "validator.password"

DEFAULT_RPC_HOST = "127.0.0.1"
DEFAULT_RPC_PORT = 8645
# Loopback and an ephemeral port unless the operator opens it: a node never listens on public
# interfaces by surprise. Set e.g. "/ip4/0.0.0.0/tcp/8646" in config.toml to join a network.
DEFAULT_P2P_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_CONFIG_FILE_BYTES = 1 << 20
DEFAULT_BLOB_QUOTA_BYTES = 20 << 30
DEFAULT_UPLOAD_MAX_BYTES = 4 << 30
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_MULTIADDR_RE = re.compile(r"^(/[^/\s]+)+$")


@dataclass(frozen=True, slots=True)
class DataDirLayout:
    """Where each thing lives inside a data directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def genesis(self) -> Path:
        return self.root / GENESIS_FILE

    @property
    def chain(self) -> Path:
        return self.root / CHAIN_DIR

    @property
    def keystore(self) -> Path:
        return self.root / KEYSTORE_DIR

    @property
    def consensus_wal(self) -> Path:
        return self.root / WAL_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def blobs(self) -> Path:
        return self.root / BLOBS_DIR

    @property
    def artifact_keys(self) -> Path:
        return self.root / ARTIFACT_KEYS_DIR

    @property
    def uploads(self) -> Path:
        return self.root / UPLOADS_DIR


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Validated node settings; every instance is checked on construction."""

    data_dir: Path
    rpc_host: str = DEFAULT_RPC_HOST
    rpc_port: int = DEFAULT_RPC_PORT
    # A JSON-RPC request may carry a hex transaction of up to 2 x MAX_TX_BYTES_HARD plus framing.
    rpc_max_body_bytes: int = 8 << 20
    rpc_max_batch: int = 100
    admin_rpc_enabled: bool = False
    p2p_listen_addrs: tuple[str, ...] = DEFAULT_P2P_LISTEN
    p2p_bootstrap_peers: tuple[str, ...] = ()
    validator_address: Address | None = None
    validator_password_file: Path | None = None
    mempool_max_txs: int = 10_000
    mempool_max_bytes: int = 64 << 20
    mempool_max_future_per_sender: int = 64  # DESIGN §4: bounded queue of future nonces
    # Artifacts (DESIGN §7): the blob store's quota and the local upload endpoint's limits.
    blob_quota_bytes: int = DEFAULT_BLOB_QUOTA_BYTES
    upload_max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES
    upload_remote: bool = (
        False  # serve POST /artifacts (and local-only RPC) to non-loopback callers
    )
    # The node's operator account: signs its own transactions (key posts, storage deals).
    operator_address: Address | None = None
    operator_password_file: Path | None = None
    operator_password_env: str | None = None  # name of an environment variable with the password
    # The compute market (node/compute_agent.py): run tasks for others (needs an operator).
    compute_enabled: bool = False
    compute_max_concurrent: int = 1
    compute_memory_bytes: int = 4 << 30
    compute_wall_seconds: int = 3600
    compute_device: str = "cpu"
    compute_threads: int = 1
    compute_price_per_device_second: int = 1
    compute_claim_margin_heights: int = 10
    compute_tasks_per_block: int = 512
    log_level: str = "info"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def layout(self) -> DataDirLayout:
        return DataDirLayout(self.data_dir)

    @property
    def password_file_path(self) -> Path | None:
        """The validator password file, relative paths taken inside the data directory."""
        if self.validator_password_file is None:
            return None
        return self.data_dir / self.validator_password_file

    @property
    def operator_password_path(self) -> Path | None:
        """The operator password file, relative paths taken inside the data directory."""
        if self.operator_password_file is None:
            return None
        return self.data_dir / self.operator_password_file

    def with_overrides(self, overrides: Mapping[str, object]) -> NodeConfig:
        """A copy with CLI values applied; ``None`` values mean "flag not given" and are skipped."""
        names = {f.name for f in dataclasses.fields(NodeConfig)} - {"data_dir"}
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in names:
                raise ConfigError(f"unknown setting {name!r}")
            if value is None:
                continue
            changes[name] = _coerce_override(name, value)
        return dataclasses.replace(self, **changes)


# --- validation --------------------------------------------------------------------------------


def _validate(c: NodeConfig) -> None:
    if not isinstance(c.data_dir, Path):
        raise ConfigError("data_dir: expected a path")
    _check_host(c.rpc_host, "rpc.host")
    _check_int(c.rpc_port, "rpc.port", 0, 65535)  # 0: an ephemeral port, printed at start
    _check_int(c.rpc_max_body_bytes, "rpc.max_body_bytes", 4096, 1 << 30)
    _check_int(c.rpc_max_batch, "rpc.max_batch", 1, 10_000)
    _check_bool(c.admin_rpc_enabled, "rpc.admin_enabled")
    # DESIGN §11: admin_* is localhost only; an admin endpoint on a public interface is refused
    # rather than silently exposed.
    if c.admin_rpc_enabled and not _is_loopback(c.rpc_host):
        raise ConfigError(
            f"rpc.admin_enabled: the admin namespace is served only on a loopback host, "
            f"not {c.rpc_host!r}"
        )
    _check_multiaddrs(c.p2p_listen_addrs, "p2p.listen")
    _check_multiaddrs(c.p2p_bootstrap_peers, "p2p.bootstrap")
    if c.validator_address is not None and (
        type(c.validator_address) is not bytes or len(c.validator_address) != 20
    ):
        raise ConfigError("validator.address: expected a 20-byte address")
    if c.validator_password_file is not None:
        if not isinstance(c.validator_password_file, Path):
            raise ConfigError("validator.password_file: expected a path")
        if c.validator_address is None:
            raise ConfigError("validator.password_file is set but validator.address is not")
    _check_int(c.mempool_max_txs, "mempool.max_txs", 1, 10_000_000)
    _check_int(c.mempool_max_bytes, "mempool.max_bytes", MAX_TX_BYTES_HARD, 1 << 40)
    _check_int(
        c.mempool_max_future_per_sender, "mempool.max_future_per_sender", 0, c.mempool_max_txs
    )
    _check_int(c.blob_quota_bytes, "artifacts.quota_bytes", 0, 1 << 50)
    _check_int(c.upload_max_bytes, "artifacts.upload_max_bytes", 1, 1 << 44)
    _check_bool(c.upload_remote, "artifacts.upload_remote")
    if c.operator_address is not None and (
        type(c.operator_address) is not bytes or len(c.operator_address) != 20
    ):
        raise ConfigError("operator.address: expected a 20-byte address")
    if c.operator_password_file is not None:
        if not isinstance(c.operator_password_file, Path):
            raise ConfigError("operator.password_file: expected a path")
        if c.operator_address is None:
            raise ConfigError("operator.password_file is set but operator.address is not")
    if type(c.compute_enabled) is not bool:
        raise ConfigError("compute.enabled: expected true or false")
    for name in (
        "compute_max_concurrent",
        "compute_memory_bytes",
        "compute_wall_seconds",
        "compute_threads",
        "compute_price_per_device_second",
        "compute_claim_margin_heights",
        "compute_tasks_per_block",
    ):
        value = getattr(c, name)
        if type(value) is not int or value < 1:
            raise ConfigError(f"compute.{name.removeprefix('compute_')}: expected an integer >= 1")
    if c.compute_device not in ("cpu", "cuda"):
        raise ConfigError('compute.device: expected "cpu" or "cuda"')
    if c.compute_enabled and c.operator_address is None:
        raise ConfigError("compute.enabled needs an operator account (operator.address)")
    if c.operator_password_env is not None:
        if not isinstance(c.operator_password_env, str) or not _ENV_NAME_RE.match(
            c.operator_password_env
        ):
            raise ConfigError("operator.password_env: expected an environment variable name")
        if c.operator_address is None:
            raise ConfigError("operator.password_env is set but operator.address is not")
    if c.log_level not in LOG_LEVELS:
        raise ConfigError(f"log.level: expected one of {', '.join(LOG_LEVELS)}")


def _check_int(value: object, key: str, lo: int, hi: int) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise ConfigError(f"{key}: expected an integer in [{lo}, {hi}]")


def _check_bool(value: object, key: str) -> None:
    if type(value) is not bool:
        raise ConfigError(f"{key}: expected true or false")


def _check_host(value: object, key: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a host name or IP address")
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(value):
        raise ConfigError(f"{key}: {value!r} is not a host name or IP address")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_multiaddrs(value: object, key: str) -> None:
    if not isinstance(value, tuple) or not all(isinstance(a, str) for a in value):
        raise ConfigError(f"{key}: expected a list of multiaddr strings")
    for a in value:
        if not _MULTIADDR_RE.match(a):
            raise ConfigError(f"{key}: {a!r} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/8646)")


# --- config.toml -------------------------------------------------------------------------------

# (section, key) in config.toml -> NodeConfig field
_TOML_KEYS: dict[tuple[str, str], str] = {
    ("rpc", "host"): "rpc_host",
    ("rpc", "port"): "rpc_port",
    ("rpc", "max_body_bytes"): "rpc_max_body_bytes",
    ("rpc", "max_batch"): "rpc_max_batch",
    ("rpc", "admin_enabled"): "admin_rpc_enabled",
    ("p2p", "listen"): "p2p_listen_addrs",
    ("p2p", "bootstrap"): "p2p_bootstrap_peers",
    ("validator", "address"): "validator_address",
    ("validator", "password_file"): "validator_password_file",
    ("mempool", "max_txs"): "mempool_max_txs",
    ("mempool", "max_bytes"): "mempool_max_bytes",
    ("mempool", "max_future_per_sender"): "mempool_max_future_per_sender",
    ("artifacts", "quota_bytes"): "blob_quota_bytes",
    ("artifacts", "upload_max_bytes"): "upload_max_bytes",
    ("artifacts", "upload_remote"): "upload_remote",
    ("operator", "address"): "operator_address",
    ("operator", "password_file"): "operator_password_file",
    ("operator", "password_env"): "operator_password_env",
    ("compute", "enabled"): "compute_enabled",
    ("compute", "max_concurrent"): "compute_max_concurrent",
    ("compute", "memory_bytes"): "compute_memory_bytes",
    ("compute", "wall_seconds"): "compute_wall_seconds",
    ("compute", "device"): "compute_device",
    ("compute", "threads"): "compute_threads",
    ("compute", "price_per_device_second"): "compute_price_per_device_second",
    ("compute", "claim_margin_heights"): "compute_claim_margin_heights",
    ("compute", "tasks_per_block"): "compute_tasks_per_block",
    ("log", "level"): "log_level",
}
_SECTIONS = sorted({s for s, _ in _TOML_KEYS})


def load_config(data_dir: Path | str, overrides: Mapping[str, object] | None = None) -> NodeConfig:
    """Settings of ``data_dir``: defaults, then ``config.toml`` if present, then ``overrides``."""
    root = Path(data_dir).expanduser()
    path = root / CONFIG_FILE
    values: dict[str, Any] = {}
    if path.exists():
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_CONFIG_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        if len(raw) > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(f"{path} exceeds {MAX_CONFIG_FILE_BYTES} bytes")
        values = _values_from_toml(raw, path)
    try:
        config = NodeConfig(data_dir=root, **values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None
    return config.with_overrides(overrides) if overrides else config


def _values_from_toml(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"{path}: unknown section [{section}] (known: {', '.join(_SECTIONS)})"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section}: expected a [{section}] table")
        for key, value in table.items():
            field = _TOML_KEYS.get((section, key))
            if field is None:
                raise ConfigError(f"{path}: unknown key {section}.{key}")
            values[field] = _from_toml_value(field, value, f"{path}: {section}.{key}")
    return values


def _from_toml_value(field: str, value: Any, where: str) -> Any:
    """Turn TOML types into the field's type; range checks happen in NodeConfig."""
    if field in ("p2p_listen_addrs", "p2p_bootstrap_peers"):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of multiaddr strings")
        return tuple(value)
    if field in ("validator_address", "operator_address"):
        return parse_address(value, where)
    if field in ("validator_password_file", "operator_password_file"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a file path")
        return Path(value)
    return value


def _coerce_override(field: str, value: object) -> Any:
    """CLI values arrive as strings, lists or already-typed values; convert the ones that differ."""
    if field in ("p2p_listen_addrs", "p2p_bootstrap_peers") and isinstance(value, list | tuple):
        return tuple(value)
    if field == "validator_address" and isinstance(value, str):
        return parse_address(value, "--validator-address")
    if field == "operator_address" and isinstance(value, str):
        return parse_address(value, "--operator")
    if field in ("validator_password_file", "operator_password_file") and isinstance(
        value, str | Path
    ):
        # A path given on the command line means relative to the working directory, not to
        # the data directory as in config.toml.
        return Path(value).expanduser().absolute()
    if field == "log_level" and isinstance(value, str):
        return value.lower()
    return value


def render_config_toml(config: NodeConfig) -> str:
    """``config.toml`` text for ``config`` (every setting written out, so it documents itself)."""

    def s(text: str) -> str:
        # A JSON string is a valid TOML basic string (same escapes).
        return json.dumps(text)

    def arr(items: tuple[str, ...]) -> str:
        return "[" + ", ".join(s(i) for i in items) + "]"

    lines = [
        "# NeuroSeed node settings (not consensus). Every key is optional.",
        "",
        "[rpc]",
        f"host = {s(config.rpc_host)}",
        f"port = {config.rpc_port}",
        f"max_body_bytes = {config.rpc_max_body_bytes}",
        f"max_batch = {config.rpc_max_batch}",
        "# admin_* methods; served only when host is a loopback address",
        f"admin_enabled = {'true' if config.admin_rpc_enabled else 'false'}",
        "",
        "[p2p]",
        f"listen = {arr(config.p2p_listen_addrs)}",
        f"bootstrap = {arr(config.p2p_bootstrap_peers)}",
        "",
        "[mempool]",
        f"max_txs = {config.mempool_max_txs}",
        f"max_bytes = {config.mempool_max_bytes}",
        f"max_future_per_sender = {config.mempool_max_future_per_sender}",
        "",
        "[artifacts]",
        "# the blob store's size limit; uploads to this node (POST /artifacts) are limited to",
        "# upload_max_bytes and served to loopback callers only unless upload_remote = true",
        f"quota_bytes = {config.blob_quota_bytes}",
        f"upload_max_bytes = {config.upload_max_bytes}",
        f"upload_remote = {'true' if config.upload_remote else 'false'}",
        "",
        "[log]",
        f"level = {s(config.log_level)}",
        "",
    ]
    if config.validator_address is not None:
        lines += [
            "# The key this node signs blocks and votes with (in the keystore directory).",
            "[validator]",
            f"address = {s(to_checksum(config.validator_address))}",
        ]
        if config.validator_password_file is not None:
            lines.append(f"password_file = {s(str(config.validator_password_file))}")
        lines.append("")
    if config.operator_address is not None:
        lines += [
            "# The account that signs this node's own transactions (key posts, storage deals).",
            "[operator]",
            f"address = {s(to_checksum(config.operator_address))}",
        ]
        if config.operator_password_file is not None:
            lines.append(f"password_file = {s(str(config.operator_password_file))}")
        if config.operator_password_env is not None:
            lines.append(f"password_env = {s(config.operator_password_env)}")
        lines.append("")
    return "\n".join(lines)


# --- initialising a data directory ---------------------------------------------------------------


def init_data_dir(
    data_dir: Path | str,
    genesis_path: Path | str,
    *,
    dev: bool,
    password: str | None = None,
    kdf_params: ScryptParams | None = None,
) -> NodeConfig:
    """Prepare ``data_dir`` for ``genesis_path``'s chain and return its settings.

    Copies the genesis, writes a default ``config.toml`` (an existing one is kept) and, with
    ``dev``, imports dev key 0 (the devnet validator; public, see ``node.devkeys``) into the
    keystore under ``password`` (default ``DEV_PASSWORD``), writes that password to
    ``validator.password`` (mode 0600) and names the key as the validator in the config.
    Running it again with the same genesis changes nothing; a different genesis is refused.
    The genesis copy is written last, so an interrupted run can simply be repeated.
    """
    root = Path(data_dir).expanduser()
    layout = DataDirLayout(root)
    genesis, genesis_bytes = read_genesis(genesis_path)
    if not dev and password is not None:
        raise ConfigError(
            "a password is only used with dev=True (to encrypt the dev validator key)"
        )
    if layout.genesis.exists():
        existing = load_genesis(layout.genesis)
        if genesis_hash(existing) != genesis_hash(genesis):
            raise ConfigError(
                f"{root} is already initialised for another chain (chain id {existing.chain_id}, "
                f"genesis {genesis_hash(existing).hex()[:16]}…); use an empty data directory"
            )
        return load_config(root)

    try:
        root.mkdir(parents=True, exist_ok=True)
        config = load_config(root)
        if dev:
            config = _init_dev_validator(
                config, genesis, DEV_PASSWORD if password is None else password, kdf_params
            )
        if not layout.config.exists():
            _write_file(layout.config, render_config_toml(config).encode("utf-8"), mode=0o644)
        # Byte-for-byte copy of what was validated: the operator's file stays the reference.
        _write_file(layout.genesis, genesis_bytes, mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot initialise {root}: {exc.strerror}") from None
    return load_config(root)


def _init_dev_validator(
    config: NodeConfig, genesis: Genesis, password: str, kdf_params: ScryptParams | None
) -> NodeConfig:
    key = dev_key(DEV_VALIDATOR_INDEX)
    if all(v.address != key.address for v in genesis.validators):
        raise ConfigError(
            f"dev mode: the genesis has no validator {to_checksum(key.address)} (dev key "
            f"{DEV_VALIDATOR_INDEX}); use the devnet genesis or init without dev"
        )
    keystore = Keystore(config.layout.keystore)
    if not keystore.has(key.address):
        keystore.import_key(key.secret, password, kdf_params=kdf_params)
    password_file = config.data_dir / DEV_PASSWORD_FILE
    if not password_file.exists():
        _write_file(password_file, password.encode("utf-8") + b"\n", mode=0o600)
    return dataclasses.replace(
        config,
        validator_address=key.address,
        validator_password_file=Path(DEV_PASSWORD_FILE),
    )


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write a new file atomically (temp file with its final mode, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)

"""The node's persistent peer-to-peer identity: a secp256k1 secret in ``<data_dir>/p2p_key``.

DESIGN §6: each node has its own libp2p secp256k1 key, separate from validator and account keys;
its peer id is derived from it, so it must survive restarts. The file holds the 32-byte secret as
64 hex digits and a newline, mode 0600, created on first start. This module only handles bytes
and files; ``libp2p_host`` (the one libp2p importer) turns the secret into a libp2p key pair.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from node.errors import KeystoreError

NODE_KEY_FILE = "p2p_key"
SECRET_BYTES = 32
# The order n of the secp256k1 group (SEC 2 §2.4.1): a private key is an integer in [1, n - 1].
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_MAX_FILE_BYTES = 256


def is_valid_secret(secret: bytes) -> bool:
    """True if ``secret`` is 32 bytes encoding an integer in [1, n - 1]."""
    return len(secret) == SECRET_BYTES and 0 < int.from_bytes(secret, "big") < SECP256K1_ORDER


def generate_secret() -> bytes:
    """A fresh secp256k1 secret from the OS CSPRNG (rejection sampling keeps it uniform)."""
    while True:
        secret = secrets.token_bytes(SECRET_BYTES)
        if is_valid_secret(secret):
            return secret


def node_key_path(data_dir: Path) -> Path:
    return data_dir / NODE_KEY_FILE


def load_node_key(path: Path) -> bytes:
    """Read a key file; refuse one that other users can read or that is malformed."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeystoreError(
                f"{path}: the p2p key file is accessible by other users "
                f"(mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`"
            )
        with path.open("rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except OSError as e:
        raise KeystoreError(f"{path}: cannot read the p2p key file: {e.strerror}") from e
    text = raw.decode("ascii", errors="replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(raw) > _MAX_FILE_BYTES or not is_valid_secret(secret):
        raise KeystoreError(
            f"{path}: not a p2p key file (expected 64 hex digits of a secp256k1 secret); "
            "move it away to create a new identity (the node's peer id will change)"
        )
    return secret


def load_or_create_node_key(data_dir: Path) -> bytes:
    """The node's secret: read from ``data_dir/p2p_key``, or created there (mode 0600) on first
    start. Creation is atomic (temporary file, fsync, hard link): a crash never leaves a partial
    key, and of two processes racing to create it, both end up with the same key."""
    path = node_key_path(data_dir)
    if path.exists():
        return load_node_key(path)
    secret = generate_secret()
    tmp = data_dir / f".{NODE_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secret.hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_node_key(path)
        _fsync_dir(data_dir)
    except OSError as e:
        raise KeystoreError(f"{path}: cannot create the p2p key file: {e.strerror}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return secret


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

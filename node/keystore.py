"""Encrypted key files: Ethereum keystore v3 (scrypt) through eth-account (DESIGN §3).

The only module that imports eth-account. Each key is one JSON file named
``UTC--<time>--<address hex>.json`` in a directory of mode 0700; files are created with
``O_CREAT | O_EXCL`` and mode 0600, so they are never world-readable, not even for an instant,
and are moved into place only once fully written and synced. Plaintext secrets exist only in
memory. Files are compatible with geth, Clef and MetaMask imports (same v3 format and scrypt
parameters by default).
"""

from __future__ import annotations

import builtins
import getpass
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from eth_account import Account as _EthAccount

from node.crypto import PrivateKey
from node.errors import KeystoreError
from node.types import Address

WRONG_PASSWORD = "wrong password or corrupt keystore file"

_FILE_RE = re.compile(r"^UTC--[0-9TZ.\-]+--([0-9a-f]{40})\.json$")
_MAX_KEYFILE_BYTES = 64 << 10  # a v3 file is ~500 bytes; refuse to parse anything huge
# eth-account fixes scrypt's r=8 and p=1; n is the work factor. A file with a larger n than this
# would make decryption take minutes and gigabytes, so it is treated as corrupt.
_MAX_SCRYPT_N = 1 << 20


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """The scrypt work factor of new key files (r=8, p=1 are fixed by the v3 format's tooling)."""

    n: int = 262_144  # eth-account's and geth's standard: ~256 MiB and ~1 s per decryption

    def __post_init__(self) -> None:
        if type(self.n) is not int or self.n < 2 or self.n & (self.n - 1) or self.n > _MAX_SCRYPT_N:
            raise KeystoreError(f"scrypt n must be a power of two in [2, {_MAX_SCRYPT_N}]")


STANDARD_SCRYPT = ScryptParams()
# Only for tests and throwaway devnets: trivially brute-forced, never for real keys.
LIGHT_SCRYPT = ScryptParams(n=1 << 4)


def _address_hex(address: Address) -> str:
    if type(address) is not bytes or len(address) != 20:
        raise KeystoreError("an address is 20 bytes")
    return address.hex()


def _utc_stamp() -> str:
    # geth's layout (UTC--2016-03-22T12-57-55.920751759Z--…): colons are not portable in names.
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H-%M-%S.") + f"{now.microsecond:06d}000Z"


class Keystore:
    """A directory of v3 key files, one per address."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    # --- queries ---------------------------------------------------------------------------

    def _files(self) -> dict[str, list[Path]]:
        """Key files by lowercase address hex; other files in the directory are ignored."""
        found: dict[str, list[Path]] = {}
        if not self.directory.is_dir():
            return found
        for entry in sorted(self.directory.iterdir()):
            m = _FILE_RE.match(entry.name)
            if m is not None and entry.is_file():
                found.setdefault(m.group(1), []).append(entry)
        return found

    def list(self) -> builtins.list[Address]:
        """The addresses with a key file, sorted."""
        return [Address(bytes.fromhex(h)) for h in sorted(self._files())]

    def has(self, address: Address) -> bool:
        return _address_hex(address) in self._files()

    def path_of(self, address: Address) -> Path:
        """The key file of ``address``; KeystoreError if there is none or more than one."""
        hex_ = _address_hex(address)
        paths = self._files().get(hex_)
        if not paths:
            raise KeystoreError(f"no key for address 0x{hex_} in the keystore")
        if len(paths) > 1:
            # Which one is meant cannot be guessed; they may hold different passwords.
            raise KeystoreError(f"several key files for address 0x{hex_}; keep only one")
        return paths[0]

    # --- creating keys ---------------------------------------------------------------------

    def new(self, password: str, *, kdf_params: ScryptParams | None = None) -> Address:
        """Generate a fresh key, store it encrypted under ``password``, return its address."""
        return self._store(PrivateKey.generate(), password, kdf_params)

    def import_key(
        self, secret: bytes, password: str, *, kdf_params: ScryptParams | None = None
    ) -> Address:
        """Store an existing 32-byte secret encrypted under ``password``."""
        if type(secret) is not bytes:
            raise KeystoreError("a private key is 32 bytes")
        try:
            key = PrivateKey(secret)
        except ValueError as exc:
            raise KeystoreError(f"invalid private key: {exc}") from None
        return self._store(key, password, kdf_params)

    def _store(self, key: PrivateKey, password: str, kdf_params: ScryptParams | None) -> Address:
        _check_password(password)
        params = kdf_params if kdf_params is not None else STANDARD_SCRYPT
        hex_ = key.address.hex()
        if self.has(key.address):
            raise KeystoreError(f"a key for address 0x{hex_} is already in the keystore")
        keyfile = _EthAccount.encrypt(key.secret, password, kdf="scrypt", iterations=params.n)
        data = json.dumps(keyfile, indent=None, separators=(",", ":")).encode("utf-8")
        final = self.directory / f"UTC--{_utc_stamp()}--{hex_}.json"
        tmp = self.directory / f".tmp-{secrets.token_hex(8)}-{hex_}"
        try:
            self._ensure_directory()
            # Written in full and synced under a name list() ignores, then renamed: a crash
            # leaves either no key file or a complete one, never a truncated one.
            _write_new_file(tmp, data)
            try:
                os.rename(tmp, final)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.directory)
        except OSError as exc:
            raise KeystoreError(
                f"cannot write key file in {self.directory}: {exc.strerror}"
            ) from None
        return key.address

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask and ignored for an existing directory; the
        # keystore must not be listable by others either way.
        if self.directory.stat().st_mode & 0o777 != 0o700:
            os.chmod(self.directory, 0o700)

    # --- reading keys ----------------------------------------------------------------------

    def export_key(self, address: Address, password: str) -> bytes:
        """The plaintext 32-byte secret of ``address`` (in memory only; for ``keys export``)."""
        path = self.path_of(address)
        try:
            if path.stat().st_size > _MAX_KEYFILE_BYTES:
                raise KeystoreError(WRONG_PASSWORD)
            raw = path.read_bytes()
        except OSError as exc:
            raise KeystoreError(f"cannot read key file: {exc.strerror}") from None
        secret = decrypt_keyfile(raw, password)
        if PrivateKey(secret).address != address:
            # A file renamed or edited to claim another address: never hand out the wrong key.
            raise KeystoreError(WRONG_PASSWORD)
        return secret

    def load(self, address: Address, password: str) -> PrivateKey:
        return PrivateKey(self.export_key(address, password))


def decrypt_keyfile(raw: bytes | str, password: str) -> bytes:
    """Decrypt one v3 key file's JSON; every failure is the same KeystoreError.

    Wrong passwords and damaged files are deliberately indistinguishable (both fail the MAC),
    and eth-account's own exceptions never leak to callers.
    """
    _check_password(password)
    try:
        keyfile = json.loads(raw)
        _check_keyfile_shape(keyfile)
        secret = bytes(_EthAccount.decrypt(keyfile, password))
    except KeystoreError:
        raise
    except Exception:
        # eth-account/eth-keyfile raise assorted ValueError, KeyError, TypeError and assertion
        # errors on bad input; the adapter translates every one of them (DESIGN §1).
        raise KeystoreError(WRONG_PASSWORD) from None
    try:
        PrivateKey(secret)
    except ValueError:
        raise KeystoreError(WRONG_PASSWORD) from None
    return secret


def _check_keyfile_shape(keyfile: Any) -> None:
    """Refuse files that are not v3/scrypt or whose cost parameters would exhaust the machine."""
    if not isinstance(keyfile, dict) or keyfile.get("version") != 3:
        raise KeystoreError(WRONG_PASSWORD)
    crypto = keyfile.get("crypto")
    if not isinstance(crypto, dict) or crypto.get("kdf") != "scrypt":
        raise KeystoreError(WRONG_PASSWORD)
    kdfparams = crypto.get("kdfparams")
    if not isinstance(kdfparams, dict):
        raise KeystoreError(WRONG_PASSWORD)
    cost: builtins.list[int] = []
    for name in ("n", "r", "p"):
        value = kdfparams.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KeystoreError(WRONG_PASSWORD)
        cost.append(value)
    n, r, p = cost
    if n > _MAX_SCRYPT_N or r > 32 or p > 16 or kdfparams.get("dklen") != 32:
        raise KeystoreError(WRONG_PASSWORD)


def _check_password(password: str) -> None:
    if type(password) is not str:
        raise KeystoreError("a password is a string")


def _write_new_file(path: Path, data: bytes) -> None:
    # O_EXCL: never follow or reuse an existing file (or a planted symlink); 0o600 from creation.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- passwords ---------------------------------------------------------------------------------


def read_password(
    password_file: Path | None,
    *,
    confirm: bool,
    prompt: Callable[[str], str] = getpass.getpass,
) -> str:
    """A password from ``password_file`` (its first line) or, without one, from the terminal.

    With ``confirm`` (a new key) the terminal asks twice and the answers must match, and an
    empty password is refused. ``prompt`` exists so tests need no terminal.
    """
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8", newline="") as fh:
                line = fh.readline(64 << 10)
        except OSError as exc:
            raise KeystoreError(
                f"cannot read password file {password_file}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise KeystoreError(f"password file {password_file} is not UTF-8") from None
        # Strip only the line ending: spaces may be part of the password.
        if line.endswith("\r\n"):
            line = line[:-2]
        elif line.endswith(("\n", "\r")):
            line = line[:-1]
        return line
    password = prompt("Password: ")
    if confirm:
        if password == "":
            raise KeystoreError("an empty password is not allowed for a new key")
        if prompt("Repeat password: ") != password:
            raise KeystoreError("passwords do not match")
    return password

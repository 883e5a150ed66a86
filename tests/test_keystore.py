"""Keystore v3 files: round trips, permissions, wrong passwords, corrupt files, password input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account as EthAccount

from node.crypto import PrivateKey
from node.devkeys import dev_key
from node.errors import KeystoreError
from node.keystore import (
    LIGHT_SCRYPT,
    STANDARD_SCRYPT,
    WRONG_PASSWORD,
    Keystore,
    ScryptParams,
    decrypt_keyfile,
    read_password,
)
from node.types import Address

PW = "correct horse battery staple"


@pytest.fixture
def ks(tmp_path: Path) -> Keystore:
    return Keystore(tmp_path / "keystore")


def test_standard_scrypt_is_eth_accounts_default() -> None:
    # Production files must be what geth / eth-account write by default.
    from eth_keyfile.keyfile import get_default_work_factor_for_kdf

    assert STANDARD_SCRYPT.n == get_default_work_factor_for_kdf("scrypt")


def test_new_list_load_roundtrip(ks: Keystore) -> None:
    assert ks.list() == []
    a = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    b = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    assert a != b
    assert ks.list() == sorted([a, b])
    key = ks.load(a, PW)
    assert isinstance(key, PrivateKey)
    assert key.address == a
    assert ks.export_key(a, PW) == key.secret


def test_import_export_known_key(ks: Keystore) -> None:
    key = dev_key(3)
    address = ks.import_key(key.secret, PW, kdf_params=LIGHT_SCRYPT)
    assert address == key.address
    assert ks.export_key(address, PW) == key.secret
    assert ks.load(address, PW).address == key.address


def test_file_name_permissions_and_no_plaintext(ks: Keystore) -> None:
    key = dev_key(1)
    ks.import_key(key.secret, PW, kdf_params=LIGHT_SCRYPT)
    path = ks.path_of(key.address)
    assert path.parent == ks.directory
    assert path.name.startswith("UTC--")
    assert path.name.endswith(f"--{key.address.hex()}.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ks.directory.stat().st_mode) == 0o700
    raw = path.read_bytes()
    assert key.secret.hex().encode() not in raw
    assert key.secret not in raw
    doc = json.loads(raw)
    assert doc["version"] == 3
    assert doc["crypto"]["kdf"] == "scrypt"
    assert doc["crypto"]["kdfparams"]["n"] == LIGHT_SCRYPT.n
    assert doc["address"].lower() == key.address.hex()
    # No temporary files are left behind.
    assert [p.name for p in ks.directory.iterdir()] == [path.name]


def test_files_are_0600_even_with_a_permissive_umask(ks: Keystore) -> None:
    old = os.umask(0)
    try:
        address = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    finally:
        os.umask(old)
    assert stat.S_IMODE(ks.path_of(address).stat().st_mode) == 0o600
    assert stat.S_IMODE(ks.directory.stat().st_mode) == 0o700


def test_existing_loose_directory_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "ks"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    Keystore(d).new(PW, kdf_params=LIGHT_SCRYPT)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_file_is_readable_by_eth_account(ks: Keystore) -> None:
    key = dev_key(2)
    ks.import_key(key.secret, PW, kdf_params=LIGHT_SCRYPT)
    doc = json.loads(ks.path_of(key.address).read_text())
    assert bytes(EthAccount.decrypt(doc, PW)) == key.secret


def test_reads_a_file_written_by_eth_account(ks: Keystore) -> None:
    key = dev_key(4)
    doc = EthAccount.encrypt(key.secret, PW, kdf="scrypt", iterations=16)
    ks.directory.mkdir(mode=0o700)
    name = f"UTC--2024-01-01T00-00-00.000000000Z--{key.address.hex()}.json"
    (ks.directory / name).write_text(json.dumps(doc))
    assert ks.list() == [key.address]
    assert ks.load(key.address, PW).secret == key.secret


def test_wrong_password(ks: Keystore) -> None:
    a = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    with pytest.raises(KeystoreError, match="wrong password or corrupt keystore file"):
        ks.load(a, "not it")
    with pytest.raises(KeystoreError, match=WRONG_PASSWORD):
        ks.export_key(a, "")


def test_unknown_address(ks: Keystore) -> None:
    with pytest.raises(KeystoreError, match="no key"):
        ks.path_of(Address(b"\x11" * 20))
    with pytest.raises(KeystoreError):
        ks.load(Address(b"\x11" * 20), PW)
    with pytest.raises(KeystoreError):
        ks.path_of(Address(b"\x11" * 19))


def test_duplicate_import_refused(ks: Keystore) -> None:
    key = dev_key(5)
    ks.import_key(key.secret, PW, kdf_params=LIGHT_SCRYPT)
    with pytest.raises(KeystoreError, match="already"):
        ks.import_key(key.secret, "other", kdf_params=LIGHT_SCRYPT)
    assert len(list(ks.directory.iterdir())) == 1


@pytest.mark.parametrize(
    "secret",
    [b"", b"\x00" * 32, b"\xff" * 32, b"\x01" * 31, b"\x01" * 33],
)
def test_invalid_secrets_refused(ks: Keystore, secret: bytes) -> None:
    with pytest.raises(KeystoreError):
        ks.import_key(secret, PW, kdf_params=LIGHT_SCRYPT)
    assert not ks.directory.exists() or list(ks.directory.iterdir()) == []


def _tamper(path: Path, edit: object) -> None:
    doc = json.loads(path.read_text())
    assert callable(edit)
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["crypto"].__setitem__("ciphertext", "00" * 32),
        lambda d: d["crypto"].__setitem__("mac", "11" * 32),
        lambda d: d["crypto"].__setitem__("ciphertext", "zz"),
        lambda d: d["crypto"].pop("cipherparams"),
        lambda d: d["crypto"]["kdfparams"].__setitem__("n", 1 << 30),
        lambda d: d["crypto"]["kdfparams"].__setitem__("n", "16"),
        lambda d: d["crypto"].__setitem__("kdf", "pbkdf2"),
        lambda d: d.__setitem__("version", 4),
        lambda d: d.pop("crypto"),
    ],
)
def test_corrupt_files_give_the_same_error(ks: Keystore, edit: object) -> None:
    a = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    _tamper(ks.path_of(a), edit)
    with pytest.raises(KeystoreError, match=WRONG_PASSWORD):
        ks.load(a, PW)


def test_not_json(ks: Keystore) -> None:
    a = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    ks.path_of(a).write_bytes(b"\x00not json")
    with pytest.raises(KeystoreError, match=WRONG_PASSWORD):
        ks.load(a, PW)


def test_file_claiming_another_address_is_refused(ks: Keystore) -> None:
    # A key file renamed to another address must not hand out a key for the wrong address.
    a = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    other = dev_key(6).address
    path = ks.path_of(a)
    path.rename(path.with_name(path.name.replace(a.hex(), other.hex())))
    with pytest.raises(KeystoreError, match=WRONG_PASSWORD):
        ks.load(other, PW)


def test_decrypt_keyfile_direct() -> None:
    key = dev_key(7)
    doc = EthAccount.encrypt(key.secret, PW, kdf="scrypt", iterations=16)
    assert decrypt_keyfile(json.dumps(doc), PW) == key.secret
    with pytest.raises(KeystoreError, match=WRONG_PASSWORD):
        decrypt_keyfile(json.dumps(doc), PW + "!")
    with pytest.raises(KeystoreError, match=WRONG_PASSWORD):
        decrypt_keyfile("[]", PW)


def test_other_files_are_ignored(ks: Keystore) -> None:
    a = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    (ks.directory / "README").write_text("hello")
    (ks.directory / ".tmp-abc").write_text("x")
    (ks.directory / "UTC--x--nothex.json").write_text("{}")
    assert ks.list() == [a]


def test_two_files_for_one_address_is_an_error(ks: Keystore) -> None:
    a = ks.new(PW, kdf_params=LIGHT_SCRYPT)
    path = ks.path_of(a)
    (ks.directory / f"UTC--2020-01-01T00-00-00.0Z--{a.hex()}.json").write_bytes(path.read_bytes())
    assert ks.list() == [a]
    with pytest.raises(KeystoreError, match="several"):
        ks.path_of(a)


@pytest.mark.parametrize("n", [0, 1, 3, 100, 1 << 21, True])
def test_bad_scrypt_params(n: int) -> None:
    with pytest.raises(KeystoreError):
        ScryptParams(n=n)


def test_password_type_checked(ks: Keystore) -> None:
    with pytest.raises(KeystoreError):
        ks.new(b"bytes", kdf_params=LIGHT_SCRYPT)  # type: ignore[arg-type]


# --- read_password -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"secret\n", "secret"),
        (b"secret\r\n", "secret"),
        (b"secret", "secret"),
        (b"  spaced pw  \nsecond line\n", "  spaced pw  "),
        (b"\n", ""),
        (b"", ""),
        ("p\u00e4ss\n".encode(), "p\u00e4ss"),
    ],
)
def test_read_password_file(tmp_path: Path, content: bytes, expected: str) -> None:
    f = tmp_path / "pw"
    f.write_bytes(content)

    def no_prompt(_: str) -> str:
        raise AssertionError("must not prompt when a file is given")

    assert read_password(f, confirm=True, prompt=no_prompt) == expected


def test_read_password_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="cannot read"):
        read_password(tmp_path / "missing", confirm=False)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff\xfe\n")
    with pytest.raises(KeystoreError, match="UTF-8"):
        read_password(bad, confirm=False)


def test_read_password_prompt() -> None:
    answers = iter(["pw1"])
    assert read_password(None, confirm=False, prompt=lambda _: next(answers)) == "pw1"


def test_read_password_confirm_match_and_mismatch() -> None:
    answers = iter(["pw1", "pw1"])
    assert read_password(None, confirm=True, prompt=lambda _: next(answers)) == "pw1"
    answers = iter(["pw1", "pw2"])
    with pytest.raises(KeystoreError, match="do not match"):
        read_password(None, confirm=True, prompt=lambda _: next(answers))
    answers = iter(["", ""])
    with pytest.raises(KeystoreError, match="empty"):
        read_password(None, confirm=True, prompt=lambda _: next(answers))


def test_new_keys_default_to_the_standard_scrypt_cost(
    ks: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Production default without paying ~1 s of scrypt here: record the cost asked for, then
    # encrypt cheaply.
    asked: list[object] = []
    real_encrypt = EthAccount.encrypt

    def spy(secret: bytes, password: str, kdf: Any, iterations: int) -> dict[str, Any]:
        asked.append((kdf, iterations))
        return real_encrypt(secret, password, kdf=kdf, iterations=LIGHT_SCRYPT.n)

    # node.keystore holds eth_account's Account class itself, so patching the class reaches it.
    monkeypatch.setattr(EthAccount, "encrypt", spy)
    address = ks.new(PW)
    assert asked == [("scrypt", STANDARD_SCRYPT.n)]
    assert ks.load(address, PW).address == address


def test_unwritable_directory_is_a_keystore_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(KeystoreError, match="cannot write"):
        Keystore(blocker / "ks").new(PW, kdf_params=LIGHT_SCRYPT)

"""Buying a compute task's priced inputs (docs/compute-market.md "Priced inputs", issue 7).

A task that names a priced (encrypted) dataset escrows an input allowance; every party that
reads the data (the provider, a drawn verifier, the referee) buys its own access with a
``Purchase`` made at or after the task's submission, and the chain refuses its result or its
commitment otherwise (``InputNotPurchased``). This module is the buyer's side, used by the
compute agent (``node.compute_agent``) with the node's operator account:

1. ``InputBuyer.open_input`` keeps a one-off secp256k1 key pair under
   ``data_dir/compute/purchases/`` (mode 0600, directory 0700; written *before* the purchase is
   sent: without it the key posted for the purchase cannot be opened) and sends
   ``Purchase(dataset, one-off public key, price)``.
2. It waits for the purchase to be in a block (found through the buyer's open purchases of the
   dataset, by its public key) and for the owner's ``KeyPost`` (the owner's key agent,
   ``node.key_agent``), polling the chain up to a height bound (``PROVIDER_GIVE_UP_HEIGHTS``
   before the task's deadline for the provider, so that its ``TaskFail`` lands in time; the
   commit window's end for a verifier or the referee).
3. It unwraps the content key (``key_wrap_context`` of the purchase and dataset) and checks it
   against the registered key check, fetches the encrypted artifact with an access request whose
   grant is the purchase (``sign_access``; the owner's ``ChainPolicy`` serves it while the
   purchase grants the root), and decrypts it into the job's input file (format v1: leaf 0, then
   the plaintext, checked against the registered plaintext hash).

A kept purchase is reused for the same task and role (a provider's or a challenger's replays
in a dispute), so one read is bought once per party. One that is not in a block
``RESEND_AFTER_HEIGHTS`` after it was sent (dropped from the pool, lost with a restart; the
send height is kept in the key file) is sent again with the same key. The decrypted input is
written mode 0600. A key file is kept until its task has ended and its purchase can no longer
be disputed (the task's end + the key-post, dispute and leaf-dispute windows), then deleted
(``InputBuyer.forget_ended``, called by the agent). The same key-file writer serves
``neuroseed dataset buy`` (``save_key_file``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from node import crypto
from node.api import ViewState
from node.consensus.state import get_account
from node.economy import tasks as tk
from node.economy.api import Role
from node.economy.datasets import DatasetRecord, get_dataset
from node.economy.models import get_model
from node.economy.purchases import (
    ShareState,
    get_purchase,
    key_wrap_context,
    open_purchases,
)
from node.economy.roles import get_role
from node.encoding import Record
from node.errors import NeuroSeedError
from node.types import Address, Amount, ChainId, Hash32, TimestampMs

log = logging.getLogger(__name__)

PURCHASES_DIR = "purchases"  # under data_dir/compute
RESEND_AFTER_HEIGHTS = 20  # a purchase not in a block this long after it was sent is sent again
PROVIDER_GIVE_UP_HEIGHTS = 3  # a provider stops waiting for a key this long before the deadline
ACCESS_LIFETIME_MS = 3600 * 1000
ROLES = ("provider", "verifier", "referee")

SendTransaction = Callable[[Record], Awaitable[Hash32]]
FetchGranted = Callable[[bytes, Any], Awaitable[None]]
"""Make ``root`` complete in the blob store, fetching with the signed access request given
(``node.p2p.chunks.AccessRequest``, or None)."""


class CannotBuy(Exception):
    """Why a task's priced inputs cannot be bought (the agent refuses the task)."""


class InputNotDelivered(Exception):
    """A purchase was made but the data did not arrive (no key in time, a refund, a wrong key,
    data that does not decrypt, a failed fetch)."""


# --- key files (shared with ``neuroseed dataset buy``) -----------------------------------------


def save_key_file(directory: Path, name: str, record: dict[str, Any]) -> Path:
    """Write ``record`` (which holds a one-off private key) to ``directory/name`` atomically,
    mode 0600 in a 0700 directory."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / name
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def _read_key_file(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# --- what a task needs -------------------------------------------------------------------------


def priced_inputs(state: Any, task: tk.Task) -> list[DatasetRecord]:
    """The task's priced dataset inputs, in input order."""
    out: list[DatasetRecord] = []
    for item in task.inputs:
        if item.kind == tk.InputKind.DATASET:
            ds = get_dataset(state, item.ref)
            if ds is not None and ds.price > 0:
                out.append(ds)
    return out


def check_buyable(state: Any, task: tk.Task, buyer: Address, spare: int = 0) -> int:
    """Raise ``CannotBuy`` unless ``buyer`` can buy every priced input of ``task`` with
    ``spare`` of its balance kept aside (a claim's bond); returns what the purchases cost."""
    for item in task.inputs:
        if item.kind == tk.InputKind.MODEL:
            m = get_model(state, item.ref)
            if m is not None and m.price > 0:
                raise CannotBuy(
                    f"model 0x{item.ref.hex()[:16]} is priced and no purchase sells models"
                )
    priced = priced_inputs(state, task)
    if not priced:
        return 0
    for ds in priced:
        if ds.is_composite or not ds.root or ds.salt is None:
            raise CannotBuy(f"dataset 0x{ds.id.hex()[:16]} is a priced composite")
    if get_role(state, buyer, Role.CUSTOMER) is None:
        raise CannotBuy(
            "buying a priced input needs the CUSTOMER role: neuroseed role register customer"
        )
    cost = sum(ds.price for ds in priced)
    balance = get_account(state, buyer).balance
    if balance < cost + spare:
        raise CannotBuy(
            f"balance {balance} cannot pay the priced inputs ({cost}) and the bond ({spare})"
        )
    return cost


def role_in(task: tk.Task, me: Address) -> str:
    """Which party of ``task`` this node reads its data as (one purchase per role)."""
    if task.provider == me:
        return "provider"
    d = task.dispute
    if d is not None and d.referee is not None and d.referee.address == me:
        return "referee"
    return "verifier"


def read_until(task: tk.Task, role: str) -> int:
    """The last height at which a purchase for ``role`` is still of use. A provider gives up
    ``PROVIDER_GIVE_UP_HEIGHTS`` before the task's deadline, so that its ``TaskFail`` still
    lands in time (a late task costs part of its bond; a reported failure does not)."""
    if role == "provider":
        return task.deadline - PROVIDER_GIVE_UP_HEIGHTS
    return max(task.commit_end, task.window_end, task.reveal_end)


# --- the buyer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenedInput:
    purchase: Hash32
    content_key: bytes


class InputBuyer:
    """Buys, waits for the key, fetches and decrypts priced inputs for one operator account."""

    def __init__(
        self,
        directory: Path,
        key: crypto.PrivateKey,
        send: SendTransaction,
        read_view: Callable[[], Any],
        *,
        fetch: FetchGranted | None = None,
        peer_id: bytes | None = None,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.directory = Path(directory)
        self._key = key
        self.address: Address = key.address
        self._send = send
        self._read_view = read_view
        self._fetch = fetch
        self._peer_id = peer_id
        self._poll = poll_interval_s
        self._lock = trio.Lock()  # one purchase decision at a time

    def _file(self, task: tk.Task, role: str, dataset: bytes) -> Path:
        return self.directory / f"{task.id.hex()}-{role}-{bytes(dataset).hex()}.json"

    async def _kept_or_buy(self, task: tk.Task, role: str, ds: DatasetRecord) -> dict[str, Any]:
        from node.economy.purchases import Purchase
        from node.storage.encryption import generate_wrap_keypair

        async with self._lock:
            path = self._file(task, role, ds.id)
            kept = _read_key_file(path)
            if kept is not None:
                return kept
            check_buyable(ViewState(self._read_view()), task, self.address)  # before any spend
            secret, pubkey = generate_wrap_keypair()
            view = self._read_view()
            kept = {
                "task": "0x" + task.id.hex(),
                "role": role,
                "dataset": "0x" + ds.id.hex(),
                "buyer": "0x" + bytes(self.address).hex(),
                "privateKey": "0x" + secret.hex(),
                "publicKey": "0x" + pubkey.hex(),
                "purchase": None,
                "createdMs": int(time.time() * 1000),
                "sentHeight": _head(view),
            }
            save_key_file(self.directory, path.name, kept)
            await self._send(Purchase(ds.id, pubkey, Amount(ds.price)))
            log.info(
                "task 0x%s: bought priced input 0x%s as %s for %d",
                task.id.hex()[:16],
                ds.id.hex()[:16],
                role,
                ds.price,
            )
            return kept

    async def open_input(self, task: tk.Task, role: str, ds: DatasetRecord) -> OpenedInput:
        """Buy ``ds`` for ``task`` as ``role`` (or reuse the purchase kept for them) and wait
        for its key; returns the purchase id and the checked content key."""
        from node.storage.encryption import KeyUnwrapFailed, key_check, unwrap_key

        kept = await self._kept_or_buy(task, role, ds)
        secret = bytes.fromhex(str(kept["privateKey"])[2:])
        pubkey = bytes.fromhex(str(kept["publicKey"])[2:])
        until = read_until(task, role)
        pid: Hash32 | None = None
        if kept.get("purchase"):
            pid = Hash32(bytes.fromhex(str(kept["purchase"])[2:]))
        while True:
            view = self._read_view()
            state = ViewState(view)
            head = _head(view)
            if pid is None:
                for candidate in open_purchases(state, self.address, ds.id):
                    record = get_purchase(state, candidate)
                    if record is not None and bytes(record.buyer_pubkey) == pubkey:
                        pid = candidate
                        kept["purchase"] = "0x" + pid.hex()
                        save_key_file(self.directory, self._file(task, role, ds.id).name, kept)
                        break
            if pid is None:
                await self._resend_if_lost(task, role, ds, kept, head)
            record = None if pid is None else get_purchase(state, pid)
            if record is not None:
                share = next((s for s in record.shares if s.source == ds.id), None)
                if share is None or share.state in (ShareState.REFUNDED, ShareState.OWNER_FAULT):
                    raise InputNotDelivered(
                        f"purchase 0x{record.id.hex()[:16]} of 0x{ds.id.hex()[:16]} was refunded"
                    )
                if share.wrapped_key:
                    context = key_wrap_context(record.id, ds.id)
                    try:
                        content = unwrap_key(bytes(share.wrapped_key), secret, context)
                    except KeyUnwrapFailed:
                        raise InputNotDelivered(
                            f"the key posted for purchase 0x{record.id.hex()[:16]} does not "
                            "open with its one-off key (dispute it: neuroseed dataset dispute)"
                        ) from None
                    assert ds.salt is not None
                    if key_check(ds.salt, content) != ds.key_check:
                        raise InputNotDelivered(
                            f"the key posted for purchase 0x{record.id.hex()[:16]} fails the "
                            "dataset's key check (dispute it: neuroseed dataset dispute)"
                        )
                    return OpenedInput(record.id, content)
            if head >= until:
                raise InputNotDelivered(
                    f"no key for priced input 0x{ds.id.hex()[:16]} by height {until}"
                )
            await trio.sleep(self._poll)

    async def _resend_if_lost(
        self, task: tk.Task, role: str, ds: DatasetRecord, kept: dict[str, Any], head: int
    ) -> None:
        """Send the kept key's ``Purchase`` again (the same one-off key) when none with that key
        is in a block ``RESEND_AFTER_HEIGHTS`` after it was sent: it left the pool (dropped, or
        lost with a restart of the node). The send height is kept in the key file; a file
        without one counts from the first look. A purchase that was only late lands twice: the
        first found is used, the other stays an open purchase of the dataset."""
        from node.economy.purchases import Purchase

        sent = kept.get("sentHeight")
        if not isinstance(sent, int):
            kept["sentHeight"] = head
        elif head >= sent + RESEND_AFTER_HEIGHTS:
            kept["sentHeight"] = head
            pubkey = bytes.fromhex(str(kept["publicKey"])[2:])
            await self._send(Purchase(ds.id, pubkey, Amount(ds.price)))
            log.warning(
                "task 0x%s: the purchase of 0x%s as %s is not in a block after %d heights: "
                "sent again",
                task.id.hex()[:16],
                ds.id.hex()[:16],
                role,
                head - sent,
            )
        else:
            return
        async with self._lock:
            save_key_file(self.directory, self._file(task, role, ds.id).name, kept)

    def forget_ended(self, view: Any) -> list[Path]:
        """Delete the key files of tasks that ended long enough ago that their purchases can no
        longer be disputed: past the task's end height + the key-post window + the dispute
        window + the leaf dispute's (each purchase was made before the task ended, so its key
        and disputes are over by then). Keys of tasks still running, or unknown, are kept.
        Returns the files deleted."""
        from node.economy.api import economy_params

        state = ViewState(view)
        head = _head(view)
        p = economy_params(state)
        keep = p.key_post_heights + p.dispute_window_heights + p.leaf_dispute_heights
        gone: list[Path] = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return gone
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                tid = bytes.fromhex(name.split("-", 1)[0])
            except ValueError:
                continue
            task = tk.get_task(state, tid) if len(tid) == 32 else None
            if task is None or task.state != tk.TaskState.ENDED or head <= task.end_height + keep:
                continue
            path = self.directory / name
            try:
                path.unlink()
            except OSError:
                continue
            gone.append(path)
        return gone

    def access_request(self, view: Any, root: bytes, grant: Hash32) -> Any:
        """A signed access request for ``root`` under ``grant``, for this node's peer id (None
        without one: a node with no network only reads its own blob store)."""
        from node.p2p.chunks import AccessTerms, sign_access

        if self._peer_id is None:
            return None
        terms = AccessTerms(
            chain_id=ChainId(view.chain.chain_id),
            root=root,
            address=self.address,
            peer_id=self._peer_id,
            grant_id=grant,
            expires_ms=TimestampMs(int(time.time() * 1000) + ACCESS_LIFETIME_MS),
            nonce=int.from_bytes(secrets.token_bytes(8), "big"),
        )
        return sign_access(self._key, terms)

    async def input_file(
        self, task: tk.Task, role: str, ds: DatasetRecord, blobs: Any, dest: Path
    ) -> Path:
        """The plaintext file (format v1) of priced dataset ``ds`` at ``dest``: bought, fetched
        with the purchase as its grant and decrypted."""
        from node.storage.importer import missing_blocks

        opened = await self.open_input(task, role, ds)
        if self._fetch is not None:
            access = self.access_request(self._read_view(), ds.root, opened.purchase)
            try:
                await self._fetch(ds.root, access)
            except NeuroSeedError as exc:
                raise InputNotDelivered(
                    f"cannot fetch priced input 0x{ds.id.hex()[:16]}: {exc.message}"
                ) from exc
        if blobs is None or await trio.to_thread.run_sync(
            lambda: not blobs.has(ds.root) or bool(missing_blocks(blobs, ds.root))
        ):
            raise InputNotDelivered(f"priced input 0x{ds.id.hex()[:16]} is not stored here")
        if not dest.exists():
            await trio.to_thread.run_sync(decrypt_to_file, blobs, ds, opened.content_key, dest)
        return dest


def decrypt_to_file(blobs: Any, ds: DatasetRecord, content_key: bytes, dest: Path) -> None:
    """Write the stored (encrypted) file of ``ds`` decrypted to ``dest`` (leaf 0 as stored, then
    the plaintext, checked against the registered plaintext hash); nothing is left at ``dest``
    on failure."""
    from node.storage.encryption import decrypt_stream
    from node.storage.format_v1 import LEAF0_BYTES
    from node.storage.importer import export_file

    assert ds.salt is not None
    cipher = dest.with_name(dest.name + ".cipher")
    tmp = dest.with_name(dest.name + ".tmp")
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
    try:
        # Both files are the owner's only (mode 0600): the plaintext was paid for.
        with os.fdopen(os.open(cipher, flags, 0o600), "w+b") as stored:
            export_file(blobs, ds.root, stored)
            stored.seek(0)
            with os.fdopen(os.open(tmp, flags, 0o600), "wb") as out:
                shutil.copyfileobj(_Limited(stored, LEAF0_BYTES), out)
                decrypt_stream(
                    content_key,
                    ds.salt,
                    stored,
                    out,
                    ds.data_size,
                    expected_sha256=ds.plain_data_hash,
                )
        os.replace(tmp, dest)
    finally:
        for p in (cipher, tmp):
            p.unlink(missing_ok=True)


class _Limited:
    """The first ``n`` bytes of a stream (for ``shutil.copyfileobj``)."""

    def __init__(self, src: Any, n: int) -> None:
        self._src, self._left = src, n

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size < 0 else min(size, self._left)
        data: bytes = self._src.read(want)
        self._left -= len(data)
        return data


def _head(view: Any) -> int:
    return 0 if view.head is None else int(view.head.height)

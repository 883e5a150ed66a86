"""``neuroseed storage …``: storage offers and deals from the command line (DESIGN §9).

* ``storage offer --capacity 10GiB --price-per-gib-epoch 0.01 --collateral-per-gib 1
  [--max-epochs N]`` — publish (or replace) the sender's offer (a ``StorageOffer`` transaction;
  the sender must hold the storage-provider role, and should be the provider node's operator
  account, which signs the deals);
* ``storage withdraw`` — remove the sender's offer;
* ``storage deal CID --provider ADDR --epochs N`` — ask the local node to make a deal for an
  artifact it holds (``ns_proposeDeal``: its storage agent builds the replica, sends it to the
  provider, gets the signature and submits the ``DealCreate`` from the node's operator account);
  a progress bar on stderr while the replica is sent; prints the deal id and the transaction;
* ``storage status [DEAL_ID]`` — one deal (state, epochs paid, open challenge), or the local
  agent's offer, replicas and deals as provider and owner.

Registered by ``node.cli.build_parser`` through ``register(commands)``; the shared CLI plumbing
(client, sender key, ``_sign_send_wait``, output, errors) is ``node.cli``'s.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

from node import cli as _cli
from node.economy.deals import OfferWithdraw, StorageOffer
from node.genesis import to_checksum
from node.types import UINT64_MAX, Amount

POLL_INTERVAL_S = 0.25
DEFAULT_DEAL_TIMEOUT = 600.0
_SIZE_RE = re.compile(r"([0-9]+)\s*([KMGTP]i?B|B)?", re.ASCII | re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
    "PIB": 1 << 50,
}


def parse_size(text: str, *, what: str) -> int:
    """Bytes from ``1048576``, ``512MiB``, ``10GiB``, ``2TB`` (binary or decimal units)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise _cli.CliError(f"{what}: expected a size like 10GiB or 500000000, not {text!r}")
    n = int(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if not 0 < n <= UINT64_MAX:
        raise _cli.CliError(f"{what}: must be positive and fit 64 bits")
    return n


def format_size(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# --- offer / withdraw --------------------------------------------------------------------------


def cmd_storage_offer(args: argparse.Namespace) -> int:
    capacity = parse_size(args.capacity, what="--capacity")
    price = _cli.parse_nsd(args.price_per_gib_epoch, what="--price-per-gib-epoch")
    collateral = _cli.parse_nsd(
        args.collateral_per_gib, what="--collateral-per-gib", allow_zero=True
    )
    if not 0 < args.max_epochs <= UINT64_MAX:
        raise _cli.CliError("--max-epochs: expected a positive number of epochs")
    _cli._fee_option(args)
    body = StorageOffer(capacity, Amount(price), Amount(collateral), args.max_epochs)
    fields: list[tuple[str, str, object, object]] = [
        ("capacityBytes", str(capacity), "capacity", format_size(capacity)),
        ("pricePerGibEpoch", str(price), "price", f"{_cli.format_nsd(price)} NSD per GiB-epoch"),
        (
            "collateralPerGib",
            str(collateral),
            "collateral",
            f"{_cli.format_nsd(collateral)} NSD per GiB",
        ),
        ("maxEpochs", str(args.max_epochs), "max epochs", args.max_epochs),
    ]
    return _cli._sign_send_wait(args, body, fields)


def cmd_storage_withdraw(args: argparse.Namespace) -> int:
    _cli._fee_option(args)
    return _cli._sign_send_wait(args, OfferWithdraw(), [])


# --- deal ----------------------------------------------------------------------------------------


class _ProgressBar:
    """A one-line progress bar on stderr (only on a terminal, or when forced)."""

    def __init__(self, label: str, *, enabled: bool) -> None:
        self._label = label
        self._enabled = enabled
        self._last = ""

    def update(self, done: int, total: int, note: str = "") -> None:
        if not self._enabled:
            return
        width = 30
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        filled = int(frac * width)
        line = (
            f"\r{self._label} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{format_size(done)}/{format_size(total)} {note}"
        )
        if line != self._last:
            print(line.ljust(len(self._last)), end="", file=sys.stderr, flush=True)
            self._last = line

    def close(self) -> None:
        if self._enabled and self._last:
            print(file=sys.stderr, flush=True)


def cmd_storage_deal(args: argparse.Namespace) -> int:
    provider = _cli._address_arg(args.provider, "--provider")
    if args.epochs <= 0:
        raise _cli.CliError("--epochs: expected a positive number of epochs")
    if args.timeout <= 0:
        raise _cli.CliError("--timeout: expected a positive number of seconds")
    request: dict[str, Any] = {
        "root": args.cid,
        "provider": _cli._hex(provider),
        "epochs": args.epochs,
    }
    if args.provider_peer:
        request["providerPeer"] = args.provider_peer
    if args.price_per_epoch is not None:
        request["pricePerEpoch"] = str(
            _cli.parse_nsd(args.price_per_epoch, what="--price-per-epoch")
        )
    if args.collateral is not None:
        request["collateral"] = str(
            _cli.parse_nsd(args.collateral, what="--collateral", allow_zero=True)
        )
    bar = _ProgressBar("sending replica", enabled=not args.json and sys.stderr.isatty())
    deadline = time.monotonic() + args.timeout
    with _cli._client(args) as client:
        job = client.call("ns_proposeDeal", [request])
        try:
            while not job.get("done"):
                if time.monotonic() > deadline:
                    raise _cli.CliError(
                        f"the deal job {job.get('jobId')} is still {job.get('state')} after "
                        f"{args.timeout:g} s (it goes on in the node; see `storage status`)"
                    )
                bar.update(
                    int(job.get("sentBytes") or 0),
                    int(job.get("totalBytes") or 0),
                    str(job.get("state")),
                )
                time.sleep(POLL_INTERVAL_S)
                job = client.call("ns_getDealJob", [job["jobId"]])
            bar.update(
                int(job.get("sentBytes") or 0),
                int(job.get("totalBytes") or 0),
                str(job.get("state")),
            )
        finally:
            bar.close()
        error = job.get("error")
        if error:
            raise _cli.CliError(
                f"the deal failed: {error.get('message')} (code {error.get('code')})"
            )
        receipt = None
        tx_id = job.get("txId")
        if not args.no_wait and tx_id:
            if not args.json:
                print(f"DealCreate {tx_id} sent; waiting until it is final", file=sys.stderr)
            receipt = client.wait_for_receipt(tx_id, timeout=max(1.0, deadline - time.monotonic()))
    if args.json:
        _cli._print_json(
            {
                "dealId": job.get("dealId"),
                "txId": tx_id,
                "terms": job.get("terms"),
                "receipt": receipt,
            }
        )
    else:
        terms = job.get("terms") or {}
        rows: list[tuple[str, object]] = [
            ("deal id", job.get("dealId")),
            ("tx id", tx_id),
            ("provider", to_checksum(provider)),
            ("epochs", terms.get("epochs")),
            ("price per epoch", _nsd_text(terms.get("pricePerEpoch"))),
            ("collateral", _nsd_text(terms.get("collateral"))),
            ("replica", format_size(int(terms.get("replicaSize") or 0))),
        ]
        if receipt is not None:
            rows.append(("status", "final" if receipt.get("success") else "failed"))
        print(_cli._rows(rows))
    if receipt is not None and not receipt.get("success"):
        raise _cli.CliError(f"the DealCreate {tx_id} failed: {receipt.get('error') or 'no reason'}")
    return _cli.EXIT_OK


def _nsd_text(units: object) -> str:
    return "?" if units is None else f"{_cli.format_nsd(int(str(units)))} NSD"


# --- status --------------------------------------------------------------------------------------


def _deal_rows(deal: dict[str, Any]) -> list[tuple[str, object]]:
    terms = deal["terms"]
    rows: list[tuple[str, object]] = [
        ("deal id", deal["dealId"]),
        ("state", deal["state"]),
        ("root", terms.get("rootCid") or terms["root"]),
        ("owner", terms["owner"]),
        ("provider", terms["provider"]),
        ("epochs paid", f"{deal['epochsPaid']} of {terms['epochs']}"),
        ("paid", _nsd_text(deal["paid"])),
        ("escrow left", _nsd_text(deal["escrow"])),
        ("collateral", _nsd_text(deal["collateralLocked"])),
        ("started", deal["startHeight"]),
    ]
    ch = deal.get("challenge")
    if ch is not None and ch.get("open"):
        rows.append(("challenge", f"epoch {ch['epoch']}, due at height {ch['dueHeight']}"))
    elif ch is not None:
        rows.append(("missed challenge", f"epoch {ch['epoch']}, due at height {ch['dueHeight']}"))
    if deal["endHeight"]:
        rows.append(("ended", deal["endHeight"]))
    elif deal["nextBoundary"]:
        rows.append(("epoch ends", deal["nextBoundary"]))
    return rows


def cmd_storage_status(args: argparse.Namespace) -> int:
    with _cli._client(args) as client:
        if args.deal_id:
            deal = client.call("ns_getDeal", [args.deal_id])
            if deal is None:
                raise _cli.CliError(f"no deal {args.deal_id} on chain")
            if args.json:
                _cli._print_json(deal)
            else:
                print(_cli._rows(_deal_rows(deal)))
            return _cli.EXIT_OK
        info = None
        if args.provider is None and args.owner is None:
            info = client.call("ns_storageInfo", [])
        address = info["address"] if info is not None else None
        provider = (
            _cli._hex(_cli._address_arg(args.provider, "--provider")) if args.provider else address
        )
        owner = _cli._hex(_cli._address_arg(args.owner, "--owner")) if args.owner else address
        offer = client.call("ns_getOffer", [provider]) if provider else None
        as_provider = (
            client.call("ns_listDeals", [{"provider": provider, "limit": args.limit}])["deals"]
            if provider
            else []
        )
        as_owner = (
            client.call("ns_listDeals", [{"owner": owner, "limit": args.limit}])["deals"]
            if owner
            else []
        )
    if args.json:
        _cli._print_json(
            {"agent": info, "offer": offer, "asProvider": as_provider, "asOwner": as_owner}
        )
        return _cli.EXIT_OK
    rows: list[tuple[str, object]] = []
    if info is not None:
        rows += [
            ("operator", info["address"]),
            ("replicas kept", len(info["replicas"])),
            ("uploads", info["uploads"]),
        ]
    if offer is not None:
        rows += [
            (
                "offer",
                f"{format_size(offer['capacityBytes'])} at "
                f"{_nsd_text(offer['pricePerGibEpoch'])} per GiB-epoch",
            ),
            ("in use", f"{format_size(offer['bytesInUse'])} in {offer['liveDeals']} deals"),
        ]
    elif provider:
        rows.append(("offer", "none"))
    if rows:
        print(_cli._rows(rows))
    for title, deals in (("as provider", as_provider), ("as owner", as_owner)):
        print(f"\ndeals {title}: {len(deals)}")
        for deal in deals:
            ch = deal.get("challenge")
            open_ch = f", challenge due {ch['dueHeight']}" if ch and ch.get("open") else ""
            print(
                f"  {deal['dealId']}  {deal['state']:<9} paid {deal['epochsPaid']}/"
                f"{deal['terms']['epochs']}{open_ch}"
            )
    return _cli.EXIT_OK


# --- registration --------------------------------------------------------------------------------


def register(commands: Any) -> None:
    """Add ``storage …`` to the top-level subcommands of ``node.cli.build_parser``."""
    storage = commands.add_parser("storage", help="storage offers and deals")
    _cli._add_global_options(storage, top=False)
    sub = storage.add_subparsers(dest="storage_command", metavar="ACTION", required=True)

    def command(name: str, handler: Any, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        _cli._add_global_options(p, top=False)
        p.set_defaults(handler=handler)
        return p

    p = command("offer", cmd_storage_offer, "publish or replace your storage offer")
    p.add_argument(
        "--capacity",
        metavar="SIZE",
        required=True,
        help="replica bytes you accept across live deals (e.g. 100GiB)",
    )
    p.add_argument(
        "--price-per-gib-epoch",
        metavar="NSD",
        required=True,
        help="least price per GiB of replica per epoch",
    )
    p.add_argument(
        "--collateral-per-gib",
        metavar="NSD",
        required=True,
        help="least collateral per GiB of replica you lock per deal",
    )
    p.add_argument(
        "--max-epochs",
        metavar="N",
        type=int,
        default=1000,
        help="longest deal you accept, in epochs (default 1000)",
    )
    _cli._add_sender_options(p)
    p = command("withdraw", cmd_storage_withdraw, "remove your storage offer (deals go on)")
    _cli._add_sender_options(p)

    p = command(
        "deal",
        cmd_storage_deal,
        "make a storage deal for an artifact the local node holds (signed by the node's "
        "operator account)",
    )
    p.add_argument("cid", metavar="CID", help="root CID of the artifact")
    p.add_argument("--provider", metavar="ADDRESS", required=True, help="the provider's account")
    p.add_argument("--epochs", metavar="N", type=int, required=True, help="deal length in epochs")
    p.add_argument(
        "--provider-peer",
        metavar="PEER",
        help="the provider's libp2p peer id (default: ask the connected peers)",
    )
    p.add_argument(
        "--price-per-epoch",
        metavar="NSD",
        help="price per epoch (default: the least the offer accepts)",
    )
    p.add_argument(
        "--collateral",
        metavar="NSD",
        help="collateral asked of the provider (default: the least allowed)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the DealCreate is sent, without waiting for finality",
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=DEFAULT_DEAL_TIMEOUT,
        help=f"seconds to wait in all (default {DEFAULT_DEAL_TIMEOUT:g})",
    )

    p = command(
        "status", cmd_storage_status, "show a deal, or the local node's offer, replicas and deals"
    )
    p.add_argument("deal_id", metavar="DEAL_ID", nargs="?", help="a deal id (0x…)")
    p.add_argument("--provider", metavar="ADDRESS", help="list the deals of this provider")
    p.add_argument("--owner", metavar="ADDRESS", help="list the deals of this owner")
    p.add_argument("--limit", metavar="N", type=int, default=20, help="deals per list (max 100)")

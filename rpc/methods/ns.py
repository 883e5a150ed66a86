"""The native ``ns_*`` methods, and the one JSON shape of blocks, transactions and receipts.

Shapes (``docs/rpc.md``): hashes, addresses and bytes are ``0x``-prefixed lowercase hex; amounts
(``Amount`` fields: balances, fees) are decimal strings of base units; heights, nonces, kinds,
times (ms) and counts are JSON numbers; record fields are camelCase.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Protocol

from node import crypto
from node.api import ChainReadView, NodeStatus, StateProof, ViewState
from node.consensus import fees
from node.consensus.blocks import Block
from node.consensus.receipts import Receipt, ReceiptStatus
from node.consensus.state import EMPTY_ACCOUNT, Account, account_key
from node.consensus.txs import (
    MAX_TX_BYTES_HARD,
    TxKind,
    decode_body,
    decode_transaction,
    recover_sender,
    verify_transaction,
)
from node.economy.api import EconomyKind
from node.encoding import Record
from node.errors import InvalidTransaction
from node.types import NSD, UINT64_MAX, Address, Amount
from rpc.methods import Context, MethodTable
from rpc.schema import (
    EARLIEST,
    BlockTag,
    Params,
    bad_param,
    parse_address,
    parse_block_tag,
    parse_bool,
    parse_hash,
    parse_hex_bytes,
    parse_quantity,
    to_hex,
)

MAX_STATE_KEY_BYTES = 1024

# --- JSON shapes ---------------------------------------------------------------------------------


def format_nsd(amount: int) -> str:
    """Base units as a decimal NSD string with exactly 18 decimals (``"1.500000000000000000"``)."""
    return f"{amount // NSD}.{amount % NSD:018d}"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _field_codec(tp: Any) -> Any:
    """A function value -> JSON for one declared field type (see the module docstring)."""
    if tp is Amount:
        return str
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        enc = _field_codec(inner)
        return lambda v: None if v is None else enc(v)
    if origin is tuple:
        enc = _field_codec(typing.get_args(tp)[0])
        return lambda v: [enc(x) for x in v]
    if isinstance(tp, type) and issubclass(tp, Record):
        return record_to_json
    supertype = getattr(tp, "__supertype__", tp)
    if supertype is bytes:
        return to_hex
    return lambda v: v  # int, bool, str and the int NewTypes


_RECORD_CODECS: dict[type[Record], tuple[tuple[str, str, Any], ...]] = {}


def _record_codec(cls: type[Record]) -> tuple[tuple[str, str, Any], ...]:
    codec = _RECORD_CODECS.get(cls)
    if codec is None:
        hints = typing.get_type_hints(cls)
        codec = tuple(
            (f.name, _camel(f.name), _field_codec(hints[f.name]))
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        )
        _RECORD_CODECS[cls] = codec
    return codec


def record_to_json(record: Record) -> dict[str, Any]:
    """Any record as a JSON object: camelCase fields, hex bytes, decimal-string amounts."""
    return {key: enc(getattr(record, name)) for name, key, enc in _record_codec(type(record))}


def _kind_name(kind: int) -> str | None:
    for kinds in (TxKind, EconomyKind):
        try:
            return kinds(kind).name.lower()
        except ValueError:
            continue
    return None


class Located(Protocol):
    """Where a transaction is: ``node.api.TxLocation`` or a position inside a fetched block."""

    @property
    def block_hash(self) -> bytes: ...

    @property
    def height(self) -> int: ...

    @property
    def index(self) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class _InBlock:
    block_hash: bytes
    height: int
    index: int


def transaction_to_json(raw: bytes, location: Located | None = None) -> dict[str, Any]:
    """A stored transaction: id, sender, envelope, decoded body, raw bytes and where it is."""
    signed = decode_transaction(raw)
    tx = signed.tx
    try:
        body: dict[str, Any] | None = record_to_json(decode_body(tx))
    except InvalidTransaction:
        body = None  # not in a valid block; the raw bytes are still shown
    try:
        sender: str | None = to_hex(recover_sender(signed))
    except InvalidTransaction:
        sender = None  # not in a valid block
    out: dict[str, Any] = {
        "id": to_hex(crypto.sha256(raw)),
        "from": sender,
        "chainId": tx.chain_id,
        "nonce": tx.nonce,
        "fee": str(tx.fee),
        "kind": tx.kind,
        "kindName": _kind_name(tx.kind),
        "body": body,
        "signature": to_hex(signed.signature),
        "size": len(raw),
        "raw": to_hex(raw),
    }
    if location is not None:
        out["blockHash"] = to_hex(location.block_hash)
        out["height"] = location.height
        out["index"] = location.index
    return out


# Event attributes that hold uint256 amounts: shown as decimal strings of base units, like every
# other amount in the API (the raw value is 32-byte big-endian).
AMOUNT_ATTRIBUTES = frozenset({"amount", "burned", "tip"})


def receipt_to_json(receipt: Receipt, location: Located | None = None) -> dict[str, Any]:
    out = record_to_json(receipt)
    for event_json, event in zip(out["events"], receipt.events, strict=True):
        for attr_json, attr in zip(event_json["attributes"], event.attributes, strict=True):
            if attr.key in AMOUNT_ATTRIBUTES and len(attr.value) == 32:
                attr_json["value"] = str(int.from_bytes(attr.value, "big"))
    out["success"] = receipt.status == ReceiptStatus.SUCCESS
    if location is not None:
        out["blockHash"] = to_hex(location.block_hash)
        out["height"] = location.height
        out["index"] = location.index
    return out


def block_to_json(block: Block, *, full_transactions: bool = False) -> dict[str, Any]:
    """Header fields, hash, size, transactions (ids, or full objects) and the last commit's signers."""
    block_hash = block.hash()
    out = record_to_json(block.header)
    out["hash"] = to_hex(block_hash)
    out["size"] = len(block.encode())
    if full_transactions:
        out["transactions"] = [
            transaction_to_json(raw, _InBlock(block_hash, block.header.height, i))
            for i, raw in enumerate(block.txs)
        ]
    else:
        out["transactions"] = [to_hex(crypto.sha256(raw)) for raw in block.txs]
    out["evidenceCount"] = len(block.evidence)
    commit = block.last_commit
    out["lastCommit"] = (
        None
        if commit is None
        else {
            "height": commit.height,
            "round": commit.round,
            "blockHash": to_hex(commit.block_hash),
            "signers": [to_hex(v.vote.validator) for v in commit.precommits],
        }
    )
    return out


def account_to_json(address: Address, account: Account) -> dict[str, Any]:
    return {
        "address": to_hex(address),
        "nonce": account.nonce,
        "balance": str(account.balance),
        "balanceNSD": format_nsd(account.balance),
    }


def proof_to_json(proof: StateProof) -> dict[str, Any]:
    return {
        "key": to_hex(proof.key),
        "value": None if proof.value is None else to_hex(proof.value),
        "height": proof.height,
        "stateRoot": to_hex(proof.state_root),
        "proof": to_hex(proof.proof),
    }


def status_to_json(status: NodeStatus) -> dict[str, Any]:
    return {
        "chainId": status.chain_id,
        "nodeVersion": status.node_version,
        "headHeight": status.head_height,
        "headHash": to_hex(status.head_hash),
        "headTime": status.head_time_ms,
        "validatorAddress": (
            None if status.validator_address is None else to_hex(status.validator_address)
        ),
        "isValidator": status.is_validator,
        "mempoolSize": status.mempool_size,
        "mempoolBytes": status.mempool_bytes,
        "peers": status.peers,
        "syncing": status.syncing,
        "finalizedHeight": status.finalized_height,
        "consensusHeight": status.consensus_height,
        "round": status.round,
        "validators": [{"address": to_hex(a), "power": p} for a, p in status.validators],
    }


# --- shared helpers ------------------------------------------------------------------------------


def head_height(view: ChainReadView) -> int:
    """The latest committed height; 0 before the first block."""
    return 0 if view.head is None else int(view.head.height)


def resolve_height(view: ChainReadView, tag: BlockTag) -> int | None:
    """A block tag as a height; ``None`` means the latest state (``latest``/``pending``)."""
    if tag.height is not None:
        return tag.height
    if tag.tag == EARLIEST:
        return 0
    return None


def account_at(view: ChainReadView, address: Address, tag: BlockTag) -> Account:
    """The account at a tag: the head view for latest, the height's proven state otherwise."""
    height = resolve_height(view, tag)
    if height is None or (view.head is not None and height == view.head.height):
        return view.get_account(address)
    value = view.get_proof(account_key(address), height).value
    return EMPTY_ACCOUNT if value is None else Account.decode(value)


# --- handlers ------------------------------------------------------------------------------------


def ns_chain_id(ctx: Context, params: Any) -> int:
    Params(params, ())
    return int(ctx.node.read_view().chain.chain_id)


def ns_block_number(ctx: Context, params: Any) -> int:
    Params(params, ())
    return head_height(ctx.node.read_view())


def ns_get_block_by_number(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("number", "fullTransactions"), required=0)
    tag = parse_block_tag(p.get(0, "latest"), "number")
    full = parse_bool(p.get(1, False), "fullTransactions")
    view = ctx.node.read_view()
    height = resolve_height(view, tag)
    if height is None:
        if view.head is None:
            return None
        height = int(view.head.height)
    block = view.get_block(height)
    return None if block is None else block_to_json(block, full_transactions=full)


def ns_get_block_by_hash(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("hash", "fullTransactions"), required=1)
    block_hash = parse_hash(p[0], "hash")
    full = parse_bool(p.get(1, False), "fullTransactions")
    block = ctx.node.read_view().get_block_by_hash(block_hash)
    return None if block is None else block_to_json(block, full_transactions=full)


def ns_get_transaction(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("txId",))
    loc = ctx.node.read_view().get_transaction(parse_hash(p[0], "txId"))
    return None if loc is None else transaction_to_json(loc.raw, loc)


def ns_get_receipt(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("txId",))
    loc = ctx.node.read_view().get_transaction(parse_hash(p[0], "txId"))
    return None if loc is None else receipt_to_json(loc.receipt, loc)


def ns_get_account(ctx: Context, params: Any) -> dict[str, Any]:
    p = Params(params, ("address",))
    address = parse_address(p[0], "address")
    return account_to_json(address, ctx.node.read_view().get_account(address))


def ns_get_proof(ctx: Context, params: Any) -> dict[str, Any]:
    p = Params(params, ("key", "height"), required=1)
    key = parse_hex_bytes(p[0], "key", max_length=MAX_STATE_KEY_BYTES)
    if not key:
        raise bad_param("key", "must not be empty")
    tag = parse_block_tag(p.get(1, "latest"), "height")
    view = ctx.node.read_view()
    return proof_to_json(view.get_proof(key, resolve_height(view, tag)))


async def ns_send_raw_transaction(ctx: Context, params: Any) -> str:
    p = Params(params, ("raw",))
    raw = parse_hex_bytes(p[0], "raw", max_length=MAX_TX_BYTES_HARD)
    if not raw:
        raise bad_param("raw", "must not be empty")
    return to_hex(await ctx.bridge.call(ctx.node.submit_transaction, raw))


def ns_estimate_fee(ctx: Context, params: Any) -> str:
    """The consensus cost (minimum fee) of a transaction under the latest params.

    ``tx`` is the hex of a signed transaction (its fee may be 0: the encoded size does not depend
    on the fee, which is a fixed-width uint256), or ``{"kind", "size", "newAccounts"?}``.
    """
    p = Params(params, ("tx",))
    view = ctx.node.read_view()
    arg = p[0]
    if isinstance(arg, dict):
        unknown = set(arg) - {"kind", "size", "newAccounts"}
        if unknown:
            raise bad_param("tx", f"unknown field {sorted(unknown)[0]!r}")
        for required in ("kind", "size"):
            if required not in arg:
                raise bad_param(f"tx.{required}", "missing")
        kind = parse_quantity(arg["kind"], "tx.kind")
        size = parse_quantity(arg["size"], "tx.size", maximum=MAX_TX_BYTES_HARD)
        new_accounts = parse_quantity(
            arg.get("newAccounts", 0), "tx.newAccounts", maximum=UINT64_MAX
        )
        return str(fees.compute_cost(view.params, kind, size, new_accounts=new_accounts))
    if not isinstance(arg, str):
        raise bad_param("tx", "expected the hex of a signed transaction or {kind, size}")
    raw = parse_hex_bytes(arg, "tx", max_length=MAX_TX_BYTES_HARD)
    vtx = verify_transaction(raw, view.params.max_tx_bytes)  # typed InvalidTransaction errors
    return str(fees.cost_of(view.params, ViewState(view), vtx))


async def ns_status(ctx: Context, params: Any) -> dict[str, Any]:
    Params(params, ())
    return status_to_json(await ctx.bridge.call(ctx.node.status))


async def ns_pending_nonce(ctx: Context, params: Any) -> int:
    p = Params(params, ("address",))
    address = parse_address(p[0], "address")
    return await ctx.bridge.call(ctx.node.pending_nonce, address)


def register(table: MethodTable) -> None:
    table.add("ns_chainId", ns_chain_id)
    table.add("ns_blockNumber", ns_block_number)
    table.add("ns_getBlockByNumber", ns_get_block_by_number)
    table.add("ns_getBlockByHash", ns_get_block_by_hash)
    table.add("ns_getTransaction", ns_get_transaction)
    table.add("ns_getReceipt", ns_get_receipt)
    table.add("ns_getAccount", ns_get_account)
    table.add("ns_getProof", ns_get_proof)
    table.add("ns_sendRawTransaction", ns_send_raw_transaction)
    table.add("ns_estimateFee", ns_estimate_fee)
    table.add("ns_status", ns_status)
    table.add("ns_pendingNonce", ns_pending_nonce)

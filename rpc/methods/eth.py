"""The read-only Ethereum-compatible layer: ``eth_chainId``, ``net_version``, ``eth_blockNumber``,
``eth_getBalance`` and ``eth_getTransactionCount`` (DESIGN §11).

Quantities are hex as Ethereum wallets expect; a balance in wei is NSD base units (both have 18
decimals). Addresses are the same 20-byte keccak addresses as Ethereum's.
"""

from __future__ import annotations

from typing import Any

from rpc.methods import Context, MethodTable
from rpc.methods.ns import account_at, head_height
from rpc.schema import PENDING, Params, parse_address, parse_block_tag, to_quantity


def eth_chain_id(ctx: Context, params: Any) -> str:
    Params(params, ())
    return to_quantity(ctx.node.read_view().chain.chain_id)


def net_version(ctx: Context, params: Any) -> str:
    Params(params, ())
    return str(ctx.node.read_view().chain.chain_id)


def eth_block_number(ctx: Context, params: Any) -> str:
    Params(params, ())
    return to_quantity(head_height(ctx.node.read_view()))


def eth_get_balance(ctx: Context, params: Any) -> str:
    p = Params(params, ("address", "block"), required=1)
    address = parse_address(p[0], "address")
    tag = parse_block_tag(p.get(1, "latest"), "block")
    return to_quantity(account_at(ctx.node.read_view(), address, tag).balance)


async def eth_get_transaction_count(ctx: Context, params: Any) -> str:
    """The account nonce at a block; ``"pending"`` counts the node's mempool (crosses the bridge)."""
    p = Params(params, ("address", "block"), required=1)
    address = parse_address(p[0], "address")
    tag = parse_block_tag(p.get(1, "latest"), "block")
    if tag.tag == PENDING:
        return to_quantity(await ctx.bridge.call(ctx.node.pending_nonce, address))
    return to_quantity(account_at(ctx.node.read_view(), address, tag).nonce)


def register(table: MethodTable) -> None:
    table.add("eth_chainId", eth_chain_id)
    table.add("net_version", net_version)
    table.add("eth_blockNumber", eth_block_number)
    table.add("eth_getBalance", eth_get_balance)
    table.add("eth_getTransactionCount", eth_get_transaction_count)

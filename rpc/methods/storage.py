"""Storage offers and deals over JSON-RPC (DESIGN §9; ``docs/storage-deals.md``).

Reads answer from the committed read view in the RPC thread: ``ns_getOffer``, ``ns_getDeal``,
``ns_listDeals``. Local-only methods make this node's storage agent (``node.storage_agent``)
work or show its local state, and cross the bridge: ``ns_proposeDeal`` (starts a deal
negotiation job: build the replica, send it, get the provider's signature, submit the
DealCreate), ``ns_getDealJob`` (its progress), ``ns_storageInfo`` (the agent's account, offer,
free capacity and the replicas it keeps). The node exposes its agent as ``node.storage_agent``
(None when it runs none).

Shapes follow ``rpc.methods.ns``: hex bytes, decimal-string amounts, camelCase fields.
"""

from __future__ import annotations

from typing import Any

from node.api import ViewState
from node.economy import deals as dl
from node.storage_agent import DealJob, StorageAgent, StorageAgentDisabled
from node.types import Address, Hash32
from rpc.methods import Context, MethodTable
from rpc.schema import (
    Params,
    bad_param,
    parse_address,
    parse_amount,
    parse_hash,
    parse_hex_bytes,
    parse_quantity,
    parse_str,
    to_hex,
)

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
# State entries one ns_listDeals call may read: a filter that matches few deals returns fewer
# than ``limit`` with a cursor to go on from, instead of scanning the whole prefix in one call.
MAX_LIST_SCAN = 10_000
MAX_PEER_ID_BYTES = 128


# --- JSON shapes ---------------------------------------------------------------------------------


def terms_to_json(terms: dl.DealTerms) -> dict[str, Any]:
    return {
        "root": to_hex(terms.root),
        "rootCid": _cid_text(terms.root),
        "owner": to_hex(terms.owner),
        "provider": to_hex(terms.provider),
        "replicaRoot": to_hex(terms.replica_root),
        "replicaSize": terms.replica_size,
        "segmentCount": terms.segment_count,
        "fileSize": terms.file_size,
        "epochs": terms.epochs,
        "pricePerEpoch": str(terms.price_per_epoch),
        "collateral": str(terms.collateral),
        "dealNonce": to_hex(terms.deal_nonce),
        "sigExpiryHeight": terms.sig_expiry_height,
    }


def deal_to_json(deal_id: Hash32, deal: dl.Deal) -> dict[str, Any]:
    ch = deal.challenge
    state = dl.DealState(deal.state)
    return {
        "dealId": to_hex(deal_id),
        "state": state.name.lower(),
        "terms": terms_to_json(deal.terms),
        "startHeight": deal.start_height,
        "epochsPaid": deal.epochs_paid,
        "paid": str(deal.epochs_paid * deal.terms.price_per_epoch),
        "escrow": str(deal.escrow),
        "collateralLocked": str(deal.collateral),
        "nextBoundary": deal.next_boundary,
        "endHeight": deal.end_height,
        # While active: the open challenge; once slashed: the challenge that was missed.
        "challenge": None
        if ch is None
        else {
            "epoch": ch.epoch,
            "indexes": list(ch.indexes),
            "issuedHeight": ch.issued_height,
            "dueHeight": ch.due_height,
            "open": state == dl.DealState.ACTIVE,
        },
    }


def offer_to_json(offer: dl.Offer, load: dl.ProviderLoad) -> dict[str, Any]:
    return {
        "provider": to_hex(offer.provider),
        "capacityBytes": offer.capacity_bytes,
        "pricePerGibEpoch": str(offer.price_per_gib_epoch),
        "collateralPerGib": str(offer.collateral_per_gib),
        "maxEpochs": offer.max_epochs,
        "height": offer.height,
        "liveDeals": load.live_deals,
        "bytesInUse": load.bytes_in_use,
        "freeBytes": max(0, offer.capacity_bytes - load.bytes_in_use),
    }


def job_to_json(job: DealJob) -> dict[str, Any]:
    return {
        "jobId": job.job_id,
        "state": job.state.value,
        "done": job.done.is_set(),
        "root": to_hex(job.root),
        "provider": to_hex(job.provider),
        "epochs": job.epochs,
        "sentBytes": job.sent_bytes,
        "totalBytes": job.total_bytes,
        "dealId": None if job.deal_id is None else to_hex(job.deal_id),
        "txId": None if job.tx_id is None else to_hex(job.tx_id),
        "terms": None if job.terms is None else terms_to_json(job.terms),
        "error": None
        if job.error_code is None
        else {"code": job.error_code, "message": job.error_message},
    }


def _cid_text(root: bytes) -> str | None:
    from node.errors import DecodeError
    from node.storage.unixfs import parse_cid

    try:
        return str(parse_cid(root))
    except DecodeError:
        return None


# --- reads -------------------------------------------------------------------------------------


def ns_get_offer(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("provider",))
    provider = parse_address(p[0], "provider")
    state = ViewState(ctx.node.read_view())
    offer = dl.get_offer(state, provider)
    return None if offer is None else offer_to_json(offer, dl.get_provider_load(state, provider))


def ns_get_deal(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("dealId",))
    deal_id = parse_hash(p[0], "dealId")
    deal = dl.get_deal(ViewState(ctx.node.read_view()), deal_id)
    return None if deal is None else deal_to_json(deal_id, deal)


def ns_list_deals(ctx: Context, params: Any) -> dict[str, Any]:
    """``{provider?, owner?, state?, cursor?, limit?}`` -> ``{deals, cursor}``: deals in id
    order; ``cursor`` (the last id read) continues the listing, null at the end."""
    p = Params(params, ("filter",), required=0)
    raw = p.get(0, {})
    if not isinstance(raw, dict):
        raise bad_param("filter", "expected an object {provider?, owner?, state?, cursor?, limit?}")
    unknown = set(raw) - {"provider", "owner", "state", "cursor", "limit"}
    if unknown:
        raise bad_param("filter", f"unknown field {sorted(unknown)[0]!r}")
    provider = parse_address(raw["provider"], "filter.provider") if "provider" in raw else None
    owner = parse_address(raw["owner"], "filter.owner") if "owner" in raw else None
    state_name = None
    if "state" in raw:
        state_name = parse_str(
            raw["state"], "filter.state", choices=[s.name.lower() for s in dl.DealState]
        )
    cursor = parse_hash(raw["cursor"], "filter.cursor") if "cursor" in raw else None
    limit = parse_quantity(raw.get("limit", DEFAULT_LIST_LIMIT), "filter.limit")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_param("filter.limit", f"expected 1..{MAX_LIST_LIMIT}")
    view = ctx.node.read_view()
    deals, next_cursor = list_deals(
        view, provider=provider, owner=owner, state=state_name, cursor=cursor, limit=limit
    )
    return {
        "deals": [deal_to_json(deal_id, deal) for deal_id, deal in deals],
        "cursor": None if next_cursor is None else to_hex(next_cursor),
    }


def list_deals(
    view: Any,
    *,
    provider: Address | None = None,
    owner: Address | None = None,
    state: str | None = None,
    cursor: Hash32 | None = None,
    limit: int = DEFAULT_LIST_LIMIT,
    max_scan: int = MAX_LIST_SCAN,
) -> tuple[list[tuple[Hash32, dl.Deal]], Hash32 | None]:
    """Deals after ``cursor`` matching the filters, at most ``limit``, reading at most
    ``max_scan`` state entries; and the cursor to go on from (None when the end was reached)."""
    iterate = getattr(view, "iter_state", None)
    if iterate is None:
        raise StorageAgentDisabled("this node's read view cannot list state (no iter_state)")
    prefix = dl.deal_key(Hash32(b""))
    after = None if cursor is None else dl.deal_key(cursor)
    found: list[tuple[Hash32, dl.Deal]] = []
    last: Hash32 | None = None
    for scanned, (key, value) in enumerate(iterate(prefix, after=after), 1):
        deal_id = Hash32(bytes(key[len(prefix) :]))
        last = deal_id
        deal = dl.Deal.decode(value)
        if (
            (provider is None or deal.terms.provider == provider)
            and (owner is None or deal.terms.owner == owner)
            and (state is None or dl.DealState(deal.state).name.lower() == state)
        ):
            found.append((deal_id, deal))
            if len(found) == limit:
                return found, deal_id
        if scanned >= max_scan:
            return found, last
    return found, None


# --- local-only: the node's storage agent ----------------------------------------------------------


def _agent(ctx: Context) -> StorageAgent:
    agent = getattr(ctx.node, "storage_agent", None)
    if agent is None:
        raise StorageAgentDisabled(
            "this node runs no storage agent (configure an operator account)"
        )
    assert isinstance(agent, StorageAgent)
    return agent


async def ns_propose_deal(ctx: Context, params: Any) -> dict[str, Any]:
    """Start a deal for an artifact held by this node: ``{root, provider, epochs,
    providerPeer?, pricePerEpoch?, collateral?}``; returns the job (poll ``ns_getDealJob``)."""
    p = Params(params, ("deal",))
    raw = p[0]
    if not isinstance(raw, dict):
        raise bad_param("deal", "expected an object {root, provider, epochs, ...}")
    allowed = {"root", "provider", "epochs", "providerPeer", "pricePerEpoch", "collateral"}
    unknown = set(raw) - allowed
    if unknown:
        raise bad_param("deal", f"unknown field {sorted(unknown)[0]!r}")
    for required in ("root", "provider", "epochs"):
        if required not in raw:
            raise bad_param(f"deal.{required}", "missing")
    root = _parse_root(raw["root"])
    provider = parse_address(raw["provider"], "deal.provider")
    epochs = parse_quantity(raw["epochs"], "deal.epochs")
    if epochs == 0:
        raise bad_param("deal.epochs", "must be positive")
    peer = None
    if "providerPeer" in raw:
        peer = _parse_peer(raw["providerPeer"])
    price = (
        parse_amount(raw["pricePerEpoch"], "deal.pricePerEpoch") if "pricePerEpoch" in raw else None
    )
    collateral = parse_amount(raw["collateral"], "deal.collateral") if "collateral" in raw else None
    agent = _agent(ctx)

    async def start() -> dict[str, Any]:
        job = agent.start_deal(
            root,
            provider,
            epochs,
            provider_peer=peer,
            price_per_epoch=price,
            collateral=collateral,
        )
        return job_to_json(job)

    return await ctx.bridge.call(start)


async def ns_get_deal_job(ctx: Context, params: Any) -> dict[str, Any]:
    p = Params(params, ("jobId",))
    job_id = parse_str(p[0], "jobId")
    if not 1 <= len(job_id) <= 64:
        raise bad_param("jobId", "expected a job id from ns_proposeDeal")
    agent = _agent(ctx)

    async def status() -> dict[str, Any]:
        return job_to_json(agent.job_status(job_id))

    return await ctx.bridge.call(status)


async def ns_storage_info(ctx: Context, params: Any) -> dict[str, Any]:
    """This node's agent: its account, whether it holds an offer, free capacity, the replicas it
    keeps (deal ids) and the uploads in progress."""
    Params(params, ())
    agent = _agent(ctx)

    async def info() -> dict[str, Any]:
        provider = agent.provider_info()
        return {
            "address": to_hex(agent.address),
            "hasOffer": provider.has_offer,
            "freeBytes": provider.free_bytes,
            "replicas": [to_hex(d) for d in sorted(agent.local_deals())],
            "uploads": agent.upload_count(),
            "headSeen": agent.last_head,
        }

    return await ctx.bridge.call(info)


def _parse_root(value: Any) -> bytes:
    """A root CID as text (``bafy…``) or as 0x hex of the binary CID."""
    from node.errors import DecodeError
    from node.storage.unixfs import parse_cid

    if isinstance(value, str) and value.startswith(("0x", "0X")):
        raw = parse_hex_bytes(value, "deal.root", max_length=dl.MAX_CID_BYTES)
        try:
            return bytes(parse_cid(raw))
        except DecodeError as exc:
            raise bad_param("deal.root", f"not a binary CID: {exc.message}") from exc
    if not isinstance(value, str) or len(value) > 200:
        raise bad_param("deal.root", "expected a CID (bafy…) or the 0x hex of a binary CID")
    try:
        return bytes(parse_cid(value))
    except DecodeError as exc:
        raise bad_param("deal.root", exc.message) from exc


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _parse_peer(value: Any) -> Any:
    """A libp2p peer id: its base58 text as libp2p prints it (``16Uiu2…``), or 0x hex."""
    from node.p2p.api import PeerId

    name = "deal.providerPeer"
    if isinstance(value, str) and value.startswith(("0x", "0X")):
        return PeerId(parse_hex_bytes(value, name, max_length=MAX_PEER_ID_BYTES))
    if not isinstance(value, str) or not 1 <= len(value) <= 2 * MAX_PEER_ID_BYTES:
        raise bad_param(name, "expected a peer id (base58 or 0x hex)")
    n = 0
    for ch in value:
        digit = _B58.find(ch)
        if digit < 0:
            raise bad_param(name, f"{ch!r} is not a base58 digit")
        n = n * 58 + digit
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    raw = b"\x00" * (len(value) - len(value.lstrip("1"))) + body
    if len(raw) > MAX_PEER_ID_BYTES:
        raise bad_param(name, "too long for a peer id")
    return PeerId(raw)


def register(table: MethodTable) -> None:
    table.add("ns_getOffer", ns_get_offer)
    table.add("ns_getDeal", ns_get_deal)
    table.add("ns_listDeals", ns_list_deals)
    table.add("ns_proposeDeal", ns_propose_deal, local_only=True)
    table.add("ns_getDealJob", ns_get_deal_job, local_only=True)
    table.add("ns_storageInfo", ns_storage_info, local_only=True)
